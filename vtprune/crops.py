"""How the vision tower's crops make up each image's visual tokens, and budgets shared among crops.

LLaVA-1.5 runs one crop per image and gives the LLM all of its tokens. LLaVA-NeXT runs a base crop
and up to several tiles per image, drops the tiles' padding and ends every row of the tile mosaic
with an `image_newline` token that no crop produced. Policies select per crop, among the crop tokens
that reach the LLM; newline tokens are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CropLayout:
    """Where each visual token the LLM gets comes from."""

    crop_tokens: int
    """Visual tokens of one crop (every crop the tower runs on has as many)."""
    crop_grid: tuple[int, int] | None
    """(rows, cols) of one crop's visual tokens, where they form a grid."""
    crops: tuple[int, ...]
    """Crops of each image, in the tower's order."""
    sources: tuple[torch.Tensor, ...]
    """Per image, `[n_tokens]`: for each visual token the LLM gets, `crop * crop_tokens + token` (crops
    numbered over the whole call), or -1 for a token no crop produced."""
    grids: tuple[tuple[int, int] | None, ...]
    """Per image, (rows, cols) of its token grid: the crop's, or LLaVA-NeXT's unpadded tile mosaic."""
    crop_grids: tuple[tuple[int, int] | None, ...] | None = None
    """Per crop, its own grid where crops differ in size (Qwen-VL images, each padded to `crop_tokens`)."""
    frames: tuple[int, ...] | None = None
    """Per video, its frame groups (temporal patches); None for images."""

    def crop_members(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Per crop of the call: (its image, the crop tokens that reach the LLM, their positions in the image)."""
        members, first = [], 0
        for image, (count, sources) in enumerate(zip(self.crops, self.sources, strict=True)):
            for crop in range(first, first + count):
                positions = ((sources >= crop * self.crop_tokens) & (sources < (crop + 1) * self.crop_tokens)).nonzero()
                positions = positions.squeeze(1)
                tokens = sources[positions] - crop * self.crop_tokens
                order = tokens.argsort()
                members.append((image, tokens[order], positions[order]))
            first += count
        return members

    def available(self) -> torch.Tensor:
        """`[crops, crop_tokens]` bool: the crop tokens that reach the LLM."""
        available = torch.zeros(sum(self.crops) * self.crop_tokens, dtype=torch.bool)
        for sources in self.sources:
            available[sources[sources >= 0]] = True
        return available.view(-1, self.crop_tokens)

    def sub_grid(self, tokens: torch.Tensor, crop: int) -> tuple[int, int] | None:
        """(rows, cols) of the rectangle these sorted tokens of `crop` fill on its grid, if they fill one."""
        grid = self.crop_grid if self.crop_grids is None else self.crop_grids[crop]
        if grid is None or len(tokens) == 0:
            return None
        cols = grid[1]
        rows, columns = tokens.div(cols, rounding_mode="floor").unique(), (tokens % cols).unique()
        return (len(rows), len(columns)) if len(rows) * len(columns) == len(tokens) else None


def share(keep: int, sizes: list[int]) -> list[int]:
    """Split `keep` tokens among crops of `sizes` tokens as evenly as they allow; the first crops take the remainder."""
    shares = [0] * len(sizes)
    left = min(keep, sum(sizes))
    open_crops = [crop for crop, size in enumerate(sizes) if size > 0]
    while left:
        each, extra = divmod(left, len(open_crops))
        for rank, crop in enumerate(open_crops):
            given = min(sizes[crop] - shares[crop], each + int(rank < extra))
            shares[crop] += given
            left -= given
        open_crops = [crop for crop in open_crops if shares[crop] < sizes[crop]]
    return shares

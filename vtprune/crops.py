"""How the vision tower's crops make up each image's visual tokens, and budgets shared among crops.

LLaVA-1.5 runs one crop per image and gives the LLM all of its tokens. LLaVA-NeXT runs a base crop
and up to several tiles per image, drops the tiles' padding and ends every row of the tile mosaic
with an `image_newline` token that no crop produced. LLaVA-OneVision may then interpolate the mosaic
down, and pools video frames, so one LLM token mixes several crop tokens. Policies select per group:
per crop, among the crop tokens that reach the LLM as they are, or among a group of resampled tokens,
whose signals are the same interpolation of their sources' signals. Newline tokens are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROW_END = -1
"""`CropLayout.sources` of a token no crop produced (LLaVA-NeXT's `image_newline`): always kept."""
RESAMPLED = -2
"""`CropLayout.sources` of a token the model interpolates from several crop tokens: see `CropLayout.resampled`."""


@dataclass(frozen=True)
class Group:
    """Visual tokens of one item that share a budget and are selected among together: those one crop gives the
    LLM as they are, or those the model resamples from several crop tokens (LLaVA-OneVision)."""

    item: int
    positions: torch.Tensor
    """`[n]`: their places among the item's visual tokens, in the group's raster order."""
    sources: torch.Tensor
    """`[n, k]`: the crop tokens (`crop * crop_tokens + token`, crops numbered over the call) each is made from."""
    weights: torch.Tensor | None
    """`[n, k]` float64 interpolation weights of `sources`; None where each token is its one source (`k == 1`)."""
    grid: tuple[int, int] | None
    """(rows, cols) the group's tokens fill, where they fill a rectangle."""

    def resample(self, values: torch.Tensor) -> torch.Tensor:
        """`[..., n, k]` values of the sources -> `[..., n]` values of the group's tokens."""
        if self.weights is None:
            return values[..., 0]
        return (values * self.weights.to(values.device, values.dtype)).sum(-1)


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
    numbered over the call), `ROW_END` for a token no crop produced, or `RESAMPLED`."""
    grids: tuple[tuple[int, int] | None, ...]
    """Per image, (rows, cols) of its token grid: the crop's, or LLaVA-NeXT's unpadded tile mosaic."""
    crop_grids: tuple[tuple[int, int] | None, ...] | None = None
    """Per crop, its own grid where crops differ in size (Qwen-VL images, each padded to `crop_tokens`)."""
    frames: tuple[int, ...] | None = None
    """Per video, its frame groups (temporal patches); None for images."""
    resampled: tuple[tuple[Group, ...], ...] | None = None
    """Per image, the groups of its `RESAMPLED` tokens; None where the model resamples nothing."""

    def groups(self) -> list[Group]:
        """Every group of the call, item by item: first one per crop (its tokens that reach the LLM as they are,
        possibly none), then the item's resampled groups."""
        groups, first = [], 0
        for image, (count, sources) in enumerate(zip(self.crops, self.sources, strict=True)):
            for crop in range(first, first + count):
                positions = ((sources >= crop * self.crop_tokens) & (sources < (crop + 1) * self.crop_tokens)).nonzero()
                positions = positions.squeeze(1)
                tokens = sources[positions] - crop * self.crop_tokens
                order = tokens.argsort()
                tokens, positions = tokens[order], positions[order]
                sources_of = (crop * self.crop_tokens + tokens)[:, None]
                groups.append(Group(image, positions, sources_of, None, self.sub_grid(tokens, crop)))
            first += count
            if self.resampled is not None:
                groups += self.resampled[image]
        return groups

    @property
    def is_resampled(self) -> bool:
        return self.resampled is not None and any(self.resampled)

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

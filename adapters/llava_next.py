"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres crops with `image_newline` row ends.

Each image is a base crop plus tiles of the tower's input size. The model packs the base crop's
tokens first, then the tile mosaic with its padding removed, row by row, each row ended by an
`image_newline` token. Which crop token lands where is read off the model's own
`pack_image_features`, run on token numbers instead of features, so vtprune never re-implements the
unpadding. Newline tokens come from no crop: they are always kept.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from vtprune.adapters.llava import LlavaAdapter

from vtprune.crops import CropLayout

ROW_END = -1.0


class LlavaNextAdapter(LlavaAdapter):
    model_types = ("llava_next",)

    def crop_layout(self, vision_inputs: dict[str, Any], modality: str, temporal: str) -> CropLayout:
        tokens, grid = self._crop_shape(vision_inputs)
        config = self.model.config
        image_sizes = vision_inputs["image_sizes"]
        crops = tuple(
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in image_sizes
        )
        # the model's own packing, run on token numbers: each packed entry says which crop token it is
        numbers = torch.arange(sum(crops) * tokens, dtype=torch.float64).view(-1, tokens, 1)
        packed, _ = self.model.model.pack_image_features(
            list(numbers.split(list(crops))),
            image_sizes,
            self.model.config.vision_feature_select_strategy,
            image_newline=torch.tensor([ROW_END], dtype=torch.float64),
        )
        sources = tuple(image[:, 0].long() for image in packed)
        return CropLayout(
            crop_tokens=tokens,
            crop_grid=grid,
            crops=crops,
            sources=sources,
            grids=tuple(_mosaic(image, tokens, grid) for image in sources),
        )

    def _crop_shape(self, vision_inputs: dict[str, Any]) -> tuple[int, tuple[int, int] | None]:
        side = self.model.config.vision_config.image_size // self.patch_size
        tokens = side * side + int(self.layout.has_cls) - self.token_offset
        return tokens, ((side, side) if side * side == tokens else None)


def _mosaic(sources: torch.Tensor, crop_tokens: int, crop_grid: tuple[int, int] | None) -> tuple[int, int] | None:
    """(rows, cols) of the unpadded tile mosaic, row ends not counted; the crop's grid for an image without tiles."""
    rows = int((sources < 0).sum())
    tiles = len(sources) - crop_tokens - rows
    return (rows, tiles // rows) if tiles > 0 else crop_grid

"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres crops with `image_newline` row ends.

Each image is a base crop plus tiles of the tower's input size. The model packs the base crop's
tokens first, then the tile mosaic with its padding removed, row by row, each row ended by an
`image_newline` token. Which crop token lands where is read off the model's own
`pack_image_features`, run on each crop token's coordinates instead of its features, so vtprune never
re-implements the unpadding (or LLaVA-OneVision's interpolation after it). Newline tokens come from no
crop: they are always kept.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from transformers.models.llava_next import modeling_llava_next
from vtprune.adapters.llava import LlavaAdapter

from vtprune.crops import RESAMPLED, ROW_END, CropLayout, Group

BASE, TILE = 0.0, 1.0
"""The first coordinate of a base crop's tokens and of the tile mosaic's; row ends get `ROW_END` in all three."""
EXACT = 1e-6
"""How far from a whole number an interpolated coordinate may lie and still be that token."""


class LlavaNextAdapter(LlavaAdapter):
    model_types = ("llava_next",)
    modeling = modeling_llava_next

    def crop_layout(
        self, vision_inputs: dict[str, Any], modality: str, temporal: str, input_ids: torch.Tensor | None = None
    ) -> CropLayout:
        tokens, grid = self._crop_shape(vision_inputs)
        side = self.side
        crops = self._image_crops(vision_inputs)
        columns = [self._tile_columns(size) for size in vision_inputs["image_sizes"]]
        coordinates = [_coordinates(count, side, tiles) for count, tiles in zip(crops, columns, strict=True)]
        packed = self._pack(coordinates, vision_inputs)
        firsts = torch.tensor([0, *crops[:-1]]).cumsum(0).tolist()
        placed = [
            _sources(image, item, first, tiles, side, tokens)
            for item, (image, first, tiles) in enumerate(zip(packed, firsts, columns, strict=True))
        ]
        sources = tuple(item_sources for item_sources, _ in placed)
        resampled = tuple(groups for _, groups in placed)
        return CropLayout(
            crop_tokens=tokens,
            crop_grid=grid,
            crops=crops,
            sources=sources,
            grids=tuple(_mosaic(image, tokens, grid) for image in sources),
            resampled=resampled if any(resampled) else None,
        )

    def _image_crops(self, vision_inputs: dict[str, Any]) -> tuple[int, ...]:
        """Crops the tower runs on for each image: its base crop and tiles."""
        config = self.model.config
        return tuple(
            self.modeling.image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in vision_inputs["image_sizes"]
        )

    def _tile_columns(self, image_size: torch.Tensor) -> int:
        """Tiles per row of the image's tile mosaic."""
        config = self.model.config
        size = config.vision_config.image_size
        return self.modeling.get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, size)[1]

    def _pack(self, coordinates: list[torch.Tensor], vision_inputs: dict[str, Any]) -> list[torch.Tensor]:
        """The model's own packing of per-image `[crops, tokens, channels]` values: one `[n, channels]` per image."""
        strategy = (
            vision_inputs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        )
        packed, _ = self.model.model.pack_image_features(
            coordinates, vision_inputs["image_sizes"], strategy, image_newline=row_end()
        )
        return list(packed)

    @property
    def side(self) -> int:
        """Patches along a crop's side."""
        return self.model.config.vision_config.image_size // self.patch_size

    def _crop_shape(self, vision_inputs: dict[str, Any]) -> tuple[int, tuple[int, int] | None]:
        side = self.side
        tokens = side * side + int(self.layout.has_cls) - self.token_offset
        return tokens, ((side, side) if side * side == tokens else None)


def pack_with_config(
    config: Any, coordinates: list[torch.Tensor], image_sizes: torch.Tensor, strategy: str
) -> list[torch.Tensor]:
    """LLaVA-NeXT's packing run with only a config, for runtimes that pack the same way without an HF model
    (vLLM's `_merge_image_patch_embeddings` mirrors it): `pack_image_features` reads nothing else of its model."""
    packed, _ = modeling_llava_next.LlavaNextModel.pack_image_features(
        SimpleNamespace(config=config), coordinates, image_sizes, strategy, image_newline=row_end()
    )
    return list(packed)


def row_end() -> torch.Tensor:
    return torch.full((3,), float(ROW_END), dtype=torch.float64)


def _coordinates(crops: int, side: int, tile_columns: int) -> torch.Tensor:
    """`[crops, side * side, 3]` float64: per crop token, (BASE, row, col) on the base crop's grid, or (TILE, row,
    col) on the tile mosaic's. Coordinates are linear in a token's place, so the model's bilinear resampling of
    them gives each resampled token the point it was sampled at."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    local = torch.stack([rows.flatten(), cols.flatten()], -1).double()
    values = [torch.cat([torch.full((side * side, 1), BASE, dtype=torch.float64), local], -1)]
    for tile in range(crops - 1):
        corner = torch.tensor([tile // tile_columns * side, tile % tile_columns * side], dtype=torch.float64)
        values.append(torch.cat([torch.full((side * side, 1), TILE, dtype=torch.float64), local + corner], -1))
    return torch.stack(values)


def _sources(
    packed: torch.Tensor, item: int, first: int, tile_columns: int, side: int, crop_tokens: int
) -> tuple[torch.Tensor, tuple[Group, ...]]:
    """One image's `CropLayout.sources` and resampled groups from its packed coordinates: a mosaic that kept its
    tokens maps each to its tile's token; one the model interpolated is one group of resampled tokens."""
    kind = packed[:, 0]
    sources = torch.full((len(packed),), ROW_END, dtype=torch.long)
    base = (kind == BASE).nonzero().squeeze(1)
    sources[base] = first * crop_tokens + token(packed[base, 1:].round().long(), side)
    tiles = (kind == TILE).nonzero().squeeze(1)
    points = packed[tiles, 1:]
    if bool(((points - points.round()).abs() <= EXACT).all()):
        sources[tiles] = _mosaic_token(points.round().long(), first, tile_columns, side, crop_tokens)
        return sources, ()
    sources[tiles] = RESAMPLED
    corners, weights = bilinear(points)
    rows = int((kind == ROW_END).sum())
    group = Group(
        item=item,
        positions=tiles,
        sources=_mosaic_token(corners, first, tile_columns, side, crop_tokens),
        weights=weights,
        grid=(rows, len(tiles) // rows),
    )
    return sources, (group,)


def bilinear(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4 grid points around each `[n, 2]` (row, col) sample point and their bilinear weights: `[n, 4, 2]` long,
    `[n, 4]` float64. A sample on a grid line has weight 0 on the far side, where the corner repeats the near one."""
    low = (points + EXACT).floor()
    fraction = (points - low).clamp(min=0)
    fraction = fraction.masked_fill(fraction <= EXACT, 0)
    high = low + (fraction > 0).double()
    corners = torch.stack(
        [
            torch.stack([low[:, 0], low[:, 1]], -1),
            torch.stack([low[:, 0], high[:, 1]], -1),
            torch.stack([high[:, 0], low[:, 1]], -1),
            torch.stack([high[:, 0], high[:, 1]], -1),
        ],
        1,
    ).long()
    down, right = fraction[:, 0], fraction[:, 1]
    weights = torch.stack([(1 - down) * (1 - right), (1 - down) * right, down * (1 - right), down * right], -1)
    return corners, weights


def token(points: torch.Tensor, side: int) -> torch.Tensor:
    """Crop token of (row, col) points on one crop's grid."""
    return points[..., 0] * side + points[..., 1]


def _mosaic_token(points: torch.Tensor, first: int, tile_columns: int, side: int, crop_tokens: int) -> torch.Tensor:
    """Crop token (numbered over the call) of (row, col) points on the tile mosaic of an image whose base crop is
    crop `first`."""
    tile = points[..., 0] // side * tile_columns + points[..., 1] // side
    return (first + 1 + tile) * crop_tokens + token(points % side, side)


def _mosaic(sources: torch.Tensor, crop_tokens: int, crop_grid: tuple[int, int] | None) -> tuple[int, int] | None:
    """(rows, cols) of the unpadded tile mosaic, row ends not counted; the crop's grid for an image without tiles."""
    rows = int((sources == ROW_END).sum())
    tiles = len(sources) - crop_tokens - rows
    return (rows, tiles // rows) if tiles > 0 else crop_grid

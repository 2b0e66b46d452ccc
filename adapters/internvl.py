"""InternVL 3 / 3.5 (`InternVLForConditionalGeneration`): InternViT with a CLS token, pixel shuffle, dynamic tiles.

Each image is cut into tiles (plus a thumbnail where there are several), every tile one crop of the tower.
The tower's last layer without its CLS token is pixel-shuffled (ratio 0.5), so each LLM token is a 2x2 block
of patches in raster order over the tile's (rows / 2, cols / 2) grid. Scores of a token are the mean of its four
patches' (the CLS query's attention row, or the attention each patch receives); the CLS token is there to
score with, as on CLIP. The processor does not hand the model how many tiles each image has: that is read off
the prompt, where an image is `<img>`, its tiles' `<IMG_CONTEXT>` placeholders, `</img>`. Positions are 1-D, as
LLaVA's. Pruning inside the tower cuts whole blocks: the pruning sees the CLS token (as a unit of its own) and
then each LLM token's four patches together, and the kept blocks go back on the tile's grid before the shuffle.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any

import torch
from torch import nn
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
from vtprune.adapters.base import pad_token_id
from vtprune.adapters.llava import LlavaAdapter, _feature_layer, concatenated_output

from vtprune import hf
from vtprune.crops import CropLayout
from vtprune.probes import AttentionProjections
from vtprune.signals import VisionLayout
from vtprune.tower import TowerPruning
from vtprune.tower_hooks import WindowedTowerHooks


class InternVLAdapter(LlavaAdapter):
    model_types = ("internvl",)
    modalities = {"image": ("pixel_values", "vision_feature_layer", "vision_feature_select_strategy")}

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        self.model = model
        if config.vision_feature_select_strategy != "default" or config.downsample_ratio != 0.5:
            raise TypeError(
                "vtprune's internvl adapter supports vision_feature_select_strategy='default' (the CLS token dropped) "
                f"and downsample_ratio=0.5, not {config.vision_feature_select_strategy!r} and {config.downsample_ratio}"
            )
        vision = config.vision_config
        self.encoder_layers = model.model.vision_tower.encoder.layer
        feature_layer = _feature_layer(config.vision_feature_layer, vision.num_hidden_layers)
        self.token_offset = 1
        self.layout = VisionLayout(vision.num_hidden_layers, feature_layer, has_cls=True, token_offset=1)
        self.probe_query = "cls"
        self.patches = (vision.image_size[0] // vision.patch_size[0], vision.image_size[1] // vision.patch_size[1])
        self.placeholders = {"image": config.image_token_id}
        self.projector = model.model.multi_modal_projector
        self.text_model = model.model.language_model
        self.pad_token_id = pad_token_id(model, config.image_token_id)

    def resolve_calls(self) -> None:
        self.projector_call = hf.bind(self.projector, hf.SUBLAYER)
        self.norm_call = hf.bind(self.model.model.vision_tower.layernorm, hf.SUBLAYER)
        self.attention_call = hf.bind(self.encoder_layers[0].attention, hf.TOWER_LAYER)  # its layers take no mask

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of a tile's LLM tokens."""
        return self.patches[0] // 2, self.patches[1] // 2

    def projections_of(self, layer: nn.Module) -> AttentionProjections:
        attention = layer.attention  # queries and keys as attended: after their norms (identity, or RMS with qk_norm)
        return AttentionProjections(
            attention.q_norm, attention.k_norm, attention.v_proj, attention.num_heads, attention.scale
        )

    def pool_scores(self, values: torch.Tensor) -> torch.Tensor:
        """`[tiles, 1 + patches]` per-token values -> `[tiles, 1 + tokens]`: the CLS token's, then each 2x2 block's
        mean, blocks in raster order (pixel shuffle's order)."""
        (rows, cols), tiles = self.patches, len(values)
        blocks = values[:, 1:].reshape(tiles, rows // 2, 2, cols // 2, 2).mean((2, 4)).flatten(1)
        return torch.cat([values[:, :1], blocks], dim=1)

    def tower_hooks(
        self, pruning: TowerPruning, layout: CropLayout, vision_inputs: dict[str, Any]
    ) -> WindowedTowerHooks:
        """Hooks that hand the pruning the CLS token, then each LLM token's 2x2 block as one unit; the kept blocks go
        back on the tile's grid at the tower's final norm, before pixel shuffle."""
        layer = vision_inputs.get("vision_feature_layer", self.model.config.vision_feature_layer)
        if layer != -1:
            raise ValueError(
                f"pruning inside the internvl tower hands the pixel shuffle its last layer's tokens, but this call "
                f"takes the features of layer {layer}: use vision_feature_layer=-1 (the checkpoints'), or a policy "
                f"that selects after the tower"
            )
        rows, cols = self.patches
        patches = torch.arange(rows * cols).view(1, rows, cols, 1)
        blocks = self.model.model.pixel_shuffle(patches, scale_factor=0.5).reshape(-1, 4)  # per LLM token, in order
        windows = torch.cat([torch.tensor([[0, -1, -1, -1]]), blocks + 1])  # the CLS unit, then the blocks
        projections = self.attention_projections(pruning.layers)
        norm = (self.model.model.vision_tower.layernorm, self.norm_call)
        attentions = [layer.attention for layer in self.encoder_layers]
        return WindowedTowerHooks(
            pruning, self.encoder_layers, self.attention_call, projections, norm, layout.crop_tokens,
            windows=windows, prefix=1, output=self.projector, masked=attentions,
        )  # fmt: skip

    def crop_layout(
        self, vision_inputs: dict[str, Any], modality: str, temporal: str, input_ids: torch.Tensor | None = None
    ) -> CropLayout:
        tiles = self._tiles = self.tiles_per_image(input_ids, len(vision_inputs["pixel_values"]))
        tokens, grid = self.grid[0] * self.grid[1], self.grid
        firsts = torch.tensor([0, *tiles[:-1]]).cumsum(0).tolist()
        sources = tuple(
            torch.arange(first * tokens, (first + count) * tokens) for first, count in zip(firsts, tiles, strict=True)
        )
        grids = tuple(grid if count == 1 else None for count in tiles)
        return CropLayout(crop_tokens=tokens, crop_grid=grid, crops=tuple(tiles), sources=sources, grids=grids)

    def tiles_per_image(self, input_ids: torch.Tensor | None, total: int) -> list[int]:
        """Tiles of each image in placeholder order over the batch: each run of placeholders between `<img>` and
        `</img>` holds a tile's tokens per tile."""
        if input_ids is None:
            raise ValueError("InternVL's tiles per image are read off the prompt: call the model with input_ids")
        placeholder, per_tile = self.placeholders["image"], self.grid[0] * self.grid[1]
        counts = [len(list(run)) for row in input_ids.tolist() for token, run in groupby(row) if token == placeholder]
        if any(count % per_tile for count in counts) or sum(counts) != total * per_tile:
            raise ValueError(
                f"the prompt's image placeholders ({sum(counts)} in runs of {counts}) are not {total} tiles of "
                f"{per_tile} tokens: build the prompt with the model's processor"
            )
        return [count // per_tile for count in counts]

    @staticmethod
    def tile_arrangement(image_processor: Any, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the tiles the image processor cuts a `size` (width, height) picture into; (1, 1) where it
        gives the picture as one tile (no thumbnail then)."""
        if not image_processor.crop_to_patches or image_processor.max_patches <= 1:
            return 1, 1
        tile = image_processor.size
        columns, rows = get_optimal_tiled_canvas(
            (size[1], size[0]), (tile.height, tile.width), image_processor.min_patches, image_processor.max_patches
        )
        return rows, columns

    def encode(self, vision_inputs: dict[str, Any], modality: str) -> list[torch.Tensor]:
        """Each image's tiles' tokens, tile after tile, split by the tiles the call's `crop_layout` read off the
        prompt (the engine lays out a call's crops before it encodes them)."""
        out = self.model.model.get_image_features(**vision_inputs, return_dict=True)
        tiles = out.pooler_output.split(self._tiles)
        return [image.flatten(0, 1) for image in tiles]

    def encoder_output(self, features: list[torch.Tensor], orders: list[torch.Tensor], modality: str) -> Any:
        return concatenated_output(features)

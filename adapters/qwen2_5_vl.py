"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): Qwen2-VL with windowed attention in the tower.

Most tower blocks attend within windows of merge units, and the tower runs units in window order. Scores
come only from the full-attention blocks (`fullatt_block_indexes`), where each image attends as a whole,
and are put back into raster order before a policy sees them. Everything else is Qwen2-VL's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index
from vtprune.adapters.qwen2_vl import Qwen2VLAdapter, _crop_sizes, _grid

from vtprune.crops import CropLayout
from vtprune.probes import PackedAttentionProbe


class Qwen2_5_VLAdapter(Qwen2VLAdapter):  # noqa: N801  (named after the model class)
    model_types = ("qwen2_5_vl",)
    modalities = {
        "image": ("pixel_values", "image_grid_thw"),
        "video": ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"),  # the last sets temporal positions
    }
    rotate = staticmethod(apply_rotary_pos_emb_vision)

    def configure(self, config: Any, visual: nn.Module) -> None:
        super().configure(config, visual)
        self.layout = replace(self.layout, full_attention=tuple(visual.fullatt_block_indexes))

    def attention_probe(
        self, rows: tuple[int, ...], columns: tuple[int, ...], layout: CropLayout, vision_inputs: dict[str, Any]
    ) -> PackedAttentionProbe:
        windowed = sorted(layer for layer in {*rows, *columns} if not self.layout.attends_fully(layer))
        if windowed:
            raise ValueError(
                f"Qwen2.5-VL's vision layers {windowed} attend within windows; score with its full-attention layers "
                f"{self.layout.full_attention}"
            )
        attentions = self.packed_attentions({*rows, *columns})
        raster = self.raster_order(vision_inputs)
        return PackedAttentionProbe(attentions, rows, columns, self.rotate, self.merge**2, _crop_sizes(layout), raster)

    def raster_order(self, vision_inputs: dict[str, Any]) -> torch.Tensor:
        return self._window(vision_inputs).argsort()

    def raster_units(self, layout: CropLayout, vision_inputs: dict[str, Any]) -> list[torch.Tensor]:
        sizes = _crop_sizes(layout)
        firsts = torch.tensor([0, *sizes[:-1]]).cumsum(0).tolist()
        windows = self._window(vision_inputs).cpu().split(sizes)
        return [window - first for window, first in zip(windows, firsts, strict=True)]

    def _window(self, vision_inputs: dict[str, Any]) -> torch.Tensor:
        """For each unit in the tower's (window) order over the call, its index in raster order."""
        grid = _grid(vision_inputs)
        return get_vision_window_index(grid, self.merge, self.visual.window_size, self.visual.patch_size)[0]

"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): images at their own resolution, 2x2 merge units, M-RoPE.

The tower runs all images as one packed sequence. Each image is one crop; its LLM tokens are its merge
units in raster order over its merged grid, and policies score a unit by the mean of its 4 patches'
scores (no CLS: query rows are the mean query's). Positions are M-RoPE: computed by the model's own
`get_rope_index` on the unpruned prompt and gathered, so kept tokens keep their (t, h, w) positions and
decoding continues from the last kept position + 1; generate's text row is renumbered contiguously over
the pruned prompt, as transformers expects. `mm_token_type_ids` is pruned with the prompt.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from vtprune.adapters.base import Adapter, pad_token_id

from vtprune.crops import CropLayout
from vtprune.probes import PackedAttentionProbe
from vtprune.signals import VisionLayout


class Qwen2VLAdapter(Adapter):
    model_types = ("qwen2_vl",)
    vision_inputs = ("pixel_values", "image_grid_thw")
    token_inputs = ("mm_token_type_ids",)
    multi_row_positions = True
    prunes_in_tower = False  # the packed tower's cu_seqlens and rotary embeddings are not cut yet
    rotate = staticmethod(apply_rotary_pos_emb_vision)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        visual = model.model.visual
        self.encoder_layers = visual.blocks
        self.projector = visual.merger
        self.text_model = model.model.language_model
        self.merge = visual.spatial_merge_size
        depth = len(self.encoder_layers)
        self.token_offset = 0
        self.layout = VisionLayout(num_layers=depth, feature_layer=depth - 1, has_cls=False)
        self.probe_query = "mean"
        self.image_token_id = model.config.image_token_id
        self.pad_token_id = pad_token_id(model, self.image_token_id)

    def attention_probe(
        self, rows: tuple[int, ...], columns: tuple[int, ...], layout: CropLayout
    ) -> PackedAttentionProbe:
        attentions = {layer: self.encoder_layers[layer].attn for layer in {*rows, *columns}}
        return PackedAttentionProbe(attentions, rows, columns, self.rotate, self.merge**2, layout.crop_tokens)

    def crop_layout(self, vision_inputs: dict[str, Any]) -> CropLayout:
        grids = []
        for frames, height, width in vision_inputs["image_grid_thw"].tolist():
            if frames != 1:
                raise ValueError("vtprune prunes Qwen2-VL images; an image with several frames is a video")
            grids.append((height // self.merge, width // self.merge))
        counts = [rows * cols for rows, cols in grids]
        tokens = max(counts)
        return CropLayout(
            crop_tokens=tokens,
            crop_grid=None,
            crops=(1,) * len(grids),
            sources=tuple(torch.arange(image * tokens, image * tokens + n) for image, n in enumerate(counts)),
            grids=tuple(grids),
            crop_grids=tuple(grids),
        )

    def encode_images(self, vision_inputs: dict[str, Any]) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(**vision_inputs, return_dict=True)
        return list(out.pooler_output)

    def encoder_outputs(self, features: list[torch.Tensor], orders: list[torch.Tensor]) -> dict[str, Any]:
        return {"image": BaseModelOutputWithPooling(pooler_output=features)}

    def default_positions(self, call: dict[str, Any], past_length: int, for_generate: bool) -> torch.Tensor:
        if call.get("mm_token_type_ids") is None:
            raise ValueError(
                "Qwen2-VL needs mm_token_type_ids for its M-RoPE positions: pass what the processor returns"
            )
        positions, _ = self.model.model.get_rope_index(
            call["input_ids"],
            mm_token_type_ids=call["mm_token_type_ids"],
            image_grid_thw=call.get("image_grid_thw"),
            attention_mask=call["attention_mask"],
        )
        if not for_generate:
            return positions  # the three M-RoPE rows, as the model's forward computes them
        return torch.cat([_text_row(call["attention_mask"])[None], positions])

    def kept_positions(self, positions: torch.Tensor, attention_mask: torch.Tensor, for_generate: bool) -> torch.Tensor:
        if not for_generate:
            return positions
        return torch.cat([_text_row(attention_mask)[None], positions[1:]])


def _text_row(attention_mask: torch.Tensor) -> torch.Tensor:
    """generate's text positions: 0.. over the real tokens, 0 on padding."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)

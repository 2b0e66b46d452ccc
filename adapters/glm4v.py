"""GLM-4.1V and GLM-4.5V (`Glm4vForConditionalGeneration`, `Glm4vMoeForConditionalGeneration`): Qwen2-VL's layout
with GLM's tower and decoder.

The tower is Qwen2-VL's in shape: all images of a call packed into one sequence, 2-D rotary embeddings,
2x2 merge units, each image (and each frame group of a video) one crop, whose LLM tokens are its merge units
in raster order. Its merge is a 2x2 convolution after the last block's norm, then the merger MLP, so the
features a policy reads as the tower's (`tower_features`) are the convolution's, one per unit, and pruning
inside the tower hands the kept units to that norm. Positions are
M-RoPE from the model's own `get_rope_index` with `mm_token_type_ids`, gathered for the kept tokens as on
Qwen-VL. A video's frame groups are images between begin and end of video (each followed by its timestamp):
their placeholders are the image placeholder, told apart by the span they sit in. The decoder rotates part of
each head's dimensions (GLM-4.1V's pairs interleaved), as its modeling file's `apply_rotary_pos_emb` does, which
scoring calls; GLM-4.5V's decoder layers are mixtures of experts.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb_vision
from vtprune.adapters.base import DecoderParts
from vtprune.adapters.qwen2_vl import Qwen2VLAdapter, _crop_sizes

from vtprune import hf
from vtprune.crops import CropLayout
from vtprune.probes import ProjectorProbe, per_crop


class Glm4vAdapter(Qwen2VLAdapter):
    model_types = ("glm4v", "glm4v_moe")
    rotate = staticmethod(apply_rotary_pos_emb_vision)

    def configure(self, config: Any, visual: nn.Module) -> None:
        super().configure(config, visual)
        self.placeholders = {"image": config.image_token_id, "video": config.image_token_id}
        self.video_bounds = (config.video_start_token_id, config.video_end_token_id)

    def modality_mask(self, input_ids: torch.Tensor, modality: str) -> torch.Tensor:
        start, end = self.video_bounds
        in_video = (input_ids == start).long().cumsum(1) > (input_ids == end).long().cumsum(1)
        return (input_ids == self.placeholders[modality]) & (in_video if modality == "video" else ~in_video)

    def decoder_parts(self, index: int) -> DecoderParts:
        modeling = sys.modules[type(self.decoder_layers[index].self_attn).__module__]
        return replace(super().decoder_parts(index), rotate=functools.partial(_rotate, modeling.apply_rotary_pos_emb))

    def projector_probe(self, layout: CropLayout, vision_inputs: dict[str, Any]) -> ProjectorProbe:
        """The merger's input: one row per merge unit already (the convolution's output), per crop in raster order."""
        sizes = _crop_sizes(layout)
        return ProjectorProbe(self.projector, self.projector_call, lambda units: per_crop(units, sizes))

    def resolve_calls(self) -> None:
        super().resolve_calls()
        self.norm_call = hf.bind(self.visual.post_layernorm, hf.SUBLAYER)

    @property
    def tower_projector(self) -> tuple[nn.Module, hf.Binding, int]:
        """The norm after the last block: in-tower pruning hands it the kept units' tokens and spreads its output
        back to every unit's place (zeros elsewhere), so the convolution and the merger see the shapes they
        expect."""
        return self.visual.post_layernorm, self.norm_call, self.merge**2


def _rotate(apply: Callable, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x` `[B, H, N, d]` rotated by a modeling file's `apply_rotary_pos_emb(q, k, cos, sin)` (the first `cos.shape[-1]`
    dimensions)."""
    return apply(x, x, cos, sin)[0]

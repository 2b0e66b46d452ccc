"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): Qwen2-VL's layout with 16-pixel patches and deepstack.

The tower also hands the LLM deepstack features: per level, one more tensor per image, added to the
visual tokens' hidden states after the first decoder layers. They are pruned with the features, and
in-decoder cuts must come after the last decoder layer that receives them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    BaseModelOutputWithDeepstackFeatures,
    apply_rotary_pos_emb_vision,
)
from vtprune.adapters.qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    model_types = ("qwen3_vl",)
    rotate = staticmethod(apply_rotary_pos_emb_vision)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.first_cut_layer = len(model.config.vision_config.deepstack_visual_indexes)
        self._deepstack: dict[str, list[tuple[torch.Tensor, ...]]] = {}

    @property
    def deepstack_mergers(self) -> list[nn.Module]:
        return list(self.model.model.visual.deepstack_merger_list)

    def encode(self, vision_inputs: dict[str, Any], modality: str) -> list[torch.Tensor]:
        out = self._encoded(vision_inputs, modality)
        self._deepstack[modality] = list(out.deepstack_features)
        return list(out.pooler_output)

    def encoder_output(self, features: list[torch.Tensor], orders: list[torch.Tensor], modality: str) -> Any:
        deepstack = [
            [level[item].index_select(0, order) for item, order in enumerate(orders)]
            for level in self._deepstack.pop(modality)
        ]
        return BaseModelOutputWithDeepstackFeatures(pooler_output=features, deepstack_features=deepstack)

"""Qwen3-VL-MoE (`Qwen3VLMoeForConditionalGeneration`): Qwen3-VL's vision path and deepstack, with sparse MoE blocks
in the LLM's decoder layers.

Nothing vtprune touches differs from Qwen3-VL: the decoder layers keep `self_attn`, `mlp` (a sparse block
where the config makes it one) and `input_layernorm`, so every stage runs unchanged; only the model
classes and the vision rotary function come from the MoE modeling file.
"""

from __future__ import annotations

from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import apply_rotary_pos_emb_vision
from vtprune.adapters.qwen3_vl import Qwen3VLAdapter


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    model_types = ("qwen3_vl_moe",)
    rotate = staticmethod(apply_rotary_pos_emb_vision)

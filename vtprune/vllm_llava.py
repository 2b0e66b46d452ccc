"""vLLM's LLaVA with vtprune: the model and processor classes the plugin (`vtprune.vllm`) registers.

Imported by vLLM only (it imports vllm). Where the config has no `vtprune` entry, the processor and the image
path are vLLM's own.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from transformers import LlavaConfig
from vllm.model_executor.models import llava
from vllm.multimodal import MULTIMODAL_REGISTRY

from vtprune.boundary import BoundaryEngine
from vtprune.vllm import VllmLlavaAdapter, settings_of

TOWERS = ("clip_vision_model", "siglip_vision_model")


class PrunedLlavaInfo(llava.LlavaProcessingInfo):
    """Each image gets its budget of placeholders: the processor fixes the count before the tower runs."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return settings_of(self.get_hf_config()).budget.tokens(full)


def _info(ctx: Any) -> llava.BaseLlavaProcessingInfo:
    config = ctx.get_hf_config(LlavaConfig)
    if settings_of(config) is None:
        return llava._build_llava_or_pixtral_hf_info(ctx)
    if config.vision_config.model_type not in TOWERS:
        raise ValueError(
            f"vtprune's vLLM plugin prunes LLaVA with CLIP or SigLIP towers, not {config.vision_config.model_type}; "
            f"serve this model without the 'vtprune' entry"
        )
    return PrunedLlavaInfo(ctx)


def _processor(info: Any, dummy_inputs: Any) -> Any:
    if isinstance(info, PrunedLlavaInfo):
        return llava.LlavaMultiModalProcessor(info, dummy_inputs)
    return llava._build_llava_or_pixtral_hf_processor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_info, dummy_inputs=llava.LlavaDummyInputsBuilder)
class PrunedLlava(llava.LlavaForConditionalGeneration):
    """vLLM's LLaVA whose image path returns only the kept tokens' features, in the LLM's order."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = settings_of(self.config)
        self.vtprune_engine = None
        self.vtprune_kept: deque[torch.Tensor] = deque(maxlen=1024)
        """The last images' kept tokens in the LLM's order, oldest first (what the trace's `kept` says on HF), for
        tests and inspection: `llm.apply_model(lambda model: list(model.vtprune_kept))`."""
        if settings is not None:
            adapter = VllmLlavaAdapter(self)
            self.vtprune_engine = BoundaryEngine(adapter, settings.policy, settings.budget, positions="contiguous")

    def _process_image_input(self, image_input: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.vtprune_engine is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)
        _, features, selections, _ = self.vtprune_engine.select({"pixel_values": image_input["pixel_values"]}, "image")
        orders = [s.kept if s.order is None else s.order for s in selections]
        self.vtprune_kept.extend(order.cpu() for order in orders)
        return tuple(f.index_select(0, order.to(f.device)) for f, order in zip(features, orders, strict=True))

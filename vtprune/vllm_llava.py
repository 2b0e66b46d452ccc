"""vLLM's LLaVA and LLaVA-NeXT with vtprune: the model and processor classes the plugin (`vtprune.vllm`) registers.

Imported by vLLM only (it imports vllm). Where the config has no `vtprune` entry, the processor and the image
path are vLLM's own.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from transformers import LlavaConfig, LlavaNextConfig
from vllm.model_executor.models import llava, llava_next
from vllm.multimodal import MULTIMODAL_REGISTRY

from vtprune.boundary import BoundaryEngine
from vtprune.vllm import VllmLlavaAdapter, VllmLlavaNextAdapter, settings_of

TOWERS = ("clip_vision_model", "siglip_vision_model")


class PrunedLlavaInfo(llava.LlavaProcessingInfo):
    """Each image gets its budget of placeholders: the processor fixes the count before the tower runs."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return settings_of(self.get_hf_config()).budget.tokens(full)


def _check_tower(config: Any) -> None:
    if config.vision_config.model_type not in TOWERS:
        raise ValueError(
            f"vtprune's vLLM plugin prunes LLaVA with CLIP or SigLIP towers, not {config.vision_config.model_type}; "
            f"serve this model without the 'vtprune' entry"
        )


def _info(ctx: Any) -> llava.BaseLlavaProcessingInfo:
    config = ctx.get_hf_config(LlavaConfig)
    if settings_of(config) is None:
        return llava._build_llava_or_pixtral_hf_info(ctx)
    _check_tower(config)
    return PrunedLlavaInfo(ctx)


def _processor(info: Any, dummy_inputs: Any) -> Any:
    if isinstance(info, PrunedLlavaInfo):
        return llava.LlavaMultiModalProcessor(info, dummy_inputs)
    return llava._build_llava_or_pixtral_hf_processor(info, dummy_inputs)


class _Pruned:
    """The image path of a pruned model: the kept tokens' features, in the LLM's order."""

    def _pruning(self, adapter: Any) -> None:
        settings = settings_of(self.config)
        self.vtprune_engine = None
        self.vtprune_kept: deque[torch.Tensor] = deque(maxlen=1024)
        """The last images' kept tokens in the LLM's order, oldest first (what the trace's `kept` says on HF), for
        tests and inspection: `llm.apply_model(lambda model: list(model.vtprune_kept))`."""
        if settings is not None:
            self.vtprune_engine = BoundaryEngine(adapter, settings.policy, settings.budget, positions="contiguous")

    def _kept_features(self, vision: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        _, features, selections, _ = self.vtprune_engine.select(vision, "image")
        orders = [s.kept if s.order is None else s.order for s in selections]
        self.vtprune_kept.extend(order.cpu() for order in orders)
        return tuple(f.index_select(0, order.to(f.device)) for f, order in zip(features, orders, strict=True))


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_info, dummy_inputs=llava.LlavaDummyInputsBuilder)
class PrunedLlava(_Pruned, llava.LlavaForConditionalGeneration):
    """vLLM's LLaVA whose image path returns only the kept tokens' features."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._pruning(VllmLlavaAdapter(self))

    def _process_image_input(self, image_input: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.vtprune_engine is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)
        return self._kept_features({"pixel_values": image_input["pixel_values"]})


class PrunedLlavaNextInfo(llava_next.LlavaNextProcessingInfo):
    """Each image gets its budget of placeholders, plus its mosaic's row ends (always kept, as on HF)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        config, encoder = self.get_hf_config(), self.get_vision_encoder_info()
        rows, cols = llava_next.get_anyres_image_grid_shape(
            image_size=(image_height, image_width),
            grid_pinpoints=config.image_grid_pinpoints,
            patch_size=encoder.get_image_size(),
        )
        _, row_ends = self._get_num_unpadded_features(
            original_height=image_height,
            original_width=image_width,
            npatches=encoder.get_patch_grid_length(),
            num_patch_height=rows,
            num_patch_width=cols,
        )
        return settings_of(config).budget.tokens(full - row_ends) + row_ends


def _next_info(ctx: Any) -> llava_next.LlavaNextProcessingInfo:
    config = ctx.get_hf_config(LlavaNextConfig)
    if settings_of(config) is None:
        return llava_next.LlavaNextProcessingInfo(ctx)
    _check_tower(config)
    return PrunedLlavaNextInfo(ctx)


@MULTIMODAL_REGISTRY.register_processor(
    llava_next.LlavaNextMultiModalProcessor, info=_next_info, dummy_inputs=llava.LlavaDummyInputsBuilder
)
class PrunedLlavaNext(_Pruned, llava_next.LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT whose image path returns only the kept tokens' features (row ends included)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._pruning(VllmLlavaNextAdapter(self))

    def _process_image_input(self, image_input: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.vtprune_engine is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)
        vision = {"pixel_values": image_input["pixel_values"], "image_sizes": image_input["image_sizes"]}
        return self._kept_features(vision)

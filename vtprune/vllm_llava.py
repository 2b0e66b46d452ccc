"""vLLM's LLaVA and LLaVA-NeXT with vtprune: the model and processor classes the plugin (`vtprune.vllm`) registers.

Imported by vLLM only (it imports vllm). Where the config has no `vtprune` entry, the processor and the image
path are vLLM's own.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlavaConfig, LlavaNextConfig
from vllm.model_executor.models import llava, llava_next
from vllm.multimodal import MULTIMODAL_REGISTRY

from vtprune.boundary import BoundaryEngine
from vtprune.vllm import (
    Settings,
    VllmLlavaAdapter,
    VllmLlavaNextAdapter,
    admitted_positions,
    placed_positions,
    settings_of,
    with_offsets,
)

TOWERS = ("clip_vision_model", "siglip_vision_model")


class _Budgeted:
    """A processing info whose images get their budget of placeholders: the processor fixes the count before the
    tower runs. The settings are parsed once, not for every image."""

    @functools.cached_property
    def vtprune_settings(self) -> Settings:
        return settings_of(self.get_hf_config())


class PrunedLlavaInfo(_Budgeted, llava.LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return self.vtprune_settings.budget.tokens(full)


def _check_tower(config: Any) -> None:
    if config.vision_config.model_type not in TOWERS:
        raise ValueError(
            f"vtprune's vLLM plugin prunes LLaVA with CLIP or SigLIP towers, not {config.vision_config.model_type}; "
            f"serve this model without the 'vtprune' entry"
        )


def _infos(config_class: type, own: Callable[[Any], Any], pruned: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A processing-info factory: vLLM's `own` where the config has no `vtprune` entry, else `pruned`."""

    def info(ctx: Any) -> Any:
        config = ctx.get_hf_config(config_class)
        if settings_of(config) is None:
            return own(ctx)
        _check_tower(config)
        return pruned(ctx)

    return info


def _processor(info: Any, dummy_inputs: Any) -> Any:
    if isinstance(info, PrunedLlavaInfo):
        return llava.LlavaMultiModalProcessor(info, dummy_inputs)
    return llava._build_llava_or_pixtral_hf_processor(info, dummy_inputs)


class _Pruned:
    """A vLLM model whose image path returns only the kept tokens' features, in the LLM's order; `adapter` says
    what the engine needs of its tower. With original positions the model lays out its prompts' M-RoPE positions
    (`vtprune.vllm` says how); vLLM asks for them only where the config's rope has sections."""

    adapter: type[VllmLlavaAdapter]
    supports_mrope = True
    supports_multimodal_pruning = True

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = settings_of(self.config)
        self.vtprune_engine = None
        self.vtprune_positions = None if settings is None else settings.positions
        self.vtprune_kept: deque[torch.Tensor] = deque(maxlen=1024)
        """The last images' kept tokens in the LLM's order, oldest first (what the trace's `kept` says on HF), for
        tests and inspection: `llm.apply_model(lambda model: list(model.vtprune_kept))`."""
        if settings is not None:
            engine = BoundaryEngine(self.adapter(self), settings.policy, settings.budget, positions=settings.positions)
            self.vtprune_engine = engine

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        adapter = self.vtprune_engine.adapter
        images = [
            (item.mm_position.offset, item.mm_position.length, adapter.unpruned_tokens(item.data.get_data()))
            for item in mm_features
        ]
        return admitted_positions(len(input_tokens), images)

    def recompute_mrope_positions(
        self, input_ids: Any, multimodal_embeddings: Any, mrope_positions: torch.Tensor, num_computed_tokens: int
    ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        image_token = self.config.image_token_index
        return placed_positions(input_ids, image_token, multimodal_embeddings, mrope_positions, num_computed_tokens)

    def _process_image_input(self, image_input: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.vtprune_engine is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)
        names = self.vtprune_engine.adapter.modalities["image"]
        vision = {name: image_input.get(name) for name in names if image_input.get(name) is not None}
        _, features, selections, _ = self.vtprune_engine.select(vision, "image")
        orders = [selection.delivered for selection in selections]
        self.vtprune_kept.extend(order.cpu() for order in orders)
        kept = [f.index_select(0, order.to(f.device)) for f, order in zip(features, orders, strict=True)]
        if self.vtprune_positions == "original":
            kept = [with_offsets(f, order) for f, order in zip(kept, orders, strict=True)]
        return tuple(kept)


@MULTIMODAL_REGISTRY.register_processor(
    _processor,
    info=_infos(LlavaConfig, llava._build_llava_or_pixtral_hf_info, PrunedLlavaInfo),
    dummy_inputs=llava.LlavaDummyInputsBuilder,
)
class PrunedLlava(_Pruned, llava.LlavaForConditionalGeneration):
    adapter = VllmLlavaAdapter


class PrunedLlavaNextInfo(_Budgeted, llava_next.LlavaNextProcessingInfo):
    """Each image's mosaic row ends come on top of its budget (always kept, as on HF)."""

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
        return self.vtprune_settings.budget.tokens(full - row_ends) + row_ends


@MULTIMODAL_REGISTRY.register_processor(
    llava_next.LlavaNextMultiModalProcessor,
    info=_infos(LlavaNextConfig, llava_next.LlavaNextProcessingInfo, PrunedLlavaNextInfo),
    dummy_inputs=llava.LlavaDummyInputsBuilder,
)
class PrunedLlavaNext(_Pruned, llava_next.LlavaNextForConditionalGeneration):
    adapter = VllmLlavaNextAdapter

"""vLLM's LLaVA, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL with vtprune: the model and processor classes the plugin
(`vtprune.vllm`) registers.

Imported by vLLM only (it imports vllm). Where the config has no `vtprune` entry, the processors, the image
paths and the positions are vLLM's own.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlavaConfig, LlavaNextConfig, Qwen2_5_VLConfig, Qwen2VLConfig
from vllm.model_executor.models import llava, llava_next, qwen2_5_vl, qwen2_vl
from vllm.multimodal import MULTIMODAL_REGISTRY

from vtprune.boundary import BoundaryEngine
from vtprune.budget import Budget
from vtprune.vllm import (
    Settings,
    VllmLlavaAdapter,
    VllmLlavaNextAdapter,
    VllmQwen2_5_VLAdapter,
    VllmQwen2VLAdapter,
    placed_positions,
    pruned_positions,
    settings_of,
    unpruned_offsets,
    with_offsets,
)

TOWERS = ("clip_vision_model", "siglip_vision_model")


class _Budgeted:
    """A processing info whose images get their budget of placeholders: the processor fixes the count before the
    tower runs. The settings are parsed once, not for every image."""

    @functools.cached_property
    def vtprune_settings(self) -> Settings:
        return settings_of(self.get_hf_config())

    def get_num_image_tokens(self, **image: Any) -> int:
        return self.vtprune_settings.budget.tokens(super().get_num_image_tokens(**image))


def _check_llava_tower(config: Any) -> None:
    if config.vision_config.model_type not in TOWERS:
        raise ValueError(
            f"vtprune's vLLM plugin prunes LLaVA with CLIP or SigLIP towers, not {config.vision_config.model_type}; "
            f"serve this model without the 'vtprune' entry"
        )


def _infos(
    config_class: type, own: Callable[[Any], Any], pruned: Callable[[Any], Any], check: Callable[[Any], None]
) -> Callable[[Any], Any]:
    """A processing-info factory: vLLM's `own` where the config has no `vtprune` entry, else `pruned`."""

    def info(ctx: Any) -> Any:
        config = ctx.get_hf_config(config_class)
        if settings_of(config) is None:
            return own(ctx)
        check(config)
        return pruned(ctx)

    return info


class _Pruned:
    """A vLLM model whose image path returns only the kept tokens' features, in the LLM's order; `adapter` says
    what the engine needs of its tower. With original positions the model lays out its prompts' M-RoPE positions
    (`vtprune.vllm` says how)."""

    adapter: type[VllmLlavaAdapter]

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
        if self.vtprune_positions == "original":  # what vLLM's runner asks of a model that places its positions
            self.supports_mrope = True
            self.supports_multimodal_pruning = True

    def vtprune_unpruned_features(self, image_input: Any) -> Any:
        """vLLM's own image path: every visual token's features, per image."""
        return super()._process_image_input(image_input)

    def _process_image_input(self, image_input: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.vtprune_engine is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)
        adapter = self.vtprune_engine.adapter
        vision = {name: image_input.get(name) for name in adapter.modalities["image"]}
        layout, features, selections, _ = self.vtprune_engine.select(
            {name: value for name, value in vision.items() if value is not None}, "image"
        )
        orders = [selection.delivered for selection in selections]
        self.vtprune_kept.extend(order.cpu() for order in orders)
        kept = [f.index_select(0, order.to(f.device)) for f, order in zip(features, orders, strict=True)]
        if self.vtprune_positions == "original":
            offsets = [adapter.position_offsets(order, grid) for order, grid in zip(orders, layout.grids, strict=True)]
            kept = [with_offsets(f, offset) for f, offset in zip(kept, offsets, strict=True)]
        return tuple(kept)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        if self.vtprune_engine is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        adapter = self.vtprune_engine.adapter
        features = sorted(mm_features, key=lambda item: item.mm_position.offset)
        images = [
            (item.mm_position.offset, item.mm_position.length, adapter.unpruned_tokens(item.data.get_data()))
            for item in features
        ]
        return pruned_positions(self._unpruned_positions(input_tokens, features, images), images)

    def _unpruned_positions(
        self, input_tokens: list[int], features: list[Any], images: list[tuple[int, int, int]]
    ) -> torch.Tensor:
        """`[3, unpruned length]` positions of the prompt with every image's tokens: LLaVA numbers them in order."""
        length = len(input_tokens) + sum(full - placeholders for _, placeholders, full in images)
        return torch.arange(length).expand(3, -1)

    def recompute_mrope_positions(
        self, input_ids: Any, multimodal_embeddings: Any, mrope_positions: torch.Tensor, num_computed_tokens: int
    ) -> tuple[Any, torch.Tensor, int]:
        if self.vtprune_positions != "original":
            return super().recompute_mrope_positions(
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )
        adapter = self.vtprune_engine.adapter
        return placed_positions(
            input_ids,
            adapter.placeholders["image"],
            multimodal_embeddings,
            mrope_positions,
            num_computed_tokens,
            adapter.rows,
        )


def _llava_processor(info: Any, dummy_inputs: Any) -> Any:
    if isinstance(info, PrunedLlavaInfo):
        return llava.LlavaMultiModalProcessor(info, dummy_inputs)
    return llava._build_llava_or_pixtral_hf_processor(info, dummy_inputs)


class PrunedLlavaInfo(_Budgeted, llava.LlavaProcessingInfo):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    _llava_processor,
    info=_infos(LlavaConfig, llava._build_llava_or_pixtral_hf_info, PrunedLlavaInfo, _check_llava_tower),
    dummy_inputs=llava.LlavaDummyInputsBuilder,
)
class PrunedLlava(_Pruned, llava.LlavaForConditionalGeneration):
    adapter = VllmLlavaAdapter


class PrunedLlavaNextInfo(_Budgeted, llava_next.LlavaNextProcessingInfo):
    """Each image's mosaic row ends come on top of its budget (always kept, as on HF)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        full = llava_next.LlavaNextProcessingInfo.get_num_image_tokens(
            self, image_width=image_width, image_height=image_height
        )
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
    info=_infos(LlavaNextConfig, llava_next.LlavaNextProcessingInfo, PrunedLlavaNextInfo, _check_llava_tower),
    dummy_inputs=llava.LlavaDummyInputsBuilder,
)
class PrunedLlavaNext(_Pruned, llava_next.LlavaNextForConditionalGeneration):
    adapter = VllmLlavaNextAdapter


def _images_only(config: Any) -> None:
    """Qwen-VL's entry: nothing to check of the config (the engine takes no videos: `vtprune.vllm.configure_engine`)."""


class _BudgetedUpdates:
    """A Qwen-VL processor whose prompt updates give each image its budget of placeholders (vLLM counts an
    image's from its grid, not through the processing info)."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> Any:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        if not isinstance(self.info, _Budgeted):
            return updates
        budget = self.info.vtprune_settings.budget
        return [
            dataclasses.replace(update, replacement=_budgeted(update.replacement, budget))
            if update.modality == "image"
            else update
            for update in updates
        ]


def _budgeted(replacement: Callable[[int], list[int]], budget: Budget) -> Callable[[int], list[int]]:
    def placeholders(item: int) -> list[int]:
        full = replacement(item)
        return full[: budget.tokens(len(full))]

    return placeholders


class _PrunedQwen(_Pruned):
    def _unpruned_positions(
        self, input_tokens: list[int], features: list[Any], images: list[tuple[int, int, int]]
    ) -> torch.Tensor:
        """vLLM's own positions of the prompt with every image's placeholders."""
        tokens, cursor, unpruned = [], 0, []
        for item, (offset, placeholders, full), start in zip(features, images, unpruned_offsets(images), strict=True):
            tokens += input_tokens[cursor:offset] + [input_tokens[offset]] * full
            cursor = offset + placeholders
            place = dataclasses.replace(item.mm_position, offset=start, length=full)
            unpruned.append(dataclasses.replace(item, mm_position=place))
        tokens += input_tokens[cursor:]
        positions, _ = super(_Pruned, self).get_mrope_input_positions(tokens, unpruned)  # vLLM's, not _Pruned's
        return positions


class PrunedQwen2VLInfo(_Budgeted, qwen2_vl.Qwen2VLProcessingInfo):
    pass


class PrunedQwen2VLProcessor(_BudgetedUpdates, qwen2_vl.Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2VLProcessor,
    info=_infos(Qwen2VLConfig, qwen2_vl.Qwen2VLProcessingInfo, PrunedQwen2VLInfo, _images_only),
    dummy_inputs=qwen2_vl.Qwen2VLDummyInputsBuilder,
)
class PrunedQwen2VL(_PrunedQwen, qwen2_vl.Qwen2VLForConditionalGeneration):
    adapter = VllmQwen2VLAdapter


class PrunedQwen2_5_VLInfo(_Budgeted, qwen2_5_vl.Qwen2_5_VLProcessingInfo):  # noqa: N801  (vLLM's names)
    pass


class PrunedQwen2_5_VLProcessor(_BudgetedUpdates, qwen2_5_vl.Qwen2_5_VLMultiModalProcessor):  # noqa: N801
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2_5_VLProcessor,
    info=_infos(Qwen2_5_VLConfig, qwen2_5_vl.Qwen2_5_VLProcessingInfo, PrunedQwen2_5_VLInfo, _images_only),
    dummy_inputs=qwen2_5_vl.Qwen2_5_VLDummyInputsBuilder,
)
class PrunedQwen2_5_VL(_PrunedQwen, qwen2_5_vl.Qwen2_5_VLForConditionalGeneration):  # noqa: N801
    adapter = VllmQwen2_5_VLAdapter

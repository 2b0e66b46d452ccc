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
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems

from vtprune.adapters.llava import KNOWN_TOWERS
from vtprune.boundary import BoundaryEngine
from vtprune.budget import Budget
from vtprune.vllm import (
    REQUEST_KEEP,
    Settings,
    VllmLlavaAdapter,
    VllmLlavaNextAdapter,
    VllmQwen2_5_VLAdapter,
    VllmQwen2VLAdapter,
    decode_budget,
    encode_budget,
    placed_positions,
    pruned_positions,
    settings_of,
    unpruned_offsets,
    with_offsets,
)


class _Budgeted:
    """The processing info of a model served pruned: the settings, parsed once rather than for every image, and
    how many placeholders an image keeps. Its counts stay vLLM's own, unpruned, for memory profiling: a
    request may ask for more tokens than the entry's `keep`."""

    @functools.cached_property
    def vtprune_settings(self) -> Settings:
        return settings_of(self.get_hf_config())

    def kept_tokens(self, budget: Budget, placeholders: int, width: int, height: int) -> int:
        """How many of an image's `placeholders` (vLLM's own count for a `width` x `height` image) it keeps."""
        return budget.tokens(placeholders)


def _check_llava_tower(config: Any) -> None:
    if config.vision_config.model_type not in KNOWN_TOWERS:
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
        self._vtprune_budgets: list[Budget] | None = None
        self.vtprune_positions = None if settings is None else settings.positions
        self.vtprune_kept: deque[torch.Tensor] = deque(maxlen=1024)
        """The last images' kept tokens in the LLM's order, oldest first (what the trace's `kept` says on HF), for
        tests and inspection: `llm.apply_model(lambda model: list(model.vtprune_kept))`."""
        if settings is not None:
            self.vtprune_engine = BoundaryEngine(
                self.adapter(self), settings.policy, settings.budget, settings.positions
            )
            self.vtprune_engine.check_no_prompt_needed()
        if self.vtprune_positions == "original":  # what vLLM's runner asks of a model that places its positions
            self.supports_mrope = True
            self.supports_multimodal_pruning = True

    def vtprune_unpruned_features(self, image_input: Any) -> Any:
        """vLLM's own image path: every visual token's features, per image."""
        return super()._process_image_input(image_input)

    def _parse_and_validate_image_input(self, **kwargs: Any) -> Any:
        budgets = kwargs.get(REQUEST_KEEP)
        self._vtprune_budgets = None if budgets is None else [decode_budget(int(b)) for b in budgets]
        return super()._parse_and_validate_image_input(**kwargs)

    def _process_image_input(self, image_input: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.vtprune_engine is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)
        adapter = self.vtprune_engine.adapter
        vision = {name: image_input.get(name) for name in adapter.modalities["image"]}
        budgets, self._vtprune_budgets = self._vtprune_budgets, None  # this call's images', read off its inputs
        layout, features, selections, _ = self.vtprune_engine.select(
            {name: value for name, value in vision.items() if value is not None}, "image", budgets
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


class _BudgetedProcessor:
    """A processor that gives each image its budget of placeholders (the request's `vtprune_keep`, else the
    entry's `keep`) before the tower runs, and hands the budget to the model with the image (`vtprune_keep`, one
    integer per image: `vtprune.vllm.encode_budget`). Inert where the config has no `vtprune` entry."""

    def _call_hf_processor(self, hf_data: Any, hf_kwargs: Any) -> Any:
        processed = super()._call_hf_processor(hf_data, hf_kwargs)
        images = hf_data.get("images")
        if isinstance(self.info, _Budgeted) and images is not None:
            value = encode_budget(self.info.vtprune_settings.request_budget(hf_kwargs))
            processed[REQUEST_KEEP] = torch.full((len(images),), value, dtype=torch.long)
        return processed

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Any) -> Any:
        fields = super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)
        if not isinstance(self.info, _Budgeted):
            return fields
        return {**fields, REQUEST_KEEP: MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> Any:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        if not isinstance(self.info, _Budgeted) or "image" not in mm_items:
            return updates
        images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
        if isinstance(images, ImageEmbeddingItems):  # features given, not pixels: served as they are
            return updates
        budget = self.info.vtprune_settings.request_budget(hf_processor_mm_kwargs)

        def budgeted(replacement: Callable[[int], list[int]]) -> Callable[[int], list[int]]:
            def placeholders(item: int) -> list[int]:
                full, size = replacement(item), images.get_image_size(item)
                return full[: self.info.kept_tokens(budget, len(full), size.width, size.height)]

            return placeholders

        return [
            dataclasses.replace(update, replacement=budgeted(update.replacement))
            if update.modality == "image"
            else update
            for update in updates
        ]


class PrunedLlavaInfo(_Budgeted, llava.LlavaProcessingInfo):
    pass


class PrunedLlavaProcessor(_BudgetedProcessor, llava.LlavaMultiModalProcessor):
    pass


def _llava_processor(info: Any, dummy_inputs: Any) -> Any:
    if isinstance(info, PrunedLlavaInfo):
        return PrunedLlavaProcessor(info, dummy_inputs)
    return llava._build_llava_or_pixtral_hf_processor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(
    _llava_processor,
    info=_infos(LlavaConfig, llava._build_llava_or_pixtral_hf_info, PrunedLlavaInfo, _check_llava_tower),
    dummy_inputs=llava.LlavaDummyInputsBuilder,
)
class PrunedLlava(_Pruned, llava.LlavaForConditionalGeneration):
    adapter = VllmLlavaAdapter


class PrunedLlavaNextInfo(_Budgeted, llava_next.LlavaNextProcessingInfo):
    def kept_tokens(self, budget: Budget, placeholders: int, width: int, height: int) -> int:
        """The budget counts the mosaic's tokens; its row ends come on top (always kept, as on HF)."""
        config, encoder = self.get_hf_config(), self.get_vision_encoder_info()
        rows, cols = llava_next.get_anyres_image_grid_shape(
            image_size=(height, width),
            grid_pinpoints=config.image_grid_pinpoints,
            patch_size=encoder.get_image_size(),
        )
        _, row_ends = self._get_num_unpadded_features(
            original_height=height,
            original_width=width,
            npatches=encoder.get_patch_grid_length(),
            num_patch_height=rows,
            num_patch_width=cols,
        )
        return budget.tokens(placeholders - row_ends) + row_ends


class PrunedLlavaNextProcessor(_BudgetedProcessor, llava_next.LlavaNextMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PrunedLlavaNextProcessor,
    info=_infos(LlavaNextConfig, llava_next.LlavaNextProcessingInfo, PrunedLlavaNextInfo, _check_llava_tower),
    dummy_inputs=llava.LlavaDummyInputsBuilder,
)
class PrunedLlavaNext(_Pruned, llava_next.LlavaNextForConditionalGeneration):
    adapter = VllmLlavaNextAdapter


def _images_only(config: Any) -> None:
    """Qwen-VL's entry: nothing to check of the config (the engine takes no videos: `vtprune.vllm.configure_engine`)."""


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


def _served_qwen(module: Any, names: str, config_class: type, adapter: type) -> type:
    """vLLM's Qwen-VL model of `module` (its classes named `<names>ForConditionalGeneration`, `...ProcessingInfo`,
    `...MultiModalProcessor`, `...DummyInputsBuilder`) served pruned, its processor registered."""
    model, info, processor, dummy = (
        getattr(module, f"{names}{part}")
        for part in ("ForConditionalGeneration", "ProcessingInfo", "MultiModalProcessor", "DummyInputsBuilder")
    )

    def named(name: str, bases: tuple[type, ...], body: dict[str, Any]) -> type:
        return type(name, bases, {"__module__": __name__, "__qualname__": name, **body})

    pruned_info = named(f"Pruned{names}Info", (_Budgeted, info), {})
    pruned_processor = named(f"Pruned{names}Processor", (_BudgetedProcessor, processor), {})
    served = named(f"Pruned{names}", (_PrunedQwen, model), {"adapter": adapter})
    infos = _infos(config_class, info, pruned_info, _images_only)
    return MULTIMODAL_REGISTRY.register_processor(pruned_processor, info=infos, dummy_inputs=dummy)(served)


PrunedQwen2VL = _served_qwen(qwen2_vl, "Qwen2VL", Qwen2VLConfig, VllmQwen2VLAdapter)
PrunedQwen2_5_VL = _served_qwen(qwen2_5_vl, "Qwen2_5_VL", Qwen2_5_VLConfig, VllmQwen2_5_VLAdapter)  # noqa: N816

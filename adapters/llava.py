"""LLaVA-1.5 (`LlavaForConditionalGeneration`) with a CLIP or SigLIP vision tower and any text backbone."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from vtprune.adapters.base import Adapter, pad_token_id

from vtprune.crops import CropLayout
from vtprune.probes import AttentionProjections
from vtprune.signals import VisionLayout

CLS_TOWERS = ("clip_vision_model",)
KNOWN_TOWERS = (*CLS_TOWERS, "siglip_vision_model")


class LlavaAdapter(Adapter):
    model_types = ("llava",)
    modalities = {"image": ("pixel_values", "vision_feature_layer", "vision_feature_select_strategy", "image_sizes")}

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        tower = model.model.vision_tower
        encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
        self.configure(model.config, encoder)
        self.projector = model.model.multi_modal_projector
        self.text_model = model.model.language_model
        self.pad_token_id = pad_token_id(model, model.config.image_token_id)

    def configure(self, config: Any, encoder: nn.Module | None) -> None:
        """The tower's layout from a LLaVA config and its encoder (the module holding `layers`); shared with
        other runtimes' LLaVA models (vLLM's), whose towers are laid out alike."""
        tower_type = config.vision_config.model_type
        if tower_type not in KNOWN_TOWERS or encoder is None:
            raise TypeError(
                f"vtprune's llava adapter supports CLIP and SigLIP vision towers, not {tower_type!r}; "
                f"open an issue with the checkpoint name to add it"
            )
        self.encoder_layers = encoder.layers
        layers = config.vision_config.num_hidden_layers  # a runtime may build only the layers up to the feature one
        feature_layer = _feature_layer(config.vision_feature_layer, layers)
        has_cls = tower_type in CLS_TOWERS
        self.token_offset = 1 if config.vision_feature_select_strategy == "default" else 0
        self.layout = VisionLayout(
            num_layers=layers,
            feature_layer=feature_layer,
            has_cls=has_cls,
            token_offset=self.token_offset,
        )
        self.probe_query = "cls" if has_cls else "mean"
        self.patch_size = config.vision_config.patch_size
        self.placeholders = {"image": config.image_token_id}

    def attention_projections(self, layers: tuple[int, ...]) -> dict[int, AttentionProjections]:
        return {index: self.projections_of(self.encoder_layers[index]) for index in layers}

    def projections_of(self, layer: nn.Module) -> AttentionProjections:
        """Where a tower layer's attention takes its queries, keys and values from."""
        attention = layer.self_attn
        return AttentionProjections(
            attention.q_proj, attention.k_proj, attention.v_proj, attention.num_heads, attention.scale
        )

    def encode(self, vision_inputs: dict[str, Any], modality: str) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(**vision_inputs, return_dict=True)
        return list(out.pooler_output)

    def crop_layout(
        self, vision_inputs: dict[str, Any], modality: str, temporal: str, input_ids: torch.Tensor | None = None
    ) -> CropLayout:
        tokens, grid = self._crop_shape(vision_inputs)
        images = len(vision_inputs["pixel_values"])
        sources = tuple(torch.arange(image * tokens, (image + 1) * tokens) for image in range(images))
        return CropLayout(
            crop_tokens=tokens, crop_grid=grid, crops=(1,) * images, sources=sources, grids=(grid,) * images
        )

    def _crop_shape(self, vision_inputs: dict[str, Any]) -> tuple[int, tuple[int, int] | None]:
        """Visual tokens of one crop, and their (rows, cols) where they form a grid (not with a CLS among them)."""
        height, width = vision_inputs["pixel_values"].shape[-2:]
        rows, cols = height // self.patch_size, width // self.patch_size
        tokens = rows * cols + int(self.layout.has_cls) - self.token_offset
        return tokens, ((rows, cols) if rows * cols == tokens else None)

    def encoder_output(self, features: list[torch.Tensor], orders: list[torch.Tensor], modality: str) -> Any:
        return BaseModelOutputWithPooling(pooler_output=features)

    def default_positions(self, call: dict[str, Any], past_length: int, for_generate: bool) -> torch.Tensor:
        input_ids, attention_mask = call["input_ids"], call["attention_mask"]
        if for_generate:  # GenerationMixin._prepare_position_ids_for_generation
            return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        length = input_ids.shape[1]
        positions = torch.arange(past_length, past_length + length, device=input_ids.device)
        return positions.expand(input_ids.shape[0], length)


def concatenated_output(features: list[torch.Tensor]) -> BaseModelOutputWithPooling:
    """Pruned features as families take them that place one `[1, tokens, hidden]` tensor over the call."""
    return BaseModelOutputWithPooling(pooler_output=torch.cat(features)[None])


def _feature_layer(vision_feature_layer: int | list[int], num_layers: int) -> int:
    """0-based encoder layer whose output is `hidden_states[vision_feature_layer]` (the deepest, for a list)."""
    indices = vision_feature_layer if isinstance(vision_feature_layer, (list, tuple)) else [vision_feature_layer]
    deepest = max(index % (num_layers + 1) for index in indices)
    if deepest == 0:
        raise TypeError("vision_feature_layer selects the patch embeddings, which no attention layer produced")
    return deepest - 1

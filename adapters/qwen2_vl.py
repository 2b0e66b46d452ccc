"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): images and videos at their own resolution, 2x2 merge units,
M-RoPE.

The tower runs all images (or videos) of a call as one packed sequence. An image is one crop; a video is
one crop per frame group (the 2 frames of a temporal patch, attended together) with `temporal="per_frame"`,
or one crop for the whole video with `"joint"`. A crop's LLM tokens are its merge units in raster order,
and policies score a unit by the mean of its 4 patches' scores (no CLS: query rows are the mean query's).
Positions are M-RoPE: computed by the model's own `get_rope_index` on the unpruned prompt and gathered,
so kept tokens keep their (t, h, w) positions and decoding continues from the last kept position + 1;
generate's text row is renumbered contiguously over the pruned prompt, as transformers expects.
`mm_token_type_ids` is pruned with the prompt.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from vtprune.adapters.base import Adapter, pad_token_id

from vtprune import hf
from vtprune.crops import CropLayout
from vtprune.packed_tower_hooks import PackedTowerHooks
from vtprune.probes import PackedAttentionProbe, PackedProjections, ProjectorProbe, per_crop
from vtprune.signals import VisionLayout
from vtprune.tower import TowerPruning

GRIDS = {"image": "image_grid_thw", "video": "video_grid_thw"}


class Qwen2VLAdapter(Adapter):
    model_types = ("qwen2_vl",)
    modalities = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}
    token_inputs = ("mm_token_type_ids",)
    multi_row_positions = True
    rotate = staticmethod(apply_rotary_pos_emb_vision)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.configure(model.config, model.model.visual)
        self.text_model = model.model.language_model
        self.pad_token_id = pad_token_id(model, model.config.image_token_id)

    def configure(self, config: Any, visual: nn.Module) -> None:
        """The tower's layout from the config and the tower (`blocks`, `merger`); shared with other runtimes'
        Qwen-VL models (vLLM's), whose towers are laid out alike."""
        self.visual = visual
        self.encoder_layers = visual.blocks
        self.projector = visual.merger
        self.merge = visual.spatial_merge_size
        depth = len(self.encoder_layers)
        self.token_offset = 0
        self.layout = VisionLayout(num_layers=depth, feature_layer=depth - 1, has_cls=False)
        self.probe_query = "mean"
        self.placeholders = {"image": config.image_token_id, "video": config.video_token_id}

    def resolve_calls(self) -> None:
        self.tower_call = hf.bind(self.encoder_layers[0], hf.PACKED_BLOCK)
        self.attention_call = hf.bind(self.encoder_layers[0].attn, hf.PACKED_ATTENTION)
        self.projector_call = hf.bind(self.projector, hf.SUBLAYER)

    def packed_attentions(self, layers: set[int] | tuple[int, ...]) -> dict[int, PackedProjections]:
        """The fused qkv projections of the tower blocks `layers`."""
        attentions = {}
        for layer in layers:
            attention = self.encoder_layers[layer].attn
            attentions[layer] = PackedProjections(
                attention, self.attention_call, attention.qkv, attention.num_heads, attention.scaling
            )
        return attentions

    def attention_probe(
        self, rows: tuple[int, ...], columns: tuple[int, ...], layout: CropLayout, vision_inputs: dict[str, Any]
    ) -> PackedAttentionProbe:
        attentions = self.packed_attentions({*rows, *columns})
        return PackedAttentionProbe(attentions, rows, columns, self.rotate, self.merge**2, _crop_sizes(layout))

    def projector_probe(self, layout: CropLayout, vision_inputs: dict[str, Any]) -> ProjectorProbe:
        """The merger's input, one row per merge unit (its patches concatenated), per crop in raster order."""
        sizes, raster = _crop_sizes(layout), self.raster_order(vision_inputs)

        def arrange(patches: torch.Tensor) -> torch.Tensor:
            return per_crop(patches.reshape(-1, patches.shape[-1] * self.merge**2), sizes, raster)

        return ProjectorProbe(self.projector, self.projector_call, arrange)

    def raster_order(self, vision_inputs: dict[str, Any]) -> torch.Tensor | None:
        """For each unit in raster order over the call, its index in the tower's order; None: the same."""
        return None

    def tower_hooks(self, pruning: TowerPruning, layout: CropLayout, vision_inputs: dict[str, Any]) -> PackedTowerHooks:
        if sum(layout.crops) != int(_grid(vision_inputs)[:, 0].sum()):
            raise ValueError(
                f"pruning inside the {self.model.config.model_type} vision tower works per frame group, the span "
                f"its attention covers; pass temporal='per_frame', or use a policy that selects after the tower"
            )
        projector, projector_call, projected_rows = self.tower_projector
        return PackedTowerHooks(
            pruning,
            self.encoder_layers,
            self.tower_call,
            self.packed_attentions(pruning.layers),
            self.rotate,
            (projector, projector_call),
            self.deepstack_mergers,
            self.merge**2,
            _crop_sizes(layout),
            self.raster_units(layout, vision_inputs),
            projected_rows,
        )

    @property
    def tower_projector(self) -> tuple[nn.Module, hf.Binding, int]:
        """The first module after the blocks, which in-tower pruning hands the kept units: it, how it is called, and
        the rows of its output per unit."""
        return self.projector, self.projector_call, 1

    @property
    def deepstack_mergers(self) -> list[nn.Module]:
        """Mergers that hand the LLM features of intermediate tower layers (Qwen3-VL's deepstack)."""
        return []

    def raster_units(self, layout: CropLayout, vision_inputs: dict[str, Any]) -> list[torch.Tensor] | None:
        """Per crop, for each of its units in the tower's order, its index in raster order; None: the same."""
        return None

    def crop_layout(
        self, vision_inputs: dict[str, Any], modality: str, temporal: str, input_ids: torch.Tensor | None = None
    ) -> CropLayout:
        grid = _grid(vision_inputs)
        if modality == "image" and bool((grid[:, 0] != 1).any()):
            raise ValueError("an image with several frames reached vtprune: pass videos as pixel_values_videos")
        frames, shapes = [], []
        for groups, height, width in grid.tolist():
            shape = (height // self.merge, width // self.merge)
            joint = temporal == "joint" and groups > 1
            frames.append(1 if joint else groups)
            shapes += [(groups * shape[0] * shape[1], None)] if joint else [(shape[0] * shape[1], shape)] * groups
        tokens = max(count for count, _ in shapes)
        sources, first = [], 0
        for crops in frames:
            sources.append(
                torch.cat([crop * tokens + torch.arange(shapes[crop][0]) for crop in range(first, first + crops)])
            )
            first += crops
        return CropLayout(
            crop_tokens=tokens,
            crop_grid=None,
            crops=tuple(frames),
            sources=tuple(sources),
            grids=tuple((height // self.merge, width // self.merge) for _, height, width in grid.tolist()),
            crop_grids=tuple(shape for _, shape in shapes),
            frames=tuple(groups for groups, _, _ in grid.tolist()) if modality == "video" else None,
        )

    def encode(self, vision_inputs: dict[str, Any], modality: str) -> list[torch.Tensor]:
        return list(self._encoded(vision_inputs, modality).pooler_output)

    def _encoded(self, vision_inputs: dict[str, Any], modality: str) -> Any:
        pixels, grid = (vision_inputs[name] for name in self.modalities[modality][:2])
        if modality == "image":
            return self.model.model.get_image_features(pixels, grid, return_dict=True)
        return self.model.model.get_video_features(pixels, grid, return_dict=True)

    def encoder_output(self, features: list[torch.Tensor], orders: list[torch.Tensor], modality: str) -> Any:
        return BaseModelOutputWithPooling(pooler_output=features)

    def default_positions(self, call: dict[str, Any], past_length: int, for_generate: bool) -> torch.Tensor:
        if call.get("mm_token_type_ids") is None:
            if not for_generate:  # generate numbers such a prompt as text itself, before the model is called
                self._check_positions_without_token_types(call)
            # the model numbers every token as text, in all 3 rows
            input_ids, attention_mask = call["input_ids"], call["attention_mask"]
            if for_generate:
                text = _text_row(attention_mask)
                return torch.cat([text[None], text[None].expand(3, -1, -1)])
            positions = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
            return positions.expand(3, *input_ids.shape)
        timing = {name: call[name] for name in self.modalities["video"][2:] if call.get(name) is not None}
        positions, _ = self.model.model.get_rope_index(
            call["input_ids"],
            mm_token_type_ids=call["mm_token_type_ids"],
            image_grid_thw=call.get("image_grid_thw"),
            video_grid_thw=call.get("video_grid_thw"),
            attention_mask=call["attention_mask"],
            **timing,
        )
        if not for_generate:
            return positions  # the three M-RoPE rows, as the model's forward computes them
        return torch.cat([_text_row(call["attention_mask"])[None], positions])

    def _check_positions_without_token_types(self, call: dict[str, Any]) -> None:
        """Ask the model's own position code about a prompt without `mm_token_type_ids`: Qwen2.5-VL numbers it as
        text, Qwen2-VL and Qwen3-VL (from transformers 5.24) refuse it with their own error."""
        compute = self.model.model.compute_3d_position_ids
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        parameters = inspect.signature(compute).parameters.values()
        compute(**{p.name: call.get(p.name) for p in parameters if p.kind in named})  # no cache: a prompt

    def kept_positions(self, positions: torch.Tensor, attention_mask: torch.Tensor, for_generate: bool) -> torch.Tensor:
        if not for_generate:
            return positions
        return torch.cat([_text_row(attention_mask)[None], positions[1:]])


def _grid(vision_inputs: dict[str, Any]) -> torch.Tensor:
    """`[items, 3]` (frame groups, patch rows, patch cols) of the call's images or videos."""
    return next(vision_inputs[name] for name in GRIDS.values() if vision_inputs.get(name) is not None)


def _crop_sizes(layout: CropLayout) -> list[int]:
    """Tokens of each crop, in the tower's order."""
    counts = torch.zeros(sum(layout.crops), dtype=torch.long)
    for sources in layout.sources:
        counts += torch.bincount(sources.div(layout.crop_tokens, rounding_mode="floor"), minlength=len(counts))
    return counts.tolist()


def _text_row(attention_mask: torch.Tensor) -> torch.Tensor:
    """generate's text positions: 0.. over the real tokens, 0 on padding."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)

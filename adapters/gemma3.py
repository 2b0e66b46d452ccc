"""Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP tower whose projector average-pools windows of patches.

Each image (each pan-and-scan crop too: the processor gives it a block of placeholders of its own) is one crop of
the tower: `patches x patches` patches in raster order, no CLS token. The projector average-pools them in
non-overlapping `pool x pool` windows (4x4 on the released checkpoints: 4096 patches to 256 tokens), so LLM token
i is the mean of its window's patches: scores and features of a token are its window's means. The image block
attends to itself both ways, marked by `token_type_ids`, which are pruned in step with the prompt. Positions are
1-D; the LLM's layers alternate sliding-window and global attention, each type with its own RoPE.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vtprune.adapters.base import pad_token_id
from vtprune.adapters.llava import LlavaAdapter, concatenated_output

from vtprune import hf
from vtprune.crops import CropLayout
from vtprune.probes import ProjectorProbe
from vtprune.signals import VisionLayout
from vtprune.tower import TowerPruning
from vtprune.tower_hooks import WindowedTowerHooks


class Gemma3Adapter(LlavaAdapter):
    model_types = ("gemma3",)
    modalities = {"image": ("pixel_values",)}
    token_inputs = ("token_type_ids",)

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        config = model.config
        vision = config.vision_config
        if vision.model_type != "siglip_vision_model":
            raise TypeError(f"vtprune's gemma3 adapter supports a SigLIP vision tower, not {vision.model_type!r}")
        siglip = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)  # nested before 5.24
        self.encoder_layers = siglip.encoder.layers
        self.final_tower_norm = siglip.post_layernorm
        if config.text_config.attn_logit_softcapping is not None:
            raise TypeError(
                "vtprune's gemma3 adapter scores attention without logit soft-capping, which this config sets "
                "(attn_logit_softcapping); Gemma 3 checkpoints leave it unset"
            )
        self.token_offset = 0
        self.layout = VisionLayout(vision.num_hidden_layers, vision.num_hidden_layers - 1, has_cls=False)
        self.probe_query = "mean"
        self.projector = model.model.multi_modal_projector
        self.patches, self.side = self.projector.patches_per_image, self.projector.tokens_per_side
        self.pool = self.projector.kernel_size
        self.placeholders = {"image": config.image_token_id}
        self.text_model = model.model.language_model
        self.pad_token_id = pad_token_id(model, config.image_token_id)

    def windows(self, values: torch.Tensor) -> torch.Tensor:
        """`[crops, patches^2, ...]` per-patch values -> `[crops, side^2, ...]`: the mean over each pooling window,
        windows in raster order (the projector's `AvgPool2d`)."""
        crops, rest = len(values), values.shape[2:]
        grid = values.reshape(crops, self.side, self.pool, self.side, self.pool, *rest)
        return grid.mean((2, 4)).reshape(crops, self.side * self.side, *rest)

    pool_scores = windows

    def projector_probe(self, layout: CropLayout, vision_inputs: dict[str, Any]) -> ProjectorProbe:
        return ProjectorProbe(self.projector, self.projector_call, arrange=self.windows)

    def tower_hooks(
        self, pruning: TowerPruning, layout: CropLayout, vision_inputs: dict[str, Any]
    ) -> WindowedTowerHooks:
        """Hooks that hand the pruning each pooling window as one unit; the kept units go back on the grid at the
        tower's final norm, before the projector pools them."""
        grid = torch.arange(self.patches * self.patches).view(self.side, self.pool, self.side, self.pool)
        windows = grid.permute(0, 2, 1, 3).reshape(self.side * self.side, self.pool * self.pool)
        projections = self.attention_projections(pruning.layers)
        norm = (self.final_tower_norm, self.norm_call)
        return WindowedTowerHooks(
            pruning, self.encoder_layers, self.tower_call, projections, norm, layout.crop_tokens,
            windows=windows, output=self.projector,
        )  # fmt: skip

    def resolve_calls(self) -> None:
        super().resolve_calls()
        self.norm_call = hf.bind(self.final_tower_norm, hf.SUBLAYER)

    def _crop_shape(self, vision_inputs: dict[str, Any]) -> tuple[int, tuple[int, int]]:
        return self.side * self.side, (self.side, self.side)

    def encoder_output(self, features: list[torch.Tensor], orders: list[torch.Tensor], modality: str) -> Any:
        return concatenated_output(features)

    def rotary_embedding(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_model.rotary_emb(hidden, position_ids, self.text_model.config.layer_types[layer])

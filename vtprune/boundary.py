"""The boundary engine: prune visual tokens between the vision tower and the LLM.

The vision tower runs once with the policy's probes attached; the policy picks kept tokens per
image; the prompt is rebuilt with only the kept placeholders (text and positions intact, re-padded)
and the pruned features are handed to the unpatched `forward`/`generate` as `mm_encoder_outputs`,
so the model's own cache, masks and sampling run untouched.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from vtprune.adapters.base import Adapter
from vtprune.budget import Budget
from vtprune.kernels import gather_tokens
from vtprune.probes import AttentionProbe
from vtprune.registry import Policy
from vtprune.signals import ImageSignals, Selection
from vtprune.tower_hooks import TowerHooks
from vtprune.trace import ImageRecord, Trace

POSITION_MODES = ("original", "contiguous")
IGNORE_INDEX = -100


def compaction_order(keep: torch.Tensor, left_padded: bool) -> torch.Tensor:
    """Per row, the indices of the kept tokens in order, padded on one side to the longest row.

    `keep` is a `[B, L]` bool mask; the result is `[B, Lp]` with `Lp` the most tokens any row keeps. The
    padding slots point at dropped tokens and must be masked by the caller (`keep.gather(1, order)`).
    """
    longest = int(keep.sum(1).max())
    flags = keep.to(torch.int8)
    if left_padded:
        return torch.sort(flags, dim=1, stable=True).indices[:, keep.shape[1] - longest :]
    return torch.sort(flags, dim=1, descending=True, stable=True).indices[:, :longest]


class BoundaryEngine:
    """Prunes the visual tokens of one call's inputs with one policy and budget."""

    def __init__(self, adapter: Adapter, policy: Policy, budget: Budget, positions: str) -> None:
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        self.adapter = adapter
        self.policy = policy
        self.budget = budget
        self.positions = positions
        policy.check(budget)
        self.request = policy.request(adapter.layout)
        layers = sorted({*self.request.attention_rows, *self.request.received_attention})
        self.projections = adapter.attention_projections(tuple(layers))
        self.trace: Trace | None = None

    def prune(self, inputs: dict[str, Any], for_generate: bool) -> dict[str, Any]:
        """Return `inputs` with the images encoded, pruned and passed as `mm_encoder_outputs`."""
        if inputs.get("input_ids") is None:
            raise ValueError(
                "vtprune finds image placeholders in input_ids: pass input_ids (as the processor returns them) "
                "rather than inputs_embeds together with pixel_values"
            )
        vision = {name: inputs.pop(name) for name in self.adapter.vision_inputs if name in inputs}
        vision = {name: value for name, value in vision.items() if value is not None}
        features, grids, selections, seconds = self._select(vision)
        self._rebuild(inputs, [len(f) for f in features], selections, for_generate)
        pruned = [f.index_select(0, _order(s).to(f.device)) for f, s in zip(features, selections, strict=True)]
        inputs["mm_encoder_outputs"] = self.adapter.encoder_outputs(pruned)
        self.trace = Trace(
            policy=self.policy.name,
            images=tuple(
                ImageRecord(
                    kept=selection.kept,
                    n_before=len(feature),
                    n_after=len(selection.kept),
                    scores=selection.scores,
                    grid=grid,
                    stages=((self.policy.stage, len(selection.kept)),),
                )
                for feature, grid, selection in zip(features, grids, selections, strict=True)
            ),
            seconds=seconds,
        )
        return inputs

    def _select(
        self, vision: dict[str, Any]
    ) -> tuple[list[torch.Tensor], list[tuple[int, int] | None], list[Selection], float]:
        """Run the tower once with the probes (and any in-tower pruning) attached; select per image; time it."""
        request, adapter = self.request, self.adapter
        probe = AttentionProbe(
            self.projections, request.attention_rows, request.received_attention, adapter.probe_query
        )
        crop_tokens = adapter.crop_tokens(vision)
        crops = len(vision["pixel_values"])
        pruning = self.policy.tower_pruning(adapter.layout, [self.budget.tokens(crop_tokens)] * crops, crop_tokens)
        hooks = contextlib.nullcontext()
        if pruning is not None:
            projections = adapter.attention_projections(pruning.layers)
            hooks = TowerHooks(pruning, adapter.encoder_layers, projections, adapter.projector, crop_tokens)
        with probe, hooks:
            features = adapter.encode_images(vision)
        start = time.perf_counter()
        grids = [adapter.grid(vision, image, len(feature)) for image, feature in enumerate(features)]
        if pruning is not None:
            selections = pruning.selections()
        else:
            offset = adapter.token_offset
            signals = [
                ImageSignals(
                    n_tokens=len(feature),
                    attention_rows=_per_image(probe.rows, request.attention_rows, image, offset, len(feature)),
                    received_attention=_per_image(
                        probe.columns, request.received_attention, image, offset, len(feature)
                    ),
                    grid=grid,
                    features=feature if request.features else None,
                )
                for image, (feature, grid) in enumerate(zip(features, grids, strict=True))
            ]
            selections = self.policy.select_batch(signals, [self.budget.tokens(len(f)) for f in features])
        tower_seconds = hooks.seconds if pruning is not None else 0.0
        return features, grids, selections, probe.seconds + tower_seconds + time.perf_counter() - start

    def _rebuild(
        self, inputs: dict[str, Any], counts: list[int], selections: list[Selection], for_generate: bool
    ) -> None:
        """Drop the unkept placeholders from the prompt in `inputs`, re-pad it and carry positions and labels."""
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        placeholder = input_ids == self.adapter.image_token_id
        rows, cols = placeholder.nonzero(as_tuple=True)
        if len(rows) != sum(counts):
            raise ValueError(
                f"the prompt holds {len(rows)} image placeholder tokens but the images give {sum(counts)} "
                f"visual tokens; build the prompt with the model's processor so each image expands to its tokens"
            )
        firsts = torch.tensor([0, *counts[:-1]], device=rows.device).cumsum(0).tolist()
        kept = torch.cat([first + s.kept.to(rows.device) for first, s in zip(firsts, selections, strict=True)])
        sources = torch.cat([first + _order(s).to(rows.device) for first, s in zip(firsts, selections, strict=True)])
        keep = attention_mask.bool() & ~placeholder
        keep[rows[kept], cols[kept]] = True

        order = compaction_order(keep, left_padded=for_generate or bool(attention_mask[:, -1].all()))
        new_mask = keep.gather(1, order)
        positions = self._positions(inputs, attention_mask, for_generate)
        if not torch.equal(kept, sources):  # tokens that take their position from another slot (see Selection.order)
            source_columns = torch.arange(input_ids.shape[1], device=rows.device).expand_as(input_ids).clone()
            source_columns[rows[kept], cols[kept]] = cols[sources]
            positions = positions.gather(-1, source_columns)
        new_ids, old_positions = gather_tokens([input_ids, positions], order)
        inputs["input_ids"] = new_ids.masked_fill(~new_mask, self.adapter.pad_token_id)
        inputs["attention_mask"] = new_mask.to(attention_mask.dtype)
        if self.positions == "original":
            inputs["position_ids"] = old_positions
        else:
            inputs["position_ids"] = (new_mask.long().cumsum(-1) - 1).clamp(min=0) + _past_length(inputs)
        if inputs.get("labels") is not None:
            (labels,) = gather_tokens([inputs["labels"]], order)
            inputs["labels"] = labels.masked_fill(~new_mask, IGNORE_INDEX)

    def _positions(self, inputs: dict[str, Any], attention_mask: torch.Tensor, for_generate: bool) -> torch.Tensor:
        positions = inputs.get("position_ids")
        if positions is None:
            positions = self.adapter.default_positions(
                inputs["input_ids"], attention_mask, _past_length(inputs), for_generate
            )
        return positions.expand_as(inputs["input_ids"])


def _per_image(
    captured: dict[int, torch.Tensor], layers: tuple[int, ...], image: int, offset: int, n_tokens: int
) -> torch.Tensor | None:
    """`[len(layers), n_tokens]`: one image's visual tokens out of per-layer `[images, tower tokens]` captures."""
    if not layers:
        return None
    return torch.stack([captured[layer][image, offset : offset + n_tokens] for layer in layers])


def _order(selection: Selection) -> torch.Tensor:
    return selection.kept if selection.order is None else selection.order


def _past_length(inputs: dict[str, Any]) -> int:
    cache = inputs.get("past_key_values")
    return 0 if cache is None else cache.get_seq_length()

"""The boundary engine: prune visual tokens between the vision tower and the LLM.

The vision tower runs once with the policy's probes attached; the policy picks kept tokens per
image; the prompt is rebuilt with only the kept placeholders (text and positions intact, re-padded)
and the pruned features are handed to the unpatched `forward`/`generate` as `mm_encoder_outputs`,
so the model's own cache, masks and sampling run untouched.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from vtprune import hf
from vtprune.adapters.base import Adapter
from vtprune.budget import Budget
from vtprune.crops import ROW_END, CropLayout, Group, share
from vtprune.kernels import gather_tokens
from vtprune.probes import AttentionProbe
from vtprune.registry import Policy
from vtprune.signals import ImageSignals, Selection
from vtprune.trace import ImageRecord, Trace

POSITION_MODES = ("original", "contiguous")
TEMPORAL_MODES = ("per_frame", "joint")
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


def check_positions(positions: str) -> None:
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")


class BoundaryEngine:
    """Prunes the visual tokens of one call's inputs with one policy and budget."""

    def __init__(
        self, adapter: Adapter, policy: Policy, budget: Budget, positions: str, temporal: str = "per_frame"
    ) -> None:
        check_positions(positions)
        if temporal not in TEMPORAL_MODES:
            raise ValueError(f"temporal must be one of {TEMPORAL_MODES}, got {temporal!r}")
        self.temporal = temporal
        self.adapter = adapter
        self.policy = policy
        self.budget = budget
        self.positions = positions
        model_type = adapter.model.config.model_type
        if positions == "contiguous" and adapter.multi_row_positions:
            raise ValueError(
                f"positions='contiguous' renumbers one-row positions; {model_type}'s multi-row (M-RoPE) positions "
                f"keep their original values: leave positions='original'"
            )
        self.request = policy.request(adapter.layout)
        self.trace: Trace | None = None
        self._delivered: list[torch.Tensor] | None = None

    def carries_vision(self, inputs: dict[str, Any]) -> bool:
        """Whether a call's inputs hold pixels of any modality the model encodes."""
        return any(inputs.get(names[0]) is not None for names in self.adapter.modalities.values())

    def take_delivered(self) -> tuple[list[torch.Tensor] | None, Trace | None]:
        """Per item (image, video) of the call just pruned, in placeholder order, the indices of the tokens given
        to the LLM in sequence order, with the call's trace; (None, None) when the call did not come through
        this engine. Read once."""
        delivered, self._delivered = self._delivered, None
        return delivered, (self.trace if delivered is not None else None)

    def prune(self, inputs: dict[str, Any], for_generate: bool) -> dict[str, Any]:
        """Return `inputs` with the images and videos encoded, pruned and passed as `mm_encoder_outputs`."""
        if inputs.get("input_ids") is None:
            raise ValueError(
                "vtprune finds image placeholders in input_ids: pass input_ids (as the processor returns them) "
                "rather than inputs_embeds together with pixel_values"
            )
        vision = {name: inputs.pop(name) for name in self.adapter.vision_inputs if name in inputs}
        vision = {name: value for name, value in vision.items() if value is not None}
        parts = [
            _Part(
                modality,
                *self.select(
                    {n: vision[n] for n in names if n in vision},
                    modality,
                    prompt=(inputs["input_ids"], inputs.get("attention_mask")),
                ),
            )
            for modality, names in self.adapter.modalities.items()
            if names[0] in vision
        ]
        starts, unchanged = self._rebuild(inputs, vision, parts, for_generate)
        if unchanged:  # the model lays out the prompt itself, as unpatched: it gets what describes the images
            pixels = {names[0] for names in self.adapter.modalities.values()}
            inputs.update({name: value for name, value in vision.items() if name not in pixels})
        outputs, records, delivered = {}, [], []
        depth = len(self.adapter.decoder_layers)
        for part in parts:
            orders = [s.delivered.to(f.device) for f, s in zip(part.features, part.selections, strict=True)]
            pruned = [f.index_select(0, order) for f, order in zip(part.features, orders, strict=True)]
            outputs[part.modality] = self.adapter.encoder_output(pruned, orders, part.modality)
            frames = part.layout.frames or (None,) * len(part.features)
            for feature, grid, selection, count in zip(
                part.features, part.layout.grids, part.selections, frames, strict=True
            ):
                record = ImageRecord(
                    kept=selection.kept,
                    n_before=len(feature),
                    n_after=len(selection.kept),
                    scores=selection.scores,
                    grid=grid,
                    stages=(("vision", len(selection.kept)),),
                    layer_tokens=(len(selection.kept),) * depth,
                    frames=count,
                    details=selection.details,
                    order=selection.order,
                )
                records.append(record)
                delivered.append(selection.delivered)
        placed = sorted(range(len(records)), key=starts.__getitem__)  # placeholder order over the batch
        inputs[hf.ENCODER_OUTPUTS] = outputs
        self._delivered = [delivered[i] for i in placed]
        self.trace = Trace(
            policy=self.policy.name,
            images=tuple(records[i] for i in placed),
            seconds=sum(part.seconds for part in parts),
            layer_lengths=(inputs["input_ids"].shape[1],) * depth,
        )
        return inputs

    def check_no_prompt_needed(self) -> None:
        """Refuse a policy that weighs the tokens by the instruction, for runtimes that call `select` without the
        prompt (vLLM, whose models call it at start-up)."""
        if self.request.instruction:
            raise ValueError(
                f"{self.policy.name} (as configured) weighs the tokens by the instruction, which this runtime does not "
                f"hand the vision encoder: configure it without one (e.g. relevance='none'), or run it with "
                f"vtprune.patch on HF transformers"
            )

    def select(
        self,
        vision: dict[str, Any],
        modality: str,
        budgets: list[Budget] | None = None,
        prompt: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> tuple[CropLayout, list[torch.Tensor], list[Selection], float]:
        """Run the tower once with the probes (and any in-tower pruning) attached and select per group: the layout,
        each item's features (`adapter.encode`), what each item keeps (numbered among its visual tokens) and the
        seconds spent scoring and selecting. Runtimes that place the features themselves (vLLM) call this alone,
        and may give each item its own budget (`budgets`, one per item; the engine's where None). `prompt` (the
        call's `input_ids` and attention mask) gives policies that ask for it each item's instruction, and families
        whose vision inputs do not say so (InternVL) each item's crops."""
        request, adapter = self.request, self.adapter
        if prompt is None:
            self.check_no_prompt_needed()
        layout = adapter.crop_layout(vision, modality, self.temporal, None if prompt is None else prompt[0])
        probe = adapter.attention_probe(request.attention_rows, request.received_attention, layout, vision)
        groups = layout.groups()
        keeps = self._group_keeps(layout, groups, budgets or [self.budget] * len(layout.sources))
        crop_keeps = [keep for group, keep in zip(groups, keeps, strict=True) if group.weights is None]
        pruning = self.policy.tower_pruning(adapter.layout, crop_keeps, layout.crop_tokens, layout.available())
        if pruning is not None and layout.is_resampled:
            raise ValueError(
                f"{self.policy.name} prunes inside the vision tower, where a token is one patch, but "
                f"{adapter.model.config.model_type} interpolates these {modality}s' tokens from several patches after "
                f"the tower (pooled video frames, or an image mosaic larger than its vision_aspect_ratio allows): use "
                f"a policy that selects after the tower (cls_attention, hierarchical, diversity_kcenter, "
                f"max_min_diversity, uniform, random) or one that acts in the decoder"
            )
        hooks = contextlib.nullcontext() if pruning is None else adapter.tower_hooks(pruning, layout, vision)
        projected = adapter.projector_probe(layout, vision) if request.tower_features else contextlib.nullcontext()
        with probe, hooks, projected:
            features = adapter.encode(vision, modality)
        start = time.perf_counter()
        if pruning is not None:  # rows are crops, and each crop's group holds its tokens that reach the LLM
            group_selections = [
                _in_group(s, g, layout.crop_tokens) for s, g in zip(hooks.selections(), groups, strict=True)
            ]
        else:
            tower_features = projected.features if request.tower_features else None
            given = prompt is not None and request.instruction
            instructions = self._instructions(*prompt, modality, [len(f) for f in features]) if given else None
            embedded = None if instructions is None else [self._embedded(ids) for ids in instructions]
            group_selections = self._select_per_group(
                probe, layout, groups, keeps, features, tower_features, instructions, embedded
            )
        selections = _item_selections(layout, groups, group_selections, [len(f) for f in features])
        tower_seconds = hooks.seconds if pruning is not None else 0.0
        return layout, features, selections, probe.seconds + tower_seconds + time.perf_counter() - start

    def _select_per_group(
        self,
        probe: AttentionProbe,
        layout: CropLayout,
        groups: list[Group],
        keeps: list[int],
        features: list[torch.Tensor],
        tower_features: torch.Tensor | None,
        instructions: list[torch.Tensor] | None,
        embedded: list[torch.Tensor] | None,
    ) -> list[Selection]:
        """The policy's selection in each group from the captured signals, numbered among the group's tokens."""
        request = self.request
        selecting = [index for index, keep in enumerate(keeps) if keep > 0]  # a group may get no share at all
        signals = []
        for index in selecting:
            group = groups[index]
            signals.append(
                ImageSignals(
                    n_tokens=len(group.positions),
                    attention_rows=self._signal(probe.rows, request.attention_rows, group, layout),
                    received_attention=self._signal(probe.columns, request.received_attention, group, layout),
                    grid=group.grid,
                    features=features[group.item][group.positions] if request.features else None,
                    tower_features=None if tower_features is None else _tower_features(tower_features, group, layout),
                    instruction_ids=None if instructions is None else instructions[group.item],
                    instruction=None if embedded is None else embedded[group.item],
                    image=group.item,
                )
            )
        chosen = self.policy.select_batch(signals, [keeps[index] for index in selecting])
        selections = [Selection(kept=torch.zeros(0, dtype=torch.long)) for _ in groups]
        for index, selection in zip(selecting, chosen, strict=True):
            selections[index] = selection
        return selections

    def _signal(
        self, captured: dict[int, torch.Tensor], layers: tuple[int, ...], group: Group, layout: CropLayout
    ) -> torch.Tensor | None:
        """`[len(layers), n]`: a group's tokens' values out of per-layer `[crops, tower tokens]` captures, each the
        interpolation of its sources' values where the model resamples it."""
        if not layers:
            return None
        crops = group.sources.div(layout.crop_tokens, rounding_mode="floor")
        tokens = self.adapter.token_offset + group.sources % layout.crop_tokens
        rows = []
        for layer in layers:
            values = captured[layer]
            rows.append(group.resample(values[crops.to(values.device), tokens.to(values.device)]))
        return torch.stack(rows)

    def _instructions(
        self, input_ids: torch.Tensor, mask: torch.Tensor | None, modality: str, counts: list[int]
    ) -> list[torch.Tensor]:
        """Per item of `modality` (`counts` visual tokens each, in placeholder order), the ids of its row's real
        text tokens after its last placeholder."""
        valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        visual = self.adapter.placeholder_mask(input_ids)
        rows, cols = self.adapter.modality_mask(input_ids, modality).nonzero(as_tuple=True)
        instructions = []
        for last in torch.tensor(counts).cumsum(0).sub(1).tolist():
            row, col = int(rows[last]), int(cols[last])
            text = valid[row] & ~visual[row]
            text[: col + 1] = False
            instructions.append(input_ids[row, text])
        return instructions

    def _embedded(self, ids: torch.Tensor) -> torch.Tensor:
        """`[M, hidden]`: the LLM's input embeddings of `ids`."""
        return self.adapter.model.get_input_embeddings()(ids).detach()

    def _group_keeps(self, layout: CropLayout, groups: list[Group], budgets: list[Budget]) -> list[int]:
        """Each group's share of its item's budget (the budget counts the tokens crops produce, not row ends)."""
        keeps = []
        for item, (sources, budget) in enumerate(zip(layout.sources, budgets, strict=True)):
            sizes = [len(group.positions) for group in groups if group.item == item]
            keeps += share(budget.tokens(int((sources != ROW_END).sum())), sizes)
        return keeps

    def _rebuild(
        self, inputs: dict[str, Any], vision: dict[str, Any], parts: list[_Part], for_generate: bool
    ) -> tuple[list[int], bool]:
        """Drop the unkept placeholders from the prompt in `inputs`, re-pad it and carry positions and labels; a
        prompt that keeps every placeholder in place is left exactly as it is. Returns, per item of `parts` in
        turn, the flat index (row-major) of its first placeholder, and whether the prompt was left as it is."""
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid = attention_mask.bool()
        present = valid.clone()  # the columns the rebuilt prompt holds: a masked placeholder stays, masked
        source_columns = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids).clone()
        starts, unchanged = [], True
        for part in parts:
            placeholder = self.adapter.modality_mask(input_ids, part.modality)
            rows, cols = placeholder.nonzero(as_tuple=True)
            counts = [len(f) for f in part.features]
            if len(rows) != sum(counts):
                raise ValueError(
                    f"Image features and image tokens do not match, tokens: {len(rows)}, features: {sum(counts)} "
                    f"(the prompt holds {len(rows)} {part.modality} placeholder tokens but the {part.modality}s give "
                    f"{sum(counts)} visual tokens); build the prompt with the model's processor so each expands to "
                    f"its tokens"
                )
            firsts = torch.tensor([0, *counts[:-1]], device=rows.device).cumsum(0).tolist()
            starts += [int(rows[first] * input_ids.shape[1] + cols[first]) for first in firsts]
            kept = torch.cat([f + s.kept.to(rows.device) for f, s in zip(firsts, part.selections, strict=True)])
            sources = torch.cat([f + s.delivered.to(rows.device) for f, s in zip(firsts, part.selections, strict=True)])
            unchanged &= len(kept) == len(rows) and torch.equal(sources, kept)
            present &= ~placeholder
            present[rows[kept], cols[kept]] = True
            source_columns[rows[kept], cols[kept]] = cols[sources]  # see Selection.order
        if unchanged:
            return starts, True
        if inputs.get("attention_mask") is None and _packed(inputs.get("position_ids")):
            raise ValueError(
                "padding-free (packed) inputs hold several sequences per row, told apart by their position ids alone, "
                "which pruning renumbers: pass one sequence per row with an attention mask (padding=True), or keep=1.0"
            )

        order = compaction_order(present, left_padded=for_generate or bool(attention_mask[:, -1].all()))
        filled = present.gather(1, order)
        new_mask = filled & valid.gather(1, order)
        positions = self._positions(inputs, vision, attention_mask, for_generate)
        positions = positions.gather(-1, source_columns.expand_as(positions))
        (new_ids,) = gather_tokens([input_ids], order)
        inputs["input_ids"] = new_ids.masked_fill(~filled, self.adapter.pad_token_id)
        inputs["attention_mask"] = new_mask.to(attention_mask.dtype)
        if self.positions == "original":
            kept_positions = _gathered_rows(positions, order)
            inputs["position_ids"] = self.adapter.kept_positions(kept_positions, new_mask, for_generate)
        else:
            inputs["position_ids"] = (new_mask.long().cumsum(-1) - 1).clamp(min=0) + _past_length(inputs)
        for name in self.adapter.token_inputs:
            if inputs.get(name) is not None:
                (values,) = gather_tokens([inputs[name]], order)
                inputs[name] = values.masked_fill(~filled, 0)
        if inputs.get("inputs_embeds") is not None:  # given beside input_ids: pruned in step with them
            (embeds,) = gather_tokens([inputs["inputs_embeds"]], order)
            inputs["inputs_embeds"] = embeds.masked_fill(~filled[..., None], 0)
        if inputs.get("labels") is not None:
            (labels,) = gather_tokens([inputs["labels"]], order)
            inputs["labels"] = labels.masked_fill(~filled, IGNORE_INDEX)
        return starts, False

    def _positions(
        self, inputs: dict[str, Any], vision: dict[str, Any], attention_mask: torch.Tensor, for_generate: bool
    ) -> torch.Tensor:
        """`[B, L]` (or `[rows, B, L]` for multi-row positions such as M-RoPE) positions of the unpruned prompt."""
        positions = inputs.get("position_ids")
        if positions is None:
            call = {**inputs, **vision, "attention_mask": attention_mask}
            positions = self.adapter.default_positions(call, _past_length(inputs), for_generate)
        return positions.expand(*positions.shape[:-2], *inputs["input_ids"].shape)


@dataclass(frozen=True)
class _Part:
    """One modality's items of a call: how its crops lie, its features and what each item keeps."""

    modality: str
    layout: CropLayout
    features: list[torch.Tensor]
    selections: list[Selection]
    seconds: float


def _gathered_rows(positions: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Positions `[..., B, L]` at `order` `[B, Lp]`, whatever rows lead."""
    if positions.dim() == 2:
        return gather_tokens([positions], order)[0]
    return gather_tokens([positions.transpose(0, 1)], order, token_dims=2)[0].transpose(0, 1)


def _item_selections(
    layout: CropLayout, groups: list[Group], selections: list[Selection], counts: list[int]
) -> list[Selection]:
    """Per item: its groups' kept tokens at their places among the item's visual tokens, plus the tokens no
    crop produced (row ends). A group's own order carries over where an item is that one group."""
    items = []
    for item, (sources, count) in enumerate(zip(layout.sources, counts, strict=True)):
        scores = torch.full((count,), float("nan"))
        kept, orders, scored, details = [(sources == ROW_END).nonzero().squeeze(1)], [], False, {}
        for group, selection in zip(groups, selections, strict=True):
            if group.item != item:
                continue
            details.update(selection.details)
            kept.append(group.positions[selection.kept])
            orders.append(None if selection.order is None else group.positions[selection.order])
            if selection.scores is not None:
                scores[group.positions] = selection.scores.detach().float().cpu()
                scored = True
        single = len(orders) == 1 and len(kept[0]) == 0
        items.append(
            Selection(
                kept=torch.cat(kept).sort().values,
                scores=scores if scored else None,
                details=tuple(details.items()),
                order=orders[0] if single else None,
            )
        )
    return items


def _tower_features(captured: torch.Tensor, group: Group, layout: CropLayout) -> torch.Tensor:
    """`[n, width]`: a group's tokens' tower features out of the projector's input `[crops, crop_tokens, width]`,
    each the interpolation of its sources' where the model resamples it."""
    sources = group.sources.to(captured.device)
    values = captured[sources.div(layout.crop_tokens, rounding_mode="floor"), sources % layout.crop_tokens]
    return group.resample(values.movedim(-1, 0)).movedim(0, -1)


def _in_group(selection: Selection, group: Group, crop_tokens: int) -> Selection:
    """A selection numbered among a crop's tokens, renumbered among its group's (the crop's tokens that reach the
    LLM), leaving out tokens the model itself drops."""
    tokens = group.sources[:, 0] % crop_tokens

    def among(chosen: torch.Tensor) -> torch.Tensor:
        chosen = chosen.to(tokens.device)
        index = torch.searchsorted(tokens, chosen).clamp(max=max(len(tokens) - 1, 0))
        return index[tokens[index] == chosen] if len(tokens) else index[:0]

    scores = None if selection.scores is None else selection.scores[tokens.to(selection.scores.device)]
    order = None if selection.order is None else among(selection.order)
    return Selection(kept=among(selection.kept), scores=scores, order=order)


def _packed(positions: torch.Tensor | None) -> bool:
    """Whether text positions `[B, L]` (or the text row of Qwen-VL's `[4, B, L]`) restart within a row."""
    if positions is None or (positions.dim() == 3 and positions.shape[0] != 4):
        return False
    text = positions if positions.dim() == 2 else positions[0]
    return bool((text.diff(dim=-1) != 1).any())


def _past_length(inputs: dict[str, Any]) -> int:
    return hf.cache_length(hf.caller_cache(inputs))

"""The in-decoder engine: cut visual tokens between decoder layers during prefill.

Forward pre-hooks on the decoder layers do the work. In prefill, at a cut's layer the visual tokens are
scored, each image keeps its share, and the hidden states, position ids and embeddings and the 4-D
masks are gathered once; every later layer gets the gathered copies. The KV cache thus holds every
token below the first cut and only the kept ones from it on. In decode, layers from a cut on get the
mask re-indexed to their shorter cache (and, with `positions="contiguous"`, positions shifted by the
tokens dropped before them). Rows may drop different numbers of tokens (several images, text-only
rows): the shorter rows are re-padded and the padding is masked out.
"""

from __future__ import annotations

import functools
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vtprune import hf
from vtprune.adapters.base import Adapter
from vtprune.boundary import BoundaryEngine, compaction_order
from vtprune.budget import Budget
from vtprune.decoder_probes import attention_received, key_norms, token_transition
from vtprune.kernels import gather_tokens
from vtprune.registry import Policy
from vtprune.signals import CutSignals, DecoderCut
from vtprune.trace import ImageRecord, Trace


@dataclass(frozen=True)
class Stage:
    """One cut of one policy, with the budget it answers to."""

    policy: Policy
    budget: Budget
    index: int
    """The cut's number among its policy's cuts."""
    cut: DecoderCut


@dataclass
class _Sequence:
    """The prefill sequence as the layers from the last cut on see it: per slot, `[B, L]` each."""

    columns: torch.Tensor
    """Column of the slot's token in the prompt the decoder received."""
    valid: torch.Tensor
    """Whether the slot holds a real token (not padding)."""
    filled: torch.Tensor
    """Whether the slot holds a token of the prompt, padding included (False: padding a cut added)."""
    image: torch.Tensor
    """Image (row-major over the batch) of a visual token, -1 for text and padding."""
    token: torch.Tensor
    """Index of a visual token among its image's tokens at the decoder's entry, -1 otherwise."""
    position_ids: torch.Tensor | None
    masks: dict[tuple[int, int | None], torch.Tensor | None] = field(default_factory=dict)
    """Gathered 4-D masks, by the id of the mask the model built (one per layer type) and the layer's window."""
    embeddings: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Gathered (or, `contiguous`, recomputed) RoPE (cos, sin), by the id of the model's cos (one per layer type)."""


@dataclass
class _Prefill:
    """State of one prefill call."""

    left_padded: bool
    sequence: _Sequence
    entering: list[int]
    """Visual tokens each image brought into the decoder."""
    counts: list[int]
    """Visual tokens each image has now (a new list after each cut, never changed in place)."""
    delivered: list[torch.Tensor]
    """Per image, the processor-numbered index of each token it brought, in sequence order."""
    base: Trace | None
    inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    transitions: torch.Tensor | None = None
    cache: Any = None
    layer_lengths: list[int] = field(default_factory=list)
    layer_tokens: list[list[int]] = field(default_factory=list)
    stages: list[list[tuple[str, int]]] = field(default_factory=list)
    scores: list[torch.Tensor | None] = field(default_factory=list)
    seconds: float = 0.0
    dropped: torch.Tensor | int = 0
    """Tokens each row `[B, 1]` has dropped so far."""
    segments: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """For decode: (first layer, slot validity `[B, Lk]`, tokens dropped per row `[B, 1]`) per cut."""


@dataclass(frozen=True)
class _Decoding:
    """What decode steps need of the prefill that filled `cache`."""

    cache: weakref.ref
    """The cache, weakly: a finished call's KV cache is the caller's to keep or drop, not the engine's."""
    segments: list[tuple[int, torch.Tensor, torch.Tensor]]


class DecoderEngine:
    """Runs a patch's in-decoder cuts through hooks on the model's decoder layers."""

    def __init__(self, adapter: Adapter, stages: list[Stage], positions: str, name: str) -> None:
        self.adapter = adapter
        self.name = name
        self.layers = adapter.decoder_layers
        self.stages = sorted(stages, key=lambda s: s.cut.layer)
        self.contiguous = positions == "contiguous"
        _check_cuts(self.stages, len(self.layers), adapter.first_cut_layer)
        self.cut_layers = {s.cut.layer: s for s in self.stages}
        self.first = self.stages[0].cut.layer
        self.stashed = {layer for s in self.stages for layer in _sources(s.cut)}
        self.transition_layers = sorted({layer for s in self.stages for layer in s.cut.transitions})
        hf.check_masks_followed(adapter.attention_implementation)
        # resolved now, so a call convention vtprune does not know is refused before the model is touched
        self.backbone_call = hf.bind(adapter.backbone, hf.BACKBONE)
        self.layer_calls = [hf.bind(layer, hf.DECODER_LAYER) for layer in self.layers]
        self.windows = [adapter.layer_window(index) for index in range(len(self.layers))]  # sliding, or None
        self.parts = {index: adapter.decoder_parts(index) for index in (*self.stashed, *self.transition_layers)}
        self.sublayer_calls = {
            index: tuple(hf.bind(m, hf.SUBLAYER) for m in (self.parts[index].attention, self.parts[index].mlp))
            for index in self.transition_layers
        }
        self.prefill: _Prefill | None = None
        self.decoding: _Decoding | None = None
        self.boundary: BoundaryEngine | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self, boundary: BoundaryEngine) -> None:
        """Attach the hooks; `boundary` is the patch's boundary engine, whose record of the call is extended."""
        self.boundary = boundary
        backbone = self.adapter.backbone
        self._handles.append(backbone.register_forward_pre_hook(self._on_call, with_kwargs=True))
        self._handles.append(backbone.register_forward_hook(self._on_return))
        # hooks are bound methods (with partial), not closures, so a copy or pickle of the model brings its own
        for index, layer in enumerate(self.layers):
            hook = functools.partial(self._on_layer, index)
            self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        for index in self.transition_layers:
            parts = self.parts[index]
            for module, binding in zip((parts.attention, parts.mlp), self.sublayer_calls[index], strict=True):
                hook = functools.partial(self._on_sublayer, binding)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def __getstate__(self) -> dict[str, Any]:
        # a copy starts with no call under way: a deep copy would keep pointing at the original's cache, and a
        # weak reference does not pickle
        return {**self.__dict__, "prefill": None, "decoding": None}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.prefill = self.decoding = None

    # --- call boundaries -------------------------------------------------------------------------

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self.backbone_call.view(args, kwargs)
        input_ids, cache = call["input_ids"], call["cache"]
        self.prefill = None
        continuing = hf.cache_length(cache) > 0
        # A decode step may carry a placeholder id the model generated; only a call with images is a prompt.
        prompt = not continuing or any(kwargs.get(name) is not None for name in hf.IMAGE_INPUTS)
        if input_ids is not None and prompt and bool(self.adapter.placeholder_mask(input_ids).any()):
            if continuing:
                raise ValueError(
                    "vtprune's in-decoder stages cut the prompt during its prefill: pass the whole prompt with "
                    "an empty cache rather than continuing a filled one"
                )
            self.decoding = None
            self.prefill = self._start(input_ids, call["mask"])
        elif self.decoding is not None and (cache is None or cache is not self.decoding.cache()):
            self.decoding = None

    def _on_return(self, module: nn.Module, args: tuple, output: Any) -> None:
        prefill, self.prefill = self.prefill, None
        if prefill is None:
            return
        self.boundary.trace = self._traced(prefill)
        if prefill.cache is not None and prefill.segments:
            self.decoding = _Decoding(weakref.ref(prefill.cache), prefill.segments)

    def _start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> _Prefill:
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        visual = self.adapter.placeholder_mask(input_ids)  # a masked placeholder still takes its image's feature
        delivered, base = self.boundary.take_delivered()
        if delivered is None:
            delivered = _runs(visual)
        counts = [len(d) for d in delivered]
        found = int(visual.sum())
        if found != sum(counts):
            raise ValueError(f"the prompt holds {found} image placeholders but the images give {sum(counts)} tokens")
        image = torch.full_like(input_ids, -1)
        token = torch.full_like(input_ids, -1)
        image[visual] = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(image.device)
        token[visual] = torch.cat([torch.arange(c) for c in counts]).to(token.device)
        batch, length = input_ids.shape
        columns = torch.arange(length, device=input_ids.device).expand(batch, length)
        sequence = _Sequence(columns, valid, torch.ones_like(valid), image, token, None)
        return _Prefill(
            left_padded=bool(valid[:, -1].all()),
            sequence=sequence,
            entering=counts,
            counts=counts,
            delivered=delivered,
            base=base,
            stages=[[] for _ in counts],
            scores=[None for _ in counts],
        )

    # --- layers ----------------------------------------------------------------------------------

    def _on_layer(self, index: int, module: nn.Module, args: tuple, kwargs: dict):
        if self.prefill is not None:
            return self._prefill_layer(index, self.layer_calls[index].view(args, kwargs))
        if self.decoding is not None and index >= self.first:
            return self._decode_layer(index, self.layer_calls[index].view(args, kwargs))
        return None

    def _prefill_layer(self, index: int, call: hf.Call):
        prefill = self.prefill
        hidden = call["hidden"]
        if prefill.cache is None:
            prefill.cache = call["cache"]
        built = (call["mask"], call["position_embeddings"])  # what the model built for the whole prompt
        if prefill.segments:  # a cut has happened: later layers follow the cut sequence
            self._follow(index, prefill.sequence, call, built)
        else:
            prefill.sequence.position_ids = call["positions"]
        if index in self.stashed:
            prefill.inputs[index] = (hidden, call["position_embeddings"])
        stage = self.cut_layers.get(index)
        if stage is not None:
            start = time.perf_counter()
            hidden = self._cut(prefill, stage, hidden)
            prefill.seconds += time.perf_counter() - start
            self._follow(index, prefill.sequence, call, built)
        call["hidden"] = hidden
        prefill.layer_lengths.append(hidden.shape[1])
        prefill.layer_tokens.append(prefill.counts)
        return call.arguments()

    def _follow(self, index: int, sequence: _Sequence, call: hf.Call, built: tuple[Any, Any]) -> None:
        """Give layer `index`, after a cut, the gathered mask, positions and position embeddings. The model built its
        masks and embeddings for the whole prompt, one per layer type: each is gathered once, at the first layer
        of its type after the cut."""
        mask, given = built
        window = self.windows[index]
        key = (id(mask), window)
        if key not in sequence.masks:
            implementation = self.adapter.attention_implementation
            sequence.masks[key] = _gathered_mask(mask, sequence, implementation, window)
        call["mask"] = sequence.masks[key]
        call["positions"] = sequence.position_ids
        if id(given[0]) not in sequence.embeddings:
            if self.contiguous:
                embeddings = self.adapter.rotary_embedding(call["hidden"], sequence.position_ids, index)
            else:
                batch = sequence.columns.shape[0]
                embeddings = tuple(gather_tokens([t.expand(batch, *t.shape[1:]) for t in given], sequence.columns))
            sequence.embeddings[id(given[0])] = embeddings
        call["position_embeddings"] = sequence.embeddings[id(given[0])]

    def _on_sublayer(self, binding: hf.Binding, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        prefill = self.prefill
        if prefill is None:
            return
        start = time.perf_counter()
        before = binding.view(args, kwargs)["hidden"]
        after = hf.first_output(output)
        change = token_transition(before, after, prefill.sequence.valid)
        prefill.transitions = change if prefill.transitions is None else prefill.transitions + change
        prefill.seconds += time.perf_counter() - start

    def _cut(self, prefill: _Prefill, stage: Stage, hidden: torch.Tensor) -> torch.Tensor:
        sequence, cut = prefill.sequence, stage.cut
        visual = sequence.image >= 0
        inputs = {layer: prefill.inputs.pop(layer) for layer in _sources(cut)}
        attention = norms = states = None
        if cut.attention_layer is not None:
            stashed, embeddings = inputs[cut.attention_layer]
            queries = _queries(cut.queries, visual, sequence.valid)
            parts = self.parts[cut.attention_layer]
            attention = attention_received(parts, stashed, embeddings, queries, sequence.valid)
        if cut.key_layer is not None:
            norms = key_norms(self.parts[cut.key_layer], *inputs[cut.key_layer])
        if cut.states:
            states = self.adapter.final_norm(hidden).float()
        transitions = prefill.transitions if cut.transitions else None
        row_index = sequence.valid.long().cumsum(1) - 1
        columns = torch.arange(visual.shape[1], device=visual.device)
        keep = sequence.filled & ~visual  # the prompt's own padding stays, so the model's masks still cover it
        counts = list(prefill.counts)
        for image in range(len(prefill.entering)):
            rows, cols = (sequence.image == image).nonzero(as_tuple=True)
            if len(cols) == 0:
                continue
            row = rows[0]  # an image lies in one row
            count = min(stage.policy.cut_keep(stage.index, prefill.entering[image], stage.budget), len(cols))
            if count == 0:
                cols = cols[:0]
            elif count < len(cols):
                text = (sequence.valid[row] & ~visual[row] & (columns > cols.max())).nonzero().squeeze(1)
                signals = CutSignals(
                    n_tokens=len(cols),
                    attention=None if attention is None else attention[row, cols],
                    transitions=None if transitions is None else transitions[row, cols],
                    key_norms=None if norms is None else norms[row, cols],
                    states=None if states is None else states[row, cols],
                    rows=row_index[row, cols],
                    text_key_norms=None if norms is None else norms[row, text],
                    text_states=None if states is None else states[row, text],
                    text_rows=row_index[row, text],
                )
                kept, scores = stage.policy.cut_select(stage.index, signals, count)
                full = torch.full((prefill.entering[image],), float("nan"))
                full[sequence.token[row, cols].cpu()] = scores.detach().float().cpu()
                prefill.scores[image] = full
                cols = cols[kept.to(cols.device).sort().values]
            keep[row, cols] = True
            counts[image] = len(cols)
            prefill.stages[image].append((f"{stage.policy.name}@{cut.layer}", count))
        prefill.counts = counts
        order = compaction_order(keep, prefill.left_padded)
        filled = keep.gather(1, order)
        valid = filled & sequence.valid.gather(1, order)
        dropped = sequence.valid & ~keep
        prefill.dropped = prefill.dropped + dropped.sum(1, keepdim=True)
        prefill.sequence = self._gathered(sequence, order, valid, filled, dropped.long().cumsum(1))
        if prefill.transitions is not None:
            (prefill.transitions,) = gather_tokens([prefill.transitions], order)
        prefill.segments.append((cut.layer, valid, prefill.dropped))
        (hidden,) = gather_tokens([hidden], order)
        return hidden

    def _gathered(
        self,
        sequence: _Sequence,
        order: torch.Tensor,
        valid: torch.Tensor,
        filled: torch.Tensor,
        dropped: torch.Tensor,
    ) -> _Sequence:
        batch = order.shape[0]
        columns, image, token, dropped = gather_tokens(
            [sequence.columns, sequence.image, sequence.token, dropped], order
        )
        image, token = image.masked_fill(~valid, -1), token.masked_fill(~valid, -1)
        position_ids = sequence.position_ids
        if position_ids is not None:  # `[B, L]`, or M-RoPE's `[3, B, L]` where the model passes its layers those
            rows = position_ids if position_ids.dim() == 3 else position_ids[None]
            rows = torch.stack([gather_tokens([row.expand(batch, -1)], order)[0] for row in rows])
            position_ids = rows if position_ids.dim() == 3 else rows[0]
        if self.contiguous:
            if position_ids is None:
                raise ValueError("positions='contiguous' needs the position ids the model passes its layers")
            position_ids = position_ids - dropped
        return _Sequence(columns, valid, filled, image, token, position_ids)

    def _decode_layer(self, index: int, call: hf.Call):
        decoding = self.decoding
        _, valid, shift = next(s for s in reversed(decoding.segments) if s[0] <= index)
        hidden = call["hidden"]
        keys = hf.cache_length(decoding.cache(), index) + hidden.shape[1]  # this layer's keys after this step
        implementation = self.adapter.attention_implementation
        call["mask"] = _decode_mask(call["mask"], valid, keys, implementation, self.windows[index])
        if self.contiguous:
            call["positions"] = call["positions"] - shift
            call["position_embeddings"] = self.adapter.rotary_embedding(hidden, call["positions"], index)
        return call.arguments()

    # --- trace -----------------------------------------------------------------------------------

    def _traced(self, prefill: _Prefill) -> Trace:
        final = prefill.sequence
        records = []
        for image, delivered in enumerate(prefill.delivered):
            remaining = final.token[final.image == image]
            given = delivered[remaining.cpu()]
            kept = given.sort().values
            base = prefill.base.images[image] if prefill.base is not None else None
            scores = prefill.scores[image]
            if scores is not None:
                full = torch.full((base.n_before if base else len(delivered),), float("nan"))
                full[delivered] = scores
                scores = full
            elif base is not None:
                scores = base.scores
            records.append(
                ImageRecord(
                    kept=kept,
                    n_before=base.n_before if base else len(delivered),
                    n_after=len(kept),
                    scores=scores,
                    grid=base.grid if base else None,
                    stages=(*(base.stages if base else ()), *prefill.stages[image]),
                    layer_tokens=tuple(counts[image] for counts in prefill.layer_tokens),
                    frames=base.frames if base else None,
                    order=None if torch.equal(given, kept) else given,
                )
            )
        seconds = (prefill.base.seconds if prefill.base is not None else 0.0) + prefill.seconds
        return Trace(
            policy=self.name, images=tuple(records), seconds=seconds, layer_lengths=tuple(prefill.layer_lengths)
        )


def _check_cuts(stages: list[Stage], depth: int, lowest: int) -> None:
    layers = [s.cut.layer for s in stages]
    if len(set(layers)) != len(layers):
        raise ValueError(
            f"two in-decoder cuts act before the same decoder layer ({layers}): give them different layers"
        )
    for stage in stages:
        cut, name = stage.cut, stage.policy.name
        if not lowest <= cut.layer < depth:
            why = "needs at least one layer before it"
            if lowest > 1:
                why = f"must come after the layers 0..{lowest - 1} that receive deepstack features"
            raise ValueError(
                f"{name} cuts before decoder layer {cut.layer}, but the decoder has layers 0..{depth - 1} and a cut "
                f"{why}: choose a layer in {lowest}..{depth - 1}"
            )
        for source in _sources(cut):
            if not 0 <= source <= cut.layer:
                raise ValueError(f"{name} scores at layer {source}, which does not run before its cut at {cut.layer}")
            between = [s.cut.layer for s in stages if source < s.cut.layer < cut.layer]
            if between:
                raise ValueError(
                    f"{name} scores the tokens with decoder layer {source}, but another cut changes them before "
                    f"layer {between[0]}: move one of the cuts"
                )
        if any(layer >= cut.layer for layer in cut.transitions):
            raise ValueError(f"{name} sums token transitions over layers {cut.transitions}, not all before its cut")


def _sources(cut: DecoderCut) -> set[int]:
    """The layers whose inputs a cut scores with."""
    return {layer for layer in (cut.attention_layer, cut.key_layer) if layer is not None}


def _runs(visual: torch.Tensor) -> list[torch.Tensor]:
    """Without the boundary's record (features passed in directly), each run of placeholders is one image."""
    images = []
    for row in visual.cpu():
        columns = row.nonzero().squeeze(1).tolist()
        start = 0
        for i in range(1, len(columns) + 1):
            if i == len(columns) or columns[i] != columns[i - 1] + 1:
                images.append(torch.arange(i - start))
                start = i
    return images


def _queries(which: str, visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`[B, L]` bool: the last real token of each row, or every real token after the row's last visual token."""
    columns = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    if which == "last":
        last = columns.masked_fill(~valid, -1).max(1, keepdim=True).values
        return columns == last
    if which == "instruction":
        after = columns.masked_fill(~visual, -1).max(1, keepdim=True).values
        return valid & (columns > after)
    raise ValueError(f"unknown query set {which!r}; use 'last' or 'instruction'")


def _gathered_mask(
    mask: torch.Tensor | None, sequence: _Sequence, implementation: str, window: int | None = None
) -> torch.Tensor | None:
    """The model's 4-D prefill mask at the kept slots (both query and key dims). Padding a cut added is masked
    as keys and attends to itself only, so no row is fully masked; the prompt's own padding keeps its mask. A
    sliding `window` counts the slots of the cut sequence, as it would on a prompt of the kept tokens alone: the
    earlier real keys the model's window left out come back, and those `window` slots or more before a query go."""
    filled = sequence.filled
    if mask is None and bool(filled.all()):
        return None  # still plain causal attention over the shorter sequence (and within any window: it was)
    batch, length = filled.shape
    slots = torch.arange(length, device=filled.device)
    diagonal = torch.eye(length, dtype=torch.bool, device=filled.device) & ~filled[:, None, None, :]
    allowed = hf.allowed(mask)
    if allowed is None:
        causal = torch.ones(length, length, dtype=torch.bool, device=filled.device).tril()
        kept = causal & sequence.valid[:, None, None, :]
    else:
        columns = sequence.columns
        allowed = allowed.expand(batch, -1, -1, -1)
        rows = allowed.gather(2, columns[:, None, :, None].expand(-1, allowed.shape[1], -1, allowed.shape[3]))
        kept = rows.gather(3, columns[:, None, None, :].expand(-1, allowed.shape[1], length, -1))
        kept = kept & filled[:, None, None, :]
    if window is not None:
        earlier = (sequence.columns[:, None, None, :] < sequence.columns[:, None, :, None]) & sequence.valid[
            :, None, None, :
        ]
        kept = (kept | earlier) & (slots[None, :] > slots[:, None] - window)
    return hf.in_form(kept | diagonal, mask, implementation)


def _decode_mask(
    mask: torch.Tensor | None, valid: torch.Tensor, keys: int, implementation: str, window: int | None = None
) -> torch.Tensor | None:
    """A decode step's mask for a layer whose `keys` keys are the prefill slots `valid` describes, then the
    tokens decoded since (whose columns close the model's own mask). A sliding-window layer's cache holds only
    its last `window - 1` keys before the step's: the mask covers those, each query its last `window` slots."""
    allowed = hf.allowed(mask)
    if allowed is None:
        if bool(valid.all()):
            return None
        later = torch.ones(valid.shape[0], keys - valid.shape[1], dtype=torch.bool, device=valid.device)
        return hf.in_form(torch.cat([valid, later], 1)[:, None, None, :], None, implementation)
    after = allowed[..., allowed.shape[-1] - min(keys - valid.shape[1], allowed.shape[-1]) :]
    prefilled = valid[:, None, None, :].expand(-1, *after.shape[1:3], -1)
    full = torch.cat([prefilled, after], -1)
    if window is not None:
        queries = full.shape[2]
        visible = min(keys - queries, window - 1) + queries
        full = full[..., -visible:]
        columns = torch.arange(visible, device=full.device)
        first = visible - queries + torch.arange(queries, device=full.device) - window + 1
        full = full & (columns[None, :] >= first[:, None])
    return hf.in_form(full, mask, implementation)

"""`visionzip`: VisionZip (arXiv 2412.04467), dominant tokens plus merged contextual tokens.

At the feature layer, the `dominant` tokens are the CLS token and the patches the CLS query attends
to most (head mean of the layer's own attention row). Of the rest, `contextual` evenly strided
targets each absorb the tokens whose head-mean keys are most similar to theirs: a contextual token
is its target plus the mean of its members. The projector gets `[dominant, contextual]`, in that
order, taken from the feature layer's output (the CLS token's included), exactly as the official code
does. A plain `keep` splits like the paper's 54 + 10 of 64 (contextual = round(keep * 10 / 64)).

Positions: dominant patches and contextual targets keep their own; the CLS token, which has no patch
of its own, takes the first slot that no kept patch uses. `positions="contiguous"` renumbers the
image's tokens in the official order.
"""

from __future__ import annotations

import torch

from vtprune.budget import Budget
from vtprune.registry import Policy, register
from vtprune.signals import Selection, SignalRequest, VisionLayout
from vtprune.tower import LayerTensors, ProjectorInput, TowerPruning

CONTEXTUAL_SHARE = 10 / 64
"""The paper's split of 64 tokens: 54 dominant (CLS included) and 10 contextual."""


@register(
    "visionzip",
    stage="vision",
    description="VisionZip: dominant tokens by CLS attention plus contextual tokens merged by key similarity",
)
class VisionZip(Policy):
    dominant: int | None = None
    """Dominant tokens per image, the CLS token included; default: keep minus contextual."""
    contextual: int | None = None
    """Merged contextual tokens per image; default round(keep * 10 / 64), or keep minus dominant."""

    def __post_init__(self) -> None:
        for name in ("dominant", "contextual"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a token count >= 0, got {value!r}")

    def check(self, budget: Budget) -> None:
        if isinstance(budget.keep, int):
            self.split(budget.keep)
        elif self.dominant is not None and self.contextual is not None:
            raise ValueError(
                f"dominant={self.dominant} and contextual={self.contextual} fix a token count, but keep={budget.keep} "
                f"is a fraction: pass keep={self.dominant + self.contextual} or only one of the two"
            )

    def split(self, keep: int) -> tuple[int, int]:
        """(dominant, contextual) tokens for a budget of `keep`."""
        if self.dominant is not None and self.contextual is not None:
            if self.dominant + self.contextual != keep:
                raise ValueError(
                    f"dominant={self.dominant} + contextual={self.contextual} is not keep={keep}: pass "
                    f"keep={self.dominant + self.contextual} or only one of the two"
                )
            return self.dominant, self.contextual
        if self.dominant is not None:
            contextual = keep - self.dominant
        elif self.contextual is not None:
            contextual = self.contextual
        else:
            contextual = round(keep * CONTEXTUAL_SHARE)
        if keep == 0:  # a crop whose share of its image's budget is nothing
            return 0, 0
        if not 0 <= contextual < keep:
            raise ValueError(
                f"visionzip keeps {keep} tokens, so it needs 0 <= contextual < {keep} and at least one dominant "
                f"token; got dominant={self.dominant}, contextual={self.contextual}"
            )
        return keep - contextual, contextual

    def request(self, layout: VisionLayout) -> SignalRequest:
        if not layout.attends_fully(layout.feature_layer):
            raise ValueError(
                f"visionzip reads the feature layer's attention, and this tower's feature layer "
                f"{layout.feature_layer} attends within windows; use another policy"
            )
        return SignalRequest()

    def tower_pruning(
        self, layout: VisionLayout, keeps: list[int], visual_tokens: int, available: torch.Tensor
    ) -> TowerPruning:
        return Zip(layout, [self.split(keep) for keep in keeps], visual_tokens, available)


class Zip(TowerPruning):
    """Reads the feature layer, then builds the projector's input from it (units where the LLM gets merge units)."""

    def __init__(
        self, layout: VisionLayout, splits: list[tuple[int, int]], visual_tokens: int, available: torch.Tensor
    ) -> None:
        self.layers = (layout.feature_layer,)
        self.cls = int(layout.has_cls)
        self.offset = layout.token_offset
        self.splits = splits
        self.visual_tokens = visual_tokens
        self.available = available
        self._selections: list[Selection] = []

    def after_layer(self, layer: int, tensors: LayerTensors) -> None:
        valid = tensors.valid
        queries, keys = tensors.queries.float(), tensors.keys.float()
        if self.cls:
            query = queries[:, :, :1]
        else:  # the mean query over the row's real tokens
            weights = valid[:, None, :, None].to(queries.dtype)
            query = (queries * weights).sum(2, keepdim=True) / weights.sum(2, keepdim=True)
        logits = (query @ keys.transpose(-1, -2) * tensors.scale).masked_fill(~valid[:, None, None, :], float("-inf"))
        self.attention = tensors.per_unit(logits.softmax(-1).mean(1)[:, 0])
        self.keys = tensors.per_unit(keys.mean(1))
        self.outputs = tensors.unit_output
        self.valid = tensors.unit_valid
        return None

    def before_projector(self, tokens: torch.Tensor) -> ProjectorInput:
        rows = [
            self._row(row, tokens[row], dominant, contextual) for row, (dominant, contextual) in enumerate(self.splits)
        ]
        self._selections = [selection for _, _, selection in rows]
        longest = max(len(t) for t, _, _ in rows)
        padded = tokens.new_zeros(len(rows), longest, tokens.shape[-1])
        slots = torch.zeros(len(rows), longest, dtype=torch.long)
        valid = torch.zeros(len(rows), longest, dtype=torch.bool)
        for row, (row_tokens, row_slots, _) in enumerate(rows):
            padded[row, : len(row_tokens)] = row_tokens
            slots[row, : len(row_tokens)] = row_slots
            valid[row, : len(row_tokens)] = True
        return ProjectorInput(tokens=padded, slots=slots, valid=valid)

    def _row(
        self, row: int, given: torch.Tensor, dominant: int, contextual: int
    ) -> tuple[torch.Tensor, torch.Tensor, Selection]:
        """One crop's projector input, the slot of each of its tokens, and its selection."""
        offset, cls = self.offset, self.cls
        scores = self.attention[row]
        visual_scores = scores[offset:].cpu()
        available = self.available[row]
        if dominant + contextual >= int(available.sum()):  # keeps every token that reaches the LLM, untouched
            real = self.valid[row, offset:].cpu()
            everything = torch.arange(self.visual_tokens)[real]
            kept = everything[available[real]]
            return given[real.to(given.device)], everything, Selection(kept=kept, scores=visual_scores)
        if dominant == 0:  # a crop whose share of the image's budget is nothing
            nothing = torch.zeros(0, dtype=torch.long)
            return given[:0], nothing, Selection(kept=nothing, scores=visual_scores)
        hidden, keys = self.outputs[row], self.keys[row]
        # tower tokens that may be kept: the CLS token, and visual tokens that reach the LLM
        candidates = torch.cat([torch.ones(offset, dtype=torch.bool), available]).to(scores.device)
        picked = scores[cls:].masked_fill(~candidates[cls:], float("-inf")).topk(dominant - cls).indices + cls
        chosen = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
        chosen[picked] = True
        chosen[:cls] = True
        dominant_index = chosen.nonzero().squeeze(1)
        rest = (~chosen & candidates).nonzero().squeeze(1)
        targets, merged = _merge(hidden, keys, rest, contextual)
        row_tokens = torch.cat([hidden[dominant_index], merged])

        slots = torch.cat([dominant_index, targets]).cpu() - offset
        if offset:  # the CLS token is no visual token: it takes the first slot no kept patch fills
            used = ~available.clone()
            used[slots[1:]] = True
            slots[0] = int((~used).nonzero()[0])
        selection = Selection(kept=slots.sort().values, scores=visual_scores, order=slots)
        return row_tokens.to(given.dtype), slots, selection

    def selections(self) -> list[Selection]:
        return self._selections


def _merge(
    hidden: torch.Tensor, keys: torch.Tensor, rest: torch.Tensor, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens out of the `rest` tokens: (their targets, target + mean of members)."""
    if contextual == 0:
        return rest[:0], hidden[:0]
    positions = torch.arange(0, len(rest), max(1, len(rest) // contextual), device=rest.device)[:contextual]
    is_target = torch.zeros(len(rest), dtype=torch.bool, device=rest.device)
    is_target[positions] = True
    unit = torch.nn.functional.normalize(keys[rest], dim=-1)
    assigned = (unit[~is_target] @ unit[positions].T).argmax(1)
    sums = hidden.new_zeros(contextual, hidden.shape[-1]).index_add_(0, assigned, hidden[rest[~is_target]])
    counts = torch.bincount(assigned, minlength=contextual).clamp(min=1).to(hidden.dtype)
    return rest[positions], hidden[rest[positions]] + sums / counts[:, None]

"""`information_flow`: FlowCut (arXiv 2505.19536), progressive pruning inside the vision encoder.

After every encoder layer below the feature layer, each patch is scored by
`(CLS attention / its sum + CLS value-similarity / its sum) * L1 norm of the head-mean value`, where
the CLS attention row is the layer's own (scaled, softmax over all tokens, head mean) and the value
similarity is the CLS value against every value (unscaled, softmax, head mean). Scores are
accumulated as an EMA with weight 0.5. With `rpl` = layers left before the feature layer, every
other layer (even `rpl`) prunes `round((N - keep) / sqrt(rpl) * (1 - H^2))` patches, H being the
normalised entropy of the CLS attention over the N current patches, and the layer with `rpl == 0`
cuts to the budget. The CLS token stays inside the tower; later layers really run on fewer tokens.

Each crop is scheduled on its own (the official code prunes the batch's largest amount from every
crop); towers without a CLS token use the mean query (and mean value) row instead. On towers whose
LLM tokens are merge units (Qwen-VL), a unit scores the mean of its tokens' scores, its attention (for
the entropy) is the sum of theirs, and units are cut whole. On Qwen2.5-VL only the full-attention
blocks score and cut: they are the schedule's layers (`rpl` counts those left).
"""

from __future__ import annotations

import torch

from vtprune.registry import Policy, register
from vtprune.signals import Selection, SignalRequest, VisionLayout
from vtprune.tower import Cut, LayerTensors, ProjectorInput, TowerPruning

EMA = 0.5


@register(
    "information_flow",
    stage="vision",
    description="FlowCut: progressive pruning inside the vision encoder by CLS attention, value similarity "
    "and value norm, with entropy-adaptive amounts",
)
class InformationFlow(Policy):
    def request(self, layout: VisionLayout) -> SignalRequest:
        if not any(layout.attends_fully(layer) for layer in range(layout.feature_layer)):
            raise ValueError(
                "information_flow prunes after encoder layers below the feature layer whose attention spans the whole "
                "image, and this tower has none (its features come from its first layer, or only windowed layers "
                "come before); use a deeper vision_feature_layer, or another policy"
            )
        return SignalRequest()

    def tower_pruning(
        self, layout: VisionLayout, keeps: list[int], visual_tokens: int, available: torch.Tensor
    ) -> TowerPruning:
        return FlowCut(layout, keeps, visual_tokens, available)


class FlowCut(TowerPruning):
    """One call's FlowCut state: per row, the tower tokens (units) still present and their accumulated scores."""

    def __init__(self, layout: VisionLayout, keeps: list[int], visual_tokens: int, available: torch.Tensor) -> None:
        self.layers = tuple(layer for layer in range(layout.feature_layer) if layout.attends_fully(layer))
        self.offset = layout.token_offset
        self.cls = int(layout.has_cls)
        self.visual_tokens = visual_tokens
        tower_tokens = visual_tokens + self.offset
        # Tower tokens a row ends with, CLS included; a row that keeps every token reaching the LLM is not cut.
        keeps = torch.tensor(keeps)
        self.target = torch.where(keeps >= available.sum(1), visual_tokens, keeps) + self.offset
        self.present = torch.arange(tower_tokens).repeat(len(keeps), 1)  # tower index of each current token
        self.valid = torch.ones_like(self.present, dtype=torch.bool)  # real current tokens (rows may be shorter)
        # Tower tokens a cut may keep before the others: those that reach the LLM (the CLS token too).
        self.preferred = torch.cat([torch.ones(len(keeps), self.offset, dtype=torch.bool), available], 1)
        self.cumulative: torch.Tensor | None = None  # [B, M] EMA score of each current token (CLS: 0)
        self.last_scores = torch.full((len(keeps), tower_tokens), float("nan"))

    def after_layer(self, layer: int, tensors: LayerTensors) -> Cut | None:
        valid = tensors.unit_valid
        if self.present.device != valid.device:
            self.target, self.present, self.last_scores, self.preferred = (
                t.to(valid.device) for t in (self.target, self.present, self.last_scores, self.preferred)
            )
        self.valid = valid
        counts = valid.sum(1)
        target = self.target
        active = counts > target
        if not bool(active.any()):
            return None
        patches = valid.clone()
        patches[:, : self.cls] = False
        attention, scores = self._scores(tensors)
        if self.cumulative is None:
            self.cumulative = scores
        else:
            self.cumulative = torch.where(active[:, None], EMA * self.cumulative + (1 - EMA) * scores, self.cumulative)
        rows = torch.arange(len(counts), device=valid.device)[:, None].expand_as(valid)
        self.last_scores[rows[patches], self.present[patches]] = self.cumulative[patches]

        remaining = sum(later > layer for later in self.layers)
        if remaining % 2:
            return None
        patch_counts = counts - self.cls
        if remaining > 0:
            dropped = _adaptive_amount(attention, patches, patch_counts, target - self.cls, remaining)
        else:
            dropped = patch_counts + 1
        kept_counts = torch.where(active, torch.maximum(counts - dropped, target), counts)
        return self._cut(patches, kept_counts)

    def _scores(self, tensors: LayerTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """Per unit: the head-mean query-row attention (renormalised over patches; summed over a unit's tokens)
        and this layer's FlowCut scores (averaged over a unit's tokens)."""
        valid = tensors.valid
        patches = valid.clone()
        patches[:, : self.cls] = False
        keys, values = tensors.keys.float(), tensors.values.float()
        if self.cls:
            query, value = tensors.queries[:, :, :1].float(), values[:, :, :1]
        else:
            query, value = _masked_mean(tensors.queries.float(), valid), _masked_mean(values, valid)
        blocked = ~valid[:, None, None, :]
        relation = _softmax_over(query @ keys.transpose(-1, -2) * tensors.scale, blocked)
        semantic = _softmax_over(value @ values.transpose(-1, -2), blocked)
        relation, semantic = (_normalised(t.mean(1)[:, 0], patches) for t in (relation, semantic))
        norm = values.mean(1).abs().sum(-1)
        scores = ((relation + semantic) * norm).masked_fill(~patches, 0.0)
        return tensors.per_unit(relation) * tensors.unit, tensors.per_unit(scores)

    def _cut(self, patches: torch.Tensor, kept_counts: torch.Tensor) -> Cut:
        """Keep CLS and each row's top `kept_counts - cls` patches by accumulated score, in tower order."""
        width = patches.shape[1]
        wanted = kept_counts - self.cls
        ranking = self.cumulative.masked_fill(~patches, float("-inf"))
        preferred = self.preferred.gather(1, self.present)
        if not bool(preferred[patches].all()):  # tokens that never reach the LLM rank below all others, in order
            finite = ranking[patches]
            ranking = torch.where(preferred, ranking, ranking - (finite.max() - finite.min() + 1))
        ranked = ranking.topk(int(wanted.max()), dim=1).indices
        chosen = torch.arange(ranked.shape[1], device=ranked.device)[None] < wanted[:, None]
        index = ranked.masked_fill(~chosen, width).sort(1).values
        if self.cls:
            index = torch.cat([index.new_zeros(len(index), 1), index], 1)
        self.valid = index < width
        index = index.masked_fill(~self.valid, 0)
        self.present = self.present.gather(1, index)
        self.cumulative = self.cumulative.gather(1, index)
        return Cut(index=index, valid=self.valid)

    def before_projector(self, tokens: torch.Tensor) -> ProjectorInput:
        valid = self.valid[:, self.offset :]
        slots = (self.present[:, self.offset :] - self.offset).masked_fill(~valid, 0)
        return ProjectorInput(tokens=tokens, slots=slots, valid=valid)

    def selections(self) -> list[Selection]:
        out = []
        for row in range(len(self.present)):
            tower = self.present[row][self.valid[row]].cpu()
            kept = tower[tower >= self.offset] - self.offset
            scores = self.last_scores[row, self.offset :].cpu()
            out.append(Selection(kept=kept, scores=None if scores.isnan().all() else scores))
        return out


def _adaptive_amount(
    attention: torch.Tensor, patches: torch.Tensor, patch_counts: torch.Tensor, keep: torch.Tensor, remaining: int
) -> torch.Tensor:
    """FlowCut's per-row amount `round((N - keep) / sqrt(remaining) * (1 - H^2))`, H the normalised entropy."""
    entropy = -torch.special.xlogy(attention, attention).masked_fill(~patches, 0.0).sum(1)
    normalised = entropy / patch_counts.float().log()
    return ((patch_counts - keep) / remaining**0.5 * (1 - normalised**2)).round().long()


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid tokens of `[B, H, M, d]`, as `[B, H, 1, d]`."""
    weights = valid[:, None, :, None].to(x.dtype)
    return (x * weights).sum(2, keepdim=True) / weights.sum(2, keepdim=True)


def _softmax_over(logits: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(blocked, float("-inf")).softmax(-1)


def _normalised(row: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """`row` over the patches only, divided by its sum there (the CLS column and padding become 0)."""
    row = row.masked_fill(~patches, 0.0)
    return row / row.sum(1, keepdim=True)

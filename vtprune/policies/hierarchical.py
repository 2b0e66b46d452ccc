"""`hierarchical`: HiPrune (arXiv 2508.00553).

Scores are the attention each token receives (mean over all queries, CLS included, and heads) at an
object-centric middle layer and at the feature layer. Anchors are the top tokens of the middle layer;
their 4-neighbours on the token grid are buffers; registers, the top tokens of the feature layer
among the rest, fill the budget. Unlike the official flat index +-1/+-24, neighbours never wrap
from one grid row to the next.
"""

from __future__ import annotations

import torch

from vtprune.registry import Policy, register
from vtprune.signals import ImageSignals, Selection, SignalRequest, VisionLayout

OBJECT_LAYER_CLIP_L = 8
"""Official HIPRUNE_OBJECT_LAYER=9 (1-based) on the 24-layer CLIP-L tower."""


@register(
    "hierarchical",
    stage="vision",
    description="HiPrune: anchors from a middle layer's received attention, their grid neighbours, "
    "and registers from the feature layer",
)
class Hierarchical(Policy):
    alpha: float = 0.1
    """Anchors are round(keep * alpha / 5): anchors and their 4 neighbours take about alpha of the budget."""
    object_layer: int | None = None
    """0-based middle layer for anchors; default 8 on a 24-layer tower, scaled by depth elsewhere (on Qwen2.5-VL,
    the next full-attention block: 15, as the official code)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.object_layer is not None and (isinstance(self.object_layer, bool) or self.object_layer < 0):
            raise ValueError(f"object_layer must be a 0-based layer index >= 0, got {self.object_layer!r}")

    def request(self, layout: VisionLayout) -> SignalRequest:
        obj = self.object_layer
        if obj is None:
            obj = layout.full_layer_from(min(layout.feature_layer, round(OBJECT_LAYER_CLIP_L * layout.num_layers / 24)))
        if obj > layout.feature_layer:
            raise ValueError(
                f"object_layer={obj} is above the feature layer {layout.feature_layer} of this vision tower; "
                f"pass an object_layer between 0 and {layout.feature_layer}"
            )
        if not layout.attends_fully(obj):
            raise ValueError(
                f"object_layer={obj} attends within windows; pass one of the full-attention layers "
                f"{layout.full_attention}"
            )
        return SignalRequest(received_attention=(obj, layout.feature_layer))

    def select(self, signals: ImageSignals, keep: int) -> Selection:
        middle, deep = signals.received_attention
        n = signals.n_tokens
        anchors = middle.topk(round(keep * self.alpha / 5)).indices.cpu()
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[_with_neighbours(anchors, signals.grid, n)] = True
        if int(chosen.sum()) > keep:  # tiny budgets: the anchors' own neighbourhoods overflow it
            chosen[:] = False
            chosen[anchors[:keep]] = True
        registers = deep.cpu().masked_fill(chosen, float("-inf")).topk(keep - int(chosen.sum())).indices
        chosen[registers] = True
        return Selection(kept=chosen.nonzero().squeeze(1), scores=deep)


def _with_neighbours(anchors: torch.Tensor, grid: tuple[int, int] | None, n: int) -> torch.Tensor:
    """Anchors and their up/down/left/right neighbours inside the grid (a 1-D strip where there is no grid)."""
    cols = grid[1] if grid is not None else n
    row, col = anchors // cols, anchors % cols
    rows = n // cols
    candidates = [
        (row, col),
        (row - 1, col),
        (row + 1, col),
        (row, col - 1),
        (row, col + 1),
    ]
    inside = [(r * cols + c)[(r >= 0) & (r < rows) & (c >= 0) & (c < cols)] for r, c in candidates]
    return torch.cat(inside)

"""`fastv`: the FastV baseline (arXiv 2403.06764), one cut inside the decoder.

Before decoder layer `layer` (K), each image keeps the `keep` visual tokens that the last prompt token
attends to most in layer K-1 (head mean, softmax over the whole prompt), in sequence order. The
official code reads that row from eager `output_attentions` of batch item 0 and uses it for every row;
vtprune recomputes it from layer K-1's own q/k with RoPE and scores every row on its own.
"""

from __future__ import annotations

import torch

from vtprune.budget import Budget
from vtprune.registry import Policy, register
from vtprune.signals import CutSignals, DecoderCut


@register(
    "fastv",
    stage="decoder",
    description="FastV baseline: tokens the last prompt token attends to most in decoder layer K-1, cut before K",
)
class FastV(Policy):
    layer: int = 2
    """K: the 0-based decoder layer that first runs on the kept tokens (scored with layer K-1)."""

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be a decoder layer >= 1 (the cut needs layer-1 to score), got {self.layer!r}")

    def decoder_cuts(self, num_layers: int) -> tuple[DecoderCut, ...]:
        return (DecoderCut(layer=self.layer, attention_layer=self.layer - 1, queries="last"),)

    def cut_keep(self, cut: int, entering: int, budget: Budget) -> int:
        return budget.tokens(entering)

    def cut_scores(self, cut: int, signals: CutSignals) -> torch.Tensor:
        return signals.attention

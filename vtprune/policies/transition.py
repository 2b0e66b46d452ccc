"""`transition`: TransPrune (arXiv 2507.20630), progressive cuts inside the decoder.

Token transition variation (TTV): in each decoder layer from the one before the first cut on, each
sublayer (attention, MLP) adds |out| / |in| x exp(1 - cos(in, out)), the latter normalised over the
row's tokens, with `in` the sublayer's normed input. At each cut before layer p, a token's score is
its summed TTV so far plus instruction-guided attention (IGA): the attention it gets from every prompt
token after the image, recomputed from layer p's own norm and q/k on the current hidden states, head
mean, query mean. Each term is normalised over the image's remaining tokens. The official code sums
the exp term over the whole batch of one and handles batch 1 only; vtprune normalises per row.
"""

from __future__ import annotations

import torch

from vtprune.budget import Budget
from vtprune.registry import Policy, register
from vtprune.signals import CutSignals, DecoderCut

PAPER_LAYERS = (7, 9, 12)
PAPER_DEPTH = 32
EPSILON = 1e-8


@register(
    "transition",
    stage="decoder",
    description="TransPrune: token transition variation + instruction-guided attention, cut progressively in the "
    "decoder",
)
class Transition(Policy):
    layers: tuple[int, ...] | None = None
    """0-based decoder layers that first run after each cut (the paper's 1-based layers it prunes after);
    None: (7, 9, 12) on a 32-layer LLM, scaled by depth elsewhere, each at least one layer after the one before
    (so 16 layers give (4, 5, 6) and 8 give (2, 3, 4), where rounding alone would merge two cuts)."""
    ratios: tuple[float, ...] = (0.875, 0.625, 0.125)
    """The schedule: tokens after each cut in proportion; the last cut keeps `keep`, so keep=0.125 gives the
    paper's 0.875 / 0.625 / 0.125 of each image's tokens."""

    def __post_init__(self) -> None:
        ratios = tuple(self.ratios)
        if not ratios or any(not 0 < r <= 1 for r in ratios) or list(ratios) != sorted(ratios, reverse=True):
            raise ValueError(f"ratios must be decreasing fractions in (0, 1], got {self.ratios!r}")
        object.__setattr__(self, "ratios", ratios)
        if self.layers is not None:
            layers = tuple(self.layers)
            if len(layers) != len(ratios) or any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
                raise ValueError(f"layers must be increasing, one per ratio ({len(ratios)}), got {self.layers!r}")
            object.__setattr__(self, "layers", layers)
        elif len(ratios) != len(PAPER_LAYERS):
            raise ValueError(f"give layers=... with {len(ratios)} ratios (the default layers are {PAPER_LAYERS})")

    def decoder_cuts(self, num_layers: int) -> tuple[DecoderCut, ...]:
        layers = self.layers or scaled_layers(num_layers)
        if layers[0] < 1 or layers[-1] >= num_layers:
            raise ValueError(
                f"a {num_layers}-layer decoder has no room for transition's cuts {layers}: pass layers=(...) "
                f"with {len(self.ratios)} increasing layers in 1..{num_layers - 1}"
            )
        first = layers[0] - 1
        return tuple(
            DecoderCut(
                layer=layer, attention_layer=layer, queries="instruction", transitions=tuple(range(first, layer))
            )
            for layer in layers
        )

    def cut_keep(self, cut: int, entering: int, budget: Budget) -> int:
        final = budget.tokens(entering)
        if cut == len(self.ratios) - 1:
            return final
        scale = entering * budget.keep if isinstance(budget.keep, float) else final
        return max(final, int(scale / self.ratios[-1] * self.ratios[cut]))

    def cut_scores(self, cut: int, signals: CutSignals) -> torch.Tensor:
        transitions, attention = signals.transitions, signals.attention
        return transitions / (transitions.sum() + EPSILON) + attention / (attention.sum() + EPSILON)


def scaled_layers(num_layers: int) -> tuple[int, ...]:
    """`PAPER_LAYERS` scaled to a `num_layers`-deep decoder, rounded, from layer 1 on, strictly increasing."""
    layers: list[int] = []
    for layer in PAPER_LAYERS:
        layers.append(max(round(layer * num_layers / PAPER_DEPTH), layers[-1] + 1 if layers else 1))
    return tuple(layers)

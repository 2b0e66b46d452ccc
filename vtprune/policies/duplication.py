"""`duplication`: DART (arXiv 2502.11494, EMNLP 2025): pivot tokens, then the tokens least duplicated by them, one
cut inside the decoder.

As the official code (`modeling_llama_self.py`): before decoder layer `layer` (K), each token's pivot score is the
L1 norm of its keys over every head at layer K-1, after RoPE (as the cache holds them). The `pivot_image` image
tokens and the `pivot_text` tokens of the text after the image with the highest scores are the pivots; the image
pivots are kept. Then, pivot by pivot, the image tokens least similar to it (cosine of the hidden states entering
layer K under the LLM's final norm) are taken from the pool that is left, until the image keeps `keep`. Text
tokens are never cut.

The pivot order (`pivot_order`): "official" is the order the official code iterates them in, CPython's set order
of their indices in the row (batch of one, no padding), which decides what each pivot may still take; "ascending"
sorts them by that index. vtprune's decisions (policies-more.md): exactly `keep` per image, the tokens past the
image pivots spread over the pivots, the first in pivot order taking one more (a `keep` of pivot_image + 8 k, the
official count, gives every pivot k); each image scored on its own row, its text pivots from that row's real text
after it; fewer text pivots when fewer text tokens follow; float32 similarities and stable sorts (ties to the
lower index, where the official's `topk` leaves them to the device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtprune.budget import Budget
from vtprune.registry import Policy, register
from vtprune.signals import CutSignals, DecoderCut

PIVOT_ORDERS = ("official", "ascending")


@register(
    "duplication",
    stage="decoder",
    description="DART: pivot tokens by key norm, then the image tokens least duplicated by each pivot, cut before "
    "decoder layer K",
)
class Duplication(Policy):
    layer: int = 2
    """K: the 0-based decoder layer that first runs on the kept tokens (pivots scored with layer K-1's keys)."""
    pivot_image: int = 4
    """Image tokens with the largest key norms: pivots, always kept."""
    pivot_text: int = 4
    """Text tokens after the image with the largest key norms: pivots only, never cut."""
    pivot_order: str = "official"
    """'official' (CPython's set order of the pivots' row indices, as the official loop) or 'ascending'."""

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be a decoder layer >= 1 (the cut needs layer-1 to score), got {self.layer!r}")
        for name in ("pivot_image", "pivot_text"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.pivot_image + self.pivot_text == 0:
            raise ValueError("DART needs pivots: pivot_image + pivot_text must be at least 1")
        if self.pivot_order not in PIVOT_ORDERS:
            raise ValueError(f"pivot_order must be one of {PIVOT_ORDERS}, got {self.pivot_order!r}")

    def decoder_cuts(self, num_layers: int) -> tuple[DecoderCut, ...]:
        return (DecoderCut(layer=self.layer, key_layer=self.layer - 1, states=True),)

    def cut_keep(self, cut: int, entering: int, budget: Budget) -> int:
        return budget.tokens(entering)

    def cut_select(self, cut: int, signals: CutSignals, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = signals.key_norms.float().cpu()
        image_pivots = _ranked(scores)[: min(self.pivot_image, count)]
        text_pivots = _ranked(signals.text_key_norms.float().cpu())[: self.pivot_text]
        rest = count - len(image_pivots)
        if rest == 0:
            return image_pivots, scores
        states = F.normalize(signals.states.float().cpu(), dim=-1)
        text_states = F.normalize(signals.text_states.float().cpu(), dim=-1)
        pivots = [(int(signals.rows[i]), states[i]) for i in image_pivots]
        pivots += [(int(signals.text_rows[j]), text_states[j]) for j in text_pivots]
        if not pivots:  # no image pivots asked for and no text after the image
            raise ValueError("duplication has no pivot for an image with no text after it: set pivot_image >= 1")
        pivots = self._ordered(pivots)
        share, extra = divmod(rest, len(pivots))
        pool = torch.ones(signals.n_tokens, dtype=torch.bool)
        pool[image_pivots] = False
        taken = [image_pivots]
        for place, (_, pivot) in enumerate(pivots):
            wanted = share + (place < extra)
            if wanted == 0:
                continue
            candidates = pool.nonzero().squeeze(1)
            similarity = states[candidates] @ pivot
            take = candidates[torch.sort(similarity, stable=True).indices[:wanted]]  # the least similar first
            pool[take] = False
            taken.append(take)
        return torch.cat(taken), scores

    def _ordered(self, pivots: list[tuple[int, torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
        """The pivots in the order the greedy loop visits them."""
        by_row = dict(pivots)
        if self.pivot_order == "ascending":
            return [(row, by_row[row]) for row in sorted(by_row)]
        # the official `list(set(image_pivots + text_pivots))`: CPython's set of ints, filled in that order
        return [(row, by_row[row]) for row in set(row for row, _ in pivots)]


def _ranked(scores: torch.Tensor) -> torch.Tensor:
    """Indices by descending score, ties to the lower index."""
    return torch.sort(scores, descending=True, stable=True).indices

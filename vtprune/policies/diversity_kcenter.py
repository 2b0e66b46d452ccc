"""`diversity_kcenter`: ToDRE (arXiv 2505.18757): greedy k-center after the projector, then removal in
the decoder.

No official code exists; vtprune fixes the method as follows. Each image's projected features (what
the LLM would see) are L2-normalised, and the distance between two tokens is 1 - cosine, in float32.
The seed is the most typical token, the one closest to the mean of the normalised features; then
farthest-first traversal (Gonzalez's 2-approximation of k-center) repeatedly adds the token farthest
from its nearest selected token, until `keep` are chosen. Ties go to the lowest index. The kept
tokens are returned in raster order. Distances to the selected set are kept as a running minimum
(O(keep * n * hidden)), never as an n x n matrix.

Stage 2 ("information migration"): before decoder layer `relevance_layer` (default: half the LLM's
depth) every remaining visual token is removed, or the `relevance_keep` ones the instruction attends to
most are kept (attention from every prompt token after the image, head mean, recomputed from that
layer's own q/k with RoPE). `keep` counts the tokens that enter the LLM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F

from vtprune.budget import Budget
from vtprune.kernels import farthest_first
from vtprune.registry import Policy, register
from vtprune.signals import CutSignals, DecoderCut, ImageSignals, Selection, SignalRequest, VisionLayout

Seed = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(unit features [B, N, D], zero rows past each image's tokens; valid [B, N]) -> each image's first pick [B]."""


def typical_seed(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The token closest to the mean of the image's unit features (ToDRE as vtprune fixes it)."""
    mean = x.sum(1) / valid.sum(1, keepdim=True)
    return torch.bmm(x, mean[:, :, None]).squeeze(2).masked_fill(~valid, float("-inf")).argmax(1)


def farthest_first_selection(signals: list[ImageSignals], keeps: list[int], seed: Seed) -> list[Selection]:
    """Per image, `keep` tokens by farthest-first traversal under cosine distance (float32) of its features from
    `seed`'s first pick, in raster order; ties to the lowest index, no token twice."""
    if not signals:
        return []
    lengths = [image.n_tokens for image in signals]
    keeps = [min(keep, n) for keep, n in zip(keeps, lengths, strict=True)]
    device = signals[0].features.device
    features = [F.normalize(image.features.detach().to(device, torch.float32), dim=-1) for image in signals]
    x = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)  # [B, N, D], zero rows past each n
    counts = torch.tensor(lengths, device=device)
    valid = torch.arange(x.shape[1], device=device) < counts[:, None]
    # Rows whose tokens run out pick index 0 in their last steps; those steps lie past their keep.
    order = farthest_first(x, counts, seed(x, valid), max(keeps)).cpu()
    return [Selection(kept=order[b, :keep].sort().values) for b, keep in enumerate(keeps)]


class FarthestFirst(Policy):
    """A policy that keeps what farthest-first traversal of the projected features picks from its `seed`."""

    seed: ClassVar[Seed]

    def request(self, layout: VisionLayout) -> SignalRequest:
        return SignalRequest(features=True)

    def select(self, signals: ImageSignals, keep: int) -> Selection:
        return self.select_batch([signals], [keep])[0]

    def select_batch(self, signals: list[ImageSignals], keeps: list[int]) -> list[Selection]:
        return farthest_first_selection(signals, keeps, self.seed)


@register(
    "diversity_kcenter",
    stage="vision+decoder",
    description="ToDRE: greedy k-center (farthest-first, cosine distance) on the projected features, then every "
    "visual token removed at relevance_layer of the LLM",
)
class DiversityKCenter(FarthestFirst):
    seed = staticmethod(typical_seed)
    relevance_layer: int | str | None = "half"
    """0-based decoder layer before which stage 2 removes the visual tokens; 'half' is num_layers // 2, None
    skips stage 2."""
    relevance_keep: int = 0
    """Visual tokens stage 2 keeps: the ones the instruction attends to most."""

    def __post_init__(self) -> None:
        layer = self.relevance_layer
        if not (layer is None or layer == "half" or (isinstance(layer, int) and not isinstance(layer, bool))):
            raise TypeError(f"relevance_layer must be 'half', a 0-based decoder layer (int) or None, got {layer!r}")
        keep = self.relevance_keep
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ValueError(f"relevance_keep must be a token count >= 0, got {keep!r}")

    def decoder_cuts(self, num_layers: int) -> tuple[DecoderCut, ...]:
        if self.relevance_layer is None:
            return ()
        layer = num_layers // 2 if self.relevance_layer == "half" else self.relevance_layer
        scored = layer if self.relevance_keep else None
        return (DecoderCut(layer=layer, attention_layer=scored, queries="instruction"),)

    def cut_keep(self, cut: int, entering: int, budget: Budget) -> int:
        return self.relevance_keep

    def cut_scores(self, cut: int, signals: CutSignals) -> torch.Tensor:
        return signals.attention

"""`diversity_kcenter`: ToDRE stage 1 (arXiv 2505.18757), greedy k-center after the projector.

No official code exists; vtprune fixes the method as follows. Each image's projected features (what
the LLM would see) are L2-normalised, and the distance between two tokens is 1 - cosine, in float32.
The seed is the most typical token, the one closest to the mean of the normalised features; then
farthest-first traversal (Gonzalez's 2-approximation of k-center) repeatedly adds the token farthest
from its nearest selected token, until `keep` are chosen. Ties go to the lowest index. The kept
tokens are returned in raster order. Distances to the selected set are kept as a running minimum
(O(keep * n * hidden)), never as an n x n matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtprune.registry import Policy, register
from vtprune.signals import ImageSignals, Selection, SignalRequest, VisionLayout


@register(
    "diversity_kcenter",
    stage="vision",
    description="ToDRE stage 1: greedy k-center (farthest-first, cosine distance) on the projected features, "
    "seeded with the token closest to their mean",
)
class DiversityKCenter(Policy):
    def request(self, layout: VisionLayout) -> SignalRequest:
        return SignalRequest(features=True)

    def select(self, signals: ImageSignals, keep: int) -> Selection:
        return self.select_batch([signals], [keep])[0]

    def select_batch(self, signals: list[ImageSignals], keeps: list[int]) -> list[Selection]:
        if not signals:
            return []
        lengths = [image.n_tokens for image in signals]
        keeps = [min(keep, n) for keep, n in zip(keeps, lengths, strict=True)]
        device = signals[0].features.device
        features = [F.normalize(image.features.detach().to(device, torch.float32), dim=-1) for image in signals]
        x = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)  # [B, N, D], zero rows past each n
        counts = torch.tensor(lengths, device=device)
        valid = torch.arange(x.shape[1], device=device) < counts[:, None]
        rows = torch.arange(len(signals), device=device)

        mean = x.sum(1) / counts[:, None]
        typicality = torch.bmm(x, mean[:, :, None]).squeeze(2).masked_fill(~valid, float("-inf"))
        pick = typicality.argmax(1)
        # Running distance of each token to its nearest selected token; -inf marks padding and chosen tokens.
        dmin = torch.full_like(typicality, float("inf")).masked_fill(~valid, float("-inf"))
        picks = []
        for step in range(max(keeps)):
            if step:
                pick = dmin.argmax(1)  # first maximum: ties go to the lowest index
            picks.append(pick)
            distance = 1.0 - torch.bmm(x, x[rows, pick][:, :, None]).squeeze(2)
            dmin = torch.minimum(dmin, distance)
            dmin[rows, pick] = float("-inf")
        # Rows whose tokens ran out pick a stale index in their last steps; those steps lie past their keep.
        order = torch.stack(picks, 1).cpu()
        return [Selection(kept=order[b, :keep].sort().values) for b, keep in enumerate(keeps)]

"""`visual_cues`: VisPruner (arXiv 2412.01818, ICCV 2025): important tokens by the tower's own attention, then
diverse ones by removing duplicates among the rest, before the projector.

As the official code (`llava/model/llava_arch.py`): `int(keep * important_ratio)` tokens are kept for their
importance, the CLS query's attention to them at the feature layer (head mean, softmax over every token, the CLS
column dropped); the rest, in importance order, are thinned by rounds of bipartite matching on the tower's
features (cosine): the list alternates into halves a = [0::2] and b = [1::2], each a token scores its best match
in b, and the (at most 8) best-matched a tokens are dropped, the a tokens that stay going first in score order,
until `keep` remain. Kept in raster order.

Towers without a CLS token (SigLIP, Qwen-VL) score importance by the attention each token receives (mean over
every query and head) at the feature layer; on Qwen-VL a merge unit scores the mean of its patches and its
features are its patches' concatenated (the merger's input). vtprune's decisions (policies-more.md): float32
scores and stable sorts (the official sorts fp16 scores with an unstable argsort); a round pairs the halves
whatever their lengths and drops at most all of a (the official loop fails on an odd residual); per crop, with
the image's budget shared over its crops, on LLaVA-NeXT; original positions by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtprune.registry import Policy, register
from vtprune.signals import ImageSignals, Selection, SignalRequest, VisionLayout

DROPPED_PER_ROUND = 8
"""The official loop removes at most 8 duplicates per matching round."""


@register(
    "visual_cues",
    stage="vision",
    description="VisPruner: important tokens by the tower's CLS attention, then diverse ones by removing duplicates "
    "(bipartite matching on the tower's features) among the rest",
)
class VisualCues(Policy):
    important_ratio: float = 0.5
    """Share of `keep` taken by importance (truncated); the rest come from duplicate removal."""

    def __post_init__(self) -> None:
        ratio = self.important_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"important_ratio must be in [0, 1], got {ratio!r}")

    def request(self, layout: VisionLayout) -> SignalRequest:
        layer = layout.feature_layer
        if not layout.attends_fully(layer):
            raise ValueError(
                f"visual_cues scores importance at the feature layer {layer}, which attends within windows in this "
                f"tower; use a policy that needs no tower attention (conditional_dpp, max_min_diversity)"
            )
        if layout.has_cls:
            return SignalRequest(attention_rows=(layer,), tower_features=True)
        return SignalRequest(received_attention=(layer,), tower_features=True)

    def select(self, signals: ImageSignals, keep: int) -> Selection:
        importance = (signals.attention_rows if signals.attention_rows is not None else signals.received_attention)[0]
        importance = importance.detach().float().cpu()
        keep = min(keep, signals.n_tokens)
        important = int(keep * self.important_ratio)
        diverse = keep - important
        order = torch.sort(importance, descending=True, stable=True).indices
        residual = order[important:]
        units = F.normalize(signals.tower_features.detach().float().cpu(), dim=-1)
        while True:
            dropped = min(DROPPED_PER_ROUND, len(residual) - diverse)
            if dropped <= 0:
                break
            a, b = residual[0::2], residual[1::2]
            matched = (units[a] @ units[b].T).amax(1)
            dropped = min(dropped, len(a))
            residual = torch.cat([a[torch.sort(matched, descending=True, stable=True).indices[dropped:]], b])
        kept = torch.cat([order[:important], residual]).sort().values
        return Selection(kept=kept, scores=importance)

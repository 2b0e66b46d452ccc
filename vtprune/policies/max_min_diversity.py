"""`max_min_diversity`: DivPrune (arXiv 2503.02175, CVPR 2025): pruning as a max-min diversity problem, solved
greedily on the projected features before the LLM.

As the official code (`LLaVA/llava/model/llava_arch.py`), the distance between two tokens is 1 - cosine of their
projected features (what the LLM would see); the seed is the most isolated token, the one whose nearest other
token is farthest; then farthest-first traversal adds the token farthest from its nearest selected token until
`keep` are chosen. vtprune's decisions (policies-more.md): float32 distances (the official computes them in the
model dtype), the seed's nearest neighbour excludes the token itself and a selected token is never selected again
(the official can pick an index twice once only duplicates remain), ties to the lowest index, per image (per crop
on LLaVA-NeXT, with the image's budget shared over its crops) instead of batch item 0 at a fixed offset, and
original positions by default (`positions="contiguous"` renumbers as the official does). The same traversal as
`diversity_kcenter`'s first stage, from another seed, through the same kernel.
"""

from __future__ import annotations

import torch

from vtprune.policies.diversity_kcenter import FarthestFirst
from vtprune.registry import register


def isolated_seed(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The token farthest (1 - cosine) from its nearest other token; the first on ties."""
    similarity = torch.bmm(x, x.transpose(1, 2))
    others = valid[:, None, :] & ~torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
    nearest_other = 1.0 - similarity.masked_fill(~others, float("-inf")).amax(2)
    return nearest_other.masked_fill(~valid, float("-inf")).argmax(1)


@register(
    "max_min_diversity",
    stage="vision",
    description="DivPrune: greedy max-min diversity (farthest-first from the most isolated token, cosine "
    "distance) on the projected features",
)
class MaxMinDiversity(FarthestFirst):
    seed = staticmethod(isolated_seed)

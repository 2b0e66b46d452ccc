"""Token kernels: compaction, attention-row scoring, greedy k-center and greedy DPP inference.

Every tensor that vtprune compacts, every attention row a policy scores from queries and keys, and the
greedy selections (k-center, DPP) go through these functions, so there is one place to make them fast. Each runs as a
Triton kernel on CUDA tensors when triton imports and as its pure-PyTorch reference (`reference`, the
oracle the Triton kernels are tested against) everywhere else; `VTPRUNE_KERNELS` overrides the choice
(see `dispatch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dispatch import backend, implementation

__all__ = ["backend", "dpp_greedy", "farthest_first", "gather_tokens", "score_rows"]


def gather_tokens(
    tensors: Sequence[torch.Tensor], index: torch.Tensor, token_dims: int | Sequence[int] = 1
) -> list[torch.Tensor]:
    """Compact several tensors along their token dim with one `[B, K]` index of kept positions per batch row.

    Each tensor has its batch on dim 0 and its tokens on `token_dims` (one for all, or one per tensor):
    hidden states `[B, N, D]`, cos/sin `[B, N, d]`, ids and masks `[B, N]`, K/V caches `[B, H, N, d]` (token
    dim 2), multi-axis positions as `[B, 3, N]` (permute `[3, B, N]` first). Returns new tensors with N
    replaced by K; on CUDA, all of them in one kernel launch.
    """
    tensors = list(tensors)
    dims = [token_dims] * len(tensors) if isinstance(token_dims, int) else list(token_dims)
    if len(dims) != len(tensors):
        raise ValueError(f"{len(dims)} token dims for {len(tensors)} tensors: give one per tensor, or one int")
    for tensor, dim in zip(tensors, dims, strict=True):
        if not 1 <= dim < tensor.dim() or tensor.shape[0] != index.shape[0]:
            raise ValueError(
                f"a tensor of shape {tuple(tensor.shape)} with token dim {dim} does not fit index "
                f"{tuple(index.shape)}: batch must be dim 0 and the token dim one of the others"
            )
    return implementation("gather_tokens", index, *tensors).gather_tokens(tensors, index, dims)


def score_rows(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
    last_key: torch.Tensor | None = None,
    sum_queries: bool = False,
    first_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean softmax attention of `queries` `[B, H, Q, d]` over `keys` `[B, Hk, N, d]` in float32:
    `[B, Q, N]`, or `[B, N]` summed over the queries (`sum_queries`), without the whole `[Q, N]` matrix in
    memory at once. H is a multiple of Hk (grouped-query attention, heads grouped as `repeat_kv` does).
    `key_valid` `[B, N]` marks the real keys and `last_key` `[B, Q]` the last key each query may see (a
    causal mask; -1 for none) and `first_key` `[B, Q]` the first (a sliding window); a query that sees no key
    scores zero."""
    if queries.shape[1] % keys.shape[1] or queries.shape[-1] != keys.shape[-1]:
        raise ValueError(
            f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} do not pair: heads and head dims"
        )
    return implementation("score_rows", queries, keys).score_rows(
        queries, keys, scale, key_valid, last_key, sum_queries, first_key
    )


def farthest_first(features: torch.Tensor, counts: torch.Tensor, first: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy k-center (farthest-first traversal) under cosine distance: `[B, steps]` token indices.

    `features` `[B, N, D]` are unit-norm, real in each row up to `counts` `[B]`; `first` `[B]` is each row's
    first pick. Each later pick is the real token farthest from all picks so far (the lowest index on
    ties); a row with fewer real tokens than steps picks index 0 past them."""
    return implementation("farthest_first", features).farthest_first(features, counts, first, steps)


def dpp_greedy(features: torch.Tensor, quality: torch.Tensor, counts: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy MAP inference of the DPP with kernel `L_ij = q_i (x_i . x_j) q_j` (fast greedy MAP, Chen et al.
    2018, without its early stop): `[B, steps]` token indices.

    `features` `[B, N, D]` are unit-norm, real in each row up to `counts` `[B]`; `quality` `[B, N]` is q. Each
    pick is the real unpicked token of largest marginal gain `d²` (the lowest index on ties), and `d²` falls by
    the square of the pick's new Cholesky entry; once the best `d²` is numerically zero (`reference.SPENT` of its
    `q²`: the kernel's rank is spent) a row's remaining picks are -1. Kernel rows are built on the fly, never the
    `[N, N]` matrix."""
    return implementation("dpp_greedy", features, quality).dpp_greedy(features, quality, counts, steps)

"""Pure-PyTorch kernels: vectorised, no Python loop over batch rows, run on every device, and the oracle
that the Triton kernels are tested against."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

QUERY_CHUNK = 256
"""Queries scored at once by `score_rows`: bounds memory at `B*H*QUERY_CHUNK*N` floats."""


def token_rows(shape: torch.Size, dim: int) -> tuple[int, int, int, int]:
    """`[B, M, N, R]`: a tensor's batch, the dims between batch and tokens (`dim`), its tokens and the dims
    after them, each group flattened: the layout in which the gather kernels see it."""
    return shape[0], math.prod(shape[1:dim]), shape[dim], math.prod(shape[dim + 1 :])


def gather_tokens(
    tensors: Sequence[torch.Tensor], index: torch.Tensor, token_dims: Sequence[int]
) -> list[torch.Tensor]:
    """See `vtprune.kernels.gather_tokens`. Each tensor, as rows `[B * M * N, R]` (`token_rows`), goes
    through one flat `index_select`, several times faster on CPU than `gather` or `take_along_dim` with an
    expanded index."""
    batch, kept = index.shape
    out = []
    for tensor, dim in zip(tensors, token_dims, strict=True):
        shape = tensor.shape
        _, middle, length, width = token_rows(shape, dim)
        rows = tensor.reshape(batch * middle * length, width)
        starts = torch.arange(batch * middle, device=index.device).view(batch, middle, 1) * length
        picked = rows.index_select(0, (starts + index[:, None, :]).reshape(-1))
        out.append(picked.reshape(*shape[:dim], kept, *shape[dim + 1 :]))
    return out


def score_rows(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
    last_key: torch.Tensor | None = None,
    sum_queries: bool = False,
    first_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean softmax attention of `queries` `[B, H, Q, d]` over `keys` `[B, Hk, N, d]` (H a multiple of
    Hk, query heads grouped as `repeat_kv` groups them), in float32: `[B, Q, N]`, or `[B, N]` summed over
    the queries with `sum_queries`. A query sees the keys that `key_valid` `[B, N]` marks real, up to its
    `last_key` `[B, Q]` index (the causal mask), from its `first_key` `[B, Q]` index on (a sliding window); a query
    that sees no key scores zero everywhere."""
    batch, heads, _, dim = queries.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    keys = keys.float().transpose(-1, -2)
    columns = torch.arange(length, device=keys.device)
    out = []
    for start in range(0, queries.shape[2], QUERY_CHUNK):
        chunk = queries[:, :, start : start + QUERY_CHUNK].float()
        count = chunk.shape[2]
        grouped = chunk.reshape(batch, kv_heads, heads // kv_heads * count, dim)
        logits = (grouped @ keys * scale).view(batch, heads, count, length)
        allowed = torch.ones(batch, count, length, dtype=torch.bool, device=keys.device)
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, :]
        if last_key is not None:
            allowed = allowed & (columns <= last_key[:, start : start + count, None])
        if first_key is not None:
            allowed = allowed & (columns >= first_key[:, start : start + count, None])
        probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).mean(1)
        probs = torch.where(allowed.any(-1, keepdim=True), probs, 0.0)
        out.append(probs.sum(1) if sum_queries else probs)
    return sum(out) if sum_queries else torch.cat(out, 1)


def farthest_first(features: torch.Tensor, counts: torch.Tensor, first: torch.Tensor, steps: int) -> torch.Tensor:
    """`[B, steps]` greedy k-center picks over unit-norm `features` `[B, N, D]` (rows real up to `counts`),
    cosine distance, starting at `first` `[B]`: each next pick is the real token farthest from every pick so
    far (the first such on ties). A row with fewer real tokens than steps repeats index 0 past them."""
    batch, length, _ = features.shape
    features = features.float()
    rows = torch.arange(batch, device=features.device)
    valid = torch.arange(length, device=features.device) < counts[:, None]
    # Running distance of each token to its nearest pick; -inf marks padding and picked tokens.
    nearest = torch.full((batch, length), float("inf"), device=features.device).masked_fill(~valid, float("-inf"))
    pick, picks = first, []
    for step in range(steps):
        if step:
            pick = nearest.argmax(1)
        picks.append(pick)
        distance = 1.0 - torch.bmm(features, features[rows, pick][:, :, None]).squeeze(2)
        nearest = torch.minimum(nearest, distance)
        nearest[rows, pick] = float("-inf")
    return torch.stack(picks, 1)


SPENT = 1e-6
"""A DPP pick whose `d²` is at most this fraction of its `q²` lies in the span of the picks so far (float32 leaves
duplicates about 1e-7 of residual): the kernel's rank is spent."""


def dpp_greedy(features: torch.Tensor, quality: torch.Tensor, counts: torch.Tensor, steps: int) -> torch.Tensor:
    """`[B, steps]` greedy MAP picks of the DPP whose kernel is `L = diag(q) X X^T diag(q)` (`features` X
    `[B, N, D]` unit-norm, real in each row up to `counts` `[B]`; `quality` q `[B, N]`), by Chen et al.'s
    incremental Cholesky update: each pick is the token of largest remaining `d²` (the first on ties); once no
    unpicked real token has `d²` above `SPENT` of its own `q²` the row's remaining picks are -1."""
    batch, length, _ = features.shape
    x, q = features.float(), quality.float()
    rows = torch.arange(batch, device=x.device)
    valid = torch.arange(length, device=x.device) < counts[:, None]
    remaining = (q * q).masked_fill(~valid, float("-inf"))  # d² (S_jj = 1 for unit rows), -inf on padding and picks
    factors = x.new_zeros(batch, steps, length)  # the Cholesky rows c_t, one per pick
    picks = torch.full((batch, steps), -1, dtype=torch.long, device=x.device)
    exhausted = torch.zeros(batch, dtype=torch.bool, device=x.device)
    for step in range(steps):
        pick = remaining.argmax(1)
        best = remaining[rows, pick]
        exhausted |= ~(best > SPENT * q[rows, pick] ** 2)
        picks[:, step] = pick.masked_fill(exhausted, -1)
        kernel_row = q[rows, pick][:, None] * q * torch.bmm(x, x[rows, pick][:, :, None]).squeeze(2)
        earlier = factors[:, :step]
        at_pick = earlier.gather(2, pick[:, None, None].expand(-1, step, 1))  # [B, step, 1]: c_t at the pick
        projected = (at_pick * earlier).sum(1)
        factor = (kernel_row - projected) / torch.where(exhausted, 1.0, best).sqrt()[:, None]
        factors[:, step] = torch.where(exhausted[:, None], 0.0, factor)
        remaining = remaining - factors[:, step] ** 2
        remaining[rows, pick] = float("-inf")
        remaining = remaining.masked_fill(exhausted[:, None], float("-inf"))
    return picks

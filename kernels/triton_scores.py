"""`score_rows` in Triton: softmax attention rows without the `[Q, N]` logits in memory.

One program takes a block of queries of one (batch row, head) and makes two passes over the keys in
blocks: the first finds each query's running maximum and normaliser (as flash attention does), the
second writes the normalised probabilities, or their sum over the block's queries. Head means and the
sums over query blocks are left to torch on the small outputs, so no atomics: results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scores_kernel(
    queries, keys, key_valid, first_key, last_key, out,
    heads, groups, count, length, dim, scale,
    q_batch, q_head, q_token, k_batch, k_head, k_token,
    SUM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row, block = tl.program_id(0), tl.program_id(1)
    b, h = row // heads, row % heads
    q_index = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d_index = tl.arange(0, BLOCK_D)
    q_inside = q_index < count
    q = tl.load(
        queries + b * q_batch + h * q_head + q_index[:, None] * q_token + d_index[None, :],
        mask=q_inside[:, None] & (d_index[None, :] < dim),
        other=0.0,
    ).to(tl.float32)
    first = tl.load(first_key + b * count + q_index, mask=q_inside, other=0)
    last = tl.load(last_key + b * count + q_index, mask=q_inside, other=-1)
    k_base = keys + b * k_batch + (h // groups) * k_head
    best = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_Q,), tl.float32)
    for start in range(0, length, BLOCK_N):
        logits, allowed = _logits(
            q, k_base, key_valid + b * length, first, last, start, length, dim, scale, k_token, BLOCK_N, BLOCK_D
        )
        new_best = tl.maximum(best, tl.max(logits, 1))
        safe = tl.where(new_best == float("-inf"), 0.0, new_best)
        total = total * tl.exp(best - safe) + tl.sum(tl.where(allowed, tl.exp(logits - safe[:, None]), 0.0), 1)
        best = new_best
    safe = tl.where(best == float("-inf"), 0.0, best)
    inverse = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)  # a query seeing no key: zero
    for start in range(0, length, BLOCK_N):
        logits, allowed = _logits(
            q, k_base, key_valid + b * length, first, last, start, length, dim, scale, k_token, BLOCK_N, BLOCK_D
        )
        probs = tl.where(allowed, tl.exp(logits - safe[:, None]), 0.0) * inverse[:, None]
        n_index = start + tl.arange(0, BLOCK_N)
        if SUM:
            target = out + (row * tl.num_programs(1) + block) * length + n_index
            tl.store(target, tl.sum(probs, 0), mask=n_index < length)
        else:
            target = out + (row * count + q_index[:, None]) * length + n_index[None, :]
            tl.store(target, probs, mask=q_inside[:, None] & (n_index[None, :] < length))


@triton.jit
def _logits(
    q, k_base, valid_row, first, last, start, length, dim, scale, k_token, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    n_index = start + tl.arange(0, BLOCK_N)
    d_index = tl.arange(0, BLOCK_D)
    n_inside = n_index < length
    k = tl.load(
        k_base + n_index[:, None] * k_token + d_index[None, :],
        mask=n_inside[:, None] & (d_index[None, :] < dim),
        other=0.0,
    ).to(tl.float32)
    logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    real = tl.load(valid_row + n_index, mask=n_inside, other=0) != 0
    allowed = real[None, :] & (n_index[None, :] <= last[:, None]) & (n_index[None, :] >= first[:, None])
    return tl.where(allowed, logits, float("-inf")), allowed


def score_rows(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
    last_key: torch.Tensor | None = None,
    sum_queries: bool = False,
    first_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """As `reference.score_rows`."""
    batch, heads, count, dim = queries.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    if queries.stride(-1) != 1:
        queries = queries.contiguous()
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    device = queries.device
    if key_valid is None:
        key_valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    if last_key is None:
        last_key = torch.full((batch, count), length - 1, dtype=torch.int64, device=device)
    if first_key is None:
        first_key = torch.zeros((batch, count), dtype=torch.int64, device=device)
    block_q = 16 if count <= 16 else 64
    block_d = max(16, triton.next_power_of_2(dim))
    block_n = 64 if block_d <= 128 else 32
    blocks = triton.cdiv(count, block_q)
    shape = (batch, heads, blocks, length) if sum_queries else (batch, heads, count, length)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out.sum((1, 2)) if sum_queries else out.mean(1)
    _scores_kernel[(batch * heads, blocks)](
        queries, keys, key_valid.to(torch.int8).contiguous(), first_key.to(torch.int64).contiguous(),
        last_key.to(torch.int64).contiguous(), out,
        heads, heads // kv_heads, count, length, dim, float(scale),
        queries.stride(0), queries.stride(1), queries.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        SUM=sum_queries, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    return out.sum((1, 2)) / heads if sum_queries else out.mean(1)

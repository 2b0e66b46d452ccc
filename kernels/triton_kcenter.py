"""`farthest_first` in Triton: one launch per greedy k-center step for the whole batch.

Step s's programs each take a block of one row's tokens: they first reduce the block maxima that step
s-1 left (so every program agrees on the pick, the first of the row's farthest tokens), then compute
their tokens' cosine distance to it, lower the running nearest distances and leave their own block's
maximum and its index. The block maxima alternate between two buffers, so a step never reads what its
own programs are writing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def dots_with(row, pick, n_index, n_inside, dim, f_token, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """`[BLOCK_N]` float32 dot products of the tokens `n_index` of one row of features with its token `pick`."""
    dot = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, dim, BLOCK_D):
        d_index = start + tl.arange(0, BLOCK_D)
        d_inside = d_index < dim
        centre = tl.load(row + pick * f_token + d_index, mask=d_inside, other=0.0)
        x = tl.load(
            row + n_index[:, None] * f_token + d_index[None, :], mask=n_inside[:, None] & d_inside[None, :], other=0.0
        )
        dot += tl.sum(x * centre[None, :], 1)
    return dot


@triton.jit
def _step_kernel(
    features, nearest, best_value, best_index, first, picks,
    step, steps, length, dim, blocks, f_batch, f_token,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCKS: tl.constexpr,
):  # fmt: skip
    b, block = tl.program_id(0), tl.program_id(1)
    if step == 0:
        pick = tl.load(first + b)
    else:
        read = ((step - 1) % 2 * tl.num_programs(0) + b) * blocks + tl.arange(0, BLOCKS)
        values = tl.load(best_value + read, mask=tl.arange(0, BLOCKS) < blocks, other=float("-inf"))
        winner = tl.argmax(values, 0, tie_break_left=True)
        pick = tl.load(best_index + ((step - 1) % 2 * tl.num_programs(0) + b) * blocks + winner)
    if block == 0:
        tl.store(picks + b * steps + step, pick)
    n_index = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_inside = n_index < length
    dot = dots_with(features + b * f_batch, pick, n_index, n_inside, dim, f_token, BLOCK_N, BLOCK_D)
    here = nearest + b * length + n_index
    distance = tl.minimum(tl.load(here, mask=n_inside, other=float("-inf")), 1.0 - dot)
    distance = tl.where(n_index == pick, float("-inf"), distance)
    tl.store(here, distance, mask=n_inside)
    top = tl.argmax(distance, 0, tie_break_left=True)
    write = (step % 2 * tl.num_programs(0) + b) * blocks + block
    tl.store(best_value + write, tl.max(distance, 0))
    tl.store(best_index + write, block * BLOCK_N + top)


def farthest_first(features: torch.Tensor, counts: torch.Tensor, first: torch.Tensor, steps: int) -> torch.Tensor:
    """As `reference.farthest_first`."""
    batch, length, dim = features.shape
    features = features.float().contiguous()
    device = features.device
    valid = torch.arange(length, device=device) < counts[:, None]
    nearest = torch.full((batch, length), float("inf"), device=device).masked_fill(~valid, float("-inf"))
    picks = torch.zeros(batch, steps, dtype=torch.int64, device=device)
    if batch == 0 or steps == 0:
        return picks
    block_n = min(128, max(16, triton.next_power_of_2(length)))
    block_d = min(128, max(16, triton.next_power_of_2(dim)))
    blocks = triton.cdiv(length, block_n)
    best_value = torch.empty(2, batch, blocks, device=device)
    best_index = torch.empty(2, batch, blocks, dtype=torch.int64, device=device)
    first = first.to(device=device, dtype=torch.int64).contiguous()
    for step in range(steps):
        _step_kernel[(batch, blocks)](
            features, nearest, best_value, best_index, first, picks,
            step, steps, length, dim, blocks, features.stride(0), features.stride(1),
            BLOCK_N=block_n, BLOCK_D=block_d, BLOCKS=triton.next_power_of_2(blocks),
        )  # fmt: skip
    return picks

"""`dpp_greedy` in Triton: one launch per greedy pick for the whole batch.

Pick s's programs each take a block of one row's tokens: they reduce the block maxima of `d²` that pick s-1
left (so every program agrees on the pick and on its `d²`), build their tokens' kernel entries with the pick
`q_j q_n (x_j . x_n)`, subtract the earlier Cholesky rows' projection, divide by `sqrt(d²_j)`, store the new
Cholesky row, lower `d²` and leave their own block's maximum and its index. The block maxima alternate between
two buffers, so a pick never reads what its own programs are writing. A row whose best `d²` is at most `SPENT` of
the pick's `q²` is spent: it records -1 and its blocks report -inf from then on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import SPENT
from .triton_kcenter import dots_with


@triton.jit
def _pick_kernel(
    features, quality, remaining, factors, best_value, best_index, picks,
    step, steps, length, dim, blocks, f_batch, f_token, spent,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCKS: tl.constexpr,
):  # fmt: skip
    b, block = tl.program_id(0), tl.program_id(1)
    read = ((step + 1) % 2 * tl.num_programs(0) + b) * blocks + tl.arange(0, BLOCKS)
    values = tl.load(best_value + read, mask=tl.arange(0, BLOCKS) < blocks, other=float("-inf"))
    winner = tl.argmax(values, 0, tie_break_left=True)
    best = tl.max(values, 0)
    pick = tl.load(best_index + ((step + 1) % 2 * tl.num_programs(0) + b) * blocks + winner)
    chosen_quality = tl.load(quality + b * length + pick)
    alive = best > spent * chosen_quality * chosen_quality
    if block == 0:
        tl.store(picks + b * steps + step, tl.where(alive, pick, -1))
    n_index = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_inside = n_index < length
    here = remaining + b * length + n_index
    gain = tl.load(here, mask=n_inside, other=float("-inf"))
    if alive:
        dot = dots_with(features + b * f_batch, pick, n_index, n_inside, dim, f_token, BLOCK_N, BLOCK_D)
        q = tl.load(quality + b * length + n_index, mask=n_inside, other=0.0)
        entry = chosen_quality * q * dot
        column = factors + b * steps * length
        for earlier in range(0, step):
            at_pick = tl.load(column + earlier * length + pick)
            entry -= at_pick * tl.load(column + earlier * length + n_index, mask=n_inside, other=0.0)
        factor = entry / tl.sqrt(best)
        tl.store(column + step * length + n_index, factor, mask=n_inside)
        gain = tl.where(n_index == pick, float("-inf"), gain - factor * factor)
        tl.store(here, gain, mask=n_inside)
    else:
        gain = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    write = (step % 2 * tl.num_programs(0) + b) * blocks + block
    tl.store(best_value + write, tl.max(gain, 0))
    tl.store(best_index + write, block * BLOCK_N + tl.argmax(gain, 0, tie_break_left=True))


def dpp_greedy(features: torch.Tensor, quality: torch.Tensor, counts: torch.Tensor, steps: int) -> torch.Tensor:
    """As `reference.dpp_greedy`."""
    batch, length, dim = features.shape
    features = features.float().contiguous()
    quality = quality.float().contiguous()
    device = features.device
    valid = torch.arange(length, device=device) < counts.to(device)[:, None]
    remaining = (quality * quality).masked_fill(~valid, float("-inf")).contiguous()
    picks = torch.full((batch, steps), -1, dtype=torch.int64, device=device)
    if batch == 0 or steps == 0 or length == 0:
        return picks
    factors = torch.zeros(batch, steps, length, device=device)
    block_n = min(128, max(16, triton.next_power_of_2(length)))
    block_d = min(128, max(16, triton.next_power_of_2(dim)))
    blocks = triton.cdiv(length, block_n)
    best_value = torch.full((2, batch, blocks), float("-inf"), device=device)
    best_index = torch.zeros(2, batch, blocks, dtype=torch.int64, device=device)
    # the first pick reads slot 1 as if an earlier pick had left it: the initial d² block maxima
    padded = torch.nn.functional.pad(remaining, (0, blocks * block_n - length), value=float("-inf"))
    initial = padded.view(batch, blocks, block_n)
    best_value[1] = initial.max(2).values
    best_index[1] = initial.argmax(2) + torch.arange(blocks, device=device) * block_n
    for step in range(steps):
        _pick_kernel[(batch, blocks)](
            features, quality, remaining, factors, best_value, best_index, picks,
            step, steps, length, dim, blocks, features.stride(0), features.stride(1), SPENT,
            BLOCK_N=block_n, BLOCK_D=block_d, BLOCKS=triton.next_power_of_2(blocks),
        )  # fmt: skip
    return picks

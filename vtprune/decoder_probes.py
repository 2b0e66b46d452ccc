"""Signals read off a decoder layer during prefill: attention rows, key norms and token transitions.

Attention rows are recomputed from the layer's own norm and q/k projections, with its q/k norms where
it has them and RoPE at the positions it runs at, so sdpa, flash and eager select alike. Only the
query rows asked for are projected; the keys are projected once per scoring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vtprune.kernels import score_rows

if TYPE_CHECKING:
    from vtprune.adapters.base import DecoderParts


def attention_received(
    layer: DecoderParts,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    queries: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """`[B, L]` float32: the attention each token gets from the `queries` tokens, head mean, then query mean.

    `layer` is the decoder layer's parts (as its adapter names them); `hidden` is the layer's input `[B, L, D]`;
    `queries` and `valid` are `[B, L]` bools (which tokens ask, which are real). Softmax runs over the real keys
    up to each query (the causal mask), and within the layer's sliding window where it has one, in float32.
    """
    normed = layer.input_norm(hidden)
    cos, sin = (t.expand(hidden.shape[0], *t.shape[1:]) for t in position_embeddings)
    count = queries.sum(1)
    slots = torch.sort(queries.to(torch.int8), dim=1, descending=True, stable=True).indices[:, : int(count.max())]
    asked = torch.arange(slots.shape[1], device=slots.device) < count[:, None]  # [B, Q] real query slots
    pick = slots[..., None].expand(-1, -1, normed.shape[-1])
    angle = slots[..., None].expand(-1, -1, cos.shape[-1])
    picked = normed.gather(1, pick)
    q = _heads(layer, layer.q_proj, layer.q_norm, picked, cos.gather(1, angle), sin.gather(1, angle))
    k = _heads(layer, layer.k_proj, layer.k_norm, normed, cos, sin)
    last_key = torch.where(asked, slots, -1)  # the causal mask; slots past a row's queries see no key
    first_key = None if layer.window is None else slots - layer.window + 1
    received = score_rows(
        q, k, layer.scaling, key_valid=valid, last_key=last_key, sum_queries=True, first_key=first_key
    )
    return received / count.clamp(min=1)[:, None]


def key_norms(
    layer: DecoderParts, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """`[B, L]` float32: the L1 norm of each token's keys over every key head, after RoPE (as the layer caches
    them), from the layer's input `hidden` `[B, L, D]`."""
    cos, sin = (t.expand(hidden.shape[0], *t.shape[1:]) for t in position_embeddings)
    keys = _heads(layer, layer.k_proj, layer.k_norm, layer.input_norm(hidden), cos, sin)
    return keys.float().abs().sum((1, 3))


def token_transition(before: torch.Tensor, after: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`[B, L]` float32 TransPrune token transition of one sublayer: norm ratio x exp(1 - cos), the latter
    normalised over each row's real tokens (the official code normalises over the whole batch of one)."""
    before, after = before.float(), after.float()
    ratio = after.norm(dim=-1) / before.norm(dim=-1)
    turn = torch.exp(1 - torch.cosine_similarity(before, after, dim=-1))
    turn = torch.where(valid, turn, 0.0)  # padding may hold anything, NaN included
    return torch.where(valid, ratio * turn / turn.sum(1, keepdim=True), 0.0)


def _heads(
    layer: DecoderParts,
    projection: torch.nn.Module,
    norm: torch.nn.Module | None,
    normed: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """`[B, H, N, d]` rotated queries or keys of `normed` `[B, N, D]`, as the attention module makes them."""
    projected = projection(normed).view(*normed.shape[:-1], -1, layer.head_dim)
    if norm is not None:
        projected = norm(projected)
    return layer.rotate(projected.transpose(1, 2), cos, sin)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as Llama, Qwen2 and Qwen3 apply it (rotate_half convention) to `x` `[B, H, N, d]`, with `cos` and `sin`
    `[B, N, d]` as the LLM's rotary embedding gives them."""
    cos, sin = cos[:, None], sin[:, None]
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin

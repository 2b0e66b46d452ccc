"""Gather the same token positions out of several tensors at once."""

from __future__ import annotations

import torch


def gather_tokens(tensors: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    """Compact every `[B, N, ...]` tensor along dim 1 with one index per batch row.

    `index` is `[B, K]`: the positions to keep in each row. Returns `[B, K, ...]` tensors. The rows are
    flattened into one `index_select`, which is several times faster on CPU than `torch.gather` with
    an expanded index.
    """
    batch, kept = index.shape
    out = []
    for tensor in tensors:
        n = tensor.shape[1]
        offsets = torch.arange(batch, device=index.device).unsqueeze(1) * n
        flat = tensor.reshape(batch * n, *tensor.shape[2:]).index_select(0, (index + offsets).reshape(-1))
        out.append(flat.reshape(batch, kept, *tensor.shape[2:]))
    return out

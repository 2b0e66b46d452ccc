"""Signal probes: attention rows captured from a vision tower while it runs.

The rows are recomputed from the q/k projections' own outputs (captured by forward hooks), so no
`output_attentions`, no eager attention and no second matmul over all keys' inputs are needed: the
attention backend (sdpa, flash, eager) cannot change what is selected.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionProjections:
    """Where one attention layer's queries and keys come from."""

    q_proj: nn.Module
    k_proj: nn.Module
    num_heads: int
    scale: float


class AttentionRowProbe:
    """Captures one query row of post-softmax attention, head-averaged, at chosen layers.

    The query is the CLS token (`query="cls"`, token 0) or the mean of all queries (`query="mean"`, for
    towers without a CLS token). Use as a context manager around one run of the tower; afterwards
    `rows[layer]` is `[B, N]` float32 and `seconds` is the time spent computing the rows.
    """

    def __init__(self, layers: dict[int, AttentionProjections], query: str = "cls") -> None:
        if query not in ("cls", "mean"):
            raise ValueError(f"query must be 'cls' or 'mean', got {query!r}")
        self.layers = layers
        self.query = query
        self.rows: dict[int, torch.Tensor] = {}
        self.seconds = 0.0
        self._queries: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> AttentionRowProbe:
        for layer, proj in self.layers.items():
            self._handles.append(proj.q_proj.register_forward_hook(self._on_query(layer)))
            self._handles.append(proj.k_proj.register_forward_hook(self._on_keys(layer, proj)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._queries.clear()

    def _on_query(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            start = time.perf_counter()
            query = output[:, :1] if self.query == "cls" else output.mean(1, keepdim=True)
            self._queries[layer] = query.detach().float()
            self.seconds += time.perf_counter() - start

        return hook

    def _on_keys(self, layer: int, proj: AttentionProjections):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            start = time.perf_counter()
            query = self._queries.pop(layer)
            batch, tokens, width = output.shape
            heads = proj.num_heads
            keys = output.detach().view(batch, tokens, heads, width // heads).transpose(1, 2).float()
            logits = (keys @ query.view(batch, heads, width // heads, 1)).squeeze(-1) * proj.scale
            self.rows[layer] = logits.softmax(-1).mean(1)
            self.seconds += time.perf_counter() - start

        return hook

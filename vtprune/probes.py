"""Signal probes: attention statistics captured from a vision tower while it runs.

Everything is recomputed from the q/k projections' own outputs (captured by forward hooks), so no
`output_attentions`, no eager attention and no second pass over the layer's inputs are needed: the
attention backend (sdpa, flash, eager) cannot change what is selected.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vtprune import hf
from vtprune.kernels import score_rows


@dataclass(frozen=True)
class AttentionProjections:
    """Where one attention layer's queries and keys come from."""

    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    num_heads: int
    scale: float


@dataclass(frozen=True)
class FusedProjections:
    """Where one attention layer's queries and keys come from when one module projects q, k and v together
    (vLLM's `qkv_proj`)."""

    qkv: nn.Module
    split: Callable[[Any], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    """The module's output -> q, k, v, each `[B, N, H*d]`."""
    num_heads: int
    scale: float


@dataclass(frozen=True)
class PackedProjections:
    """Where one packed tower attention's queries and keys come from: a fused qkv projection."""

    attention: nn.Module
    """The attention module, whose call carries the boundaries and rotary embeddings (`call`)."""
    call: hf.Binding
    qkv: nn.Module
    num_heads: int
    scale: float

    def heads(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v `[N, H, d]` from the qkv projection's output `[N, 3 * H * d]`."""
        return output.reshape(output.shape[0], 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)


class AttentionProbe:
    """Captures post-softmax attention statistics, head-averaged, at chosen layers.

    `row_layers` get one query row: the CLS token's (`query="cls"`, token 0) or that of the mean query
    (`query="mean"`, for towers without a CLS token). `column_layers` get the attention each token
    receives, averaged over every query. Use as a context manager around one run of the tower;
    afterwards `rows[layer]` and `columns[layer]` are `[B, N]` float32, and `seconds` is the time spent. `pool`,
    where the LLM's tokens are groups of patches (InternVL's pixel shuffle), maps `[B, N]` per-token values to
    `[B, N']`, the tokens before the first visual one kept.
    """

    def __init__(
        self,
        projections: dict[int, AttentionProjections | FusedProjections],
        row_layers: tuple[int, ...] = (),
        column_layers: tuple[int, ...] = (),
        query: str = "cls",
        pool: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if query not in ("cls", "mean"):
            raise ValueError(f"query must be 'cls' or 'mean', got {query!r}")
        self.projections = projections
        self.row_layers, self.column_layers = set(row_layers), set(column_layers)
        self.query = query
        self.pool = pool
        self.rows: dict[int, torch.Tensor] = {}
        self.columns: dict[int, torch.Tensor] = {}
        self.seconds = 0.0
        self._queries: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> AttentionProbe:
        for layer in self.row_layers | self.column_layers:
            proj = self.projections[layer]
            if isinstance(proj, FusedProjections):
                self._handles.append(proj.qkv.register_forward_hook(self._on_fused(layer, proj)))
                continue
            self._handles.append(proj.q_proj.register_forward_hook(self._on_queries(layer)))
            self._handles.append(proj.k_proj.register_forward_hook(self._on_keys(layer, proj)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._queries.clear()

    def _on_queries(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._queries[layer] = output.detach()

        return hook

    def _on_keys(self, layer: int, proj: AttentionProjections):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._capture(layer, proj, self._queries.pop(layer), output.detach())

        return hook

    def _on_fused(self, layer: int, proj: FusedProjections):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            queries, keys, _ = proj.split(output)
            self._capture(layer, proj, queries.detach(), keys.detach())

        return hook

    def _capture(
        self, layer: int, proj: AttentionProjections | FusedProjections, queries: torch.Tensor, keys: torch.Tensor
    ) -> None:
        start = time.perf_counter()
        queries, keys = heads(queries, proj.num_heads), heads(keys, proj.num_heads)
        pool = self.pool or (lambda values: values)
        if layer in self.row_layers:
            query = queries[:, :, :1] if self.query == "cls" else queries.float().mean(2, keepdim=True)
            self.rows[layer] = pool(_row(query, keys, proj.scale))
        if layer in self.column_layers:
            self.columns[layer] = pool(_received(queries, keys, proj.scale))
        self.seconds += time.perf_counter() - start


def heads(x: torch.Tensor, count: int) -> torch.Tensor:
    """`[B, N, H*d]` -> `[B, H, N, d]`."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, count, width // count).transpose(1, 2)


def _row(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """`[B, N]`: one query's (`[B, H, 1, d]`) head-mean attention over `keys`, in float32."""
    return score_rows(query, keys, scale)[:, 0]


def _received(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """`[B, N]`: the head-mean attention each key gets, averaged over every query."""
    return score_rows(queries, keys, scale, sum_queries=True) / queries.shape[2]


class PackedAttentionProbe:
    """`AttentionProbe` for towers that run all images as one packed sequence (Qwen-VL): fused qkv, rotary
    position embeddings, and `cu_seqlens` marking where each image's tokens start.

    A pre-hook on each probed attention module reads the image boundaries and rotary embeddings; a hook on its
    qkv projection rotates q and k with `rotate` and computes, per image, the mean query's attention row
    and the attention each token receives, averaged over every `unit` consecutive tokens (a merge unit,
    one LLM token). `rows[layer]` and `columns[layer]` are `[crops, max(crop_sizes)]` float32: each crop's
    units (`crop_sizes` of them, consecutive in raster order; a video's frame groups may form one crop),
    zero past its own count. Towers that run units out of raster order (Qwen2.5-VL's windows) pass
    `raster`: for each unit in raster order over the call, its index in the tower's order.
    """

    def __init__(
        self,
        attentions: dict[int, PackedProjections],
        row_layers: tuple[int, ...],
        column_layers: tuple[int, ...],
        rotate,
        unit: int,
        crop_sizes: list[int],
        raster: torch.Tensor | None = None,
    ) -> None:
        self.attentions = attentions
        self.raster = raster
        self.crop_sizes = crop_sizes
        self.row_layers, self.column_layers = set(row_layers), set(column_layers)
        self.rotate, self.unit = rotate, unit
        self.rows: dict[int, torch.Tensor] = {}
        self.columns: dict[int, torch.Tensor] = {}
        self.seconds = 0.0
        self._calls: dict[int, dict] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> PackedAttentionProbe:
        for layer in self.row_layers | self.column_layers:
            attention = self.attentions[layer]
            self._handles.append(
                attention.attention.register_forward_pre_hook(self._on_call(layer, attention.call), with_kwargs=True)
            )
            self._handles.append(attention.qkv.register_forward_hook(self._on_qkv(layer, attention)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._calls.clear()

    def _on_call(self, layer: int, binding: hf.Binding):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._calls[layer] = binding.view(args, kwargs)

        return hook

    def _on_qkv(self, layer: int, attention: PackedProjections):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            start = time.perf_counter()
            call = self._calls.pop(layer)
            q, k, _ = (part.detach() for part in attention.heads(output))
            q, k = self.rotate(q, k, *call["position_embeddings"])
            bounds = call["bounds"].tolist()
            rows, columns = [], []
            for first, last in zip(bounds[:-1], bounds[1:], strict=True):
                queries = q[first:last].transpose(0, 1)[None].float()  # [1, H, n, d]
                keys = k[first:last].transpose(0, 1)[None].float()
                if layer in self.row_layers:
                    rows.append(self._units(_row(queries.mean(2, keepdim=True), keys, attention.scale)[0]))
                if layer in self.column_layers:
                    columns.append(self._units(_received(queries, keys, attention.scale)[0]))
            if rows:
                self.rows[layer] = self._per_image(rows)
            if columns:
                self.columns[layer] = self._per_image(columns)
            self.seconds += time.perf_counter() - start

        return hook

    def _units(self, scores: torch.Tensor) -> torch.Tensor:
        """Per merge unit, the mean of its tokens' scores."""
        return scores.view(-1, self.unit).mean(1)

    def _per_image(self, units: list[torch.Tensor]) -> torch.Tensor:
        return per_crop(torch.cat(units), self.crop_sizes, self.raster)


def per_crop(units: torch.Tensor, crop_sizes: list[int], raster: torch.Tensor | None = None) -> torch.Tensor:
    """`[crops, max(crop_sizes), ...]`: per-unit values `[units, ...]` of a packed call (in the tower's order; `raster`
    gives, for each unit in raster order, its index there) split into crops in raster order, zero-padded."""
    if raster is not None:
        units = units[raster.to(units.device)]
    longest = max(crop_sizes)
    crops = units.split(crop_sizes)
    return torch.stack([torch.cat([c, c.new_zeros(longest - len(c), *c.shape[1:])]) for c in crops])


class ProjectorProbe:
    """Captures what the projector receives while the tower runs: the tower's features of every visual token.

    Use as a context manager around one run of the tower; afterwards `features` is `[crops, crop_tokens, width]`,
    arranged from the captured input by `arrange` (the identity where the projector takes crops as they are).
    """

    def __init__(
        self,
        projector: nn.Module,
        binding: hf.Binding,
        arrange: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.projector, self.binding, self.arrange = projector, binding, arrange
        self.features: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> ProjectorProbe:
        self._handle = self.projector.register_forward_pre_hook(self._on_call, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured = self.binding.view(args, kwargs)["hidden"].detach()
        self.features = captured if self.arrange is None else self.arrange(captured)

"""Hooks that let a `TowerPruning` act inside a packed vision tower (Qwen-VL) while it runs.

A packed tower runs every crop of a call as one sequence `[N, D]`: `cu_seqlens` marks where each crop
(an image, or one frame group of a video) starts, rotary embeddings give each token its 2-D position,
and Qwen2.5-VL's windowed blocks get a second, finer `cu_seqlens` over tokens in window order. The
hooks keep the index, in the unpruned sequence, of every token still present; each block is handed
the boundaries and rotary embeddings of those tokens only, so after a cut the later blocks compute
exactly what they would on a sequence that held only the kept tokens. A pruning sees each crop as one
padded row and cuts whole merge units (the `unit` tokens that become one LLM token). The mergers'
outputs (the projector's and Qwen3-VL's deepstack ones) are scattered back to the unpruned length,
zeros where units were cut, so the model's code after them (window order undone, split per item)
sees the shapes it expects. Selections are put into raster order for the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from vtprune import hf
from vtprune.probes import PackedProjections
from vtprune.signals import Selection
from vtprune.tower import LayerTensors, TowerPruning


class PackedTowerHooks:
    """Drives one `TowerPruning` through one run of a packed tower; use as a context manager.

    `crop_units` are the units of each crop in the tower's order (crops are the full-attention segments);
    `raster`, where the tower runs units out of raster order, gives for each crop and each of its units in
    the tower's order its index in raster order. `projector` is the first module after the blocks that takes the
    units (their tokens, `[n, D]`); `projected_rows` is how many rows of its output each unit gives: 1 where it
    merges them (Qwen's merger), `unit` where it runs per token before a merge of its own (GLM's post-norm).
    """

    def __init__(
        self,
        pruning: TowerPruning,
        blocks: nn.ModuleList,
        block_call: hf.Binding,
        attentions: dict[int, PackedProjections],
        rotate: Callable,
        projector: tuple[nn.Module, hf.Binding],
        deepstack: list[nn.Module],
        unit: int,
        crop_units: list[int],
        raster: list[torch.Tensor] | None = None,
        projected_rows: int = 1,
    ) -> None:
        self.pruning = pruning
        self.blocks = blocks
        self.block_call = block_call
        self.attentions = attentions
        self.rotate = rotate
        self.projector, self.projector_call = projector
        self.deepstack = deepstack
        self.unit = unit
        self.crop_units = torch.tensor(crop_units)
        self.raster = raster
        self.projected_rows = projected_rows
        self.seconds = 0.0
        self._present: torch.Tensor | None = None  # unpruned index of each token still present, once cut
        self._row_tokens = self.crop_units * unit  # tokens each crop (row) holds now
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # what the current block rotates with
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None
        self._qkv: dict[int, torch.Tensor] = {}
        self._slots: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> PackedTowerHooks:
        add = self._handles.append
        for block in self.blocks:
            add(block.register_forward_pre_hook(self._hand_present, with_kwargs=True, prepend=True))
        for index in self.pruning.layers:
            attention = self.attentions[index]
            add(attention.qkv.register_forward_hook(self._keep_qkv(index), prepend=True))
            add(self.blocks[index].register_forward_hook(self._after_layer(index, attention), prepend=True))
        add(self.projector.register_forward_pre_hook(self._before_projector, with_kwargs=True, prepend=True))
        add(self.projector.register_forward_hook(self._scatter_projected, prepend=True))
        for merger in self.deepstack:
            add(merger.register_forward_hook(self._scatter_present, prepend=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._qkv.clear()

    def selections(self) -> list[Selection]:
        """Per crop, what was kept, numbered among the crop's units in raster order."""
        chosen = self.pruning.selections()
        if self.raster is None:
            return chosen
        return [_in_raster(selection, order) for selection, order in zip(chosen, self.raster, strict=True)]

    def _hand_present(self, module: nn.Module, args: tuple, kwargs: dict):
        call = self.block_call.view(args, dict(kwargs))
        if self._present is None:
            self._rotary = call["position_embeddings"]
            return None
        present, given = self._present, call["bounds"]
        bounds = torch.searchsorted(present, given.to(present.device).long())
        bounds = bounds.unique_consecutive().to(given)  # segments left empty are dropped
        if self._gathered is None:
            self._gathered = tuple(t.index_select(0, present.to(t.device)) for t in call["position_embeddings"])
        self._rotary = self._gathered
        call["bounds"], call["position_embeddings"] = bounds, self._gathered
        if call["longest"] is not None:
            call["longest"] = int((bounds[1:] - bounds[:-1]).max())
        return call.arguments()

    def _keep_qkv(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._qkv[index] = output

        return hook

    def _rows(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`[crops, longest]` index of each row's tokens in the current sequence, and which entries are real."""
        counts = self._row_tokens.to(device)
        starts = counts.cumsum(0) - counts
        columns = torch.arange(int(counts.max()), device=device)
        valid = columns[None] < counts[:, None]
        return (starts[:, None] + columns[None]).masked_fill(~valid, 0), valid

    def _after_layer(self, index: int, attention: PackedProjections):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            start = time.perf_counter()
            length = output.shape[0]
            q, k, v = attention.heads(self._qkv.pop(index))
            q, k = self.rotate(q, k, *self._rotary)
            rows, valid = self._rows(output.device)
            cut = self.pruning.after_layer(
                index,
                LayerTensors(
                    queries=q[rows].transpose(1, 2),
                    keys=k[rows].transpose(1, 2),
                    values=v[rows].transpose(1, 2),
                    scale=attention.scale,
                    output=output[rows],
                    valid=valid,
                    unit=self.unit,
                ),
            )
            self.seconds += time.perf_counter() - start
            if cut is None:
                return None
            within = torch.arange(self.unit, device=output.device)
            tokens = (cut.index.to(output.device)[..., None] * self.unit + within).flatten(1)
            kept = cut.valid.to(output.device).repeat_interleave(self.unit, dim=1)
            picked = rows.gather(1, tokens)[kept]  # row after row, each in order: the sequence stays sorted
            present = torch.arange(length, device=output.device) if self._present is None else self._present
            self._present = present[picked]
            self._row_tokens = kept.sum(1).cpu()
            self._gathered = None
            return output[picked]

        return hook

    def _before_projector(self, module: nn.Module, args: tuple, kwargs: dict):
        start = time.perf_counter()
        call = self.projector_call.view(args, dict(kwargs))
        hidden = call["hidden"]
        rows, valid = self._rows(hidden.device)
        units = hidden[rows].unflatten(1, (-1, self.unit)).flatten(2)  # [crops, units, unit * D]
        given = self.pruning.before_projector(units)
        chosen = given.valid.to(hidden.device)
        first_units = (self.crop_units.cumsum(0) - self.crop_units).to(hidden.device)
        self._slots = (first_units[:, None] + given.slots.to(hidden.device))[chosen]
        call["hidden"] = given.tokens[chosen].reshape(-1, hidden.shape[-1])
        self.seconds += time.perf_counter() - start
        return call.arguments()

    def _scatter_projected(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        rows = self.projected_rows
        if rows == 1:
            return self._scatter(output, self._slots)
        within = torch.arange(rows, device=self._slots.device)
        full = output.new_zeros(int(self.crop_units.sum()) * rows, output.shape[-1])
        return full.index_copy(0, (self._slots[:, None] * rows + within).flatten().to(output.device), output)

    def _scatter_present(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self._present is None:
            return None
        return self._scatter(output, self._present[:: self.unit].div(self.unit, rounding_mode="floor"))

    def _scatter(self, output: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """`output` `[n, D]` of the units at `slots` (unpruned unit indices), at full length with zeros elsewhere."""
        full = output.new_zeros(int(self.crop_units.sum()), output.shape[-1])
        return full.index_copy(0, slots.to(output.device), output)


def _in_raster(selection: Selection, raster: torch.Tensor) -> Selection:
    """A crop's selection numbered in the tower's order, renumbered in raster order."""
    scores = None
    if selection.scores is not None:
        scores = torch.full_like(selection.scores, float("nan"))
        scores[raster] = selection.scores[: len(raster)]
    order = None if selection.order is None else raster[selection.order]
    return Selection(kept=raster[selection.kept].sort().values, scores=scores, order=order)

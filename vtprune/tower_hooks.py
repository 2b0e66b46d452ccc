"""Hooks that let a `TowerPruning` act inside a vision tower while it runs.

After each of the pruning's layers, the layer's own q/k/v projection outputs and its output go to the
pruning; a `Cut` it returns is applied to the layer's output, so every later layer runs on fewer
tokens, with the padding of shorter rows masked out of their attention. Before the projector the
pruning says which visual-token slot each remaining token fills, and the projector's output is
scattered back to the full visual-token count (zeros in pruned slots), so the model's own code after
the projector (splitting, packing crops) sees the shapes it expects. The hooks run before any other
forward hook on the same module, so transformers' hidden-state capture records the pruned outputs.

Where the projector pools windows of `unit` patches into one LLM token (Gemma 3), the pruning sees the tokens
window by window (`raster`: the raster index of each patch in that order), so a unit is consecutive tokens as
the policies expect; the tower runs in raster order up to the first cut and on the kept windows' tokens, window
by window, after it (its layers hold no positions, so the order is theirs to take). Before the projector the
kept windows' patches go back to their places on the full grid (zeros elsewhere) and only the kept windows'
outputs are kept: the units go back on the grid where the tower's last layer hands them on (`projector` is the
module there, its final norm), and the module that makes the LLM's tokens (`output`) keeps the kept windows.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from vtprune import hf
from vtprune.kernels import gather_tokens
from vtprune.probes import AttentionProjections, heads
from vtprune.signals import Selection
from vtprune.tower import LayerTensors, TowerPruning


class TowerHooks:
    """Drives one `TowerPruning` through one run of the tower; use as a context manager."""

    def __init__(
        self,
        pruning: TowerPruning,
        layers: nn.ModuleList,
        layer_call: hf.Binding,
        projections: dict[int, AttentionProjections],
        projector: tuple[nn.Module, hf.Binding],
        visual_tokens: int,
        unit: int = 1,
        raster: torch.Tensor | None = None,
        output: nn.Module | None = None,
    ) -> None:
        self.pruning = pruning
        self.unit, self.raster = unit, raster
        self._rows = raster
        """Per token in window order, its row in the tower's hidden states; None where they are in that order."""
        self.layers = layers
        self.layer_call = layer_call
        self.projections = projections
        self.projector, self.projector_call = projector
        self.output = output or self.projector
        self.visual_tokens = visual_tokens
        self.seconds = 0.0
        self._valid: torch.Tensor | None = None
        self._projected: tuple[torch.Tensor, torch.Tensor] | None = None
        self._outputs: dict[tuple[int, str], torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> TowerHooks:
        add = self._handles.append
        self._rows = self.raster
        for layer in self.layers:
            add(layer.register_forward_pre_hook(self._mask_padding, with_kwargs=True, prepend=True))
        for index in self.pruning.layers:
            proj = self.projections[index]
            for name in ("q", "k", "v"):
                add(getattr(proj, f"{name}_proj").register_forward_hook(self._keep_output(index, name), prepend=True))
            add(self.layers[index].register_forward_hook(self._after_layer(index, proj), prepend=True))
        add(self.projector.register_forward_pre_hook(self._before_projector, with_kwargs=True, prepend=True))
        add(self.output.register_forward_hook(self._scatter_back, prepend=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def selections(self) -> list[Selection]:
        """Per crop, what was kept, numbered among the crop's visual tokens."""
        return self.pruning.selections()

    def _keep_output(self, index: int, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._outputs[index, name] = output

        return hook

    def _mask_padding(self, module: nn.Module, args: tuple, kwargs: dict):
        valid = self._valid
        if valid is None or bool(valid.all()):
            return None
        call = self.layer_call.view(args, dict(kwargs))
        hidden = call["hidden"]
        mask = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device)
        call["mask"] = mask.masked_fill(~valid.to(hidden.device), torch.finfo(hidden.dtype).min)[:, None, None, :]
        return call.arguments()

    def _after_layer(self, index: int, proj: AttentionProjections):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            start = time.perf_counter()
            hidden = hf.first_output(output)
            valid = self._valid
            if valid is None:
                valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            rows = None if self._rows is None else self._rows.to(hidden.device)
            q, k, v = (self._ordered(self._outputs.pop((index, name)), rows) for name in "qkv")
            tensors = LayerTensors(
                queries=heads(q, proj.num_heads),
                keys=heads(k, proj.num_heads),
                values=heads(v, proj.num_heads),
                scale=proj.scale,
                output=self._ordered(hidden, rows),
                valid=self._ordered(valid, rows),
                unit=self.unit,
            )
            cut = self.pruning.after_layer(index, tensors)
            self.seconds += time.perf_counter() - start
            if cut is None:
                return None
            within = torch.arange(self.unit, device=hidden.device)
            tokens = (cut.index.to(hidden.device)[..., None] * self.unit + within).flatten(1)
            self._valid = cut.valid.repeat_interleave(self.unit, dim=1)
            (pruned,) = gather_tokens([hidden], tokens if rows is None else rows[tokens])
            self._rows = None
            return hf.with_first_output(output, pruned)

        return hook

    def _before_projector(self, module: nn.Module, args: tuple, kwargs: dict):
        start = time.perf_counter()
        call = self.projector_call.view(args, dict(kwargs))
        hidden = self._ordered(call["hidden"], None if self._rows is None else self._rows.to(call["hidden"].device))
        given = self.pruning.before_projector(hidden.unflatten(1, (-1, self.unit)).flatten(2))
        self._projected = (given.slots, given.valid)
        call["hidden"] = given.tokens if self.raster is None else self._on_grid(given.tokens, given.slots, given.valid)
        self.seconds += time.perf_counter() - start
        return call.arguments()

    @staticmethod
    def _ordered(tokens: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """`[B, M, ...]` in window order."""
        return tokens if rows is None else tokens[:, rows]

    def _on_grid(self, tokens: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """`[B, patches, D]`: each given unit's patches at their places in its slot's window, zeros elsewhere."""
        batch, _, width = tokens.shape
        places = self.raster.to(tokens.device).view(-1, self.unit)[slots.to(tokens.device)]  # [B, m, unit]
        valid = valid.to(tokens.device)
        rows = torch.arange(batch, device=tokens.device)[:, None, None].expand_as(places)
        full = tokens.new_zeros(batch, len(self.raster), width // self.unit)
        full[rows[valid], places[valid]] = tokens[valid].view(-1, self.unit, width // self.unit)
        return full

    def _scatter_back(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        slots, valid = self._projected
        batch, _, width = output.shape
        full = output.new_zeros(batch, self.visual_tokens, width)
        rows = torch.arange(batch, device=output.device)[:, None].expand_as(slots)
        valid, slots = valid.to(output.device), slots.to(output.device)
        given = output[valid] if self.raster is None else output[rows[valid], slots[valid]]  # on the grid: by slot
        full[rows[valid], slots[valid]] = given
        return full

"""Hooks that let a `TowerPruning` act inside a vision tower while it runs.

After each of the pruning's layers, the layer's own q/k/v projection outputs and its output go to the
pruning; a `Cut` it returns is applied to the layer's output, so every later layer runs on fewer
tokens, with the padding of shorter rows masked out of their attention. Before the projector the
pruning says which visual-token slot each remaining token fills, and the projector's output is
scattered back to the full visual-token count (zeros in pruned slots), so the model's own code after
the projector (splitting, packing crops) sees the shapes it expects. The hooks run before any other
forward hook on the same module, so transformers' hidden-state capture records the pruned outputs.
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
    ) -> None:
        self.pruning = pruning
        self.layers = layers
        self.layer_call = layer_call
        self.projections = projections
        self.projector, self.projector_call = projector
        self.visual_tokens = visual_tokens
        self.seconds = 0.0
        self._valid: torch.Tensor | None = None
        self._projected: tuple[torch.Tensor, torch.Tensor] | None = None
        self._outputs: dict[tuple[int, str], torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> TowerHooks:
        add = self._handles.append
        for layer in self.layers:
            add(layer.register_forward_pre_hook(self._mask_padding, with_kwargs=True, prepend=True))
        for index in self.pruning.layers:
            proj = self.projections[index]
            for name in ("q", "k", "v"):
                add(getattr(proj, f"{name}_proj").register_forward_hook(self._keep_output(index, name), prepend=True))
            add(self.layers[index].register_forward_hook(self._after_layer(index, proj), prepend=True))
        add(self.projector.register_forward_pre_hook(self._before_projector, with_kwargs=True, prepend=True))
        add(self.projector.register_forward_hook(self._scatter_back, prepend=True))
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
            tensors = LayerTensors(
                queries=heads(self._outputs.pop((index, "q")), proj.num_heads),
                keys=heads(self._outputs.pop((index, "k")), proj.num_heads),
                values=heads(self._outputs.pop((index, "v")), proj.num_heads),
                scale=proj.scale,
                output=hidden,
                valid=valid,
            )
            cut = self.pruning.after_layer(index, tensors)
            self.seconds += time.perf_counter() - start
            if cut is None:
                return None
            self._valid = cut.valid
            (pruned,) = gather_tokens([hidden], cut.index.to(hidden.device))
            return hf.with_first_output(output, pruned)

        return hook

    def _before_projector(self, module: nn.Module, args: tuple, kwargs: dict):
        start = time.perf_counter()
        call = self.projector_call.view(args, dict(kwargs))
        given = self.pruning.before_projector(call["hidden"])
        self._projected = (given.slots, given.valid)
        call["hidden"] = given.tokens
        self.seconds += time.perf_counter() - start
        return call.arguments()

    def _scatter_back(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        slots, valid = self._projected
        batch, _, width = output.shape
        full = output.new_zeros(batch, self.visual_tokens, width)
        rows = torch.arange(batch, device=output.device)[:, None].expand_as(slots)
        valid = valid.to(output.device)
        full[rows[valid], slots.to(output.device)[valid]] = output[valid]
        return full

"""Hooks that let a `TowerPruning` act inside a vision tower while it runs.

After each of the pruning's layers, the layer's own q/k/v projection outputs and its output go to the
pruning; a `Cut` it returns is applied to the layer's output, so every later layer runs on fewer
tokens, with the padding of shorter rows masked out of their attention. Before the projector the
pruning says which visual-token slot each remaining token fills, and the projector's output is
scattered back to the full visual-token count (zeros in pruned slots), so the model's own code after
the projector (splitting, packing crops) sees the shapes it expects. The hooks run before any other
forward hook on the same module, so transformers' hidden-state capture records the pruned outputs.

Where the model makes each LLM token from a window of patches after the tower (Gemma 3's average pooling,
InternVL's pixel shuffle), `WindowedTowerHooks` shows the pruning the tokens window by window, so a unit is
consecutive tokens as the policies expect, and puts the kept windows' patches back on the full grid where
the tower's last layer hands them on.
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
        output: nn.Module | None = None,
        masked: list[nn.Module] | None = None,
    ) -> None:
        """`layer_call` is how the modules that take the attention mask are called: the layers, or `masked` (one
        per layer) where the layers take none (InternViT's attention modules do); `output` is the module whose
        output the LLM's visual tokens are (the projector where None)."""
        self.pruning = pruning
        self.unit = 1  # tower tokens per unit the pruning sees
        self.layers = layers
        self.masked = masked if masked is not None else list(layers)
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
        for module in self.masked:
            add(module.register_forward_pre_hook(self._mask_padding, with_kwargs=True, prepend=True))
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
            q, k, v = (self.shown(self._outputs.pop((index, name))) for name in "qkv")
            tensors = LayerTensors(
                queries=heads(q, proj.num_heads),
                keys=heads(k, proj.num_heads),
                values=heads(v, proj.num_heads),
                scale=proj.scale,
                output=self.shown(hidden),
                valid=self.shown_valid(valid),
                unit=self.unit,
            )
            cut = self.pruning.after_layer(index, tensors)
            self.seconds += time.perf_counter() - start
            if cut is None:
                return None
            within = torch.arange(self.unit, device=hidden.device)
            tokens = (cut.index.to(hidden.device)[..., None] * self.unit + within).flatten(1)
            self._valid = cut.valid.to(hidden.device).repeat_interleave(self.unit, dim=1)
            (pruned,) = gather_tokens([hidden], self.cut_rows(tokens))
            return hf.with_first_output(output, pruned)

        return hook

    def _before_projector(self, module: nn.Module, args: tuple, kwargs: dict):
        start = time.perf_counter()
        call = self.projector_call.view(args, dict(kwargs))
        call["hidden"] = self.projector_input(call["hidden"])
        self.seconds += time.perf_counter() - start
        return call.arguments()

    # --- what the windowed hooks change ----------------------------------------------------------

    def shown(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[B, M, ...]` per-token values of the tower's hidden states as the pruning sees them."""
        return tokens

    def shown_valid(self, valid: torch.Tensor) -> torch.Tensor:
        return valid

    def cut_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The hidden states' rows `[B, M']` of the tokens a cut keeps (`tokens`, as the pruning sees them)."""
        return tokens

    def projector_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the projector gets in place of `hidden`, the tower's remaining tokens; notes the slots they fill."""
        given = self.pruning.before_projector(hidden)
        self._projected = (given.slots, given.valid)
        return given.tokens

    def projected(self, output: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor):
        """The output rows of the given tokens: one per given token, in order."""
        return output[valid]

    def _scatter_back(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        slots, valid = self._projected
        batch, _, width = output.shape
        full = output.new_zeros(batch, self.visual_tokens, width)
        rows = torch.arange(batch, device=output.device)[:, None].expand_as(slots)
        valid, slots = valid.to(output.device), slots.to(output.device)
        full[rows[valid], slots[valid]] = self.projected(output, rows, slots, valid)
        return full


class WindowedTowerHooks(TowerHooks):
    """`TowerHooks` for towers whose LLM tokens are windows of `unit` patches made after the tower.

    `windows` `[units, unit]` gives, for each unit the pruning sees (a leading CLS unit, then the LLM's tokens in
    order), the index of each of its tokens in the tower's sequence; -1 marks a filler that holds no token (the
    CLS token's unit is the CLS and `unit - 1` fillers), shown as zeros and never valid. The tower runs as the
    model runs it up to the first cut, then on the kept units' tokens, unit by unit, fillers in place and masked
    out of attention (the layers hold no positions, so the order is theirs to take). Before the projector the
    kept units' tokens go back to their places on the full sequence, zeros elsewhere, and the module that makes
    the LLM's tokens (`output`) keeps the kept windows' tokens. `prefix` units (the CLS's) lead the sequence and
    are no LLM token.
    """

    def __init__(self, *args, windows: torch.Tensor, prefix: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.unit, self.windows, self.prefix = windows.shape[1], windows, prefix
        self.length = int(windows.max()) + 1  # tokens of the tower's own sequence

    def __enter__(self) -> WindowedTowerHooks:
        self._rows = self.windows.flatten()  # per token shown, its row in the hidden states; None once cut
        self._filler = (self._rows < 0)[None]  # [1 or B, tokens shown]
        return super().__enter__()

    def shown(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._rows is not None:
            tokens = tokens[:, self._rows.clamp(min=0).to(tokens.device)]
        filler = self._filler.to(tokens.device).view(*self._filler.shape, *[1] * (tokens.dim() - 2))
        return tokens.masked_fill(filler, 0)

    def shown_valid(self, valid: torch.Tensor) -> torch.Tensor:
        if self._rows is not None:
            valid = valid[:, self._rows.clamp(min=0).to(valid.device)]
        return valid & ~self._filler.to(valid.device)

    def cut_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        self._filler = self._filler.to(tokens.device).expand(len(tokens), -1).gather(1, tokens)
        self._valid = self._valid & ~self._filler
        rows = tokens if self._rows is None else self._rows.to(tokens.device).clamp(min=0)[tokens]
        self._rows = None
        return rows

    def projector_input(self, hidden: torch.Tensor) -> torch.Tensor:
        shown = self.shown(hidden)
        batch, _, width = shown.shape
        units = shown.view(batch, -1, self.unit, width)
        given = self.pruning.before_projector(units[:, self.prefix :].flatten(2))
        self._projected = (given.slots, given.valid)
        windows = self.windows.to(hidden.device)
        full = shown.new_zeros(batch, self.length, width)
        leading = windows[: self.prefix]
        full[:, leading[leading >= 0]] = units[:, : self.prefix][:, leading >= 0]
        places = windows[self.prefix + given.slots.to(hidden.device)]  # [B, m, unit]
        placed = given.valid.to(hidden.device)[..., None] & (places >= 0)
        rows = torch.arange(batch, device=hidden.device)[:, None, None].expand_as(places)
        full[rows[placed], places[placed]] = given.tokens.view(batch, -1, self.unit, width)[placed]
        return full

    def projected(self, output: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor):
        return output[rows[valid], slots[valid]]  # the output covers every window: the given ones by slot

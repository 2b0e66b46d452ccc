"""What a policy that prunes inside the vision tower sees and returns.

Such a policy does not pick tokens after the tower has run: it is called between the tower's layers
and before its projector, one row per crop, and the tower really runs on fewer tokens after each cut.
Rows may hold different numbers of tokens (crops of different sizes, or after a cut), so they are
right-padded and `valid` marks the real ones; the hooks that drive a `TowerPruning` keep the padding
out of every later attention. Where the LLM gets one token per group of `unit` consecutive tower
tokens (Qwen-VL's 2x2 merge units), a group is kept or cut whole: cuts, projector inputs and
selections count units, while the projections and `valid` count tower tokens.
Everything here is tensors: a policy never sees a module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.signals import Selection


@dataclass(frozen=True)
class LayerTensors:
    """One vision layer's attention projections and output, for the tokens it ran on."""

    queries: torch.Tensor
    """`[B, H, M, d]`, unscaled (`scale` multiplies the logits)."""
    keys: torch.Tensor
    values: torch.Tensor
    scale: float
    output: torch.Tensor
    """`[B, M, D]`: the layer's output hidden states."""
    valid: torch.Tensor
    """`[B, M]` bool: real tokens; False marks the padding of rows that hold fewer tokens."""
    unit: int = 1
    """Tower tokens per pruning unit (`M` is a multiple of it). A unit's tokens are all real or all padding, but for
    a CLS unit (InternVL's: the CLS token, then `unit - 1` fillers, zeros and never valid), whose first token alone
    is real: `unit_valid` reads first tokens, and `per_unit` averages a CLS unit's fillers in."""

    def per_unit(self, values: torch.Tensor) -> torch.Tensor:
        """`[B, M, ...]` per-token values -> `[B, M / unit, ...]`: the mean over each unit's tokens."""
        return values if self.unit == 1 else values.unflatten(1, (-1, self.unit)).mean(2)

    @property
    def unit_valid(self) -> torch.Tensor:
        """`[B, M / unit]` bool: real units."""
        return self.valid[:, :: self.unit]

    @property
    def unit_output(self) -> torch.Tensor:
        """`[B, M / unit, unit * D]`: the output with each unit's tokens side by side, as projectors take them."""
        batch, tokens, width = self.output.shape
        return self.output.reshape(batch, tokens // self.unit, self.unit * width)


@dataclass(frozen=True)
class Cut:
    """Which of a layer's `M / unit` output units the next layers run on, per row."""

    index: torch.Tensor
    """`[B, M']`: positions into the layer's units, in order; padded rows point anywhere past `valid`."""
    valid: torch.Tensor
    """`[B, M']` bool: the real entries of `index`."""


@dataclass(frozen=True)
class ProjectorInput:
    """The units handed to the projector, and the visual-token slot each one fills."""

    tokens: torch.Tensor
    """`[B, m, unit * D]`."""
    slots: torch.Tensor
    """`[B, m]`: index, among the row's visual tokens, whose place each token takes."""
    valid: torch.Tensor
    """`[B, m]` bool."""


class TowerPruning:
    """One call's pruning inside the tower. Rows are crops (one per image on LLaVA-1.5)."""

    layers: tuple[int, ...] = ()
    """0-based layers after which `after_layer` is called."""

    def after_layer(self, layer: int, tensors: LayerTensors) -> Cut | None:
        """Called after each layer in `layers`; return a `Cut` to drop tokens, or None to keep them all."""
        return None

    def before_projector(self, tokens: torch.Tensor) -> ProjectorInput:
        """`tokens` `[B, m, unit * D]` are the tower's visual units that reach the projector (rows padded as at the
        last layer); say which slot each fills."""
        raise NotImplementedError

    def selections(self) -> list[Selection]:
        """Per row, what was kept, numbered among the row's visual tokens (units) in the tower's order."""
        raise NotImplementedError

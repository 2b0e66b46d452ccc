"""What a policy that prunes inside the vision tower sees and returns.

Such a policy does not pick tokens after the tower has run: it is called between the tower's layers
and before its projector, one row per crop, and the tower really runs on fewer tokens after each cut.
Rows may keep different numbers of tokens, so after a cut they are right-padded and `valid` marks the
real ones; the hooks that drive a `TowerPruning` mask the padding out of every later attention.
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
    """`[B, M]` bool: real tokens; False marks the padding of rows that kept fewer tokens."""


@dataclass(frozen=True)
class Cut:
    """Which of a layer's `M` output tokens the next layers run on, per row."""

    index: torch.Tensor
    """`[B, M']`: positions into the layer's tokens, in order; padded rows point anywhere past `valid`."""
    valid: torch.Tensor
    """`[B, M']` bool: the real entries of `index`."""


@dataclass(frozen=True)
class ProjectorInput:
    """The tokens handed to the projector, and the visual-token slot each one fills."""

    tokens: torch.Tensor
    """`[B, m, D]`."""
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
        """`tokens` `[B, m, D]` are the tower's visual tokens that reach the projector; say which slot each fills."""
        raise NotImplementedError

    def selections(self) -> list[Selection]:
        """Per row, what was kept, numbered among the row's visual tokens."""
        raise NotImplementedError

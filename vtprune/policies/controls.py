"""Control policies: a seeded random subset, and an evenly strided subset."""

from __future__ import annotations

import torch

from vtprune.registry import Policy, register
from vtprune.signals import ImageSignals, Selection


@register("random", stage="vision", description="Control: a seeded random subset of each image's tokens", control=True)
class RandomSubset(Policy):
    seed: int = 0
    """Each image draws from a generator seeded with this, so a selection never depends on the batch."""

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    def select(self, signals: ImageSignals, keep: int) -> Selection:
        generator = torch.Generator().manual_seed(self.seed)
        kept = torch.randperm(signals.n_tokens, generator=generator)[:keep].sort().values
        return Selection(kept=kept)


@register(
    "uniform",
    stage="vision",
    description="Control: evenly strided tokens, one at the centre of each of keep bins",
    control=True,
)
class UniformStride(Policy):
    def select(self, signals: ImageSignals, keep: int) -> Selection:
        centres = (torch.arange(keep, dtype=torch.float64) + 0.5) * (signals.n_tokens / keep)
        return Selection(kept=centres.floor().long())


class KeepAll(Policy):
    """Keeps every token: the vision side of a patch whose stages are all in the decoder. Not registered."""

    name, stage, description = "keep_all", "vision", "every token"

    def select(self, signals: ImageSignals, keep: int) -> Selection:
        return Selection(kept=torch.arange(signals.n_tokens))


KEEP_ALL = KeepAll()

"""The policy registry: a policy joins it with one decorator."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from vtprune.budget import Budget
from vtprune.signals import CutSignals, DecoderCut, ImageSignals, Selection, SignalRequest, VisionLayout
from vtprune.tower import TowerPruning

STAGES = ("vision", "decoder", "vision+decoder")


class Policy:
    """Base class of every policy. Subclasses are dataclasses whose fields are the policy's options.

    A vision-stage policy either selects from signals captured while the tower ran (`request` and
    `select`), or prunes inside the tower while it runs (`tower_pruning`). A decoder-stage policy cuts
    visual tokens between decoder layers during prefill (`decoder_cuts`, `cut_keep`, `cut_scores`).
    """

    name: ClassVar[str]
    stage: ClassVar[str]
    description: ClassVar[str]
    control: ClassVar[bool] = False
    """A baseline that ignores what the tokens show (random, evenly strided): a floor for the others."""

    def request(self, layout: VisionLayout) -> SignalRequest:
        """The signals this policy needs from a tower of this layout; raise ValueError if it cannot run."""
        return SignalRequest()

    def check(self, budget: Budget) -> None:
        """Raise ValueError if this policy cannot honour `budget` (called when patching)."""

    def select(self, signals: ImageSignals, keep: int) -> Selection:
        """Choose `keep` of the image's `signals.n_tokens` visual tokens."""
        raise NotImplementedError

    def select_batch(self, signals: list[ImageSignals], keeps: list[int]) -> list[Selection]:
        """Select for every image of a call; policies that vectorise over images override this."""
        return [self.select(image, keep) for image, keep in zip(signals, keeps, strict=True)]

    def tower_pruning(
        self, layout: VisionLayout, keeps: list[int], visual_tokens: int, available: torch.Tensor
    ) -> TowerPruning | None:
        """For policies that prune inside the tower: the pruning of one call whose rows (crops) keep `keeps`
        of their `visual_tokens`, choosing only among `available` (`[crops, visual_tokens]` bool: the tokens
        that reach the LLM). None for policies that select after the tower has run."""
        return None

    def decoder_cuts(self, num_layers: int) -> tuple[DecoderCut, ...]:
        """The cuts this policy makes in a decoder of `num_layers` layers, in layer order; raise ValueError
        if its options do not fit that decoder."""
        return ()

    def cut_keep(self, cut: int, entering: int, budget: Budget) -> int:
        """Tokens an image keeps after cut number `cut`, given the `entering` tokens it brought into the
        decoder (the engine never keeps more than remain)."""
        raise NotImplementedError

    def cut_scores(self, cut: int, signals: CutSignals) -> torch.Tensor:
        """`[signals.n_tokens]` scores of one image's remaining tokens at cut number `cut`: the highest are kept."""
        raise NotImplementedError

    def cut_select(self, cut: int, signals: CutSignals, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `count` tokens (indices among `signals.n_tokens`, any order) one image keeps at cut number `cut`,
        and the `[n_tokens]` scores the trace records: by default the `count` highest `cut_scores`."""
        scores = self.cut_scores(cut, signals)
        return scores.topk(count).indices, scores

    @property
    def acts_on_vision(self) -> bool:
        return "vision" in self.stage

    @property
    def acts_in_decoder(self) -> bool:
        return "decoder" in self.stage


_REGISTRY: dict[str, type[Policy]] = {}


def register(
    name: str, *, stage: str, description: str, control: bool = False
) -> Callable[[type[Policy]], type[Policy]]:
    """Class decorator: make a `Policy` subclass a frozen dataclass and register it under `name`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")

    def add(cls: type[Policy]) -> type[Policy]:
        if name in _REGISTRY:
            raise ValueError(f"a policy named {name!r} is already registered")
        cls = dataclasses.dataclass(frozen=True)(cls)
        cls.name, cls.stage, cls.description, cls.control = name, stage, description, control
        _REGISTRY[name] = cls
        return cls

    return add


def policies() -> dict[str, str]:
    """Registered policy names with a one-line description each."""
    return {name: cls.description for name, cls in sorted(_REGISTRY.items())}


def option_defaults(name: str) -> dict[str, Any]:
    """The options a policy takes, with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(_lookup(name))}


def make_policy(name: str, options: dict[str, Any]) -> Policy:
    """Build a policy from its name and options, with errors that say what would have been valid."""
    cls = _lookup(name)
    known = option_defaults(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
        raise TypeError(f"policy {name!r} has no option {', '.join(unknown)}; its options are: {listed}")
    return cls(**options)


def _lookup(name: str) -> type[Policy]:
    if not isinstance(name, str):
        raise TypeError(f"policy must be a policy name (str), got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; registered policies are: {', '.join(sorted(_REGISTRY))}") from None

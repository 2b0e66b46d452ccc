"""The public API: patch a model in place, trace what it pruned, and restore it exactly."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vtprune import generation, hf
from vtprune.adapters import for_model
from vtprune.boundary import BoundaryEngine
from vtprune.budget import Budget
from vtprune.decoder import DecoderEngine, Stage
from vtprune.policies.controls import KEEP_ALL
from vtprune.registry import Policy, make_policy
from vtprune.trace import Trace

_ATTRIBUTE = "_vtprune_patch"
_WRAPPED = ("forward", "generate")
_ABSENT = object()


class Patch:
    """A patched model's pruning state; `patch()` returns it and `remove()` undoes it."""

    def __init__(
        self,
        model: nn.Module,
        engine: BoundaryEngine,
        decoder: DecoderEngine | None,
        stages: list[tuple[Policy, Budget]],
    ) -> None:
        self.model = model
        self.engine = engine
        self.decoder = decoder
        self.stages = stages
        self._saved = {name: model.__dict__.get(name, _ABSENT) for name in _WRAPPED}
        self.lock = threading.RLock()
        model.forward = _pruning_forward(model.forward, engine, decoder, self.lock)
        model.generate = _pruning_generate(model.generate, engine, decoder, self.lock)
        if decoder is not None:
            decoder.install(engine)
        setattr(model, _ATTRIBUTE, self)

    @property
    def trace(self) -> Trace | None:
        """Records of the last `forward`/`generate` call that carried images."""
        return self.engine.trace

    def remove(self) -> None:
        """Restore the model exactly as it was before `patch`."""
        if self.decoder is not None:
            self.decoder.remove()
        for name, saved in self._saved.items():
            if saved is _ABSENT:
                self.model.__dict__.pop(name, None)
            else:
                self.model.__dict__[name] = saved
        self.model.__dict__.pop(_ATTRIBUTE, None)

    def __repr__(self) -> str:
        stages = ", ".join(f"{policy!r} keeping {budget}" for policy, budget in self.stages)
        return f"vtprune.Patch({stages}; positions={self.engine.positions!r}, model={type(self.model).__name__})"


def policy(name: str, **options: Any) -> Policy:
    """A configured policy, e.g. for a list of stages:
    `patch(model, [policy("cls_attention"), policy("fastv", layer=3)], keep=[192, 64])`."""
    return make_policy(name, options)


def patch(
    model: nn.Module,
    policy: str | Policy | list[str | Policy] = "cls_attention",
    keep: int | float | list[int | float] = 64,
    *,
    positions: str = "original",
    temporal: str = "per_frame",
    **options: Any,
) -> Patch:
    """Prune `model`'s visual tokens in place; returns the `Patch`.

    `keep` is the visual tokens kept per image (int) or the fraction of each image's tokens (float in
    (0, 1]). `positions="original"` keeps the kept tokens' position ids as in the unpruned prompt;
    `"contiguous"` renumbers them, as most papers' code does. A video's budget is shared among its frame
    groups (`temporal="per_frame"`) or spent over the whole video at once (`"joint"`). `options` go to the
    policy. `policy` may be
    a list of stages (one vision-side policy, any in-decoder ones) with one `keep` each; configure each
    with `vtprune.policy(name, **options)`. Patching a patched model replaces the earlier patch. Every
    argument is checked before the model is touched.
    """
    stages = _stages(policy, keep, options)
    hf.warn_if_untested()
    adapter = for_model(model)
    vision = [(p, b) for p, b in stages if p.acts_on_vision]
    if len(vision) > 1:
        names = ", ".join(p.name for p, _ in vision)
        raise ValueError(
            f"a patch takes one vision-side policy, got {names}: keep one and add in-decoder ones after it"
        )
    chosen, budget = vision[0] if vision else (KEEP_ALL, Budget(1.0))
    engine = BoundaryEngine(adapter, chosen, budget, positions, temporal)
    cuts = [
        Stage(p, b, index, cut)
        for p, b in stages
        if p.acts_in_decoder
        for index, cut in enumerate(p.decoder_cuts(len(adapter.decoder_layers)))
    ]
    decoder = DecoderEngine(adapter, cuts, positions, "+".join(p.name for p, _ in stages)) if cuts else None
    unpatch(model)
    return Patch(model, engine, decoder, stages)


def _stages(policy: Any, keep: Any, options: dict[str, Any]) -> list[tuple[Policy, Budget]]:
    """(policy, budget) per stage, from `patch`'s arguments."""
    if not isinstance(policy, (list, tuple)):
        chosen = policy if isinstance(policy, Policy) else make_policy(policy, options)
        if isinstance(policy, Policy) and options:
            raise TypeError("options go into vtprune.policy(name, **options) when passing a configured policy")
        budget = Budget(keep)
        chosen.check(budget)
        return [(chosen, budget)]
    if options:
        raise TypeError(
            f"options ({', '.join(options)}) are ambiguous with a list of policies: configure each with "
            f"vtprune.policy(name, **options)"
        )
    if not policy:
        raise ValueError("policy is an empty list: name at least one policy")
    keeps = keep if isinstance(keep, (list, tuple)) else None
    if keeps is None or len(keeps) != len(policy):
        raise ValueError(
            f"a list of {len(policy)} policies takes a list of as many keeps, one per stage (e.g. keep=[192, 64]), "
            f"got keep={keep!r}"
        )
    return [stage for p, k in zip(policy, keeps, strict=True) for stage in _stages(p, k, {})]


def unpatch(model: nn.Module) -> None:
    """Restore a patched model exactly; a model that is not patched is left as it is."""
    current = getattr(model, _ATTRIBUTE, None)
    if current is not None:
        current.remove()


@contextlib.contextmanager
def patched(
    model: nn.Module,
    policy: str | Policy | list[str | Policy] = "cls_attention",
    keep: int | float | list[int | float] = 64,
    **options: Any,
) -> Iterator[Patch]:
    """`with vtprune.patched(model, ...) as p:` patches for the block and restores the model after it."""
    handle = patch(model, policy, keep, **options)
    try:
        yield handle
    finally:
        unpatch(model)


def last_trace(model: nn.Module) -> Trace | None:
    """The trace of the patched model's last call with images, or None before its first."""
    current = getattr(model, _ATTRIBUTE, None)
    if current is None:
        raise ValueError(f"{type(model).__name__} is not patched: call vtprune.patch(model, ...) first")
    return current.trace


def _pruning_forward(forward, engine: BoundaryEngine, decoder: DecoderEngine | None, lock: threading.RLock):
    signature = inspect.signature(forward)

    @functools.wraps(forward)
    def pruning_forward(*args: Any, **kwargs: Any):
        inputs = _as_keywords(signature, args, kwargs)
        if decoder is not None and inputs.get("labels") is not None:
            raise ValueError(
                "in-decoder stages shorten the sequence inside the model, so logits no longer line up with labels; "
                "compute the loss without vtprune, or patch with vision-side policies only"
            )
        if decoder is not None:
            generation.check_finds_placeholders(inputs)
        with lock:
            if not engine.carries_vision(inputs):
                return forward(*args, **kwargs)
            return forward(**engine.prune(inputs, for_generate=False))

    return pruning_forward


def _pruning_generate(generate, engine: BoundaryEngine, decoder: DecoderEngine | None, lock: threading.RLock):
    model = getattr(generate, "__self__", None)

    @functools.wraps(generate)
    def pruning_generate(inputs: torch.Tensor | None = None, **kwargs: Any):
        if decoder is not None:
            generation.check_in_decoder(model, kwargs)
            generation.check_finds_placeholders(kwargs)
        with lock:  # one call at a time: a call's pruning state lives in the patch
            if not engine.carries_vision(kwargs):
                return generate(inputs, **kwargs)
            if inputs is not None:
                kwargs["input_ids"] = inputs
            prompt = kwargs.get("input_ids")
            with torch.no_grad():  # as generate itself runs the tower
                call = engine.prune(dict(kwargs), for_generate=True)
            generation.counted_on_prompt(model, call, prompt.shape[1])
            if call.get("streamer") is not None:
                call["streamer"] = generation.PromptFirst(call["streamer"], prompt)
            out = generate(**call)
            return generation.with_prompt(out, prompt, call["input_ids"].shape[1])

    return pruning_generate


def _as_keywords(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = signature.bind_partial(*args, **kwargs).arguments
    inputs = {}
    for name, value in bound.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            inputs.update(value)
        else:
            inputs[name] = value
    return inputs

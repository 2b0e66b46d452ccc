"""The public API: patch a model in place, trace what it pruned, and restore it exactly."""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref
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


class Patch:
    """A patched model's pruning state; `patch()` returns it and `remove()` undoes it.

    Everything a patch installs is plain data (its wrappers are `_Wrapper` objects, its hooks bound methods),
    so a deep copy or a pickle of the patched model carries its own patch, running its own weights.
    """

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
        self.lock = threading.RLock()
        self.pruned_caches: weakref.WeakSet = weakref.WeakSet()
        """Caches filled from prompts this patch shortened: they do not line up with the caller's sequences."""
        self._saved = {name: model.__dict__[name] for name in _WRAPPED if name in model.__dict__}
        for name in _WRAPPED:
            model.__dict__[name] = _Wrapper(self, name)
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
        for name in _WRAPPED:
            self.model.__dict__.pop(name, None)
        self.model.__dict__.update(self._saved)
        self.model.__dict__.pop(_ATTRIBUTE, None)

    def original(self, name: str) -> Any:
        """The model's unpatched `forward` or `generate`."""
        saved = self._saved.get(name)
        return saved if saved is not None else getattr(type(self.model), name).__get__(self.model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        forward = self.original("forward")
        inputs = _as_keywords(inspect.signature(forward), args, kwargs)
        if self.decoder is not None:
            if inputs.get("labels") is not None:
                raise ValueError(
                    "in-decoder stages shorten the sequence inside the model, so logits no longer line up with "
                    "labels; compute the loss without vtprune, or patch with vision-side policies only"
                )
            if self.engine.carries_vision(inputs):
                generation.check_finds_placeholders(inputs)
        self._check_continues(inputs)
        with self.lock:  # one call at a time: a call's pruning state lives in the patch
            if not self.engine.carries_vision(inputs):
                return forward(*args, **kwargs)
            prompt = inputs.get("input_ids")
            call = self.engine.prune(dict(inputs), for_generate=False)
            out = forward(**call)
            self._remember(prompt, call, out)
            return out

    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:
        generate = self.original("generate")
        if self.decoder is not None and self.engine.carries_vision(kwargs):
            generation.check_in_decoder(self.model, kwargs)
        self._check_continues(kwargs)
        with self.lock:
            if not self.engine.carries_vision(kwargs):
                return generate(inputs, **kwargs)
            if inputs is not None:
                kwargs["input_ids"] = inputs
            prompt = kwargs.get("input_ids")
            with torch.no_grad():  # as generate itself runs the tower
                call = self.engine.prune(dict(kwargs), for_generate=True)
            generation.counted_on_prompt(self.model, call, prompt.shape[1])
            if call.get("streamer") is not None:
                call["streamer"] = generation.PromptFirst(call["streamer"], prompt)
            out = generate(**call)
            self._remember(prompt, call, out)
            return generation.with_prompt(out, prompt, call["input_ids"].shape[1])

    def _remember(self, prompt: torch.Tensor, call: dict[str, Any], out: Any) -> None:
        """Note the cache a shortened prompt filled, so a caller cannot continue it as if it held their prompt."""
        cache = hf.caller_cache(call)
        if cache is None:
            cache = hf.output_cache(out)
        if cache is not None and not torch.equal(call["input_ids"], prompt):
            self.pruned_caches.add(cache)

    def _check_continues(self, inputs: dict[str, Any]) -> None:
        cache = hf.caller_cache(inputs)
        if cache is not None and cache in self.pruned_caches and hf.cache_length(cache) > 0:
            raise ValueError(
                "this cache was filled from the pruned prompt vtprune gave the model, so it does not line up with "
                "the sequences you got back: continue the conversation without it (pass the whole conversation "
                "and its images again), or unpatch the model to reuse caches"
            )

    def __getstate__(self) -> dict[str, Any]:
        return {name: value for name, value in self.__dict__.items() if name not in ("lock", "pruned_caches")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()
        self.pruned_caches = weakref.WeakSet()

    def __repr__(self) -> str:
        stages = ", ".join(f"{policy!r} keeping {budget}" for policy, budget in self.stages)
        return f"vtprune.Patch({stages}; positions={self.engine.positions!r}, model={type(self.model).__name__})"


class _Wrapper:
    """A patched model's `forward` or `generate` (an object, not a closure, so it copies and pickles with the
    model); signature and help are the unpatched method's."""

    def __init__(self, patch: Patch, name: str) -> None:
        self.patch, self.name = patch, name

    @property
    def __wrapped__(self) -> Any:
        return self.patch.original(self.name)

    @property
    def __doc__(self) -> str | None:
        return self.__wrapped__.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.patch, self.name)(*args, **kwargs)


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
    model = _base(model)
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
    current = getattr(_base(model), _ATTRIBUTE, None)
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
    current = getattr(_base(model), _ATTRIBUTE, None)
    if current is None:
        raise ValueError(f"{type(model).__name__} is not patched: call vtprune.patch(model, ...) first")
    return current.trace


def _base(model: nn.Module) -> nn.Module:
    """The model a patch goes on: a PEFT model's base model (its wrappers call the base model's `forward` and
    `generate`, so the adapters still run, and unpatching restores the base model under the same wrapper)."""
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return model


def _as_keywords(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = signature.bind_partial(*args, **kwargs).arguments
    inputs = {}
    for name, value in bound.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            inputs.update(value)
        else:
            inputs[name] = value
    return inputs

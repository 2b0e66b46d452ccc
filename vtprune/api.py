"""The public API: patch a model in place, trace what it pruned, and restore it exactly."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vtprune.adapters import for_model
from vtprune.boundary import BoundaryEngine
from vtprune.budget import Budget
from vtprune.registry import make_policy
from vtprune.trace import Trace

_ATTRIBUTE = "_vtprune_patch"
_WRAPPED = ("forward", "generate")
_ABSENT = object()


class Patch:
    """A patched model's pruning state; `patch()` returns it and `remove()` undoes it."""

    def __init__(self, model: nn.Module, engine: BoundaryEngine) -> None:
        self.model = model
        self.engine = engine
        self._saved = {name: model.__dict__.get(name, _ABSENT) for name in _WRAPPED}
        model.forward = _pruning_forward(model.forward, engine)
        model.generate = _pruning_generate(model.generate, engine)
        setattr(model, _ATTRIBUTE, self)

    @property
    def trace(self) -> Trace | None:
        """Records of the last `forward`/`generate` call that carried images."""
        return self.engine.trace

    def remove(self) -> None:
        """Restore the model exactly as it was before `patch`."""
        for name, saved in self._saved.items():
            if saved is _ABSENT:
                self.model.__dict__.pop(name, None)
            else:
                self.model.__dict__[name] = saved
        self.model.__dict__.pop(_ATTRIBUTE, None)

    def __repr__(self) -> str:
        engine = self.engine
        return (
            f"vtprune.Patch(policy={engine.policy!r}, keep={engine.budget.keep!r}, positions={engine.positions!r}, "
            f"model={type(self.model).__name__})"
        )


def patch(
    model: nn.Module,
    policy: str = "cls_attention",
    keep: int | float = 64,
    *,
    positions: str = "original",
    **options: Any,
) -> Patch:
    """Prune `model`'s visual tokens in place; returns the `Patch`.

    `keep` is the visual tokens kept per image (int) or the fraction of each image's tokens (float in
    (0, 1]). `positions="original"` keeps the kept tokens' position ids as in the unpruned prompt;
    `"contiguous"` renumbers them, as most papers' code does. `options` go to the policy. Patching a
    patched model replaces the earlier patch. Every argument is checked before the model is touched.
    """
    budget = Budget(keep)
    chosen = make_policy(policy, options)
    engine = BoundaryEngine(for_model(model), chosen, budget, positions)
    unpatch(model)
    return Patch(model, engine)


def unpatch(model: nn.Module) -> None:
    """Restore a patched model exactly; a model that is not patched is left as it is."""
    current = getattr(model, _ATTRIBUTE, None)
    if current is not None:
        current.remove()


@contextlib.contextmanager
def patched(model: nn.Module, policy: str = "cls_attention", keep: int | float = 64, **options: Any) -> Iterator[Patch]:
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


def _pruning_forward(forward, engine: BoundaryEngine):
    signature = inspect.signature(forward)

    @functools.wraps(forward)
    def pruning_forward(*args: Any, **kwargs: Any):
        inputs = _as_keywords(signature, args, kwargs)
        if inputs.get("pixel_values") is None:
            return forward(*args, **kwargs)
        return forward(**engine.prune(inputs, for_generate=False))

    return pruning_forward


def _pruning_generate(generate, engine: BoundaryEngine):
    @functools.wraps(generate)
    def pruning_generate(inputs: torch.Tensor | None = None, **kwargs: Any):
        if kwargs.get("pixel_values") is None:
            return generate(inputs, **kwargs)
        if inputs is not None:
            kwargs["input_ids"] = inputs
        prompt = kwargs.get("input_ids")
        call = engine.prune(dict(kwargs), for_generate=True)
        if call.get("max_length") is not None:  # a length budget counts the prompt, which is now shorter
            call["max_new_tokens"] = call.pop("max_length") - prompt.shape[1]
        out = generate(**call)
        return _with_prompt(out, prompt, call["input_ids"].shape[1])

    return pruning_generate


def _with_prompt(out, prompt: torch.Tensor, pruned_length: int):
    """Replace the pruned prompt at the head of generated sequences with the caller's own prompt."""
    if isinstance(out, torch.Tensor):
        return torch.cat([prompt.to(out.device), out[:, pruned_length:]], dim=1)
    out.sequences = _with_prompt(out.sequences, prompt, pruned_length)
    return out


def _as_keywords(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = signature.bind_partial(*args, **kwargs).arguments
    inputs = {}
    for name, value in bound.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            inputs.update(value)
        else:
            inputs[name] = value
    return inputs

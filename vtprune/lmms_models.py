"""The model classes `vtprune.lmms` names: each lmms-eval wrapper, subclassed to patch its model after loading and
to log each request's pruning. Built on first use (PEP 562), so a wrapper's own imports load only when it is asked
for."""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lmms_eval.api.instance import GenerationResult, TokenCounts, unwrap_generation_output
from tqdm import tqdm

import vtprune

BASES = {
    "LlavaHf": "lmms_eval.models.simple.llava_hf:LlavaHf",
    "LlavaHfChat": "lmms_eval.models.chat.llava_hf:LlavaHf",
    "Qwen2VL": "lmms_eval.models.simple.qwen2_vl:Qwen2_VL",
    "Qwen2_5VL": "lmms_eval.models.simple.qwen2_5_vl:Qwen2_5_VL",
    "Qwen2_5VLChat": "lmms_eval.models.chat.qwen2_5_vl:Qwen2_5_VL",
    "Qwen3VL": "lmms_eval.models.simple.qwen3_vl:Qwen3_VL",
    "Qwen3VLChat": "lmms_eval.models.chat.qwen3_vl:Qwen3_VL",
}
"""Our class name -> the lmms-eval class it prunes."""


@dataclass
class PrunedTokenCounts(TokenCounts):
    """lmms-eval's per-request token counts plus, per image of the request, its visual tokens before and after
    pruning and in each decoder layer's input during prefill."""

    policy: str = ""
    visual_tokens: list[int] = field(default_factory=list)
    kept_tokens: list[int] = field(default_factory=list)
    layer_visual_tokens: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        pruning = {"policy": self.policy, "visual_tokens": self.visual_tokens, "kept_tokens": self.kept_tokens}
        return super().to_dict() | pruning | {"layer_visual_tokens": self.layer_visual_tokens}


ENGINE_OPTIONS = ("positions", "temporal")
"""`vtprune.patch` keywords that are not the policy's."""


def literal(value: Any) -> Any:
    """A `--model_args` value as Python reads it where lmms-eval left it a string ("None" -> None); lists cannot
    pass, since lmms-eval splits the arguments at commas."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def pruned(base: type, name: str) -> type:
    """`base` with its model patched by vtprune after loading; every `--model_args` entry `base.__init__` does not
    name goes to `vtprune.patch` (the policy's options), checked before the checkpoint loads."""
    accepted = set(inspect.signature(base.__init__).parameters) - {"self", "kwargs"}

    def __init__(self, policy: str = "cls_attention", keep: int | float = 64, **arguments: Any) -> None:
        options = {name: literal(arguments.pop(name)) for name in list(arguments) if name not in accepted}
        vtprune.policy(policy, **{k: v for k, v in options.items() if k not in ENGINE_OPTIONS})
        base.__init__(self, **arguments)
        self.vtprune_patch = vtprune.patch(self.model, policy, keep=keep, **options)

    def generate_until(self, requests: list) -> list[GenerationResult]:
        """The wrapper's answers, one request at a time so that each result carries its own request's trace."""
        answers = []
        with _quiet(base.generate_until), tqdm(total=len(requests), disable=self.rank != 0, desc="vtprune") as bar:
            for request in requests:
                earlier = vtprune.last_trace(self.model)
                (output,) = base.generate_until(self, [request])
                text, counts = unwrap_generation_output(output)
                trace = vtprune.last_trace(self.model)
                # a request without images leaves the trace of the last one that had some
                answers.append(
                    GenerationResult(text, self.vtprune_counts(counts, trace if trace is not earlier else None))
                )
                bar.update(1)
        return answers

    def vtprune_counts(self, counts: TokenCounts | None, trace: Any) -> PrunedTokenCounts:
        images = trace.images if trace is not None else ()
        return PrunedTokenCounts(
            **(vars(counts) if counts is not None else {}),
            policy=trace.policy if trace is not None else "",
            visual_tokens=[image.n_before for image in images],
            kept_tokens=[image.n_after for image in images],
            layer_visual_tokens=[list(image.layer_tokens) for image in images],
        )

    namespace = {"__init__": __init__, "generate_until": generate_until, "vtprune_counts": vtprune_counts}
    return type(name, (base,), {**namespace, "__module__": __name__, "__qualname__": name})


@contextlib.contextmanager
def _quiet(method: Any) -> Iterator[None]:
    """The wrapper's own per-call progress bar silenced (it would print one bar per request)."""
    module = sys.modules[method.__module__]
    original = getattr(module, "tqdm", None)
    if original is None:
        yield
        return
    module.tqdm = lambda *args, **kwargs: original(*args, **{**kwargs, "disable": True})
    try:
        yield
    finally:
        module.tqdm = original


def __getattr__(name: str) -> type:
    if name not in BASES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, class_name = BASES[name].split(":")
    cls = pruned(getattr(importlib.import_module(module_name), class_name), name)
    globals()[name] = cls
    return cls

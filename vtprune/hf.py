"""The binding to transformers: every call convention vtprune's hooks rely on, in one place.

Adapters say which modules play which part (a decoder layer, its attention and MLP, a tower block);
this module says how those modules are called: the keyword names and positional slots of the values
the hooks read and write, the forms masks come in, how a cache is asked its length, and which
transformers releases are tested. Names are resolved per model when it is patched, from the modules'
own `forward` signatures, so a rename (5.24's `past_key_values` -> `cache`) is found, not assumed; a
convention that cannot be resolved is refused before the model is touched. A release that renames
something is one edit here.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import nn

TESTED = ("5.18.0", "5.23.0", "5.24.0")
"""The transformers releases CI runs vtprune on: the lowest supported, the last before the cache rename, the newest."""
SUPPORTED = f">={TESTED[0]},<={TESTED[-1]}"

# Roles: a value a hook reads or writes, with the keyword names transformers has given it, newest first.
HIDDEN = ("hidden_states",)
MASK = ("attention_mask",)
POSITIONS = ("position_ids",)
POSITION_EMBEDDINGS = ("position_embeddings",)
CACHE = ("cache", "past_key_values")
INPUT_IDS = ("input_ids",)
BOUNDS = ("cu_seqlens",)
LONGEST = ("max_seqlen",)

DECODER_LAYER = {
    "hidden": HIDDEN,
    "mask": MASK,
    "positions": POSITIONS,
    "position_embeddings": POSITION_EMBEDDINGS,
    "cache": CACHE,
}
"""A decoder layer of the LLM, as the text model's loop calls it."""
BACKBONE = {"input_ids": INPUT_IDS, "mask": MASK, "cache": CACHE}
"""The VLM's inner model, which `forward`/`generate` call with the prompt, the images and the cache."""
SUBLAYER = {"hidden": None}
"""A decoder layer's attention or MLP, or a tower's projector: only its input is read, whatever its first
parameter is called."""
TOWER_LAYER = {"hidden": HIDDEN, "mask": MASK}
"""A vision encoder layer (CLIP, SigLIP): the tower's loop passes the mask in its second positional slot."""
PACKED_ATTENTION = {"bounds": BOUNDS, "position_embeddings": POSITION_EMBEDDINGS}
"""A packed tower's attention module (Qwen-VL): `cu_seqlens` bound each image's tokens."""
PACKED_BLOCK = {"hidden": HIDDEN, "bounds": BOUNDS, "position_embeddings": POSITION_EMBEDDINGS, "longest": LONGEST}
"""A packed tower's block (Qwen-VL); `max_seqlen` is passed only where the attention backend wants it."""
OPTIONAL = {"longest"}
"""Roles a module may take through `**kwargs` rather than name in its signature."""

ENCODER_OUTPUTS = "mm_encoder_outputs"
"""The keyword of `forward`/`generate` that takes precomputed image features instead of pixels."""
IMAGE_INPUTS = ("pixel_values", "pixel_values_videos", ENCODER_OUTPUTS)
"""Keywords of the inner model that carry images: a call with one of them holds a prompt."""


class UnsupportedTransformers(TypeError):
    """A module is called in a way vtprune does not know: the installed transformers is outside its range."""


def version() -> str:
    return transformers.__version__


def warn_if_untested() -> None:
    """Warn once where the installed release is outside the tested range: its conventions are still resolved and
    checked when patching, but its behaviour is not proven equal by the suite."""
    if not Version(TESTED[0]) <= Version(version()) <= Version(TESTED[-1]):
        warnings.warn(
            f"vtprune is tested on transformers{SUPPORTED}, not {version()}: the calls it follows resolved, but "
            f"run the test suite before trusting its outputs",
            stacklevel=3,
        )


def refusal(what: str) -> UnsupportedTransformers:
    return UnsupportedTransformers(
        f"{what}, so vtprune cannot follow this model's calls under transformers {version()}; vtprune supports "
        f"transformers{SUPPORTED} (tested: {', '.join(TESTED)}): install a release in that range "
        f"(pip install 'transformers{SUPPORTED}') or upgrade vtprune"
    )


@dataclass(frozen=True)
class Binding:
    """How one kind of module takes the values vtprune reads: per role, the keyword name it is passed under and
    its positional slot (None: keyword only), plus the older names a caller may still use."""

    names: dict[str, str]
    slots: dict[str, int | None]
    aliases: dict[str, tuple[str, ...]]

    def view(self, args: tuple, kwargs: dict) -> Call:
        """A read/write view of one call's arguments, as a forward pre-hook (or forward hook) receives them."""
        return Call(self, list(args), kwargs)


def bind(module: nn.Module, roles: dict[str, tuple[str, ...] | None]) -> Binding:
    """Resolve `roles` against `module.forward`'s signature; refuse with `UnsupportedTransformers` when one
    of them is not there. Cached per module class."""
    return _bind(type(module), tuple(roles.items()))


@functools.cache
def _bind(cls: type, roles: tuple[tuple[str, tuple[str, ...] | None], ...]) -> Binding:
    parameters = list(inspect.signature(cls.forward).parameters.values())[1:]  # without self
    named = {p.name: p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}
    flexible = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    slotted = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p.name for p in parameters if p.kind in slotted]
    names, slots, aliases = {}, {}, {}
    for role, candidates in roles:
        if candidates is None:  # the first parameter, whatever it is called
            if not positional:
                raise refusal(f"{cls.__name__}.forward takes no positional input")
            candidates = (positional[0],)
        found = next((name for name in candidates if name in named), None)
        if found is None and role in OPTIONAL and flexible:
            found = candidates[0]
        if found is None:
            raise refusal(
                f"{cls.__name__}.forward takes no {' or '.join(candidates)} argument (the {role} vtprune reads)"
            )
        names[role] = found
        slots[role] = positional.index(found) if found in positional else None
        aliases[role] = tuple(name for name in candidates if name != found)
    return Binding(names, slots, aliases)


class Call:
    """One call's arguments by role: `call["mask"]` reads, `call["mask"] = m` writes where the value came
    (its positional slot when it was passed there, else its keyword), `call.arguments()` gives back
    `(args, kwargs)` for the hook to return. A value passed under an older name is found too."""

    def __init__(self, binding: Binding, args: list, kwargs: dict) -> None:
        self.binding, self.args, self.kwargs = binding, args, kwargs

    def _slot(self, role: str) -> int | None:
        slot = self.binding.slots[role]
        return slot if slot is not None and slot < len(self.args) else None

    def __getitem__(self, role: str) -> Any:
        slot = self._slot(role)
        if slot is not None:
            return self.args[slot]
        for name in (self.binding.names[role], *self.binding.aliases[role]):
            if name in self.kwargs:
                return self.kwargs[name]
        return None

    def __setitem__(self, role: str, value: Any) -> None:
        slot = self._slot(role)
        if slot is not None:
            self.args[slot] = value
            return
        name = next((n for n in self.binding.aliases[role] if n in self.kwargs), self.binding.names[role])
        self.kwargs[name] = value

    def arguments(self) -> tuple[tuple, dict]:
        return tuple(self.args), self.kwargs


def first_output(output: Any) -> torch.Tensor:
    """The hidden states of a module's output: a tensor, or the first item of a tuple (attention modules)."""
    return output[0] if isinstance(output, tuple) else output


def with_first_output(output: Any, hidden: torch.Tensor) -> Any:
    """`output` with its hidden states replaced, in the same form."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


# --- callers' inputs -------------------------------------------------------------------------------


def caller_cache(inputs: dict[str, Any]) -> Any:
    """The cache a caller passed to `forward`/`generate`, under either of its names."""
    return next((inputs[name] for name in CACHE if inputs.get(name) is not None), None)


def output_cache(out: Any) -> Any:
    """The cache a model output or generate output returns (None for a plain tensor of sequences)."""
    fields = out.keys() if hasattr(out, "keys") else ()  # not the deprecated alias properties
    return next((out[name] for name in CACHE if name in fields and out[name] is not None), None)


def cache_length(cache: Any, layer: int = 0) -> int:
    """Tokens `cache` holds for decoder layer `layer` (0 for no cache)."""
    return 0 if cache is None else cache.get_seq_length(layer)


def is_dynamic_cache(cache: Any) -> bool:
    return type(cache).__name__ == "DynamicCache"


def attention_implementation(config: Any) -> str:
    """The attention backend ('sdpa', 'eager', 'flash_attention_2', ...) a config's model runs with."""
    return config._attn_implementation


# --- masks -----------------------------------------------------------------------------------------

FOLLOWED_MASKS = ("sdpa", "eager")
"""Attention backends whose decoder-layer masks vtprune gathers and rebuilds: 4-D, bool (sdpa) or additive
(eager). Flash attention takes 2-D masks and reads packed sequences off position ids, which a cut breaks."""


def check_masks_followed(implementation: str) -> None:
    """Refuse, when patching, a backend whose masks the in-decoder engine cannot follow."""
    if implementation not in FOLLOWED_MASKS:
        raise ValueError(
            f"in-decoder stages re-mask the layers after a cut, which vtprune does for sdpa and eager attention; "
            f"load the model with attn_implementation='sdpa' (or 'eager'), not {implementation!r}, or patch with "
            f"vision-side policies only"
        )


def allowed(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A 4-D attention mask as the model built it, as bool (True: attend): sdpa's bool masks stay, eager's
    additive float masks (0 attend, a large negative otherwise) become bool; None (plain causal) stays None."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if torch.is_tensor(mask) and mask.is_floating_point() and mask.dim() == 4:
        return mask == 0
    raise refusal(f"the decoder layers get an attention mask of a form vtprune does not know ({type(mask).__name__})")


def in_form(allowed: torch.Tensor, like: torch.Tensor | None, implementation: str) -> torch.Tensor:
    """A bool mask (True: attend) in the form the model's layers take: that of `like`, the mask the model built
    (None: the model passes none, as sdpa does for plain causal attention)."""
    if like is None:
        if implementation != "sdpa":  # eager always builds its mask; other backends take no 4-D one
            raise ValueError(
                f"rows that keep different numbers of tokens need a padding mask, which vtprune builds for sdpa "
                f"attention only; load the model with attn_implementation='sdpa' (or 'eager'), not {implementation!r}"
            )
        return allowed
    if like.dtype == torch.bool:
        return allowed
    blocked = torch.finfo(like.dtype).min
    return torch.zeros(allowed.shape, dtype=like.dtype, device=allowed.device).masked_fill(~allowed, blocked)

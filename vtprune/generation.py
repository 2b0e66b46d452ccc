"""A `generate` call on a pruned prompt, made to behave as the caller's call on the whole prompt.

The caller counts lengths, streams and slices outputs on the prompt they passed; the model sees a shorter
one. This module converts what counts the prompt (length limits), what shows it (streamers, returned
sequences), and refuses the modes the in-decoder stages cannot follow, before any work is done.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vtprune import hf


def setting(model: nn.Module | None, kwargs: dict[str, Any], name: str) -> Any:
    """A generation setting as `generate` resolves it: the keyword, else the passed `generation_config`, else the
    model's own (None where none sets it)."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    for config in (kwargs.get("generation_config"), getattr(model, "generation_config", None)):
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def check_in_decoder(model: nn.Module | None, kwargs: dict[str, Any]) -> None:
    """Refuse generation modes whose cache handling the in-decoder stages cannot follow."""
    if (setting(model, kwargs, "num_beams") or 1) > 1:
        raise ValueError(
            "in-decoder stages do not support beam search (beams reorder the cache rows the cut follows): "
            "use num_beams=1, or patch with vision-side policies only"
        )
    if (setting(model, kwargs, "num_return_sequences") or 1) > 1:
        raise ValueError(
            "in-decoder stages cut each prompt row once, not its num_return_sequences copies: pass the prompt that "
            "many times in the batch (with do_sample=True), or patch with vision-side policies only"
        )
    if kwargs.get("assistant_model") is not None or setting(model, kwargs, "prompt_lookup_num_tokens"):
        raise ValueError("in-decoder stages do not support assisted generation: drop assistant_model/prompt lookup")
    if kwargs.get("inputs_embeds") is not None:  # generate drops input_ids when given embeddings
        raise ValueError(
            "vtprune's in-decoder stages find image tokens in input_ids, which generate drops when inputs_embeds "
            "are given: pass input_ids (as the processor returns them) rather than inputs_embeds"
        )
    if setting(model, kwargs, "use_cache") is False:
        raise ValueError(
            "in-decoder stages cut the prompt once, in its prefill; with use_cache=False every step would re-run "
            "and re-cut the prompt: leave use_cache on, or patch with vision-side policies only"
        )
    cache = hf.caller_cache(kwargs)
    foreign = cache is not None and not hf.is_dynamic_cache(cache)
    # "hybrid" (Gemma 3 checkpoints' old default) is what generate replaces by a DynamicCache, passed or not
    if setting(model, kwargs, "cache_implementation") not in (None, "dynamic", "hybrid") or foreign:
        raise ValueError(
            "in-decoder stages need a DynamicCache (layers after a cut hold fewer tokens); drop "
            "cache_implementation / the cache you passed, or patch with vision-side policies only"
        )


def check_finds_placeholders(inputs: dict[str, Any]) -> None:
    """In-decoder stages find the image tokens in `input_ids`: refuse a call that passes embeddings instead of
    them (beside them is fine: the model, too, finds the placeholders in `input_ids` then)."""
    if inputs.get("inputs_embeds") is not None and inputs.get("input_ids") is None:
        raise ValueError(
            "vtprune's in-decoder stages find image tokens in input_ids: pass input_ids (as the processor returns "
            "them) rather than inputs_embeds"
        )


def counted_on_prompt(model: nn.Module | None, call: dict[str, Any], prompt_length: int) -> None:
    """Length limits that count the prompt (`max_length`, `min_length`: as keywords, in the passed config or in
    the model's) become counts of new tokens, so the output is as long as the unpatched model's."""
    for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        limit = setting(model, call, total)
        if setting(model, call, new) is None and limit is not None:
            call[new] = max(limit - prompt_length, 0 if total == "min_length" else 1)
        call.pop(total, None)


class PromptFirst:
    """A streamer that is shown the caller's prompt where `generate` puts the pruned one (its first `put`)."""

    def __init__(self, streamer: Any, prompt: torch.Tensor) -> None:
        self.streamer, self.prompt, self.started = streamer, prompt, False

    def put(self, value: torch.Tensor) -> None:
        if not self.started:
            self.started = True
            value = repeated(self.prompt.to(value.device), value.shape[0])
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()


def repeated(prompt: torch.Tensor, rows: int) -> torch.Tensor:
    """The caller's prompt rows, each repeated for its `num_return_sequences` of `rows` output rows."""
    return prompt.repeat_interleave(rows // prompt.shape[0], dim=0)


def with_prompt(out: Any, prompt: torch.Tensor, pruned_length: int) -> Any:
    """Generated sequences with the caller's own prompt at their head in place of the pruned one; each prompt
    row heads its `num_return_sequences` rows."""
    if isinstance(out, torch.Tensor):
        return torch.cat([repeated(prompt.to(out.device), out.shape[0]), out[:, pruned_length:]], dim=1)
    out.sequences = with_prompt(out.sequences, prompt, pruned_length)
    return out

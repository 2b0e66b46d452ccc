"""Model-family adapters: one module per family, picked by `config.model_type`."""

from __future__ import annotations

from torch import nn
from vtprune.adapters.base import Adapter
from vtprune.adapters.gemma3 import Gemma3Adapter
from vtprune.adapters.glm4v import Glm4vAdapter
from vtprune.adapters.internvl import InternVLAdapter
from vtprune.adapters.llava import LlavaAdapter
from vtprune.adapters.llava_next import LlavaNextAdapter
from vtprune.adapters.llava_onevision import LlavaOnevisionAdapter
from vtprune.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from vtprune.adapters.qwen2_vl import Qwen2VLAdapter
from vtprune.adapters.qwen3_vl import Qwen3VLAdapter
from vtprune.adapters.qwen3_vl_moe import Qwen3VLMoeAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    t: cls
    for cls in (
        LlavaAdapter,
        LlavaNextAdapter,
        LlavaOnevisionAdapter,
        Qwen2VLAdapter,
        Qwen2_5_VLAdapter,
        Qwen3VLAdapter,
        Qwen3VLMoeAdapter,
        Glm4vAdapter,
        InternVLAdapter,
        Gemma3Adapter,
    )
    for t in cls.model_types
}


def supported_models() -> list[str]:
    """Model types (`config.model_type`) that vtprune can patch."""
    return sorted(ADAPTERS)


def for_model(model: nn.Module) -> Adapter:
    """The adapter for `model`, or a TypeError that lists what is supported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise TypeError(
            f"vtprune cannot patch {type(model).__name__} (model_type={model_type!r}); supported model types: "
            f"{', '.join(supported_models())}. Load the model with AutoModelForImageTextToText or the "
            f"family's *ForConditionalGeneration class."
        )
    if not hasattr(model, "generate") or not hasattr(model, "model"):
        raise TypeError(
            f"vtprune patches the generation model (e.g. LlavaForConditionalGeneration), not "
            f"{type(model).__name__}; load it with AutoModelForImageTextToText"
        )
    adapter = ADAPTERS[model_type](model)
    adapter.resolve_calls()
    return adapter


__all__ = ["Adapter", "for_model", "supported_models"]

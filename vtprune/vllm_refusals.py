"""vLLM's models of the other families vtprune prunes on HF, refusing a `vtprune` entry the plugin cannot serve.

Without this, such a model would load with the entry ignored: served unpruned, silently. Each class is made
on first use (`vtprune.vllm_refusals:<architecture>`) as a subclass of vLLM's own, which it is in every way
but the check. Imported by vLLM only.
"""

from __future__ import annotations

import importlib
from typing import Any

from vtprune.vllm import settings_of


def __getattr__(name: str) -> type:
    from vllm.model_executor.models.registry import _MULTIMODAL_MODELS

    if name not in _MULTIMODAL_MODELS:
        raise AttributeError(name)
    module, class_name = _MULTIMODAL_MODELS[name]
    base = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), class_name)

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        if settings_of(config) is not None:
            raise ValueError(
                f"vtprune's vLLM plugin prunes LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL only; {name} "
                f"({config.model_type}) is pruned with HF transformers + vtprune: serve it without the 'vtprune' "
                f"entry, or run it with vtprune.patch"
            )
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)

    refusing = type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})
    globals()[name] = refusing
    return refusing

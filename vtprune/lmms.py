"""vtprune inside lmms-eval (0.7.3): one model name per family lmms-eval has a Hugging Face wrapper for, each the
wrapper itself with the model patched after loading.

    lmms-eval --model vtprune_llava_hf --model_args pretrained=llava-hf/llava-1.5-7b-hf,policy=cls_attention,keep=64 \\
        --tasks pope --log_samples --output_path results/

lmms-eval finds the names through the `lmms_eval.models` entry point, which calls `manifests`. `--model_args`
takes the wrapper's own arguments plus `policy`, `keep`, `positions`, `temporal` and the policy's options. The task
yamls' prompt and generation overrides for the wrapper (`llava_hf`, `qwen2_vl`, ...) apply to its vtprune name too.
Each logged sample's `token_counts` holds its images' visual tokens before and after pruning and per decoder layer.
Everything that touches lmms-eval's internals is here, in `vtprune.lmms_models` and, for its task files'
layout, in `vtprune.eval.lmms_tasks`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import warnings
from typing import Any

TESTED_LMMS_EVAL = ("0.7.3",)
"""The lmms-eval releases the plugin is tested on (.ci/lmms); it touches their internals, so it offers nothing to
others."""
PREFIX = "vtprune_"
CLASSES: dict[str, tuple[str, str | None]] = {
    "llava_hf": ("LlavaHf", "LlavaHfChat"),
    "qwen2_vl": ("Qwen2VL", None),
    "qwen2_5_vl": ("Qwen2_5VL", "Qwen2_5VLChat"),
    "qwen3_vl": ("Qwen3VL", "Qwen3VLChat"),
}
"""Wrapper name (one of `lmms_conventions.WRAPPERS`) -> (simple class, chat class or None) in
`vtprune.lmms_models`, as lmms-eval has them."""


def model_name(wrapper: str) -> str:
    """The `--model` name of a wrapper's vtprune version."""
    return PREFIX + wrapper


def wrapper_of(name: str) -> str | None:
    """The wrapper a `--model` name is the vtprune version of; None for any other name."""
    wrapper = name.removeprefix(PREFIX)
    return wrapper if name.startswith(PREFIX) and wrapper in CLASSES else None


def manifests() -> list[Any]:
    """The entry point: a manifest per wrapper; also lets the task yamls' per-model settings find our names.
    On an untested lmms-eval, none, with a warning (raising would cost lmms-eval the other plugins' models too)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    release = importlib.metadata.version("lmms-eval")
    if release not in TESTED_LMMS_EVAL:
        warnings.warn(
            f"vtprune's lmms-eval plugin is tested on lmms-eval {', '.join(TESTED_LMMS_EVAL)}, not {release}, and "
            f"offers no models: install one of those (pip install --no-deps lmms-eval=={TESTED_LMMS_EVAL[-1]}, "
            "see vtprune's README)",
            stacklevel=2,
        )
        return []

    _share_task_settings()
    paths = {
        wrapper: tuple(f"vtprune.lmms_models.{name}" if name else None for name in names)
        for wrapper, names in CLASSES.items()
    }
    return [
        ModelManifest(model_id=model_name(wrapper), simple_class_path=simple, chat_class_path=chat)
        for wrapper, (simple, chat) in paths.items()
    ]


def _share_task_settings() -> None:
    """Make a task's `lmms_eval_specific_kwargs`, `model_specific_target_kwargs` and
    `model_specific_generation_kwargs` entries for a wrapper apply to its vtprune name, unless a yaml names ours."""
    from lmms_eval.api.task import ConfigurableTask

    prepare = ConfigurableTask._prepare_model_specific_config
    if getattr(prepare, "vtprune", False):
        return

    @functools.wraps(prepare)
    def prepare_as_wrapper(task: Any) -> None:
        own = task.model_name
        wrapper = wrapper_of(own) if isinstance(own, str) else None
        config = task.config
        sections = (
            config.lmms_eval_specific_kwargs,
            config.model_specific_target_kwargs,
            config.model_specific_generation_kwargs,
        )
        if wrapper is not None and not any(isinstance(s, dict) and own in s for s in sections):
            task.model_name = wrapper
        try:
            prepare(task)
        finally:
            task.model_name = own

    prepare_as_wrapper.vtprune = True
    ConfigurableTask._prepare_model_specific_config = prepare_as_wrapper

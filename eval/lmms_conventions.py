"""What lmms-eval 0.7.3 does that `vtprune eval` mirrors: its tasks for vtprune's benchmarks, and what its model
wrappers do around a task's prompt, per model type, so that `vtprune eval` sizes images and generates as an
lmms-eval run of the same checkpoint does, and the plugin (`vtprune.lmms`) knows which wrapper serves each family.
Prompts need nothing here: each wrapper's default class below (the chat one where there is one) puts the image
before the task's text in one user turn of the processor's chat template (Qwen's adds the default system prompt,
which its template adds anyway), as `runner.prompt_text` does; `llava_hf`'s simple class (`--force_simple`) words
prompts through the tokenizer's template instead, or its own Vicuna template where the tokenizer has none."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Resize:
    """qwen-vl-utils' `fetch_image`: a side of each multiple of `factor`, the area within the pixel bounds, the
    aspect kept as nearly as that allows; resampled by PIL's default (bicubic) before the processor sees it."""

    factor: int
    min_pixels: int
    max_pixels: int

    def size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing (qwen-vl-utils' `smart_resize`)."""
        factor = self.factor
        rows, cols = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
        if rows * cols > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            rows, cols = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
        elif rows * cols < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            rows, cols = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
        return rows, cols


@dataclass(frozen=True)
class Wrapper:
    """One lmms-eval model wrapper (its default class: the chat one where there is one): its `--model` name, the
    answer length it uses where a task sets none, the keyword arguments it loads the processor with and calls it
    with, what it does to an image before the processor (a JPEG round trip at `jpeg_quality`, then `resize`),
    and whether it cuts answers at the task's stop strings."""

    name: str
    max_new_tokens: int
    processor_options: dict[str, Any] = field(default_factory=dict)
    processor_call: dict[str, Any] = field(default_factory=dict)
    jpeg_quality: int | None = None
    resize: Resize | None = None
    cuts_at_stops: bool = False


TASKS: dict[str, tuple[str, str]] = {
    "pope": ("pope/pope.yaml", "test"),
    "mme": ("mme/mme.yaml", "test"),
    "gqa": ("gqa/gqa.yaml", "testdev"),
    "textvqa": ("textvqa/textvqa_val.yaml", "validation"),
    "vqav2": ("vqav2/vqav2_val.yaml", "validation"),
    "scienceqa": ("scienceqa/scienceqa_img.yaml", "test"),
    "mmbench": ("mmbench/mmbench_en_dev_static.yaml", "dev"),
}
"""vtprune benchmark -> (the lmms-eval task yaml under `lmms_eval/tasks/` that runs it, named as the file; the
split it evaluates, the one vtprune reads by default)."""

LLAVA_HF = Wrapper("llava_hf", 1024)
QWEN_PIXELS = {"max_pixels": 1605632, "min_pixels": 200704}
QWEN3_VL = Wrapper(
    "qwen3_vl", 128, QWEN_PIXELS, processor_call={"do_resize": False}, resize=Resize(32, 4 * 32**2, 16384 * 32**2)
)
WRAPPERS: dict[str, Wrapper] = {
    "llava": LLAVA_HF,
    "llava_next": LLAVA_HF,
    "llava_onevision": LLAVA_HF,
    "qwen2_vl": Wrapper(
        "qwen2_vl",
        128,
        {"max_pixels": 602112, "min_pixels": 3136},
        jpeg_quality=85,
        resize=Resize(28, 3136, 602112),
        cuts_at_stops=True,
    ),
    # its chat class hands qwen-vl-utils images without pixel bounds: that resize uses the defaults
    "qwen2_5_vl": Wrapper("qwen2_5_vl", 128, QWEN_PIXELS, resize=Resize(28, 4 * 28**2, 16384 * 28**2)),
    "qwen3_vl": QWEN3_VL,
    "qwen3_vl_moe": QWEN3_VL,
}
"""Model type (`config.model_type`) -> the lmms-eval wrapper that runs it. Tested end to end against lmms-eval:
LLaVA's and Qwen2-VL's (tests_lmms); Qwen2.5-VL's and Qwen3-VL's are read off their code."""


def wrapper(model_type: str) -> Wrapper | None:
    """The wrapper lmms-eval runs a model type with; None for a type it has no wrapper for."""
    return WRAPPERS.get(model_type)


def max_new_tokens(task_length: int | None, model_type: str) -> int:
    """A task's answer length, or where it sets none, the wrapper's (16 for a model type without one)."""
    if task_length is not None:
        return task_length
    found = wrapper(model_type)
    return found.max_new_tokens if found else 16


def processor_options(model_type: str) -> dict[str, Any]:
    """The keyword arguments lmms-eval loads this model type's processor with (Qwen-VL's pixel bounds)."""
    found = wrapper(model_type)
    return dict(found.processor_options) if found else {}


def processor_call(model_type: str) -> dict[str, Any]:
    """The extra keyword arguments this model type's wrapper calls its processor with (Qwen3-VL: no resizing)."""
    found = wrapper(model_type)
    return dict(found.processor_call) if found else {}


def cut_at_stops(answer: str, stops: tuple[str, ...], model_type: str) -> str:
    """The answer as the wrapper returns it: cut before the first of the task's stop strings where the wrapper
    cuts (Qwen2-VL's), stripped."""
    found = wrapper(model_type)
    if found is not None and found.cuts_at_stops:
        answer = answer[: min((answer.index(stop) for stop in stops if stop in answer), default=len(answer))]
    return answer.strip()


def prepare_image(image: Image.Image, model_type: str) -> Image.Image:
    """The image as this model type's wrapper hands it to the processor."""
    found = wrapper(model_type)
    if found is None:
        return image
    if found.jpeg_quality is not None:
        encoded = io.BytesIO()
        image.convert("RGB").save(encoded, format="JPEG", quality=found.jpeg_quality)
        image = Image.open(io.BytesIO(encoded.getvalue())).convert("RGB")
    if found.resize is not None:
        rows, cols = found.resize.size(image.height, image.width)
        image = image.resize((cols, rows))
    return image

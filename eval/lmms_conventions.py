"""What lmms-eval 0.7.3 does that `vtprune eval` mirrors: its tasks for vtprune's benchmarks, and what its model
wrappers do around a task's prompt, per model type, so that `vtprune eval` sizes images and generates as an
lmms-eval run of the same checkpoint does, and the plugin (`vtprune.lmms`) knows which wrapper serves each family.
Prompts need nothing here: every wrapper below puts the image before the task's text in one user turn of the
processor's chat template (Qwen's adds the default system prompt, which its template adds anyway), as
`runner.prompt_text` does."""

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
    """One lmms-eval model wrapper: its `--model` name, the answer length it uses where a task sets none, the
    keyword arguments it loads the processor with, and what it does to an image before the processor (a JPEG
    round trip at `jpeg_quality`, then `resize`), where known."""

    name: str
    max_new_tokens: int
    processor_options: dict[str, Any] = field(default_factory=dict)
    jpeg_quality: int | None = None
    resize: Resize | None = None


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
QWEN3_VL = Wrapper("qwen3_vl", 128, {"max_pixels": 1605632, "min_pixels": 200704})
WRAPPERS: dict[str, Wrapper] = {
    "llava": LLAVA_HF,
    "llava_next": LLAVA_HF,
    "llava_onevision": LLAVA_HF,
    "qwen2_vl": Wrapper(
        "qwen2_vl", 128, {"max_pixels": 602112, "min_pixels": 3136}, jpeg_quality=85, resize=Resize(28, 3136, 602112)
    ),
    "qwen2_5_vl": Wrapper("qwen2_5_vl", 128, {"max_pixels": 1605632, "min_pixels": 200704}),
    "qwen3_vl": QWEN3_VL,
    "qwen3_vl_moe": QWEN3_VL,
}
"""Model type (`config.model_type`) -> the lmms-eval wrapper that runs it. Qwen2.5-VL's and Qwen3-VL's chat
wrappers also resize images with qwen-vl-utils' defaults before their processors; that step is not mirrored."""


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

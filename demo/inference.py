"""One question about one picture, answered by the unpruned model and under each chosen policy, with the
pruning drawn and timed. Plain functions: the Gradio app only lays these out."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from vtprune.eval.runner import EMBEDDED, ModelError, greedy, load_model, prompt_text

import vtprune
from vtprune.trace import ImageRecord

from .layout import panels
from .overlay import overlay

MAX_NEW_TOKENS = 24


@dataclass(frozen=True)
class Answer:
    """What one setting (a policy at a budget, or the unpruned model) made of the question."""

    policy: str
    text: str
    tokens_before: int
    tokens_after: int
    first_token_s: float
    total_s: float
    picture: Image.Image
    """The kept tokens bright, the pruned ones dimmed (the unpruned model: every token kept)."""
    heatmap: Image.Image | None
    """The policy's scores over the picture, where it gives scores."""

    @property
    def summary(self) -> str:
        return (
            f"visual tokens {self.tokens_before} -> {self.tokens_after}"
            f" · first token {1000 * self.first_token_s:.0f} ms · total {1000 * self.total_s:.0f} ms"
        )


class Models:
    """Models loaded so far, by name (the embedded one and any hub name or local directory)."""

    def __init__(self) -> None:
        self.loaded: dict[str, tuple[Any, Any]] = {}

    def get(self, name: str) -> tuple[Any, Any]:
        name = name.strip() or EMBEDDED
        if name not in self.loaded:
            if name != EMBEDDED:
                _check_supported(name)
            self.loaded[name] = load_model(name, device=_device(), dtype=torch.float32, device_map=None)
        return self.loaded[name]


def _check_supported(name: str) -> None:
    """Refuse a model vtprune cannot patch from its config alone, before any weights load."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(name).model_type
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model {name!r}: {error}") from error
    if model_type not in vtprune.supported_models():
        raise ModelError(
            f"{name!r} is a {model_type} model, which vtprune cannot patch; "
            f"use one of these model types: {', '.join(vtprune.supported_models())}"
        )


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def ask(
    model: Any, processor: Any, image: Image.Image, question: str, policy: str | None, keep: float | int | None
) -> Answer:
    """Greedy answer of the model, patched with `policy` at `keep` for this call only (None: unpruned)."""
    image = image.convert("RGB")
    question = prompt_text(processor, question)
    with vtprune.patched(model, policy, keep=keep) if policy else contextlib.nullcontext():
        inputs, (text,), clock = greedy(model, processor, [image], [question], MAX_NEW_TOKENS)
        record = vtprune.last_trace(model)[0] if policy else None
    total = time.perf_counter() - clock.start
    tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if record is None:
        return Answer("unpruned", text, tokens, tokens, clock.first_token_seconds, total, image, None)
    picture = draw(model, processor, image, record)
    heatmap = None if record.scores is None else draw(model, processor, image, record, heatmap=True)
    return Answer(policy, text, tokens, record.n_after, clock.first_token_seconds, total, picture, heatmap)


def draw(model: Any, processor: Any, image: Image.Image, record: ImageRecord, heatmap: bool = False) -> Image.Image:
    """The picture with the record's kept tokens bright and the others dimmed, or its scores as a heatmap."""
    if record.grid is None:
        raise ValueError(f"the trace has no token grid for this {model.config.model_type} image to draw on")
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size if hasattr(vision, "image_size") else None
    layout = panels(
        model.config.model_type,
        record.grid,
        image.size,
        record.n_before,
        crop_grid=(side, side) if side else None,
        image_processor=processor.image_processor,
        frames=record.frames,
    )
    return overlay(image, layout, record.kept, record.scores, heatmap=heatmap)

"""One question about one picture or video, answered by the unpruned model and under each chosen policy, with
the pruning drawn and timed. Plain functions: the Gradio app only lays these out."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from vtprune.adapters.internvl import InternVLAdapter
from vtprune.eval.runner import EMBEDDED, ModelError, greedy, load_model, prompt_text

import vtprune
from vtprune.trace import ImageRecord

from .layout import panels
from .overlay import overlay, sheet


@dataclass(frozen=True)
class Video:
    """A video's sampled frames (`[frames, H, W, 3]` uint8) and, where known, the `video_metadata` the
    processors time them from (`vtprune.load_video(..., with_metadata=True)`)."""

    frames: np.ndarray
    metadata: dict[str, Any] | None = None


Media = Image.Image | Video

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
    """The kept tokens bright, the pruned ones dimmed (the unpruned model: the picture, or the video's first
    frame of each frame group)."""
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
    model: Any, processor: Any, media: Media, question: str, policy: str | None, keep: float | int | None
) -> Answer:
    """Greedy answer of the model about a picture or a video, patched with `policy` at `keep` for this call
    only (None: unpruned)."""
    video = isinstance(media, Video)
    if video:
        _check_takes_videos(model, processor)
        images, videos = [], {"videos": [media.frames], "do_sample_frames": False}
        if media.metadata is not None:
            videos["video_metadata"] = [media.metadata]
    else:
        images, videos = [media], {}
    text = prompt_text(processor, question, "video" if video else "image")
    with vtprune.patched(model, policy, keep=keep) if policy else contextlib.nullcontext():
        inputs, (answer,), clock = greedy(model, processor, images, [text], MAX_NEW_TOKENS, **videos)
        record = vtprune.last_trace(model)[0] if policy else None
    total = time.perf_counter() - clock.start
    kinds = inputs.get("mm_token_type_ids")  # GLM-4.1V's video frames use the image placeholder
    if kinds is not None:
        tokens = int((kinds == (2 if video else 1)).sum())
    else:
        placeholder = model.config.video_token_id if video else model.config.image_token_id
        tokens = int((inputs["input_ids"] == placeholder).sum())
    if record is None:
        picture = sheet(frame_pictures(processor, media))
        return Answer("unpruned", answer, tokens, tokens, clock.first_token_seconds, total, picture, None)
    picture = draw(model, processor, media, record)
    heatmap = None if record.scores is None else draw(model, processor, media, record, heatmap=True)
    return Answer(policy, answer, tokens, record.n_after, clock.first_token_seconds, total, picture, heatmap)


def _check_takes_videos(model: Any, processor: Any) -> None:
    if getattr(model.config, "video_token_id", None) is None or getattr(processor, "video_processor", None) is None:
        raise ModelError(
            f"this {model.config.model_type} model takes pictures, not videos; "
            "ask about a picture, or load a Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4.1V or LLaVA-OneVision model for a "
            "video"
        )


def frame_pictures(processor: Any, media: Media) -> list[Image.Image]:
    """What the tokens are drawn over: the picture, or a video's first frame of each frame group (the frames
    the tower merges into one grid of tokens; LLaVA-OneVision: every frame, one grid each)."""
    if isinstance(media, Image.Image):
        return [media.convert("RGB")]
    step = getattr(processor.video_processor, "temporal_patch_size", 1)
    return [Image.fromarray(frame) for frame in media.frames[::step]]


def draw(model: Any, processor: Any, media: Media, record: ImageRecord, heatmap: bool = False) -> Image.Image:
    """The picture (a video: a frame per frame group) with the record's kept tokens bright and the others dimmed,
    or its scores as a heatmap."""
    model_type = model.config.model_type
    pictures = frame_pictures(processor, media)
    tiles = crop_grid = None
    if model_type == "internvl":
        tiles = InternVLAdapter.tile_arrangement(processor.image_processor, pictures[0].size)
        crop_grid = InternVLAdapter(model).grid
    elif hasattr(model.config.vision_config, "image_size"):
        vision = model.config.vision_config
        crop_grid = (vision.image_size // vision.patch_size,) * 2
    grid = record.grid or crop_grid
    if grid is None:
        raise ValueError(f"the trace has no token grid for this {model_type} image to draw on")
    layout = panels(
        model_type,
        grid,
        pictures[0].size,
        record.n_before,
        crop_grid=crop_grid,
        image_processor=processor.image_processor,
        frames=record.frames,
        tiles=tiles,
    )
    return overlay(pictures if record.frames else pictures[0], layout, record.kept, record.scores, heatmap=heatmap)

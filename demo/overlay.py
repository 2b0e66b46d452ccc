"""Pictures of a pruning: the kept tokens bright and outlined, the pruned ones dimmed, or a score heatmap."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw

from .layout import Panel

DIM = 0.3
"""Brightness left to a pruned token's pixels."""
UNSEEN = 0.1
"""Brightness left to pixels the model never saw (cropped away by its processor)."""
OUTLINE = (255, 214, 0)
HEAT = (255, 40, 0)
GAP = 8
"""Pixels between panels drawn side by side."""
PER_ROW = 4
"""Panels to a row (a video has one per frame group)."""


def overlay(
    pictures: Image.Image | Sequence[Image.Image],
    panels: Sequence[Panel],
    kept: torch.Tensor | Sequence[int],
    scores: torch.Tensor | None = None,
    heatmap: bool = False,
) -> Image.Image:
    """The picture (or a video's frame of each panel) once per panel, laid out by `sheet`: kept tokens as they
    are with an outline, pruned ones dimmed, and what the panel does not cover darker still. With `heatmap`,
    each token is tinted by its score (min-max scaled over the image) instead, kept ones still outlined."""
    if heatmap and scores is None:
        raise ValueError("this policy gives no scores to draw a heatmap from; draw the kept tokens instead")
    if isinstance(pictures, Image.Image):
        pictures = [pictures] * len(panels)
    if len(pictures) != len(panels):
        raise ValueError(f"{len(pictures)} pictures for {len(panels)} panels: give one per panel, or one for all")
    kept = set(torch.as_tensor(kept).tolist())
    scale = _scaled(scores) if heatmap else None
    return sheet(
        [
            _panel_picture(picture.convert("RGB"), panel, kept, scale)
            for picture, panel in zip(pictures, panels, strict=True)
        ]
    )


def sheet(pictures: Sequence[Image.Image]) -> Image.Image:
    """Pictures side by side, `PER_ROW` to a row, `GAP` pixels apart, on white."""
    rows = [pictures[start : start + PER_ROW] for start in range(0, len(pictures), PER_ROW)]
    widths = [sum(picture.width for picture in row) + GAP * (len(row) - 1) for row in rows]
    heights = [max(picture.height for picture in row) for row in rows]
    canvas = Image.new("RGB", (max(widths), sum(heights) + GAP * (len(rows) - 1)), (255, 255, 255))
    top = 0
    for row, height in zip(rows, heights, strict=True):
        left = 0
        for picture in row:
            canvas.paste(picture, (left, top))
            left += picture.width + GAP
        top += height + GAP
    return canvas


def _scaled(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.float()
    low, high = scores.min(), scores.max()
    return (scores - low) / (high - low) if high > low else torch.zeros_like(scores)


def _panel_picture(image: Image.Image, panel: Panel, kept: set[int], scale: torch.Tensor | None) -> Image.Image:
    left, top, right, bottom = panel.region
    # The region may reach past the picture (a padding processor): paste the picture into it.
    shift = (max(0, -round(left)), max(0, -round(top)))
    size = (max(image.width, round(right)) + shift[0], max(image.height, round(bottom)) + shift[1])
    base = Image.new("RGB", size, (0, 0, 0))
    base.paste(image, shift)
    dim = Image.eval(base, lambda value: int(value * DIM))
    picture = Image.eval(base, lambda value: int(value * UNSEEN))
    boxes = {index: _shifted(box, shift) for index, box in panel.boxes().items()}
    for index, box in boxes.items():
        pixels = tuple(round(value) for value in box)
        if scale is not None:
            tint = Image.new("RGB", (pixels[2] - pixels[0], pixels[3] - pixels[1]), HEAT)
            picture.paste(Image.blend(base.crop(pixels), tint, 0.75 * float(scale[index])), pixels[:2])
        else:
            picture.paste((base if index in kept else dim).crop(pixels), pixels[:2])
    pen = ImageDraw.Draw(picture)
    for index in kept & boxes.keys():
        pen.rectangle(tuple(round(value) for value in boxes[index]), outline=OUTLINE)
    return picture


def _shifted(box: tuple[float, ...], shift: tuple[int, int]) -> tuple[float, ...]:
    return (box[0] + shift[0], box[1] + shift[1], box[2] + shift[0], box[3] + shift[1])

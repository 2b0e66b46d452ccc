"""`shapes`: a deterministic synthetic VQA benchmark, and `vtprune-shapes`, the small LLaVA trained on it.

Each scene is a 168x168 picture (a 12x12 grid of 14-pixel patches) of 3 to 6 small coloured shapes, each
inside one patch, on a plain background with a little clutter (grey dots, pixel noise). Each question needs
the patch of one object (of every object of one shape, for counting), so a pruned model that drops it cannot
answer. Question kinds, one in five samples each:

    colour    what colour is the triangle ?                         red
    shape     what shape is the blue object ?                       circle
    count     how many circles are there ?                          2
    exists    is there a green square ?                             yes / no (balanced; 'no' scenes hold a
                                                                    green object and a square, not both)
    position  on which side is the red object ?                     left / right (balanced; objects in
                                                                    the two middle columns are not asked about)

Sample `i` of a split is generated from the seed `SEED_BASE[split] + i`; the splits' seed ranges are
disjoint. The model (`eval/vtprune_shapes/`, built by `python -m vtprune.eval.train_shapes`) answers
prompts worded as LLaVA-1.5's, `PROMPT_TEMPLATE`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from vtprune.eval.runner import greedy
from vtprune.eval.samples import SCORINGS, Benchmark, Sample

MODEL_NAME = "vtprune-shapes"
MODEL_DIR = Path(__file__).parent / "vtprune_shapes"
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
"""LLaVA-1.5's wording, which the evaluation runner uses for processors without a chat template."""

IMAGE_SIZE = 168
BACKGROUND = (242, 240, 234)
COLOURS = {
    "red": (214, 45, 40),
    "green": (48, 160, 66),
    "blue": (40, 86, 214),
    "yellow": (236, 196, 30),
    "purple": (140, 62, 184),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
KINDS = ("colour", "shape", "count", "exists", "position")
COUNTS = (1, 2, 3, 4)
OBJECTS = (3, 6)
"""Fewest and most objects in a scene."""
CELL = 14
"""Objects lie in distinct cells of a grid of this pitch, the vision tower's patch grid: one image token each."""
SIZES = (8, 13)
"""Smallest and largest object, in pixels (bounding-box side)."""

SEED_BASE = {"test": 0, "train": 1_000_000}
SPLIT_SIZES = {"test": 1_000, "train": 100_000}
"""Samples per split (what `load` returns without a limit); training draws train samples one by one."""

ANSWERS = (*COLOURS, *SHAPES, *map(str, COUNTS), "yes", "no", "left", "right")
WORDS = (
    "what colour is the shape object how many are there a on which side ?".split()
    + list(COLOURS)
    + list(SHAPES)
    + list(PLURALS.values())
    + list(ANSWERS)
)
"""Every word of every question and answer."""


@dataclass(frozen=True)
class Item:
    """One shape in a scene: its colour and shape names, its centre and its bounding-box side, in pixels."""

    colour: str
    shape: str
    x: int
    y: int
    size: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        half = self.size // 2
        return self.x - half, self.y - half, self.x - half + self.size, self.y - half + self.size

    @property
    def cell(self) -> int:
        """The grid cell (image patch) the object lies in, in raster order."""
        return (self.y // CELL) * (IMAGE_SIZE // CELL) + self.x // CELL


@dataclass(frozen=True)
class Query:
    """One question about a scene; `colour` and `shape` name what it asks about, as far as the kind needs."""

    kind: str
    colour: str | None = None
    shape: str | None = None

    @property
    def text(self) -> str:
        match self.kind:
            case "colour":
                return f"what colour is the {self.shape} ?"
            case "shape":
                return f"what shape is the {self.colour} object ?"
            case "count":
                return f"how many {PLURALS[self.shape]} are there ?"
            case "exists":
                return f"is there a {self.colour} {self.shape} ?"
            case "position":
                return f"on which side is the {self.colour} object ?"
        raise ValueError(f"unknown question kind {self.kind!r}")

    def answer(self, items: tuple[Item, ...]) -> str:
        """The answer for a scene; ValueError if the question does not have exactly one in that scene."""
        match self.kind:
            case "colour":
                return _only([item for item in items if item.shape == self.shape], self).colour
            case "shape":
                return _only([item for item in items if item.colour == self.colour], self).shape
            case "count":
                return str(sum(item.shape == self.shape for item in items))
            case "exists":
                return "yes" if any((item.colour, item.shape) == (self.colour, self.shape) for item in items) else "no"
            case "position":
                offset = _only([item for item in items if item.colour == self.colour], self).x - IMAGE_SIZE / 2
                if abs(offset) < CELL:
                    raise ValueError(f"{self.text!r}: the object is within {CELL} pixels of the middle")
                return "left" if offset < 0 else "right"
        raise ValueError(f"unknown question kind {self.kind!r}")

    def evidence(self, items: tuple[Item, ...]) -> tuple[Item, ...]:
        """The objects whose patches the answer rests on: the one asked about; every object of the shape, for
        'count'; for an 'exists' question answered 'no', the objects that hold its colour or its shape."""
        match self.kind:
            case "colour" | "count":
                return tuple(item for item in items if item.shape == self.shape)
            case "shape" | "position":
                return tuple(item for item in items if item.colour == self.colour)
            case "exists":
                pair = (self.colour, self.shape)
                return tuple(item for item in items if (item.colour, item.shape) == pair) or tuple(
                    item for item in items if item.colour == self.colour or item.shape == self.shape
                )
        raise ValueError(f"unknown question kind {self.kind!r}")


def _only(matches: list[Item], query: Query) -> Item:
    if len(matches) != 1:
        raise ValueError(f"{query.text!r}: {len(matches)} objects match, the question needs exactly one")
    return matches[0]


@dataclass(frozen=True)
class Scene:
    """The objects of one picture, and the seed of its clutter (dots and noise)."""

    items: tuple[Item, ...]
    clutter_seed: int


def draw(scene: Scene) -> Image.Image:
    """The scene as an RGB picture: grey dots, then the objects, then faint pixel noise."""
    rng = np.random.default_rng(scene.clutter_seed)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for _ in range(rng.integers(8, 20)):
        x, y = rng.integers(0, IMAGE_SIZE, 2)
        radius, grey = int(rng.integers(1, 3)), int(rng.integers(120, 200))
        pen.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(grey, grey, grey))
    for item in scene.items:
        _draw_item(pen, item, COLOURS[item.colour])
    noise = rng.normal(0, 4, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def _draw_item(pen: ImageDraw.ImageDraw, item: Item, fill: tuple[int, int, int] | int) -> None:
    left, top, right, bottom = item.box
    match item.shape:
        case "circle":
            pen.ellipse((left, top, right - 1, bottom - 1), fill=fill)
        case "square":
            pen.rectangle((left, top, right - 1, bottom - 1), fill=fill)
        case "triangle":
            pen.polygon([(item.x, top), (right - 1, bottom - 1), (left, bottom - 1)], fill=fill)
        case "cross":
            arm = item.size // 3
            pen.rectangle((left + arm, top, right - 1 - arm, bottom - 1), fill=fill)
            pen.rectangle((left, top + arm, right - 1, bottom - 1 - arm), fill=fill)


def seed_of(split: str, index: int) -> int:
    if split not in SEED_BASE:
        raise ValueError(f"unknown split {split!r}; shapes has {tuple(SEED_BASE)}")
    if not 0 <= index < SPLIT_SIZES[split]:
        raise ValueError(f"index {index} is outside the {split} split's 0..{SPLIT_SIZES[split] - 1}")
    return SEED_BASE[split] + index


def generate(seed: int) -> tuple[Scene, Query]:
    """The scene and question of one seed. The kind cycles with the seed; the answers to 'count', 'exists'
    and 'position' questions cycle with each kind's turn (1 2 3 4, yes no, left right)."""
    rng = np.random.default_rng(seed)
    kind, turn = KINDS[seed % len(KINDS)], seed // len(KINDS)
    query, required, allowed = _plan(kind, rng, turn)
    side = ("left", "right")[turn % 2]
    while True:
        total = max(len(required), int(rng.integers(OBJECTS[0], OBJECTS[1] + 1)))
        pool = [pair for pair in _pairs() if allowed(pair)]
        pairs = required + [pool[i] for i in rng.integers(0, len(pool), total - len(required))]
        items = _place(rng, pairs)
        if _unambiguous(query, items) and (kind != "position" or query.answer(items) == side):
            return Scene(items, clutter_seed=int(rng.integers(2**31))), query


def render(seed: int) -> Image.Image:
    """The picture of one seed (sample `i` of a split is `render(seed_of(split, i))`)."""
    return draw(generate(seed)[0])


def sample(split: str, index: int) -> Sample:
    """Sample `index` of `split`, id like 'test-00042', grouped by question kind."""
    seed = seed_of(split, index)
    scene, query = generate(seed)
    return Sample(
        id=f"{split}-{index:05d}",
        image=draw(scene),
        question=query.text,
        answers=(query.answer(scene.items),),
        group=query.kind,
        extra={"seed": seed},
    )


def questions(items: tuple[Item, ...]) -> list[Query]:
    """Every question about these objects that has exactly one answer, and one in `ANSWERS`."""
    candidates = [Query("colour", shape=shape) for shape in SHAPES]
    candidates += [Query("shape", colour=colour) for colour in COLOURS]
    candidates += [Query("count", shape=shape) for shape in SHAPES]
    candidates += [Query("exists", colour=colour, shape=shape) for colour, shape in _pairs()]
    candidates += [Query("position", colour=colour) for colour in COLOURS]
    return [query for query in candidates if _unambiguous(query, items) and query.answer(items) in ANSWERS]


def _pairs() -> list[tuple[str, str]]:
    return [(colour, shape) for colour in COLOURS for shape in SHAPES]


def _plan(kind: str, rng: np.random.Generator, turn: int):
    """A question of `kind`, the (colour, shape) pairs its scene must hold, and which pairs may fill the rest."""
    colour, shape = _pick(rng, COLOURS), _pick(rng, SHAPES)
    match kind:
        case "colour":
            return Query(kind, shape=shape), [(colour, shape)], lambda pair: pair[1] != shape
        case "shape":
            return Query(kind, colour=colour), [(colour, shape)], lambda pair: pair[0] != colour
        case "count":
            count = COUNTS[turn % len(COUNTS)]
            required = [(_pick(rng, COLOURS), shape) for _ in range(count)]
            return Query(kind, shape=shape), required, lambda pair: pair[1] != shape
        case "exists":
            if turn % 2 == 0:
                return Query(kind, colour=colour, shape=shape), [(colour, shape)], lambda pair: True
            # A 'no' scene holds the colour on another shape and the shape in another colour.
            lures = [
                (colour, _pick(rng, [s for s in SHAPES if s != shape])),
                (_pick(rng, [c for c in COLOURS if c != colour]), shape),
            ]
            return Query(kind, colour=colour, shape=shape), lures, lambda pair: pair != (colour, shape)
        case "position":
            return Query(kind, colour=colour), [(colour, shape)], lambda pair: pair[0] != colour
    raise ValueError(f"unknown question kind {kind!r}")


def _pick(rng: np.random.Generator, names) -> str:
    names = list(names)
    return names[int(rng.integers(len(names)))]


def _place(rng: np.random.Generator, pairs: list[tuple[str, str]]) -> tuple[Item, ...]:
    """Objects of random sizes in distinct random cells, each at a random place inside its cell."""
    grid = IMAGE_SIZE // CELL
    items = []
    for (colour, shape), cell in zip(pairs, rng.choice(grid * grid, len(pairs), replace=False), strict=True):
        size = int(rng.integers(SIZES[0], SIZES[1] + 1))
        left, top = (int(corner * CELL + rng.integers(0, CELL - size + 1)) for corner in divmod(cell, grid)[::-1])
        items.append(Item(colour, shape, left + size // 2, top + size // 2, size))
    return tuple(items)


def _unambiguous(query: Query, items: tuple[Item, ...]) -> bool:
    try:
        query.answer(items)
    except ValueError:
        return False
    return True


class Shapes(Benchmark):
    """The `shapes` benchmark: questions about small coloured shapes, answered in one word."""

    name = "shapes"
    splits = ("test", "train")

    def load(self, split: str | None = None, data_dir: str | None = None, limit: int | None = None) -> list[Sample]:
        """The first `limit` samples of the split (all `SPLIT_SIZES[split]` without one); generated, so
        `data_dir` is ignored."""
        split = split or self.splits[0]
        count = SPLIT_SIZES[split] if limit is None else min(limit, SPLIT_SIZES[split])
        return [sample(split, index) for index in range(count)]

    def prompt(self, sample: Sample) -> str:
        return sample.question

    rules = dict.fromkeys(SCORINGS, lambda sample, prediction: float(normalise(prediction) in sample.answers))

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, float]:
        """Accuracy over all samples and per question kind ('accuracy/colour', ...), in percent."""
        by_kind: dict[str, list[float]] = defaultdict(list)
        for one, prediction in zip(samples, predictions, strict=True):
            by_kind[one.group].append(self.correct(one, prediction))
        every = [score for scores in by_kind.values() for score in scores]
        metrics = {"accuracy": 100 * sum(every) / max(len(every), 1)}
        for kind in sorted(by_kind, key=lambda k: KINDS.index(k) if k in KINDS else len(KINDS)):
            metrics[f"accuracy/{kind}"] = 100 * sum(by_kind[kind]) / len(by_kind[kind])
        return metrics


def normalise(answer: str) -> str:
    """Lower case, without surrounding white space and trailing punctuation."""
    return re.sub(r"[\s.,!?;:]+$", "", answer.strip().lower())


def load_model(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """`vtprune-shapes` and its processor from the packaged directory (left padding, for batched generation)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(MODEL_DIR, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    processor.tokenizer.padding_side = "left"
    return model, processor


def predict(model, processor, samples: list[Sample], batch_size: int = 50, max_new_tokens: int = 3) -> list[str]:
    """Greedy answers (the new tokens up to end of sequence, decoded) to the samples' questions."""
    predictions = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        texts = [PROMPT_TEMPLATE.format(question=one.question) for one in chunk]
        predictions += greedy(model, processor, [one.image for one in chunk], texts, max_new_tokens)[1]
    return predictions

"""MMBench (lmms-lab/MMBench, config en, dev) with circular evaluation: a question counts as right only if the model
picks the right option under every rotation of its options.

The rotated copies of question `i` have index `i + k * 1_000_000` (k = 1 .. options - 1), the dataset's own
convention; a question whose copies are not among the loaded rows gets them made by rotating its options, and, as in
lmms-eval, copies whose question itself was not loaded do not count. Letters are read from predictions as
lmms-eval's static (no GPT judge) evaluation reads them, in both scorings: MMBench has no offline script of its own.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from vtprune.eval.benchmarks.choices import INSTRUCTION, LETTERS, option_lines, read_choice
from vtprune.eval.benchmarks.loading import HubBenchmark
from vtprune.eval.benchmarks.metrics import percent
from vtprune.eval.samples import SCORINGS, Sample

COPY_STRIDE = 1_000_000
OPTIONS_HEADER = "There are several options:"
READ_LETTERS = "ABCD"
"""The option columns lmms-eval reads answers against (an "E" option is never matched by its text)."""


def missing(value: Any) -> bool:
    """Whether a cell is empty as pandas sees it (None or NaN); the dataset also writes missing cells as "nan"."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def present(value: Any) -> bool:
    """Whether a cell holds text lmms-eval puts in the prompt."""
    return not missing(value) and str(value) not in ("", "nan")


def chosen_correctly(sample: Sample, prediction: str) -> float:
    return float(read_choice(prediction, sample.extra["options"]) == sample.answers[0])


def rotated(sample: Sample, shift: int) -> Sample:
    """The copy of `sample` whose option k is its option k + shift (cyclically), with the answer letter moved along."""
    count = len(sample.choices)
    choices = sample.choices[shift:] + sample.choices[:shift]
    answer = LETTERS[(LETTERS.index(sample.answers[0]) - shift) % count]
    index = sample.extra["index"] + shift * COPY_STRIDE
    return Sample(
        id=str(index),
        image=sample.image,
        question=sample.question,
        answers=(answer,),
        choices=choices,
        group=sample.group,
        extra={**sample.extra, "index": index, "options": dict(zip(READ_LETTERS, choices, strict=False))},
    )


class MMBench(HubBenchmark):
    name = "mmbench"
    splits = ("dev",)
    hub_id = "lmms-lab/MMBench"
    config = "en"
    max_new_tokens = 1024
    stops = ("ASSISTANT:",)
    rules = dict.fromkeys(SCORINGS, chosen_correctly)

    def load(self, split: str | None = None, data_dir: str | None = None, limit: int | None = None) -> list[Sample]:
        """The first `limit` rows, plus the rotated copies of any question loaded without them."""
        samples = super().load(split, data_dir, limit)
        copies = defaultdict(int)
        for sample in samples:
            copies[sample.extra["circular_group"]] += 1
        made = [
            rotated(sample, shift)
            for sample in samples
            if copies[sample.extra["circular_group"]] == 1
            for shift in range(1, len(sample.choices))
        ]
        return samples + made

    def to_sample(self, row: dict[str, Any], position: int) -> Sample:
        index = int(row["index"])
        choices = []
        for letter in LETTERS:
            if not present(row.get(letter)):
                break
            choices.append(str(row[letter]))
        return Sample(
            id=str(index),
            image=row["image"],
            question=row["question"],
            answers=(row["answer"],),
            choices=tuple(choices),
            group=row["category"],
            extra={
                "index": index,
                "circular_group": index % COPY_STRIDE,
                "hint": row["hint"] if present(row["hint"]) else "",
                "options": {letter: str(row.get(letter)) for letter in READ_LETTERS if not missing(row.get(letter))},
            },
        )

    def prompt(self, sample: Sample) -> str:
        # lmms-eval joins hint, question and the options' header with spaces, and leaves a blank line before the
        # instruction.
        hint = sample.extra["hint"]
        stem = f"{hint} {sample.question}" if hint else sample.question
        return f"{stem} {OPTIONS_HEADER}\n{option_lines(sample.choices)}\n\n{INSTRUCTION}"

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, float]:
        """Circular "accuracy" over the questions loaded unrotated (overall and per category), and "single_pass"
        over unrotated rows."""
        values = self.correctness(samples, predictions)
        questions: dict[int, list[float]] = defaultdict(list)
        categories = {s.extra["index"]: s.group for s in samples if s.extra["index"] < COPY_STRIDE}
        for sample, value in zip(samples, values, strict=True):
            questions[sample.extra["circular_group"]].append(value)
        circular = {question: float(all(questions[question])) for question in categories}
        by_category: dict[str, list[float]] = defaultdict(list)
        for question, value in circular.items():
            by_category[categories[question]].append(value)
        metrics = {"accuracy": percent(circular.values())}
        metrics.update({f"accuracy/{category}": percent(v) for category, v in sorted(by_category.items())})
        metrics["single_pass"] = percent(
            value for sample, value in zip(samples, values, strict=True) if sample.extra["index"] < COPY_STRIDE
        )
        return metrics

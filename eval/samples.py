"""What every benchmark gives the evaluation runner: samples, prompts and scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Sample:
    """One question about one image."""

    id: str
    """Unique within the benchmark (and split): the key results are stored and resumed by."""
    image: Image.Image
    question: str
    """The question as the benchmark states it, without answer-format instructions."""
    answers: tuple[str, ...]
    """Ground truth: one answer, or the human answers VQA accuracy is computed over (10 for VQAv2/TextVQA);
    for multiple choice, the letter of the right option ('A', 'B', ...)."""
    choices: tuple[str, ...] = ()
    """Multiple-choice options, in order A, B, C, ...; empty for open questions."""
    group: str = ""
    """What scores are broken down by (POPE split, MME subtask, a `shapes` question kind), if anything."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Benchmark-specific fields a scorer needs (MMBench's circular index, MME's image id, ...)."""


class Benchmark:
    """A benchmark: loads samples, words each as a prompt, and scores predictions as its official code does."""

    name: str
    splits: tuple[str, ...]
    """The splits `load` accepts; the first is the default."""

    def load(self, split: str | None = None, data_dir: str | None = None, limit: int | None = None) -> list[Sample]:
        """The split's samples, from the hub dataset by name, or from `data_dir` holding the same schema."""
        raise NotImplementedError

    def prompt(self, sample: Sample) -> str:
        """The question with the benchmark's usual answer-format instruction (and options, for multiple choice)."""
        raise NotImplementedError

    def correct(self, sample: Sample, prediction: str) -> float:
        """One sample's score in [0, 1] (VQA accuracy gives fractions)."""
        raise NotImplementedError

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, float]:
        """The benchmark's metrics over all samples, in percent; `"accuracy"` is the headline number."""
        raise NotImplementedError

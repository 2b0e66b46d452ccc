"""What every benchmark gives the evaluation runner: samples, prompts and scores."""

from __future__ import annotations

from collections.abc import Callable
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


SCORINGS = ("lmms-eval", "official")
"""How predictions are read and scored: "lmms-eval" as lmms-eval 0.7.3's task code does (the default),
"official" as each benchmark's own script does where it differs (LLaVA's `eval_pope.py`,
`eval_science_qa.py`, `convert_gqa_for_eval.py`, its m4c VQA answer processor, MME's `calculation.py`)."""

Rule = Callable[[Sample, str], float]


class Benchmark:
    """A benchmark: loads samples, words each as a prompt as lmms-eval does, and scores predictions by the rules of
    `scoring` (one of `SCORINGS`)."""

    name: str
    splits: tuple[str, ...]
    """The splits `load` accepts; the first is the default."""
    max_new_tokens: int | None = 16
    """lmms-eval's generation length for the task; None where the task leaves it to the model wrapper."""
    stops: tuple[str, ...] = ("\n\n",)
    """The task's stop strings in lmms-eval (its `until`; the few-shot delimiter where a task sets none)."""
    rules: dict[str, Rule]
    """One sample's score in [0, 1] (VQA accuracy gives fractions) under each scoring; the same function where the
    two agree."""

    def __init__(self, scoring: str = SCORINGS[0]) -> None:
        if scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
        self.scoring = scoring

    def load(self, split: str | None = None, data_dir: str | None = None, limit: int | None = None) -> list[Sample]:
        """The split's samples, from the hub dataset by name, or from `data_dir` holding the same schema."""
        raise NotImplementedError

    def prompt(self, sample: Sample) -> str:
        """The question with lmms-eval's answer-format instruction for the task (and options, for multiple choice)."""
        raise NotImplementedError

    def correct(self, sample: Sample, prediction: str) -> float:
        """One sample's score in [0, 1] under this benchmark's scoring, of the prediction stripped (lmms-eval strips
        every answer before scoring it; LLaVA's scripts get answers its `model_vqa` stripped)."""
        return self.rules[self.scoring](sample, prediction.strip())

    def correctness(self, samples: list[Sample], predictions: list[str]) -> list[float]:
        """`correct` for each sample and its prediction."""
        return [self.correct(sample, prediction) for sample, prediction in zip(samples, predictions, strict=True)]

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, float]:
        """The benchmark's metrics over all samples, in percent; `"accuracy"` is the headline number."""
        raise NotImplementedError

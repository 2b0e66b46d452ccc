"""ScienceQA-IMG (lmms-lab/ScienceQA, config ScienceQA-IMG, test): multiple choice with the lecture hint as context,
broken down by subject.

lmms-eval accepts the letter alone (in either case) or a capital letter and a period starting the answer ("B",
"b", "B. a cat"). "official" is LLaVA's `eval_science_qa.py`: the capital letter alone, a letter, period and space
starting the answer, or exactly one "The answer is X" followed by any character ("The answer is B.").
"""

from __future__ import annotations

import re
from typing import Any

from vtprune.eval.benchmarks.choices import LETTERS, multiple_choice_prompt
from vtprune.eval.benchmarks.loading import HubBenchmark
from vtprune.eval.samples import Sample

OFFICIAL_OPTIONS = tuple("ABCDE")
STATED = re.compile(r"The answer is ([A-Z]).")


def lmms_eval_correct(sample: Sample, answer: str) -> float:
    target = sample.answers[0].lower()
    if answer.lower() == target:
        return 1.0
    return float(len(answer) >= 2 and answer[0].isupper() and answer[1] == "." and answer[0].lower() == target)


def official_letter(prediction: str) -> str | None:
    """The letter `eval_science_qa.py` reads from a prediction, or None for its "FAILED"."""
    if prediction in OFFICIAL_OPTIONS:
        return prediction
    if len(prediction) >= 3 and prediction[0] in OFFICIAL_OPTIONS and prediction[1:3] == ". ":
        return prediction[0]
    stated = STATED.findall(prediction)
    return stated[0] if len(stated) == 1 else None


def official_correct(sample: Sample, prediction: str) -> float:
    letter = official_letter(prediction)
    return float(letter in OFFICIAL_OPTIONS[: len(sample.choices)] and letter == sample.answers[0])


class ScienceQA(HubBenchmark):
    name = "scienceqa"
    splits = ("test", "validation")
    hub_id = "lmms-lab/ScienceQA"
    config = "ScienceQA-IMG"
    rules = {"lmms-eval": lmms_eval_correct, "official": official_correct}

    def to_sample(self, row: dict[str, Any], position: int) -> Sample:
        return Sample(
            id=str(position),
            image=row["image"],
            question=row["question"],
            answers=(LETTERS[row["answer"]],),
            choices=tuple(row["choices"]),
            group=row["subject"],
            extra={"hint": row["hint"] or ""},
        )

    def prompt(self, sample: Sample) -> str:
        hint = sample.extra["hint"]
        stem = f"Context: {hint}\n{sample.question}" if hint else sample.question
        return multiple_choice_prompt(stem, sample.choices)

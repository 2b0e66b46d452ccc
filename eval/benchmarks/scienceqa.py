"""ScienceQA-IMG (lmms-lab/ScienceQA, config ScienceQA-IMG, test): multiple choice with the lecture hint as context,
broken down by subject."""

from __future__ import annotations

from typing import Any

from vtprune.eval.benchmarks.choices import LETTERS, MultipleChoice, multiple_choice_prompt
from vtprune.eval.samples import Sample


class ScienceQA(MultipleChoice):
    name = "scienceqa"
    splits = ("test", "validation")
    hub_id = "lmms-lab/ScienceQA"
    config = "ScienceQA-IMG"

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

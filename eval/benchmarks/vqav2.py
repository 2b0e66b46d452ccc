"""VQAv2 (lmms-lab/VQAv2, validation): VQA accuracy over 10 human answers, broken down by answer type."""

from __future__ import annotations

from typing import Any

from vtprune.eval.benchmarks.open_ended import OpenEnded
from vtprune.eval.benchmarks.vqa_answers import vqa_accuracy
from vtprune.eval.samples import Sample


class VQAv2(OpenEnded):
    name = "vqav2"
    splits = ("validation",)
    hub_id = "lmms-lab/VQAv2"

    def to_sample(self, row: dict[str, Any], position: int) -> Sample:
        return Sample(
            id=str(row["question_id"]),
            image=row["image"],
            question=row["question"],
            answers=tuple(answer["answer"] for answer in row["answers"]),
            group=row["answer_type"],
            extra={"image_id": row["image_id"]},
        )

    def correct(self, sample: Sample, prediction: str) -> float:
        return vqa_accuracy(prediction, sample.answers)

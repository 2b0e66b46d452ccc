"""VQAv2 (lmms-lab/VQAv2, validation): VQA accuracy over 10 human answers, broken down by answer type.

lmms-eval normalises answers without the EvalAI processor's tokenize step ("red,white" reads as "red white"); LLaVA
runs the whole processor (tokenize included: "redwhite") on its answers before submitting them. "official" runs it
on both sides, as LLaVA's local m4c evaluator does for TextVQA; the VQA server's own treatment of the human answers
(`vqaEval.py`: punctuation only, and only where they disagree) is not reproduced.
"""

from __future__ import annotations

from typing import Any

from vtprune.eval.benchmarks.open_ended import OpenEnded
from vtprune.eval.benchmarks.vqa_answers import vqa_accuracy
from vtprune.eval.samples import Sample


class VQAv2(OpenEnded):
    name = "vqav2"
    splits = ("validation",)
    hub_id = "lmms-lab/VQAv2"
    rules = {
        "lmms-eval": lambda sample, prediction: vqa_accuracy(prediction, sample.answers, tokenize=False),
        "official": lambda sample, prediction: vqa_accuracy(prediction, sample.answers),
    }

    def to_sample(self, row: dict[str, Any], position: int) -> Sample:
        return Sample(
            id=str(row["question_id"]),
            image=row["image"],
            question=row["question"],
            answers=tuple(answer["answer"] for answer in row["answers"]),
            group=row["answer_type"],
            extra={"image_id": row["image_id"]},
        )

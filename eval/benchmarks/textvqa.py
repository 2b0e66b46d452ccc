"""TextVQA (lmms-lab/textvqa, validation): VQA accuracy over 10 human answers, without OCR tokens in the prompt;
lmms-eval and LLaVA's m4c evaluator score it alike. lmms-eval leaves its answer length to the model wrapper."""

from __future__ import annotations

from typing import Any

from vtprune.eval.benchmarks.open_ended import SHORT_ANSWER, OpenEnded
from vtprune.eval.benchmarks.vqa_answers import vqa_accuracy
from vtprune.eval.samples import SCORINGS, Sample


class TextVQA(OpenEnded):
    name = "textvqa"
    splits = ("validation", "train")
    hub_id = "lmms-lab/textvqa"
    max_new_tokens = None
    stops = ("ASSISTANT:",)
    rules = dict.fromkeys(SCORINGS, lambda sample, prediction: vqa_accuracy(prediction, sample.answers))

    def to_sample(self, row: dict[str, Any], position: int) -> Sample:
        return Sample(
            id=str(row["question_id"]),
            image=row["image"],
            question=row["question"],
            answers=tuple(row["answers"]),
            extra={"image_id": row["image_id"]},
        )

    def prompt(self, sample: Sample) -> str:
        # lmms-eval capitalises TextVQA questions (and lowercases the rest), unlike the other open benchmarks.
        return f"{sample.question.capitalize()}{SHORT_ANSWER}"

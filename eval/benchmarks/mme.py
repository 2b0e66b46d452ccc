"""MME (lmms-lab/MME, test): two yes/no questions per image over 14 subtasks (the `category` column).

Per subtask, acc is the share of questions answered right and acc+ the share of images with both questions right;
the subtask's score is acc + acc+ in percent points. The perception score sums the 10 perception subtasks (max 2000),
the cognition score the 4 cognition subtasks (max 800). Answers are read by lmms-eval's rule (Otter's) or, under
"official", by MME's own `calculation.py`, which reads a lone "y" or "n" as neither.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from vtprune.eval.benchmarks.metrics import label_rules, percent
from vtprune.eval.benchmarks.open_ended import OpenEnded
from vtprune.eval.samples import Sample

INSTRUCTION = " Please answer yes or no."
"""Ends every MME question; lmms-eval replaces it with its short-answer instruction (`OpenEnded.prompt`)."""
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def otter_label(prediction: str) -> str:
    """The answer as "yes", "no" or "other", read as lmms-eval reads MME answers: lowercased, stripped, periods
    removed, then the whole answer, a lone "y" or "n", or a "yes" or "no" within its first four characters."""
    text = prediction.lower().strip().replace(".", "")
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    return calculation_label(text)


def calculation_label(text: str) -> str:
    """MME's `calculation.py` on a lowercased answer: the whole answer if it is "yes" or "no", else whichever of the
    two its first four characters hold ("yes" first), else "other"."""
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    return "no" if "no" in text[:4] else "other"


LABELS = {"lmms-eval": otter_label, "official": lambda prediction: calculation_label(prediction.lower())}


class MME(OpenEnded):
    name = "mme"
    splits = ("test",)
    hub_id = "lmms-lab/MME"
    rules = label_rules(LABELS)

    def to_sample(self, row: dict[str, Any], position: int) -> Sample:
        # `question_id` names the image (e.g. "code_reasoning/0020.png"), shared by its two questions.
        return Sample(
            id=f"{row['question_id']}#{position}",
            image=row["image"],
            question=row["question"].strip().replace(INSTRUCTION, ""),
            answers=(row["answer"].strip().lower(),),
            group=row["category"],
            extra={"image_id": row["question_id"]},
        )

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, float]:
        values = self.correctness(samples, predictions)
        by_image: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for sample, value in zip(samples, values, strict=True):
            by_image[sample.group][sample.extra["image_id"]].append(value)
        metrics = {"accuracy": percent(values)}
        subtask_scores = {}
        for subtask, images in sorted(by_image.items()):
            acc = percent(value for image in images.values() for value in image)
            acc_plus = percent(float(all(image)) for image in images.values())
            metrics.update({f"acc/{subtask}": acc, f"acc+/{subtask}": acc_plus})
            subtask_scores[subtask] = acc + acc_plus
        metrics["perception"] = sum(subtask_scores.get(subtask, 0.0) for subtask in PERCEPTION)
        metrics["cognition"] = sum(subtask_scores.get(subtask, 0.0) for subtask in COGNITION)
        return metrics

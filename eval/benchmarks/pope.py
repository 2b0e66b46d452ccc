"""POPE (lmms-lab/POPE, test): object-hallucination yes/no questions on COCO, in adversarial, popular and random
splits (the `category` column).

Answers are read as the official POPE script reads them: "no" if the first sentence has the word "no", "No" or
"not", otherwise "yes". Metrics, overall and per split, are accuracy, precision, recall and F1 with "yes" as the
positive class, and the share of "yes" answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vtprune.eval.benchmarks.metrics import percent
from vtprune.eval.benchmarks.open_ended import OpenEnded
from vtprune.eval.samples import Sample

NEGATIONS = frozenset(("no", "No", "not"))


def says_yes(prediction: str) -> bool:
    """Whether a free-text answer counts as "yes" (anything without a negation in its first sentence does)."""
    first_sentence = prediction.strip().split(".")[0]
    return NEGATIONS.isdisjoint(first_sentence.replace(",", "").split(" "))


def yes_no_metrics(truths: Sequence[bool], predictions: Sequence[bool]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" positive) and yes ratio, in percent; 0 where undefined."""
    pairs = list(zip(truths, predictions, strict=True))
    true_positives = sum(truth and predicted for truth, predicted in pairs)
    predicted_yes = sum(predictions)
    actual_yes = sum(truths)
    precision = true_positives / predicted_yes if predicted_yes else 0.0
    recall = true_positives / actual_yes if actual_yes else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": percent(truth == predicted for truth, predicted in pairs),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": percent(predictions),
    }


class POPE(OpenEnded):
    name = "pope"
    splits = ("test",)
    hub_id = "lmms-lab/POPE"

    def to_sample(self, row: dict[str, Any], position: int) -> Sample:
        return Sample(
            id=f"{row['category']}/{row['question_id']}",
            image=row["image"],
            question=row["question"].strip(),
            answers=(row["answer"].strip().lower(),),
            group=row["category"],
        )

    def correct(self, sample: Sample, prediction: str) -> float:
        return float(says_yes(prediction) == (sample.answers[0] == "yes"))

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, float]:
        truths = [sample.answers[0] == "yes" for sample in samples]
        answers = [says_yes(prediction) for prediction in predictions]
        metrics = yes_no_metrics(truths, answers)
        for split in sorted({sample.group for sample in samples}):
            members = [i for i, sample in enumerate(samples) if sample.group == split]
            split_metrics = yes_no_metrics([truths[i] for i in members], [answers[i] for i in members])
            metrics.update({f"{metric}/{split}": value for metric, value in split_metrics.items()})
        return metrics

"""POPE (lmms-lab/POPE, test): object-hallucination yes/no questions on COCO, in adversarial, popular and random
splits (the `category` column).

lmms-eval counts an answer as "yes" or "no" only when it is exactly that word (lowercased, stripped); anything else
is wrong and neither a positive nor a negative prediction. "official" reads answers as LLaVA's `eval_pope.py` does:
"no" if the first sentence has the word "no", "No" or "not", otherwise "yes". Metrics, overall and per split, are
accuracy, precision, recall and F1 with "yes" as the positive class, and the yes ratio: of the predictions under
"official", of the ground truth under lmms-eval (which computes it so).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vtprune.eval.benchmarks.metrics import label_rules, percent
from vtprune.eval.benchmarks.open_ended import OpenEnded
from vtprune.eval.samples import Sample

NEGATIONS = frozenset(("no", "No", "not"))


def says_yes(prediction: str) -> bool:
    """Whether a free-text answer counts as "yes" for `eval_pope.py` (anything without a negation in its first
    sentence does)."""
    first_sentence = prediction.split(".")[0]
    return NEGATIONS.isdisjoint(first_sentence.replace(",", "").split(" "))


LABELS: dict[str, Callable[[str], str]] = {
    "lmms-eval": lambda prediction: prediction.lower(),
    "official": lambda prediction: "yes" if says_yes(prediction) else "no",
}
"""A stripped prediction's label ("yes", "no", or anything else: wrong either way) under each scoring."""


def yes_no_metrics(truths: Sequence[str], labels: Sequence[str], yes_ratio_of_truths: bool) -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" positive) and yes ratio, in percent; 0 where undefined. A label other
    than "yes" or "no" counts in none of the confusion cells."""
    pairs = list(zip(truths, labels, strict=True))
    true_positives = sum(truth == label == "yes" for truth, label in pairs)
    false_positives = sum(truth == "no" and label == "yes" for truth, label in pairs)
    false_negatives = sum(truth == "yes" and label == "no" for truth, label in pairs)
    precision = true_positives / (true_positives + false_positives) if true_positives + false_positives else 0.0
    recall = true_positives / (true_positives + false_negatives) if true_positives + false_negatives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": percent(truth == label for truth, label in pairs),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": percent(value == "yes" for value in (truths if yes_ratio_of_truths else labels)),
    }


class POPE(OpenEnded):
    name = "pope"
    splits = ("test",)
    hub_id = "lmms-lab/POPE"
    max_new_tokens = 128
    rules = label_rules(LABELS)

    def to_sample(self, row: dict[str, Any], position: int) -> Sample:
        return Sample(
            id=f"{row['category']}/{row['question_id']}",
            image=row["image"],
            question=row["question"].strip(),
            answers=(row["answer"].strip().lower(),),
            group=row["category"],
        )

    def score(self, samples: list[Sample], predictions: list[str]) -> dict[str, float]:
        truths = [sample.answers[0] for sample in samples]
        labels = [LABELS[self.scoring](prediction.strip()) for prediction in predictions]
        of_truths = self.scoring == "lmms-eval"
        metrics = yes_no_metrics(truths, labels, of_truths)
        for split in sorted({sample.group for sample in samples}):
            members = [i for i, sample in enumerate(samples) if sample.group == split]
            split_metrics = yes_no_metrics([truths[i] for i in members], [labels[i] for i in members], of_truths)
            metrics.update({f"{metric}/{split}": value for metric, value in split_metrics.items()})
        return metrics

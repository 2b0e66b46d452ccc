"""Aggregating per-sample scores into percent metrics."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

from vtprune.eval.samples import Rule, Sample


def percent(values: Iterable[float]) -> float:
    """The mean of `values` in percent; 0 for no values."""
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else 0.0


def by_group(samples: Sequence[Sample], values: Sequence[float]) -> dict[str, list[float]]:
    """`values` split by their sample's group, groups sorted by name; ungrouped samples are left out."""
    groups: dict[str, list[float]] = defaultdict(list)
    for sample, value in zip(samples, values, strict=True):
        if sample.group:
            groups[sample.group].append(value)
    return dict(sorted(groups.items()))


def accuracy_by_group(samples: Sequence[Sample], values: Sequence[float]) -> dict[str, float]:
    """ "accuracy" over all samples, and "accuracy/<group>" for each group."""
    metrics = {"accuracy": percent(values)}
    metrics.update({f"accuracy/{group}": percent(scores) for group, scores in by_group(samples, values).items()})
    return metrics


def label_rules(labels: Mapping[str, Callable[[str], str]]) -> dict[str, Rule]:
    """Per scoring, the rule "1 if the prediction's label (by that scoring's reader) is the answer, else 0"."""
    return {
        scoring: lambda sample, prediction, label=label: float(label(prediction) == sample.answers[0])
        for scoring, label in labels.items()
    }

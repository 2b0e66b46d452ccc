"""`vtprune eval`'s default scoring gives every comparison case (`comparisons.py`) the score lmms-eval's own task
code gives it, and its aggregates (POPE's, MMBench's circular accuracy) are lmms-eval's."""

from __future__ import annotations

import random

import pytest
from comparisons import CASES, mmbench_evaluator, pope, predictions
from vtprune.eval.benchmarks import benchmark
from vtprune.eval.samples import Sample


@pytest.mark.parametrize("name", list(CASES))
def test_every_case_scores_as_lmms_eval(name):
    bench = benchmark(name)
    disagreeing = [(p, theirs) for s, p, theirs in CASES[name]() if bench.correct(s, p) != pytest.approx(theirs)]
    assert not disagreeing, disagreeing[:10]


def test_official_scoring_disagrees_where_the_scripts_do():
    # the comparison cases hold answers the benchmarks' own scripts read differently: the test above can fail
    for name in ("pope", "mme", "gqa", "vqav2", "scienceqa"):
        bench = benchmark(name, "official")
        assert any(bench.correct(s, p) != pytest.approx(theirs) for s, p, theirs in CASES[name]()), name


def test_pope_aggregates_as_lmms_eval():
    cases = predictions("yes_no", 2)
    rng = random.Random(3)
    truths = [rng.choice(["yes", "no"]) for _ in cases]
    samples = [Sample(id=str(i), image=None, question="q", answers=(t,), group="random") for i, t in enumerate(truths)]
    ours = benchmark("pope").score(samples, cases)
    results = [
        pope.pope_process_results({"question_id": str(i), "answer": t}, [p.strip()])["pope_accuracy"]
        for i, (t, p) in enumerate(zip(truths, cases, strict=True))
    ]
    theirs = {
        "accuracy": pope.pope_aggregate_accuracy(results),
        "precision": pope.pope_aggregate_precision(results),
        "recall": pope.pope_aggregate_recall(results),
        "f1": pope.pope_aggregate_f1_score(results),
        "yes_ratio": pope.pope_aggregate_yes_ratio(results),
    }
    assert {metric: ours[metric] / 100 for metric in theirs} == pytest.approx(theirs)


def test_mmbench_circular_accuracy_as_lmms_eval():
    cells = {"A": "cat", "B": "dog", "C": "bird", "D": "nan"}
    rng = random.Random(10)
    rows, samples, answers = [], [], []
    for question in range(40):
        for shift in range(3):
            if question % 7 == 0 and shift == 0:
                continue  # only rotated copies of this question: lmms-eval does not count it
            index = question + shift * 1_000_000
            truth = rng.choice("ABC")
            prediction = rng.choice(["A", "B", "C", "dog", "The answer is C", "bird"])
            rows.append(
                {"index": index, "question": "q", "answer": truth, "prediction": prediction, "hint": "nan"}
                | {"source": "s", "split": "dev", "category": "animals", "L2-category": "l2", **cells}
            )
            extra = {"index": index, "circular_group": question, "options": cells}
            samples.append(Sample(id=str(index), image=None, question="q", answers=(truth,), extra=extra))
            answers.append(prediction)
    overall, _, _ = mmbench_evaluator.eval_result(rows, eval_method="static")
    assert benchmark("mmbench").score(samples, answers)["accuracy"] == pytest.approx(100 * overall)

"""Every scoring rule of `vtprune eval`, in both scorings, on hand-worked cases: lmms-eval's task code ("lmms-eval",
the default) and the benchmarks' own scripts ("official"), including the cases where the two disagree."""

from __future__ import annotations

import pytest
from vtprune.eval.benchmarks import benchmark
from vtprune.eval.benchmarks.choices import extract_letter, infer_option, read_choice
from vtprune.eval.samples import SCORINGS, Sample

LMMS, OFFICIAL = SCORINGS


def scored(name: str, scoring: str, prediction: str, answers: tuple[str, ...], **fields) -> float:
    sample = Sample(id="0", image=None, question="q", answers=answers, **fields)
    return benchmark(name, scoring).correct(sample, prediction)


def test_an_unknown_scoring_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="lmms-eval, official"):
        benchmark("pope", "vqa")


@pytest.mark.parametrize(
    ("prediction", "truth", "lmms", "official"),
    [
        ("yes", "yes", 1, 1),
        ("  Yes ", "yes", 1, 1),
        ("No", "no", 1, 1),
        ("NO", "no", 1, 0),  # eval_pope looks for "no", "No" or "not" as words: "NO" reads as yes
        ("No!", "no", 0, 0),  # lmms-eval: not exactly "no"; eval_pope: "No!" is no negation word
        ("Nope", "no", 0, 0),
        ("N", "yes", 0, 1),  # eval_pope reads anything without a negation as yes
        ("Yes.", "yes", 0, 1),
        ("No, there is no dog.", "no", 0, 1),
        ("Yes. There are no cats.", "yes", 0, 1),  # eval_pope reads the first sentence only
        ("There is not a dog in the image.", "no", 0, 1),
        ("I cannot tell", "yes", 0, 1),
    ],
)
def test_pope_answers(prediction, truth, lmms, official):
    assert scored("pope", LMMS, prediction, (truth,)) == lmms
    assert scored("pope", OFFICIAL, prediction, (truth,)) == official


def test_pope_metrics_as_lmms_eval_aggregates_them():
    # truths Y Y Y N N; answers "yes", "Yes.", "no", "yes", "no" -> labels yes, "yes." (neither), no, yes, no
    truths = ["yes", "yes", "yes", "no", "no"]
    predictions = ["yes", "Yes.", "no", "yes", "no"]
    samples = [Sample(id=str(i), image=None, question="q", answers=(t,), group="random") for i, t in enumerate(truths)]

    metrics = benchmark("pope").score(samples, predictions)
    # TP 1, FP 1, FN 1 ("Yes." is neither a positive nor a negative); accuracy 2/5; yes ratio of the truths 3/5
    assert metrics["accuracy"] == pytest.approx(40.0)
    assert metrics["precision"] == pytest.approx(50.0)
    assert metrics["recall"] == pytest.approx(50.0)
    assert metrics["f1"] == pytest.approx(50.0)
    assert metrics["yes_ratio"] == pytest.approx(60.0)
    official = benchmark("pope", OFFICIAL).score(samples, predictions)
    # eval_pope: "Yes." is yes -> TP 2, FP 1, FN 1, TN 1; yes ratio of the predictions 3/5
    assert official["accuracy"] == pytest.approx(60.0)
    assert official["precision"] == pytest.approx(200 / 3)
    assert official["recall"] == pytest.approx(200 / 3)
    assert official["yes_ratio"] == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("prediction", "truth", "lmms", "official"),
    [
        ("Yes", "yes", 1, 1),
        ("No.", "no", 1, 1),
        ("yes, it is", "yes", 1, 1),
        ("y", "yes", 1, 0),  # MME's calculation.py reads a lone letter as "other"
        ("N", "no", 1, 0),
        (" no", "no", 1, 1),  # calculation.py finds "no" within the first four characters
        ("Not sure", "no", 1, 1),  # both find "no" in "not "
        ("maybe", "yes", 0, 0),
        ("The answer is yes", "yes", 0, 0),  # neither looks past the first four characters
    ],
)
def test_mme_answers(prediction, truth, lmms, official):
    assert scored("mme", LMMS, prediction, (truth,)) == lmms
    assert scored("mme", OFFICIAL, prediction, (truth,)) == official


@pytest.mark.parametrize(
    ("prediction", "truth", "lmms", "official"),
    [
        ("left", "left", 1, 1),
        ("Left.", "left", 1, 1),
        ("T-shirt!", "t-shirt", 1, 0),  # lmms-eval drops every punctuation mark; LLaVA only trailing periods
        ("tshirt", "t-shirt", 1, 0),
        ("left  side", "left side", 0, 0),  # neither collapses spaces
        ("the left", "left", 0, 0),
    ],
)
def test_gqa_answers(prediction, truth, lmms, official):
    assert scored("gqa", LMMS, prediction, (truth,)) == lmms
    assert scored("gqa", OFFICIAL, prediction, (truth,)) == official


@pytest.mark.parametrize(
    ("prediction", "answers", "lmms", "official"),
    [
        ("red,white", ("red white",) * 10, 1, 0),  # the tokenize step deletes the comma: "redwhite"
        ("hows", ("how's",) * 10, 1, 0),  # tokenize splits the answer's "'s" off: "how 's"
        ("Two", ("2",) * 10, 1, 1),
        ("a dog", ("dog",) * 3 + ("cat",) * 7, 0.9, 0.9),
        ("yes?", ("yes",) * 10, 1, 1),
    ],
)
def test_vqav2_answers(prediction, answers, lmms, official):
    assert scored("vqav2", LMMS, prediction, answers) == pytest.approx(lmms)
    assert scored("vqav2", OFFICIAL, prediction, answers) == pytest.approx(official)


@pytest.mark.parametrize(
    ("prediction", "answers", "accuracy"),
    [
        ("." * 10 + "stop", ("stop",) * 10, 1.0),
        # The EvalAI processor passes re.UNICODE (32) as the count of its period-stripping re.sub: 8 periods stay.
        ("." * 40 + "stop", ("stop",) * 10, 0.0),
        ("Coca-Cola", ("coca cola",) * 2 + ("coke",) * 8, 2 / 3 * 0.8 + 1 / 3 * 0.2),
    ],
)
def test_textvqa_answers_score_alike_in_both_scorings(prediction, answers, accuracy):
    for scoring in SCORINGS:
        assert scored("textvqa", scoring, prediction, answers) == pytest.approx(accuracy)


@pytest.mark.parametrize(
    ("prediction", "lmms", "official"),
    [
        ("B", 1, 1),
        ("b", 1, 0),  # lmms-eval lowercases; eval_science_qa.py does not
        ("B.", 1, 0),  # lmms-eval: a capital and a period; LLaVA wants a period and a space
        ("B. whale", 1, 1),
        (" B", 1, 1),  # both pipelines strip answers before scoring them
        ("(B)", 0, 0),
        ("The answer is B.", 0, 1),
        ("The answer is B", 0, 0),  # LLaVA's pattern wants one more character after the letter
        ("The answer is B. The answer is B.", 0, 0),  # ... exactly once
        ("Answer: B", 0, 0),
        ("whale", 0, 0),
        ("A", 0, 0),
    ],
)
def test_scienceqa_answers(prediction, lmms, official):
    fields = {"choices": ("frog", "whale")}
    assert scored("scienceqa", LMMS, prediction, ("B",), **fields) == lmms
    assert scored("scienceqa", OFFICIAL, prediction, ("B",), **fields) == official


def test_scienceqa_official_refuses_a_letter_beyond_the_options():
    assert scored("scienceqa", OFFICIAL, "C", ("C",), choices=("frog", "whale")) == 0


ANIMALS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("A", "A"),
        ("B.", "B"),
        ("(C)", "C"),
        ("D)", "D"),
        ("A. cat", "A"),
        ("The answer is B.", "B"),
        ("Answer: (C)", "C"),
        ("dog", "B"),
        ("A dog.", "A"),  # a lone "A" in a short answer is read as the letter
        ("A dog runs fast", "B"),  # ... but not in an answer of more than three words: the text decides
        ("I think it is B", "B"),
        ("B or C", "B"),  # two letters: the one that starts the answer wins
        ("**B**", "B"),  # found only by extract_mcq_answer's last resort
        ("It is a bird.", "C"),
        ("cat or dog", ""),  # two options named, no letter written
        ("I don't know", ""),
        ("E", "E"),  # can_infer_option reads A-E whatever the options
    ],
)
def test_mmbench_reads_letters_as_lmms_eval(prediction, letter):
    assert read_choice(prediction, ANIMALS) == letter


def test_mmbench_reads_missing_options_stored_as_text_as_options():
    # The hub writes missing options as the string "nan": lmms-eval matches answer text against it too.
    options = {"A": "cat", "B": "dog", "C": "nan"}
    assert read_choice("a banana", options) == "C"
    assert infer_option("a b c d") is None
    assert extract_letter("none of them") == ""


def test_mmbench_scores_the_same_in_both_scorings():
    sample = Sample(id="0", image=None, question="q", answers=("B",), extra={"options": ANIMALS})
    assert [benchmark("mmbench", scoring).correct(sample, "A dog.") for scoring in SCORINGS] == [0.0, 0.0]
    assert [benchmark("mmbench", scoring).correct(sample, "**B**") for scoring in SCORINGS] == [1.0, 1.0]


def test_mmbench_ignores_rotated_copies_of_a_question_not_loaded():
    def row(index: int, answer: str) -> Sample:
        extra = {"index": index, "circular_group": index % 1_000_000, "options": ANIMALS}
        return Sample(id=str(index), image=None, question="q", answers=(answer,), group="animals", extra=extra)

    samples = [row(0, "A"), row(1_000_000, "D"), row(1_000_001, "B")]  # question 1 only through a copy
    assert benchmark("mmbench").score(samples, ["A", "D", "B"]) == {
        "accuracy": 100.0,
        "accuracy/animals": 100.0,
        "single_pass": 100.0,
    }

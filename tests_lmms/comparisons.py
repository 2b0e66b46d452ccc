"""The comparison cases: per benchmark, (sample, prediction, the score lmms-eval's own task code gives it). The
hand-made cases of `tests/test_scoring.py` (those where lmms-eval and the benchmarks' scripts disagree included)
and seeded random answers built from the pieces that trip scorers up.

    python tests_lmms/comparisons.py    # per benchmark: how many cases each vtprune scoring scores as lmms-eval
"""

from __future__ import annotations

import copy
import random
import string
from collections.abc import Iterator

from lmms_eval.api.metrics import exact_match_hf_evaluate
from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer
from lmms_eval.tasks.mmbench.en_utils import mmbench_evaluator
from lmms_eval.tasks.mme import utils as mme
from lmms_eval.tasks.pope import utils as pope
from lmms_eval.tasks.scienceqa import utils as scienceqa
from lmms_eval.tasks.textvqa import utils as textvqa
from lmms_eval.tasks.vqav2 import utils as vqav2
from vtprune.eval.samples import Sample

RANDOM_CASES = 300
HAND = {
    "yes_no": "yes| Yes |No|NO|No!|Nope|N|n|y|Yes.|No, there is no dog.|maybe|Yes. There are no cats.|"
    "There is not a dog.|Not sure|none|The answer is yes|",
    "short": "left|Left.|T-shirt!|tshirt|left  side|the left|  red |red,white|hows|Two|a dog|yes?|"
    + "." * 10
    + "stop|"
    + "." * 40
    + "stop|Coca-Cola|3.5|1,000|it's",
    "letters": "B|b|B.|B. whale| B|(B)|The answer is B.|The answer is B|Answer: B|whale|A|C|A dog.|A dog runs fast|"
    "I think it is B|B or C|**B**|It is a bird.|cat or dog|I don't know|E|a banana|B)|:B|b.",
}
PIECES = {
    "yes_no": ["yes", "Yes", "YES", "no", "No", "NO", "not", "n", "y", "nope", "there", "is", "a", "dog", ".", ","]
    + ["!", " ", "  ", "\n", "maybe"],
    "short": ["red", "white", "left", "side", "t-shirt", "T", "-", "shirt", "a", "the", "two", "2", "3.5", "1,000"]
    + [",", ".", "'s", "how", "dont", "?", "!", "/", "(", ")", " ", "  ", "\t", "..."],
    "letters": ["A", "B", "C", "D", "E", "a", "b", "(", ")", ".", ":", " ", "The answer is", "answer", "option"]
    + ["cat", "dog", "bird", "fish", "nan", "is", "I choose", "**"],
}
VQA_ANSWERS = [
    ("red white",) * 10,
    ("how's",) * 10,
    ("2",) * 6 + ("two",) * 4,
    ("dog",) * 3 + ("cat",) * 7,
    ("stop",) * 10,
    ("coca cola",) * 2 + ("coke",) * 8,
    ("left side",) * 9 + ("left",),
    ("t-shirt",) * 10,
]
MMBENCH_CELLS = [{"A": "cat", "B": "dog", "C": "bird", "D": "fish"}, {"A": "cat", "B": "dog", "C": "nan", "D": None}]
Case = tuple[Sample, str, float]


def predictions(kind: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    made = [
        "".join(rng.choice(PIECES[kind]) + rng.choice(["", " "]) for _ in range(rng.randint(1, 5)))
        for _ in range(RANDOM_CASES)
    ]
    return HAND[kind].split("|") + made


def sample(answers, **fields) -> Sample:
    return Sample(id="0", image=None, question="q", answers=tuple(answers), **fields)


# Each: lmms-eval's evaluator strips every answer before the task's process_results sees it.


def pope_cases() -> Iterator[Case]:
    for truth in ("yes", "no"):
        for p in predictions("yes_no", 1):
            result = pope.pope_process_results({"question_id": "1", "answer": truth}, [p.strip()])
            yield sample([truth]), p, result["pope_accuracy"]["score"]


def mme_cases() -> Iterator[Case]:
    for truth in ("Yes", "No"):
        doc = {"question_id": "existence/1.png", "answer": truth, "category": "existence"}
        for p in predictions("yes_no", 4):
            yield sample([truth.lower()]), p, mme.mme_process_results(doc, [p.strip()])["mme_perception_score"]["score"]


def gqa_cases() -> Iterator[Case]:
    for truth in ("left", "t-shirt", "left side", "yes"):
        for p in predictions("short", 5):
            scored = exact_match_hf_evaluate([p.strip()], [truth], ignore_case=True, ignore_punctuation=True)
            yield sample([truth]), p, float(scored["exact_match"])


def textvqa_cases() -> Iterator[Case]:
    for answers in VQA_ANSWERS:
        for p in predictions("short", 6):
            doc = {"question_id": 1, "answers": list(answers)}
            yield sample(answers), p, textvqa.textvqa_process_results(doc, [p.strip()])["exact_match"]


def vqav2_cases() -> Iterator[Case]:
    for answers in VQA_ANSWERS:
        doc = {"question_id": 1, "answers": [{"answer": a, "answer_id": i} for i, a in enumerate(answers)]}
        for p in predictions("short", 7):
            yield sample(answers), p, vqav2.vqav2_process_results(copy.deepcopy(doc), [p.strip()])["exact_match"]


def scienceqa_cases() -> Iterator[Case]:
    for answer, choices in ((1, ("frog", "whale")), (2, ("cat", "dog", "bird", "fish"))):
        doc = {"answer": answer, "choices": list(choices)}
        for p in predictions("letters", 8):
            truth = string.ascii_uppercase[answer]
            yield sample([truth], choices=choices), p, scienceqa.sqa_process_results(doc, [p.strip()])["exact_match"]


def mmbench_read(prediction: str, cells: dict) -> str:
    """lmms-eval's eval_sub_data on one row: can_infer on the row's A-D options, then (static evaluation)
    extract_mcq_answer."""
    choices = mmbench_evaluator.build_choices({**cells, "prediction": prediction})
    return mmbench_evaluator.can_infer(prediction, dict(choices)) or extract_mcq_answer(prediction, sorted(choices))


def mmbench_cases() -> Iterator[Case]:
    for cells in MMBENCH_CELLS:
        options = {letter: text for letter, text in cells.items() if text is not None}
        for p in predictions("letters", 9):
            yield sample(["B"], extra={"options": options}), p, float(mmbench_read(p.strip(), cells) == "B")


CASES = {
    "pope": pope_cases,
    "mme": mme_cases,
    "gqa": gqa_cases,
    "textvqa": textvqa_cases,
    "vqav2": vqav2_cases,
    "scienceqa": scienceqa_cases,
    "mmbench": mmbench_cases,
}


if __name__ == "__main__":
    from vtprune.eval.benchmarks import benchmark
    from vtprune.eval.samples import SCORINGS

    print("| benchmark | cases | " + " | ".join(f"{scoring} scores as lmms-eval" for scoring in SCORINGS) + " |")
    print("|---|---|" + "---|" * len(SCORINGS))
    for name, cases in CASES.items():
        made = list(cases())
        agreeing = []
        for scoring in SCORINGS:
            bench = benchmark(name, scoring)
            agreeing.append(sum(abs(bench.correct(s, p) - theirs) < 1e-9 for s, p, theirs in made))
        print(f"| {name} | {len(made)} | " + " | ".join(str(count) for count in agreeing) + " |")

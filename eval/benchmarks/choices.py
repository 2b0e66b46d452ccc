"""Multiple choice: wording the options into a prompt, and reading the chosen letter back out of free text."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from vtprune.eval.benchmarks.loading import HubBenchmark
from vtprune.eval.samples import Sample

LETTERS = string.ascii_uppercase
INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTER_ANSWERS = (
    re.compile(r"^\(?([A-Z])\)?[.:)]?$"),  # "A", "A.", "(A)", "A)"
    re.compile(r"^\(?([A-Z])[.):]\s"),  # "A. a cat", "(A) a cat"
    re.compile(r"(?i:\b(?:answer|option)(?:\s+is)?\s*:?\s*)\(?([A-Z])\b"),  # "The answer is A", "Answer: (A)"
)


def multiple_choice_prompt(stem: str, choices: Sequence[str], lead_in: str = "\n") -> str:
    """`stem` (context and question), `lead_in`, the options as "A. ..." lines, then the answer instruction."""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=False))
    return f"{stem}{lead_in}{options}\n{INSTRUCTION}"


def parse_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The letter a free-text answer picks: a letter on its own or marked as the answer, else the one option whose
    text the answer is or contains; None when it picks none or several."""
    letters = LETTERS[: len(choices)]
    text = prediction.strip()
    for pattern in LETTER_ANSWERS:
        match = pattern.search(text)
        if match and match.group(1) in letters:
            return match.group(1)
    lowered = text.lower().rstrip(".")
    options = [choice.strip().lower() for choice in choices]
    if lowered in options:
        return letters[options.index(lowered)]
    contained = [letter for letter, option in zip(letters, options, strict=True) if option and option in lowered]
    return contained[0] if len(contained) == 1 else None


class MultipleChoice(HubBenchmark):
    """A benchmark whose samples have `choices` and the right letter as their one answer."""

    def correct(self, sample: Sample, prediction: str) -> float:
        return float(parse_choice(prediction, sample.choices) == sample.answers[0])

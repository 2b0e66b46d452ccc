"""Multiple choice: wording the options into a prompt, and reading the chosen letter back out of free text as
lmms-eval's MMBench evaluator does (its `can_infer` heuristics, then its `extract_mcq_answer`)."""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

LETTERS = string.ascii_uppercase
INSTRUCTION = "Answer with the option's letter from the given choices directly."
INFERABLE = "ABCDE"
"""The letters `can_infer_option` looks for, whatever the number of options."""
MARKS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","))
MARKS += ((":", "."), (":", ")"), (":", ")."))
"""(prefix, suffix) around a letter standing as a word ("A.", "(A)", ":A" ...), in the order they are tried."""
EXTRACTABLE = "ABCDEFGH"
"""The letters `extract_mcq_answer` looks for when it is given no options."""
PHRASES = (
    "the answer is|answer is|the correct answer is|correct answer is|the best answer is|best answer is|"
    "the correct option is|correct option is|the best option is|best option is|the choice is|choice is|"
    "the correct choice is|correct choice is|i choose|i select|i pick|my answer is|my choice is|"
    "옵션|정답은|답은|답:|答案是|答案为|选|答えは"
).split("|")
"""Phrases after which the first occurrence of each letter is a candidate answer."""
FORMATS = (("parentheses", "({})", 6), ("period", "{}.", 5), ("colon", "{}:", 4), ("right_paren", "{})", 3))
FORMATS += (("space", "{} ", 2),)
"""(name, how the letter is written, priority): a letter written so anywhere is a candidate, at its last place."""
PRIORITY = {"start": 10, "end": 9, "phrase": 7, "fallback": 0} | {name: rank for name, _, rank in FORMATS}


def option_lines(choices: Sequence[str]) -> str:
    """The options as "A. ..." lines."""
    return "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=False))


def multiple_choice_prompt(stem: str, choices: Sequence[str]) -> str:
    """`stem` (context and question), the options as "A. ..." lines, then the answer instruction."""
    return f"{stem}\n{option_lines(choices)}\n{INSTRUCTION}"


def infer_option(answer: str) -> str | None:
    """The one letter of A-E the answer has as a word, bare or marked ("B", "B.", "(B)"); None if none or several
    (or a bare "A" in an answer of more than three words, where it may be the article)."""
    words = [word.strip() for word in answer.split()]

    def marked(prefix: str, suffix: str) -> list[str]:
        return [letter for letter in INFERABLE if prefix + letter + suffix in words]

    bare = marked("", "")
    if len(bare) == 1 and not ("A" in words and len(words) > 3):
        return bare[0]
    for prefix, suffix in MARKS:
        found = marked(prefix, suffix)
        if len(found) == 1:
            return found[0]
    return None


def infer_text(answer: str, options: Mapping[str, str]) -> str | None:
    """The letter of the one option whose text the lowercased answer contains; None if none or several."""
    lowered = answer.lower()
    found = [letter for letter, text in options.items() if str(text).lower() in lowered]
    return found[0] if len(found) == 1 else None


def extract_letter(response: str, letters: Sequence[str] = ()) -> str:
    """The letter the response most likely means, by the priority of how it is written (first, last, after an
    answer phrase, "(B)", "B.", "B:", "B)", "B "), later places winning ties; "" when no letter appears."""
    if not response.strip():
        return ""
    letters = tuple(letters) or tuple(EXTRACTABLE)
    text = response.strip()
    for mark in ",.!?;:'\"":
        text = text.strip(mark)
    text = f" {text} "
    candidates = []
    for name, written, _ in FORMATS:
        candidates += [(letter, text.rfind(written.format(letter)), name) for letter in letters]
    candidates = [candidate for candidate in candidates if candidate[1] != -1]
    lowered = text.lower()
    for phrase in PHRASES:
        start = lowered.find(phrase)
        if start != -1:
            after = start + len(phrase)
            candidates += [(letter, text.find(letter, after), "phrase") for letter in letters]
            candidates = [candidate for candidate in candidates if candidate[1] != -1]
    stripped = text.strip()
    for letter in letters:
        if stripped.startswith(letter) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((letter, 0, "start"))
    for letter in letters:
        if stripped.endswith(letter) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((letter, len(text) - 1, "end"))
    if not candidates:
        candidates = [(letter, text.rfind(letter), "fallback") for letter in letters if letter in text]
    if not candidates:
        return ""
    return max(candidates, key=lambda candidate: (PRIORITY[candidate[2]], candidate[1]))[0]


def read_choice(prediction: str, options: Mapping[str, str]) -> str:
    """The letter lmms-eval's static MMBench evaluation reads from a prediction: `infer_option`, else `infer_text`,
    else `extract_letter` over the options' letters; "" when none reads one."""
    return infer_option(prediction) or infer_text(prediction, options) or extract_letter(prediction, sorted(options))

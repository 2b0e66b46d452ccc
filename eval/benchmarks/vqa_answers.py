"""VQA answer normalisation and accuracy (VQAv2, TextVQA), as the EvalAI answer processor that LLaVA's m4c
evaluator and lmms-eval share computes them.

A prediction scores `min(1, matches / 3)` against each 9-answer subset left when one of the 10 human answers is
held out, averaged over the 10 subsets: 3 matching humans give 0.9, 4 or more give 1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# The VQA API's contraction table, keyed as it matches after lowercasing (its capitalised keys never match).
CONTRACTIONS = dict(
    pair.split(":")
    for pair in """
    aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
    couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
    hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd
    howll:how'll hows:how's isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am
    mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
    neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at
    shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't
    shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
    somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd
    someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's
    somethingd:something'd somethingd've:something'd've something'dve:something'd've somethingll:something'll
    thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're theres:there's
    theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
    wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're
    whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd
    whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're whys:why's
    wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all
    yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd
    youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've
    """.split()
)
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset(("a", "an", "the"))
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
# The API writes this as "(?!<=\d)(\.)(?!\d)", whose first lookahead always holds: a period not followed by a digit.
PERIOD = re.compile(r"\.(?!\d)")
PERIODS_STRIPPED = 32
"""The processor passes `re.UNICODE` (32) where `re.sub` takes its count, so only the first 32 such periods go."""


def strip_punctuation(text: str) -> str:
    """Punctuation removed where it touches a space (or anywhere, in a text with a digit-separating comma), spaced
    out elsewhere ("black/white" -> "black white"); periods dropped except before digits ("3.5" stays)."""
    # As in the API, whether a mark touches a space is judged on the original text, for all its occurrences at once.
    glue = DIGIT_COMMA.search(text) is not None
    stripped = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        stripped = stripped.replace(mark, "" if touches_space or glue else " ")
    return PERIOD.sub("", stripped, count=PERIODS_STRIPPED)


def normalize_answer(text: str, tokenize: bool = True) -> str:
    """An answer as EvalAI compares it: (with `tokenize`, the processor's first step: lowercased, "," and "?"
    deleted, "'s" split off) punctuation handled, number words as digits, articles dropped, contractions restored
    ("dont" -> "don't")."""
    if tokenize:
        text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str], tokenize: bool = True) -> float:
    """The VQA accuracy of `prediction` against the human `answers` (usually 10), in [0, 1], both normalised alike."""
    if not answers:
        return 0.0
    predicted = normalize_answer(prediction, tokenize)
    matches = [normalize_answer(answer, tokenize) == predicted for answer in answers]
    total = sum(matches)
    return sum(min(1.0, (total - held_out) / 3) for held_out in matches) / len(matches)

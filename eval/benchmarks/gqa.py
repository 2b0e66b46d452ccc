"""GQA (lmms-lab/GQA, testdev balanced): exact match, broken down by structural question type. lmms-eval compares
both sides lowercased with every punctuation mark removed (spaces kept as they are); "official" is LLaVA's
`convert_gqa_for_eval.py` (the prediction lowercased without trailing periods) and GQA's `eval.py` (equal to the
answer as given).

Questions and images are separate hub configs, joined on the image id; locally each is a subdirectory of `data_dir`
named after its config.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from vtprune.eval.benchmarks.loading import read_rows
from vtprune.eval.benchmarks.open_ended import OpenEnded
from vtprune.eval.samples import Sample

QUESTIONS_CONFIG = "testdev_balanced_instructions"
IMAGES_CONFIG = "testdev_balanced_images"
PUNCTUATION = str.maketrans("", "", string.punctuation)


def without_case_and_punctuation(text: str) -> str:
    """Lowercased, every punctuation mark removed (lmms-eval's `exact_match` with ignore_case and
    ignore_punctuation)."""
    return text.lower().translate(PUNCTUATION)


class GQA(OpenEnded):
    name = "gqa"
    splits = ("testdev",)
    hub_id = "lmms-lab/GQA"
    config = QUESTIONS_CONFIG
    rules = {
        "lmms-eval": lambda sample, prediction: float(
            without_case_and_punctuation(prediction) == without_case_and_punctuation(sample.answers[0])
        ),
        "official": lambda sample, prediction: float(prediction.rstrip(".").lower() == sample.answers[0]),
    }

    def load(self, split: str | None = None, data_dir: str | None = None, limit: int | None = None) -> list[Sample]:
        split = self.checked_split(split)
        questions = read_rows(self.hub_id, QUESTIONS_CONFIG, split, config_dir(data_dir, QUESTIONS_CONFIG), limit)
        wanted = {row["imageId"] for row in questions}
        images = {
            row["id"]: row["image"]
            for row in read_rows(self.hub_id, IMAGES_CONFIG, split, config_dir(data_dir, IMAGES_CONFIG), None)
            if row["id"] in wanted
        }
        return [
            self.to_sample({**row, "image": images[row["imageId"]]}, position) for position, row in enumerate(questions)
        ]

    def to_sample(self, row: dict[str, Any], position: int) -> Sample:
        return Sample(
            id=str(row["id"]),
            image=row["image"],
            question=row["question"],
            answers=(row["answer"],),
            group=(row.get("types") or {}).get("structural", ""),
            extra={"image_id": row["imageId"]},
        )


def config_dir(data_dir: str | None, config: str) -> Path | None:
    """Where a hub config's files lie under `data_dir`; None (read from the hub) without one."""
    return None if data_dir is None else Path(data_dir) / config

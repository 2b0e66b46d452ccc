"""Open questions answered with a single word or phrase (VQAv2, TextVQA, GQA; POPE words its prompt the same way)."""

from __future__ import annotations

from vtprune.eval.benchmarks.loading import HubBenchmark
from vtprune.eval.samples import Sample

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


class OpenEnded(HubBenchmark):
    """Prompts with the question and the short-answer instruction."""

    def prompt(self, sample: Sample) -> str:
        return f"{sample.question}{SHORT_ANSWER}"

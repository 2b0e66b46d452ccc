"""Benchmarks by name: each resolved lazily, so a benchmark's dependencies load only when it is asked for.

bench = benchmark("pope")
samples = bench.load(limit=100)
metrics = bench.score(samples, [generate(bench.prompt(s), s.image) for s in samples])
bench = benchmark("pope", scoring="official")     # LLaVA's eval_pope.py reading answers
"""

from __future__ import annotations

import importlib

from vtprune.eval.samples import SCORINGS, Benchmark

BENCHMARKS: dict[str, str] = {
    "vqav2": "vtprune.eval.benchmarks.vqav2:VQAv2",
    "textvqa": "vtprune.eval.benchmarks.textvqa:TextVQA",
    "gqa": "vtprune.eval.benchmarks.gqa:GQA",
    "pope": "vtprune.eval.benchmarks.pope:POPE",
    "mme": "vtprune.eval.benchmarks.mme:MME",
    "scienceqa": "vtprune.eval.benchmarks.scienceqa:ScienceQA",
    "mmbench": "vtprune.eval.benchmarks.mmbench:MMBench",
    "shapes": "vtprune.eval.shapes:Shapes",
}
"""Benchmark name -> "module:Class" of its `Benchmark` implementation."""


def names() -> list[str]:
    """The known benchmark names, in registry order."""
    return list(BENCHMARKS)


def benchmark(name: str, scoring: str = SCORINGS[0]) -> Benchmark:
    """A fresh instance of the benchmark called `name`, scoring by the rules of `scoring`."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(names())}")
    module_name, class_name = BENCHMARKS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)(scoring)

"""`vtprune lmms-task`: lmms-eval tasks that read a benchmark from local files instead of the hub.

    vtprune lmms-task pope --data-dir data/pope --out tasks/
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lmms-eval --model vtprune_llava_hf --model_args pretrained=...,keep=64 \\
        --include_path tasks/ --tasks pope_local

Each task includes lmms-eval's own yaml for the benchmark (prompts, generation, scoring: everything but the data)
and reads the parquet files under `--data-dir`, in the hub dataset's schema: the same directory
`vtprune eval --data-dir` reads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from vtprune.eval.lmms_conventions import TASKS

HUB_ONLY = {"gqa": "its process_docs loads the image config from the hub (lmms-lab-encoder/GQA); cache it first"}
"""Benchmarks whose lmms-eval task cannot read local files alone, and why."""


def task_yaml(benchmark: str) -> Path:
    """lmms-eval's installed yaml for a benchmark's task."""
    if benchmark not in TASKS:
        raise ValueError(f"no lmms-eval task for {benchmark!r}; tasks exist for {', '.join(TASKS)}")
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lmms-eval is not installed: see the README's lmms-eval section")
    return Path(spec.submodule_search_locations[0]) / "tasks" / TASKS[benchmark][0]


def write_local_task(benchmark: str, data_dir: str | Path, out: str | Path) -> str:
    """Write `<out>/<task>_local.yaml` reading the benchmark's parquet files under `data_dir`; returns the task's
    name."""
    if benchmark in HUB_ONLY:
        raise ValueError(f"{benchmark} cannot run offline in lmms-eval: {HUB_ONLY[benchmark]}")
    source = task_yaml(benchmark)
    files = sorted(str(path.resolve()) for path in Path(data_dir).rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no .parquet files under {data_dir}")
    name = f"{source.stem}_local"
    lines = {
        "include": str(source),
        "task": name,
        "dataset_path": "parquet",
        "dataset_kwargs": {"data_files": {TASKS[benchmark][1]: files}},
    }
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    # JSON is YAML: every value here is a plain string, list or mapping.
    (folder / f"{name}.yaml").write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in lines.items()))
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune lmms-task", description=__doc__.split("\n")[0])
    parser.add_argument("benchmark", choices=sorted(set(TASKS) - set(HUB_ONLY)), help="the benchmark")
    parser.add_argument("--data-dir", required=True, help="directory of the benchmark's parquet files (hub schema)")
    parser.add_argument("--out", required=True, help="directory to write the task yaml to (lmms-eval --include_path)")
    args = parser.parse_args(argv)
    print(write_local_task(args.benchmark, args.data_dir, args.out))
    return 0

"""The evaluation's summary: a markdown table per (benchmark, setting) and a plot of accuracy against kept tokens
(or, for the leaderboard, against time to first token)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vtprune.eval.samples import Benchmark, Sample

COLUMNS = (
    "benchmark",
    "policy",
    "keep",
    "samples",
    "accuracy",
    "% of unpruned",
    "visual tokens",
    "visual tokens / layer",
    "prefill TFLOPs",
    "selection (ms/image)",
    "first token (ms)",
    "decode tok/s",
    "peak memory (MB)",
    "KV cache (MB)",
)


def summarise(rows: list[dict[str, Any]], bench: Benchmark, samples: dict[str, Sample]) -> dict[str, Any]:
    """One setting's line: the benchmark's own score over its samples, and the cost averaged per sample (token
    counts, FLOPs, cache) or per batch (times, memory)."""
    scored = [(samples[row["id"]], row["prediction"]) for row in rows if row["id"] in samples]
    metrics = bench.score([s for s, _ in scored], [p for _, p in scored]) if scored else {}
    per_batch = {row["batch"]: row for row in rows}.values()
    decode = [row["decode_tokens_per_s"] for row in per_batch if row["decode_tokens_per_s"] is not None]
    return {
        "policy": rows[0]["policy"],
        "keep": rows[0]["keep"],
        "samples": len(rows),
        "accuracy": metrics.get("accuracy"),
        "metrics": metrics,
        "visual tokens": _mean(rows, "visual_after"),
        "visual tokens / layer": _mean(rows, "layer_visual_tokens"),
        "prefill TFLOPs": _mean(rows, "prefill_tflops"),
        "selection (ms/image)": _mean(rows, "selection_ms") if all("selection_ms" in row for row in rows) else None,
        "first token (ms)": 1000 * statistics.fmean(row["first_token_s"] for row in per_batch),
        "decode tok/s": statistics.fmean(decode) if decode else None,
        "peak memory (MB)": max(row["peak_memory_mb"] for row in rows),
        "KV cache (MB)": _mean(rows, "kv_cache_mb"),
    }


def _mean(rows: list[dict[str, Any]], name: str) -> float:
    return statistics.fmean(row[name] for row in rows)


def table(lines: list[dict[str, Any]]) -> str:
    """Markdown, one row per line; `% of unpruned` against the benchmark's unpruned line."""
    unpruned = {line["benchmark"]: line["accuracy"] for line in lines if line["keep"] is None}
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for line in lines:
        base = unpruned.get(line["benchmark"])
        relative = None if not base or line["accuracy"] is None else 100 * line["accuracy"] / base
        cells = {**line, "keep": "all" if line["keep"] is None else str(line["keep"]), "% of unpruned": relative}
        out.append("| " + " | ".join(_cell(cells[column]) for column in COLUMNS) + " |")
    return "\n".join(out) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.1f}"
    return str(value)


def plot(
    lines: list[dict[str, Any]], path: Path, x: str = "visual tokens", xlabel: str = "visual tokens kept per image"
) -> None:
    """Accuracy against `x` (a line's column), one line per policy and the unpruned model (a dashed line, and a
    star where `x` is not a token count), one panel per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    benchmarks = list(dict.fromkeys(line["benchmark"] for line in lines))
    figure, axes = pyplot.subplots(1, len(benchmarks), figsize=(6.5 * len(benchmarks), 4.5), squeeze=False)
    for axis, name in zip(axes[0], benchmarks, strict=True):
        mine = [line for line in lines if line["benchmark"] == name and line["accuracy"] is not None]
        colours = pyplot.get_cmap("tab20").colors  # the default cycle repeats after 10 policies
        for index, policy in enumerate(dict.fromkeys(line["policy"] for line in mine if line["keep"] is not None)):
            points = sorted((line[x], line["accuracy"]) for line in mine if line["policy"] == policy)
            axis.plot(*zip(*points, strict=True), marker="o", label=policy, color=colours[index % len(colours)])
        for line in mine:
            if line["keep"] is None:
                axis.axhline(line["accuracy"], color="black", linestyle="--", label="unpruned")
                if x != "visual tokens":
                    axis.plot(line[x], line["accuracy"], marker="*", markersize=12, color="black")
        axis.set(title=name, xlabel=xlabel, ylabel="accuracy (%)")
        axis.legend(fontsize="x-small", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def summary_lines(
    rows: Iterable[dict[str, Any]], loaded: dict[str, tuple[Benchmark, str, list[Sample]]]
) -> list[dict[str, Any]]:
    """One `summarise` line per (benchmark, setting) of the benchmarks in `loaded`: unpruned first, then by policy."""
    grouped: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["benchmark"], row["split"], row["setting"]), []).append(row)
    lines = []
    for name, (bench, split, samples) in loaded.items():
        by_id = {sample.id: sample for sample in samples}
        for (benchmark, row_split, _), members in grouped.items():
            if benchmark == name and row_split == split:
                lines.append({"benchmark": name, **summarise(members, bench, by_id)})
    lines.sort(key=lambda line: (line["benchmark"], line["keep"] is not None, line["policy"], str(line["keep"])))
    return lines


def write_report(
    rows: Iterable[dict[str, Any]], loaded: dict[str, tuple[Benchmark, str, list[Sample]]], out: Path
) -> str:
    """Write `table.md` and `accuracy_vs_tokens.png` into `out` for the benchmarks in `loaded`; return the table."""
    lines = summary_lines(rows, loaded)
    text = table(lines)
    (out / "table.md").write_text(text)
    plot(lines, out / "accuracy_vs_tokens.png")
    return text

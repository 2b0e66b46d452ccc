"""The leaderboard: every registered policy at the same budgets, on the same samples and engine, ranked.

    vtprune eval --leaderboard [--model ...] [--benchmarks ...] [--budgets 0.5 0.25 0.11]

Per benchmark, one row per policy, ranked by its accuracy averaged over the budgets (shown as a percentage of
the unpruned model's; ties: the lower mean time to first token first). Each row also gives the measured time to
first token at each budget (one batch's prefill: vision tower, scoring and selection, the decoder's forward),
the visual tokens per decoder layer at the last budget (what decoder-side cuts leave the early layers) and
the time vtprune spends scoring and selecting per image. The unpruned model heads the table; the controls
(`random`, `uniform`) are ranked with the rest and marked. A policy that does not fit the model is listed with
the reason, unranked. `accuracy_vs_prefill.png` plots accuracy against time to first token.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vtprune.eval.report import plot, summary_lines
from vtprune.eval.samples import Benchmark, Sample

import vtprune

BUDGETS = (0.5, 0.25, 0.11)
"""Half, a quarter and a ninth of each image's tokens: on LLaVA-1.5's 576, the papers' 288, 144 and 64."""


def keep_label(keep: float | int) -> str:
    return f"{100 * keep:g}%" if isinstance(keep, float) else f"{keep} tokens"


def ranked(lines: list[dict[str, Any]], budgets: list[float | int], refused: dict[str, str]) -> list[dict[str, Any]]:
    """One benchmark's summary lines folded into one entry per registered policy, best first; the entries of
    policies without a line at every budget come last, with why (`refused`, or 'not run')."""
    unpruned = next(line for line in lines if line["keep"] is None)
    entries = []
    for name in vtprune.policies():
        at = {line["keep"]: line for line in lines if line["policy"] == name and line["keep"] in budgets}
        entry = {"policy": name, "policy_object": vtprune.policy(name), "at": at}
        if len(at) == len(budgets):
            entry["accuracy"] = statistics.fmean(at[keep]["accuracy"] for keep in budgets)
            base = unpruned["accuracy"]
            entry["relative"] = 100 * entry["accuracy"] / base if base else None
            entry["first_token"] = statistics.fmean(at[keep]["first token (ms)"] for keep in budgets)
        else:
            entry["missing"] = refused.get(name, "not run at every budget")
        entries.append(entry)
    complete = sorted((e for e in entries if "missing" not in e), key=lambda e: (-e["accuracy"], e["first_token"]))
    return complete + [e for e in entries if "missing" in e]


def board(lines: list[dict[str, Any]], budgets: list[float | int], refused: dict[str, str]) -> str:
    """One benchmark's ranking as markdown."""
    unpruned = next(line for line in lines if line["keep"] is None)
    last = budgets[-1]
    kept = {keep: _common_tokens(lines, keep) for keep in budgets}
    header = ["rank", "policy", "stage"]
    header += [f"accuracy at {keep_label(keep)} ({kept[keep]} tokens)" for keep in budgets]
    header += ["mean % of unpruned"]
    header += [f"first token (ms) at {keep_label(keep)}" for keep in budgets]
    header += [f"visual tokens / layer at {keep_label(last)}", "selection (ms/image)"]
    blank = ["-"] * (len(budgets) - 1)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    share = "100.0" if unpruned["accuracy"] else "-"
    full = [_number(unpruned["accuracy"]), *blank, share, _number(unpruned["first token (ms)"]), *blank]
    out.append(_row(["-", f"none (unpruned, {round(unpruned['visual tokens'])} tokens)", "-", *full, "-", "-"]))
    rank = 0
    for entry in ranked(lines, budgets, refused):
        policy = entry["policy_object"]
        stage = policy.stage + (" (control)" if policy.control else "")
        if "missing" in entry:
            reason = entry["missing"].replace("|", "/").replace("\n", " ")
            out.append(_row(["-", entry["policy"], stage, f"refused: {reason}", *[""] * (len(header) - 4)]))
            continue
        rank += 1
        at = entry["at"]
        cells = [str(rank), entry["policy"], stage]
        cells += [_number(at[keep]["accuracy"]) for keep in budgets] + [_number(entry["relative"])]
        cells += [_number(at[keep]["first token (ms)"]) for keep in budgets]
        selection = [at[keep]["selection (ms/image)"] for keep in budgets]
        mean_selection = statistics.fmean(selection) if None not in selection else None
        cells += [_number(at[last]["visual tokens / layer"]), _number(mean_selection, digits=2)]
        out.append(_row(cells))
    return "\n".join(out) + "\n"


def _common_tokens(lines: list[dict[str, Any]], keep: float | int) -> int:
    counts = Counter(round(line["visual tokens"]) for line in lines if line["keep"] == keep)
    return counts.most_common(1)[0][0] if counts else 0


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def write(
    rows: Iterable[dict[str, Any]],
    loaded: dict[str, tuple[Benchmark, str, list[Sample]]],
    budgets: list[float | int],
    refused: dict[str, str],
    out: Path,
) -> str:
    """Write `leaderboard.md` (a ranking per benchmark in `loaded`) and `accuracy_vs_prefill.png` into `out`;
    return the markdown."""
    lines = [line for line in summary_lines(rows, loaded) if line["keep"] is None or line["keep"] in budgets]
    parts = []
    for name in loaded:
        mine = [line for line in lines if line["benchmark"] == name]
        parts.append(f"### {name}\n\n" + board(mine, budgets, refused))
    text = "\n".join(parts)
    (out / "leaderboard.md").write_text(text)
    plot(lines, out / "accuracy_vs_prefill.png", x="first token (ms)", xlabel="time to first token per batch (ms)")
    return text

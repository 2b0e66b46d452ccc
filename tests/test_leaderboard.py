"""The leaderboard's ranking on hand-made summary lines (`vtprune eval --leaderboard` end to end is in test_eval)."""

from vtprune.eval import leaderboard

import vtprune


def line(policy, keep, accuracy, first_token=10.0, selection=0.5):
    return {
        "benchmark": "pope",
        "policy": policy,
        "keep": keep,
        "accuracy": accuracy,
        "visual tokens": 64 if keep is None else 64 * keep,
        "visual tokens / layer": 64 if keep is None else 64 * keep,
        "first token (ms)": first_token,
        "selection (ms/image)": selection,
    }


def test_policies_rank_by_mean_share_of_the_unpruned_accuracy_ties_by_time(monkeypatch):
    monkeypatch.setattr(vtprune, "policies", lambda: {name: "" for name in ("fastv", "random", "uniform", "visionzip")})
    budgets = [0.5, 0.25]
    lines = [line("none", None, 80.0, first_token=30.0)]
    lines += [line("fastv", 0.5, 80.0, first_token=20.0), line("fastv", 0.25, 60.0, first_token=12.0)]  # 87.5%
    lines += [line("visionzip", 0.5, 76.0), line("visionzip", 0.25, 64.0)]  # 87.5%, faster
    lines += [line("random", 0.5, 40.0), line("random", 0.25, 40.0)]  # 50%
    lines += [line("random", 0.11, 99.0)]  # another run's budget: not on this board
    refused = {"uniform": "does not fit | here"}
    entries = leaderboard.ranked(lines, budgets, refused)
    assert [entry["policy"] for entry in entries] == ["visionzip", "fastv", "random", "uniform"]
    assert [entry.get("relative") for entry in entries] == [87.5, 87.5, 50.0, None]
    assert entries[-1]["missing"] == "does not fit | here"

    table = leaderboard.board(lines, budgets, refused).splitlines()
    cells = [row.strip("| ").split(" | ") for row in table[2:]]
    assert table[0].startswith("| rank | policy | stage | accuracy at 50% (32 tokens) | accuracy at 25% (16 tokens) |")
    assert cells[0][:6] == ["-", "none (unpruned, 64 tokens)", "-", "80.0", "-", "100.0"]
    assert [row[:3] for row in cells[1:]] == [
        ["1", "visionzip", "vision"],
        ["2", "fastv", "decoder"],
        ["3", "random", "vision (control)"],
        ["-", "uniform", "vision (control)"],
    ]
    assert cells[2][3:8] == ["80.0", "60.0", "87.5", "20.0", "12.0"]
    assert cells[4][3] == "refused: does not fit / here"  # a '|' would split the markdown cell


def test_a_policy_missing_a_budget_is_listed_unranked(monkeypatch):
    monkeypatch.setattr(vtprune, "policies", lambda: {"fastv": "", "visionzip": ""})
    lines = [line("none", None, 80.0), line("fastv", 0.5, 80.0), line("visionzip", 0.5, 40.0)]
    entries = leaderboard.ranked(lines, [0.5, 0.25], {})
    assert [(entry["policy"], entry.get("missing")) for entry in entries] == [
        ("fastv", "not run at every budget"),
        ("visionzip", "not run at every budget"),
    ]

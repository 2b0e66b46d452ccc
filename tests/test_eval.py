"""`vtprune eval` end to end on a tiny saved model and a POPE fixture: results, table and plot; resuming; and
samples sharded over two processes by `accelerate launch`, merged once."""

import json
import os
import statistics
import subprocess
import sys

import datasets
import pytest
from PIL import Image
from vtprune.eval import efficiency, leaderboard, runner, synthetic
from vtprune.eval.benchmarks import benchmark
from vtprune.eval.benchmarks.pope import says_yes
from vtprune.eval.samples import Sample

import vtprune
from vtprune import cli

QUESTIONS = ["Is there a dog in the image?", "Is there a car in the image?", "Is there a cat in the image?"]
POLICIES = ["cls_attention", "fastv"]
SAMPLES, SETTINGS = 6, 1 + len(POLICIES)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random LLaVA saved as a checkpoint directory, and a 6-question POPE split in its hub schema."""
    root = tmp_path_factory.mktemp("eval")
    config = synthetic.llava_config("llama", image_size=56, text_layers=4)  # 64 visual tokens
    synthetic.llava_model(config).save_pretrained(root / "model")
    synthetic.llava_processor(config).save_pretrained(root / "model")
    colours = ["red", "green", "blue", "white", "black", "yellow"]
    columns = {
        "id": [str(i) for i in range(SAMPLES)],
        "question_id": [str(i) for i in range(SAMPLES)],
        "question": [QUESTIONS[i % 3] for i in range(SAMPLES)],
        "answer": ["yes", "no"] * 3,
        "image_source": [f"img{i}" for i in range(SAMPLES)],
        "image": [Image.new("RGB", (40 + i, 50), colour) for i, colour in enumerate(colours)],
        "category": ["adversarial", "popular", "random"] * 2,
    }
    (root / "pope").mkdir()
    datasets.Dataset.from_dict(columns).to_parquet(str(root / "pope" / "test-00000-of-00001.parquet"))
    return root


def arguments(saved, out):
    return [
        *("--model", str(saved / "model"), "--benchmarks", "pope", "--data-dir", str(saved / "pope")),
        *("--policies", *POLICIES, "--budgets", "0.25", "--batch-size", "4", "--max-new-tokens", "3"),
        *("--out", str(out), "--quiet"),
    ]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_grid_gives_results_a_table_and_a_plot(saved, tmp_path):
    assert cli.main(["eval", *arguments(saved, tmp_path)]) == 0
    rows = lines(tmp_path / "results.jsonl")
    assert len(rows) == SAMPLES * SETTINGS
    assert {(row["setting"], row["id"]) for row in rows} == {
        (setting, f"{category}/{i}")
        for setting in ("none", "cls_attention@0.25", "fastv@0.25")
        for i, category in zip(range(SAMPLES), ["adversarial", "popular", "random"] * 2, strict=True)
    }
    by = {setting: [row for row in rows if row["setting"] == setting] for setting in ("none", "cls_attention@0.25")}
    assert all(row["visual_before"] == row["visual_after"] == 64 for row in by["none"])
    assert all(row["visual_after"] == 16 and row["layer_visual_tokens"] == 16 for row in by["cls_attention@0.25"])
    for full, pruned in zip(by["none"], by["cls_attention@0.25"], strict=True):
        assert pruned["prefill_tflops"] < full["prefill_tflops"] and pruned["kv_cache_mb"] < full["kv_cache_mb"]
        assert full["score"] == pope_score(full["prediction"], full["id"])
    fastv = [row for row in rows if row["setting"] == "fastv@0.25"]
    assert all(row["visual_after"] == 16 and 16 < row["layer_visual_tokens"] < 64 for row in fastv)  # cut at layer 2

    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| benchmark | policy | keep | samples | accuracy | % of unpruned |")
    assert [cells.split(" | ")[1:3] for cells in table[2:]] == [
        ["none", "all"],
        ["cls_attention", "0.25"],
        ["fastv", "0.25"],
    ]
    assert (tmp_path / "accuracy_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def pope_score(prediction, sample_id):
    answer = "yes" if int(sample_id.split("/")[1]) % 2 == 0 else "no"
    return float(prediction.strip().lower() == answer)  # lmms-eval's POPE rule


def test_official_scoring_scores_by_the_benchmarks_own_script(saved, tmp_path):
    runner.main([*arguments(saved, tmp_path), "--policies", "cls_attention"])
    assert {row["scoring"] for row in lines(tmp_path / "results.jsonl")} == {"lmms-eval"}
    # a rerun under another scoring answers again rather than keep rows scored by the other rules
    runner.main([*arguments(saved, tmp_path), "--scoring", "official", "--policies", "cls_attention"])
    rows = lines(tmp_path / "results.jsonl")
    assert len(rows) == SAMPLES * 2 and {row["scoring"] for row in rows} == {"official"}
    for row in rows:
        truth = "yes" if int(row["id"].split("/")[1]) % 2 == 0 else "no"
        assert row["score"] == float(says_yes(row["prediction"]) == (truth == "yes"))  # LLaVA's eval_pope.py


def test_a_rerun_answers_only_what_is_missing(saved, tmp_path):
    runner.main(arguments(saved, tmp_path))
    results = tmp_path / "results.jsonl"
    first = results.read_text().splitlines()
    runner.main(arguments(saved, tmp_path))
    assert results.read_text().splitlines() == first  # nothing to do
    results.write_text("\n".join(first[2:]) + "\n")  # lose two answers
    runner.main(arguments(saved, tmp_path))
    again = lines(results)
    assert len(again) == len(first) and {json.loads(line)["id"] for line in first[:2]} <= {r["id"] for r in again}


def test_accelerate_shards_samples_over_two_processes_and_merges_once(saved, tmp_path):
    # accelerate's multi-process launcher (its --cpu flag launches one process); on a machine without GPUs the
    # processes join over gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launch, "-m", "vtprune.eval", *arguments(saved, tmp_path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = lines(tmp_path / "results.jsonl")
    assert not list(tmp_path.glob("results.rank*.jsonl"))
    assert len(rows) == len({(row["setting"], row["id"]) for row in rows}) == SAMPLES * SETTINGS
    for setting in ("none", "cls_attention@0.25", "fastv@0.25"):
        ids = [row["id"] for row in rows if row["setting"] == setting]
        numbers = {row["id"]: int(row["id"].split("/")[1]) for row in rows}
        for process in (0, 1):  # process p answers samples p, p + 2, ...
            mine = {row["id"] for row in rows if row["setting"] == setting and row["process"] == process}
            assert mine == {i for i in ids if numbers[i] % 2 == process}
    assert (tmp_path / "table.md").exists()


def test_prefill_flops_count_the_experts_a_token_is_routed_to():
    """Qwen3-VL-MoE's sparse layers: attention, router and 2 of 4 experts (each half the dense MLP's width)."""
    config = synthetic.qwen_vl_config("qwen3_vl_moe", text_layers=3)
    model = synthetic.qwen_vl_model(config)
    text = config.text_config
    hidden, inner, heads, kv = (
        text.hidden_size,
        text.moe_intermediate_size,
        text.num_attention_heads,
        text.num_key_value_heads,
    )
    attention = 2 * hidden * heads * text.head_dim + 2 * hidden * kv * text.head_dim
    dense = attention + 3 * hidden * text.intermediate_size
    sparse = attention + text.num_experts * hidden + text.num_experts_per_tok * 3 * hidden * inner
    shape = efficiency.DecoderShape.of(model.get_decoder().layers, text)
    assert shape.layer_weights == (dense, sparse, sparse)
    assert (
        shape.prefill_flops([10, 10, 4])
        == 2 * 10 * dense + 2 * 10 * sparse + 2 * 4 * sparse + (2 * 100 + 2 * 100 + 2 * 16) * heads * text.head_dim
    )


@pytest.mark.parametrize("subject", ["llava_onevision", "qwen3_vl_moe"])
def test_answers_on_the_newest_families_report_the_pruned_tokens(subject):
    from subjects import SUBJECTS, model_for

    (chosen,) = [s for s in SUBJECTS if s.name == subject]
    model, processor = model_for(chosen.family, "sdpa")
    samples = [
        Sample(id=str(i), image=media, question=QUESTIONS[i], answers=("yes",))
        for i, ((_, media),) in enumerate(chosen.media)
    ]
    bench = benchmark("pope")
    with runner._patched(model, runner.Setting("cls_attention", 0.25)):
        rows = runner.answer(model, processor, bench, samples, runner.Setting("cls_attention", 0.25), 2)
        trace = vtprune.last_trace(model)
    assert [(row["visual_before"], row["visual_after"]) for row in rows] == [(r.n_before, r.n_after) for r in trace]
    assert all(row["visual_after"] < row["visual_before"] for row in rows)


def leaderboard_arguments(saved, out):
    return [
        *("--model", str(saved / "model"), "--benchmarks", "pope", "--data-dir", str(saved / "pope")),
        *("--leaderboard", "--batch-size", "6", "--max-new-tokens", "3", "--out", str(out), "--quiet"),
    ]


def test_the_leaderboard_ranks_every_registered_policy(saved, tmp_path):
    runner.main(leaderboard_arguments(saved, tmp_path))
    rows = [json.loads(text) for text in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {row["setting"] for row in rows} == {"none"} | {
        f"{name}@{keep}" for name in vtprune.policies() for keep in leaderboard.BUDGETS
    }
    accuracy = {
        setting: 100 * statistics.fmean(row["score"] for row in rows if row["setting"] == setting)
        for setting in {row["setting"] for row in rows}
    }
    first_token = {
        setting: 1000 * statistics.fmean(row["first_token_s"] for row in rows if row["setting"] == setting)
        for setting in accuracy
    }
    table = (tmp_path / "leaderboard.md").read_text().splitlines()
    assert table[0] == "### pope"
    cells = [row.strip("| ").split(" | ") for row in table[4:]]
    assert cells[0][1] == "none (unpruned, 64 tokens)"
    assert float(cells[0][3]) == pytest.approx(accuracy["none"], abs=0.05)
    assert sorted(row[1] for row in cells[1:]) == sorted(vtprune.policies())
    assert [row[0] for row in cells[1:]] == [str(rank) for rank in range(1, len(cells))]  # every policy fits
    keys = []
    for row in cells[1:]:
        settings = [f"{row[1]}@{keep}" for keep in leaderboard.BUDGETS]
        assert [float(cell) for cell in row[3:6]] == pytest.approx([accuracy[s] for s in settings], abs=0.05)
        assert [float(cell) for cell in row[7:10]] == pytest.approx([first_token[s] for s in settings], abs=0.05)
        mean_accuracy = statistics.fmean(accuracy[s] for s in settings)
        keys.append((-mean_accuracy, statistics.fmean(first_token[s] for s in settings)))
    assert keys == sorted(keys)
    assert (tmp_path / "accuracy_vs_prefill.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_leaderboard_takes_every_policy(saved, tmp_path):
    with pytest.raises(SystemExit):
        runner.main([*leaderboard_arguments(saved, tmp_path), "--policies", "fastv"])

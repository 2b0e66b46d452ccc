"""`vtprune bench` on a tiny random model: its table, its CSV, and ideal speed-ups from token counts."""

import contextlib
import csv
import io

import pytest
import torch
from vtprune.eval import bench, synthetic

import vtprune

POLICIES = ["cls_attention", "fastv"]


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model runs fastest on one thread, and far slower on two when another process holds a core."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def run(one_thread, tmp_path_factory):
    """The printed output and CSV rows of one tiny bench run."""
    path = tmp_path_factory.mktemp("bench") / "bench.csv"
    argv = ["--tiny", "--policies", *POLICIES, "--repeats", "1", "--new-tokens", "3", "--csv", str(path)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench.main(argv) == 0
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        return out.getvalue(), reader.fieldnames, list(reader)


def prompt_and_trace(policy: str) -> tuple[int, vtprune.Trace]:
    """The prompt length of the bench's tiny inputs, and the trace of its tiny model on them patched with
    `policy` at the bench's default keep."""
    model, processor = bench.synthetic_llava(bench.TINY_LLAVA, torch.bfloat16)
    inputs = bench.image_inputs(processor, bench.prompt(bench.TEXT_WORDS), 1)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad(), vtprune.patched(model, policy, keep=0.25):
        model(**inputs, logits_to_keep=1)
        return inputs["input_ids"].shape[1], vtprune.last_trace(model)


def test_prints_a_row_for_the_full_model_and_each_policy(run):
    out, _, _ = run
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| setting | visual tokens kept |")
    assert [line.split(" | ")[0].removeprefix("| ") for line in table[1:]] == ["full", *POLICIES]


def test_writes_the_rows_to_csv(run):
    _, columns, rows = run
    assert columns == bench.COLUMNS
    assert [row["setting"] for row in rows] == ["full", *POLICIES]
    assert [row["policy"] for row in rows] == ["", *POLICIES]
    measured = [column for column in columns if column not in ("setting", "policy", "keep")]
    assert all(isinstance(float(row[column]), float) for row in rows for column in measured)  # every cell filled


@pytest.mark.parametrize("policy", POLICIES)
def test_ideal_speedup_is_the_ratio_of_layer_tokens(run, policy):
    _, _, rows = run
    row = next(row for row in rows if row["setting"] == policy)
    full = next(row for row in rows if row["setting"] == "full")
    length, trace = prompt_and_trace(policy)
    full_layer_tokens = len(trace.layer_lengths) * length
    assert int(full["layer_tokens"]) == full_layer_tokens
    assert int(row["layer_tokens"]) == sum(trace.layer_lengths) < full_layer_tokens
    assert float(row["ideal_speedup"]) == pytest.approx(full_layer_tokens / sum(trace.layer_lengths))
    assert float(row["visual_after"]) == trace[0].n_after == 4  # 25% of the tiny tower's 16 tokens
    assert float(row["achieved_over_ideal"]) == pytest.approx(
        float(row["achieved_speedup"]) / float(row["ideal_speedup"])
    )


def test_loads_a_checkpoint_by_directory(one_thread, tmp_path):
    config = synthetic.llava_config("qwen2")
    synthetic.llava_model(config).save_pretrained(tmp_path)
    synthetic.llava_processor(config).save_pretrained(tmp_path)
    argv = ["--model", str(tmp_path), "--policies", "uniform", "--repeats", "1", "--new-tokens", "2", "--keep", "8"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench.main(argv) == 0
    assert out.getvalue().startswith(f"{tmp_path}, bfloat16 on cpu, batch 1")
    assert "| uniform | 8 of 16 |" in out.getvalue()


def test_pruning_time_is_zero_unpatched_and_counted_for_policies(run):
    _, _, rows = run
    full = next(row for row in rows if row["setting"] == "full")
    assert float(full["pruning_ms"]) == 0.0
    for row in rows[1:]:
        assert float(row["pruning_ms"]) > 0
        assert float(row["pruning_share"]) == pytest.approx(float(row["pruning_ms"]) / float(full["prefill_ms"]))

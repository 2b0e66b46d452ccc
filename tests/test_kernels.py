"""Token kernels: each reference against a plain loop, each Triton kernel against its reference (in
Triton's interpreter on CPU, on the GPU where there is one), the dispatch, and a whole model pruned with
the Triton kernels selecting what the references select."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
import torch
import torch.nn.functional as F
from vtprune.eval import kernel_bench
from vtprune.kernels import dispatch, reference

import vtprune
from vtprune.boundary import compaction_order

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_kernel(name: str):
    return getattr(dispatch.triton_module(name), name)


def kept_index(batch: int, length: int, kept: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(length, generator=generator)[:kept].sort().values for _ in range(batch)])


def token_tensors(batch: int, length: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[int]]:
    """What one compaction moves: hidden states, cos/sin, ids, a mask, multi-axis positions as [B, 3, N],
    a K/V cache [B, H, N, d], and views whose rows or middle dims are strided."""
    torch.manual_seed(0)
    tensors = [
        torch.randn(batch, length, 37, dtype=dtype),
        torch.randn(batch, length, 6, dtype=dtype),
        torch.randint(0, 1000, (batch, length)),
        torch.rand(batch, length) > 0.5,
        torch.randint(0, 50, (3, batch, length)).transpose(0, 1),
        torch.randn(batch, 3, length, 10, dtype=dtype),
        torch.randn(batch, length, 16, dtype=dtype)[:, :, ::2],
        torch.randn(batch, 4, length, 5, dtype=dtype).transpose(1, 2),
    ]
    return [t.to(DEVICE) for t in tensors], [1, 1, 1, 1, 2, 2, 1, 1]


def test_reference_gather_matches_a_loop_over_rows():
    tensors, dims = token_tensors(3, 11, torch.bfloat16)
    index = kept_index(3, 11, 4).to(DEVICE)
    for got, tensor, dim in zip(reference.gather_tokens(tensors, index, dims), tensors, dims, strict=True):
        for b in range(3):
            assert torch.equal(got[b], tensor[b].index_select(dim - 1, index[b]))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "length", "kept"), [(1, 1, 1), (3, 11, 4), (2, 37, 37), (4, 130, 9)])
def test_triton_gather_equals_the_reference(dtype, batch, length, kept):
    tensors, dims = token_tensors(batch, length, dtype)
    index = kept_index(batch, length, kept, seed=length).to(DEVICE)
    got = triton_kernel("gather_tokens")(tensors, index, dims)
    for out, expected in zip(got, reference.gather_tokens(tensors, index, dims), strict=True):
        assert out.dtype == expected.dtype and out.shape == expected.shape
        assert torch.equal(out, expected)


@needs_triton
def test_triton_gather_handles_no_tensors_and_nothing_kept():
    gather = triton_kernel("gather_tokens")
    index = torch.zeros(2, 0, dtype=torch.long, device=DEVICE)
    assert gather([], index, []) == []
    (out,) = gather([torch.randn(2, 5, 3, device=DEVICE)], index, [1])
    assert out.shape == (2, 0, 3)


def naive_scores(queries, keys, scale, key_valid=None, last_key=None, sum_queries=False, first_key=None):
    """Per row, query and head: softmax over the keys it may see, by explicit loops."""
    batch, heads, count, _ = queries.shape
    groups = heads // keys.shape[1]
    out = torch.zeros(batch, count, keys.shape[2])
    for b in range(batch):
        for q in range(count):
            seen = torch.ones(keys.shape[2], dtype=torch.bool)
            if key_valid is not None:
                seen &= key_valid[b].cpu()
            if last_key is not None:
                seen &= torch.arange(keys.shape[2]) <= last_key[b, q].item()
            if first_key is not None:
                seen &= torch.arange(keys.shape[2]) >= first_key[b, q].item()
            if not seen.any():
                continue
            for h in range(heads):
                logits = keys[b, h // groups].float().cpu() @ queries[b, h, q].float().cpu() * scale
                out[b, q, seen] += logits[seen].softmax(0) / heads
    return out.sum(1) if sum_queries else out


SCORE_SHAPES = [
    (1, 4, 4, 1, 1, 8),
    (2, 4, 2, 1, 37, 8),
    (1, 6, 3, 21, 70, 20),
    (2, 2, 1, 5, 9, 64),
    (1, 2, 2, 70, 300, 16),
]


@pytest.mark.parametrize("masked", [False, True])
def test_reference_scores_match_a_loop(masked):
    torch.manual_seed(1)
    queries, keys = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 12, 8)
    masks = {}
    if masked:
        masks = {
            "key_valid": torch.rand(2, 12) > 0.3,
            "last_key": torch.tensor([[-1, 0, 3, 11, 7], [2, 2, 5, -1, 11]]),
            "first_key": torch.tensor([[0, 1, 0, 6, 8], [0, 3, 2, 0, 9]]),
        }
    for sum_queries in (False, True):
        got = reference.score_rows(queries, keys, 0.35, **masks, sum_queries=sum_queries)
        torch.testing.assert_close(got, naive_scores(queries, keys, 0.35, **masks, sum_queries=sum_queries))


def test_reference_scores_chunk_long_query_sets(monkeypatch):
    torch.manual_seed(2)
    queries, keys = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    whole = reference.score_rows(queries, keys, 0.5, sum_queries=True)
    monkeypatch.setattr(reference, "QUERY_CHUNK", 2)
    torch.testing.assert_close(reference.score_rows(queries, keys, 0.5, sum_queries=True), whole)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "heads", "kv_heads", "count", "length", "dim"), SCORE_SHAPES)
def test_triton_scores_equal_the_reference(dtype, batch, heads, kv_heads, count, length, dim):
    torch.manual_seed(length)
    queries = torch.randn(batch, heads, count, dim, dtype=dtype, device=DEVICE)
    keys = torch.randn(batch, kv_heads, length, dim, dtype=dtype, device=DEVICE)
    valid = torch.rand(batch, length, device=DEVICE) > 0.2
    last = torch.randint(-1, length, (batch, count), device=DEVICE)
    first = (last - torch.randint(0, 8, (batch, count), device=DEVICE)).clamp(min=0)
    score = triton_kernel("score_rows")
    windowed = {"key_valid": valid, "last_key": last, "first_key": first}
    for masks in ({}, {"key_valid": valid, "last_key": last}, windowed):
        for sum_queries in (False, True):
            got = score(queries, keys, dim**-0.5, **masks, sum_queries=sum_queries)
            expected = reference.score_rows(queries, keys, dim**-0.5, **masks, sum_queries=sum_queries)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@needs_triton
def test_triton_scores_read_strided_queries_and_keys():
    torch.manual_seed(3)
    qkv = torch.randn(2, 17, 3, 4, 16, device=DEVICE)  # [B, N, 3, H, d], as a fused projection leaves them
    queries, keys = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    got = triton_kernel("score_rows")(queries, keys, 0.25, sum_queries=True)
    torch.testing.assert_close(got, reference.score_rows(queries, keys, 0.25, sum_queries=True))


def greedy_k_center(features: torch.Tensor, count: int, first: int, steps: int) -> list[int]:
    """Gonzalez's farthest-first traversal for one row, written out."""
    points = F.normalize(features[:count].double(), dim=-1)
    picks = [first]
    while len(picks) < min(steps, count):
        distance = [min(1 - float(points[i] @ points[j]) for j in picks) for i in range(count)]
        picks.append(max((i for i in range(count) if i not in picks), key=lambda i: (distance[i], -i)))
    return picks + [0] * (steps - len(picks))


def test_reference_farthest_first_matches_the_written_out_greedy():
    torch.manual_seed(4)
    features = F.normalize(torch.randn(3, 20, 6), dim=-1)
    counts = torch.tensor([20, 7, 3])
    features = features * (torch.arange(20) < counts[:, None])[..., None]
    first = torch.tensor([5, 0, 2])
    got = reference.farthest_first(features, counts, first, 6)
    for b in range(3):
        assert got[b].tolist() == greedy_k_center(features[b], int(counts[b]), int(first[b]), 6)


def test_reference_farthest_first_on_a_hand_checked_example():
    # Tokens on the unit circle at 0, 10, 90, 180 and 200 degrees; starting at 0 degrees the farthest is
    # 180, then 90 (cosine distance 1 from both), then 200 (farther from {0, 90, 180} than 10 is).
    angles = torch.tensor([0.0, 10.0, 90.0, 180.0, 200.0]).deg2rad()
    features = torch.stack([angles.cos(), angles.sin()], -1)[None]
    got = reference.farthest_first(features, torch.tensor([5]), torch.tensor([0]), 5)
    assert got[0].tolist() == [0, 3, 2, 4, 1]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "length", "dim", "steps"), [(1, 1, 3, 1), (3, 50, 20, 12), (2, 300, 40, 30), (2, 5, 3, 8)]
)
def test_triton_farthest_first_equals_the_reference(dtype, batch, length, dim, steps):
    torch.manual_seed(length)
    counts = torch.randint(1, length + 1, (batch,))
    counts[0] = length
    features = (
        F.normalize(torch.randn(batch, length, dim), dim=-1) * (torch.arange(length) < counts[:, None])[..., None]
    )
    features, counts = features.to(DEVICE, dtype), counts.to(DEVICE)
    first = torch.stack([torch.randint(0, int(n), ()) for n in counts]).to(DEVICE)
    got = triton_kernel("farthest_first")(features, counts, first, steps)
    assert torch.equal(got, reference.farthest_first(features, counts, first, steps))


def greedy_dpp(features: torch.Tensor, quality: torch.Tensor, count: int, steps: int) -> list[int]:
    """Chen et al.'s greedy MAP for one row, written out on the dense kernel matrix (float64): -1 once spent."""
    x, q = features[:count].double(), quality[:count].double()
    kernel = q[:, None] * (x @ x.T) * q[None, :]
    gains, factors, picks = kernel.diagonal().clone(), [], []
    for _ in range(steps):
        j = max((i for i in range(count) if i not in picks), key=lambda i: (float(gains[i]), -i), default=None)
        if j is None or gains[j] <= reference.SPENT * q[j] ** 2:
            break
        factor = (kernel[j] - sum(c[j] * c for c in factors)) / gains[j].sqrt()
        factors.append(factor)
        gains = gains - factor**2
        picks.append(j)
    return picks + [-1] * (steps - len(picks))


def test_reference_dpp_greedy_matches_the_written_out_greedy():
    torch.manual_seed(5)
    features = F.normalize(torch.randn(3, 20, 6), dim=-1)
    counts = torch.tensor([20, 9, 3])
    features = features * (torch.arange(20) < counts[:, None])[..., None]
    quality = torch.rand(3, 20) + 0.1
    got = reference.dpp_greedy(features, quality, counts, 8)  # rank 6: row 0 is spent after 6 picks
    for b in range(3):
        assert got[b].tolist() == greedy_dpp(features[b], quality[b], int(counts[b]), 8)
    assert got[0, 6:].tolist() == [-1, -1] and got[2, 3:].tolist() == [-1] * 5


def test_reference_dpp_greedy_on_a_hand_checked_example():
    # Unit tokens at 0, 10 and 90 degrees with quality 1, 3, 2: d² = q² picks token 1; then
    # d² = q² sin²(angle to token 1): token 0 sin² 10° = 0.030, token 2 4 sin² 80° = 3.88 -> token 2. The tokens
    # are 2-D, so the kernel has rank 2: token 0 lies in the span of the two picks (d² ~ 0) and the row is spent.
    angles = torch.tensor([0.0, 10.0, 90.0]).deg2rad()
    features = torch.stack([angles.cos(), angles.sin()], -1)[None]
    got = reference.dpp_greedy(features, torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([3]), 4)
    assert got[0].tolist() == [1, 2, -1, -1]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "length", "dim", "steps"), [(1, 1, 3, 1), (3, 50, 20, 12), (2, 300, 40, 30), (2, 40, 8, 12)]
)
def test_triton_dpp_greedy_equals_the_reference(dtype, batch, length, dim, steps):
    torch.manual_seed(length + dim)
    counts = torch.randint(1, length + 1, (batch,))
    counts[0] = length
    features = (
        F.normalize(torch.randn(batch, length, dim), dim=-1) * (torch.arange(length) < counts[:, None])[..., None]
    )
    features, counts = features.to(DEVICE, dtype), counts.to(DEVICE)
    quality = (torch.rand(batch, length) + 0.2).to(DEVICE)
    got = triton_kernel("dpp_greedy")(features, quality, counts, steps)
    assert torch.equal(got, reference.dpp_greedy(features, quality, counts, steps))


def test_dispatch_chooses_triton_only_for_cuda_tensors(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("VTPRUNE_KERNELS", raising=False)
    assert dispatch.backend(cpu) == "reference"
    monkeypatch.setenv("VTPRUNE_KERNELS", "reference")
    assert dispatch.implementation("gather_tokens", cpu) is reference
    monkeypatch.setenv("VTPRUNE_KERNELS", "fast")
    with pytest.raises(ValueError, match="unset it"):
        dispatch.backend(cpu)


@needs_triton
def test_forcing_triton_off_cuda_asks_for_the_interpreter(monkeypatch):
    monkeypatch.setenv("VTPRUNE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.backend(torch.zeros(1))


def test_gather_tokens_refuses_a_tensor_without_the_batch_first():
    with pytest.raises(ValueError, match="batch must be dim 0"):
        vtprune.kernels.gather_tokens([torch.zeros(3, 2, 5)], torch.zeros(2, 1, dtype=torch.long))


@needs_triton
@pytest.mark.parametrize("policy", ["cls_attention", "fastv", "diversity_kcenter", "conditional_dpp"])
def test_a_model_pruned_with_the_triton_kernels_selects_as_with_the_references(monkeypatch, policy):
    model, processor = helpers.tiny(text_layers=4)
    inputs = helpers.batch(processor, helpers.PROMPTS, [helpers.image(1), helpers.image(2)])
    runs = {}
    for choice in ("reference", "triton"):
        monkeypatch.setenv("VTPRUNE_KERNELS", choice)
        with vtprune.patched(model, policy, keep=5), torch.no_grad():
            logits = model(**inputs).logits
            runs[choice] = ([record.kept.tolist() for record in vtprune.last_trace(model)], logits)
    assert runs["triton"][0] == runs["reference"][0]
    torch.testing.assert_close(runs["triton"][1], runs["reference"][1])


def test_compaction_order_repads_on_the_left_keeping_order():
    keep = torch.tensor([[0, 1, 1, 0, 1, 1], [0, 0, 1, 0, 0, 1]], dtype=torch.bool)
    order = compaction_order(keep, left_padded=True)
    assert order.shape == (2, 4)
    assert order[0].tolist() == [1, 2, 4, 5]
    assert order[1, 2:].tolist() == [2, 5] and not keep[1, order[1, :2]].any()


def test_compaction_order_repads_on_the_right():
    keep = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    order = compaction_order(keep, left_padded=False)
    assert order[0].tolist() == [0, 1, 3]
    assert order[1, 0].item() == 0 and not keep[1, order[1, 1:]].any()


def test_kernel_benchmark_writes_a_row_per_kernel_case(tmp_path, capsys):
    path = tmp_path / "kernels.csv"
    assert kernel_bench.main(["--tokens", "16", "32", "--repeats", "1", "--kv-layers", "1", "--csv", str(path)]) == 0
    with path.open(newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["implementation"] == "reference"]  # and Triton's on CUDA
    labels = ["gather_tokens", "gather_tokens+kv", "score_rows Q=1", "score_rows Q=64", "farthest_first", "dpp_greedy"]
    assert [(row["kernel"], int(row["tokens"])) for row in rows] == [(k, n) for n in (16, 32) for k in labels]
    assert all(float(row["ms"]) > 0 for row in rows)
    assert "| gather_tokens+kv | 32 |" in capsys.readouterr().out


def test_transformers_imports_from_the_source_checkout():
    """From the repository root, the `kernels/` source folder is importable as a top-level `kernels`, which
    transformers probes for the hub-kernels package on import: it must import without vtprune (no cycle)."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "from transformers import LlavaForConditionalGeneration; import torch, vtprune.kernels as kernels; "
        "print(kernels.backend(torch.ones(1)))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["reference"]

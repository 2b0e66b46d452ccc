"""Each token kernel against its PyTorch reference across token counts, in the style of Liger Kernel's
benchmarks: median milliseconds per call, written to CSV and printed as a markdown table.

    python -m vtprune.eval.kernel_bench [--device cuda] [--dtype bfloat16] [--tokens 576 1152 2304 4608]
                                        [--repeats 20] [--csv eval_results/kernels.csv]

Shapes are LLaVA-1.5-7B's (hidden 4096, 32 heads of 128), batch `--batch`, a quarter of the tokens kept:

- gather_tokens: hidden states, cos and sin, position ids and the attention mask at once; "+kv" adds
  `--kv-layers` layers' K and V caches `[B, 32, N, 128]` (cache eviction after prefill);
- score_rows: the last token's row (Q=1) and the column sums of 64 instruction queries (Q=64);
- farthest_first: greedy k-center over the projected features `[B, N, 4096]`, N/4 picks;
- dpp_greedy: greedy DPP MAP inference over the same features with random quality, N/4 picks.

The Triton column is measured on CUDA only (on CPU the interpreter runs it, which says nothing about speed);
there the reference runs alone.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from vtprune.eval.bench import seconds, write_csv
from vtprune.kernels import dispatch, reference

HIDDEN, HEADS, HEAD_DIM = 4096, 32, 128
COLUMNS = ["kernel", "tokens", "implementation", "device", "dtype", "ms"]


def timed(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of `run()` over `repeats` calls after one warm-up, the device's queue included."""
    run()
    return 1e3 * statistics.median(seconds(run, device) for _ in range(repeats))


def cases(tokens: int, batch: int, kv_layers: int, dtype: torch.dtype, device: torch.device):
    """(kernel, label, arguments) for one token count."""
    make = {"device": device, "dtype": dtype}
    kept = torch.stack([torch.randperm(tokens, device=device)[: tokens // 4].sort().values for _ in range(batch)])
    compacted = [
        torch.randn(batch, tokens, HIDDEN, **make),
        torch.randn(batch, tokens, HEAD_DIM, **make),
        torch.randn(batch, tokens, HEAD_DIM, **make),
        torch.arange(tokens, device=device).expand(batch, -1).contiguous(),
        torch.ones(batch, tokens, dtype=torch.bool, device=device),
    ]
    yield "gather_tokens", "gather_tokens", (compacted, kept, [1] * len(compacted))
    if kv_layers:
        cache = [torch.randn(batch, HEADS, tokens, HEAD_DIM, **make) for _ in range(2 * kv_layers)]
        yield "gather_tokens", "gather_tokens+kv", (compacted + cache, kept, [1] * len(compacted) + [2] * len(cache))
    keys = torch.randn(batch, HEADS, tokens, HEAD_DIM, **make)
    for count, summed in ((1, False), (64, True)):
        queries = torch.randn(batch, HEADS, count, HEAD_DIM, **make)
        yield "score_rows", f"score_rows Q={count}", (queries, keys, HEAD_DIM**-0.5, None, None, summed)
    features = torch.nn.functional.normalize(torch.randn(batch, tokens, HIDDEN, device=device), dim=-1).to(dtype)
    counts = torch.full((batch,), tokens, device=device)
    first = torch.zeros(batch, dtype=torch.long, device=device)
    yield "farthest_first", "farthest_first", (features, counts, first, tokens // 4)
    quality = torch.rand(batch, tokens, device=device) + 0.5
    yield "dpp_greedy", "dpp_greedy", (features, quality, counts, tokens // 4)


def measure(args: argparse.Namespace) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    names = ["reference"] + (["triton"] if device.type == "cuda" and dispatch.triton_available() else [])
    rows = []
    for tokens in args.tokens:
        for kernel, label, arguments in cases(tokens, args.batch, args.kv_layers, dtype, device):
            for name in names:
                module = reference if name == "reference" else dispatch.triton_module(kernel)
                ms = timed(functools.partial(getattr(module, kernel), *arguments), device, args.repeats)
                rows.append(
                    dict(zip(COLUMNS, [label, tokens, name, str(device), args.dtype, round(ms, 4)], strict=True))
                )
                print(f"{label} N={tokens} {name}: {ms:.3f} ms", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    names = list(dict.fromkeys(row["implementation"] for row in rows))
    lines = ["| kernel | tokens | " + " | ".join(f"{name} (ms)" for name in names) + " |"]
    lines.append("|---|---|" + "---|" * len(names))
    for key in dict.fromkeys((row["kernel"], row["tokens"]) for row in rows):
        times = {row["implementation"]: row["ms"] for row in rows if (row["kernel"], row["tokens"]) == key}
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(f"{times[name]:.3f}" for name in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[576, 1152, 2304, 4608])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kv-layers", type=int, default=32, help="layers of K/V cache in the '+kv' gather (0: none)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--csv", type=Path, default=Path("eval_results/kernels.csv"))
    args = parser.parse_args(argv)
    rows = measure(args)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.csv, COLUMNS)
    print(markdown(rows))
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

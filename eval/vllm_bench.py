"""vLLM serving a random LLaVA through vtprune's plugin against HF transformers + vtprune, full and pruned.

    python -m vtprune.eval.vllm_bench [--requests 8] [--new-tokens 8] [--dtype bfloat16] [--positions original]

Runs in an environment with vLLM (`.ci/vllm` builds one). The model is a random LLaVA with a CLIP-L/14-336
tower and a Qwen2-0.5B-sized LLM (`--size llava-1.5-7b` for a LLaVA-1.5-7B-sized one on a GPU), saved in
the hub layout vLLM loads. For the full model and `cls_attention` at 25% and 11% of the 576 visual tokens, a
batch of `--requests` requests with one image each: vLLM (one engine per setting, the budget fixed when it
starts) and HF `generate` on the batch (left-padded). Reported: requests/s over the whole batch with
`--new-tokens` new tokens each, time to first token of the batch (its prefill: tower, pruning and the
prompts' forward; vLLM's from a run with one new token) and prefill tokens/s (the prompt tokens the LLM
ran, pruned, over that time). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import torch
from vtprune.eval import bench, synthetic
from vtprune.eval.efficiency import Clock

import vtprune
from vtprune import vllm as plugin

KEEPS = (None, 0.25, 0.11)
QUESTION = "USER: <image>\n" + "what is shown in the picture " * 6 + "? ASSISTANT:"


def images(count: int, first: int = 0) -> list[Any]:
    """`count` random pictures; runs use different ones, so no cache of a previous run's images is hit."""
    return [synthetic.random_image(bench.IMAGE_SIDE, bench.IMAGE_SIDE, seed) for seed in range(first, first + count)]


def served(
    path: str, keep: float | None, requests: int, new_tokens: int, dtype: str, positions: str
) -> dict[str, float]:
    from vllm import LLM, SamplingParams

    extra = {} if keep is None else {"hf_overrides": plugin.overrides("cls_attention", keep=keep, positions=positions)}
    llm = LLM(
        model=path,
        enforce_eager=True,
        max_model_len=2048,
        dtype=dtype,
        gpu_memory_utilization=0.6 if dtype == "float32" else 0.3,  # on CPU, the share the model and KV cache take
        enable_prefix_caching=False,  # every run prefills its prompts in full
        **extra,
    )

    def prompts(first: int) -> list[dict[str, Any]]:
        return [{"prompt": QUESTION, "multi_modal_data": {"image": image}} for image in images(requests, first)]

    llm.generate(prompts(2 * requests)[:1], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
    start = time.perf_counter()
    first = llm.generate(prompts(0), SamplingParams(max_tokens=1, temperature=0.0))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate(prompts(requests), SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0))
    total = time.perf_counter() - start
    tokens = sum(len(output.prompt_token_ids) for output in first)
    del llm
    return {"requests_per_s": requests / total, "ttft": prefill, "prefill_tokens_per_s": tokens / prefill}


@torch.no_grad()
def transformers_run(
    path: str, keep: float | None, requests: int, new_tokens: int, dtype: str, positions: str
) -> dict[str, float]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images(requests), text=[QUESTION] * requests, return_tensors="pt", padding=True)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    greedy = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    patch = vtprune.patch(model, "cls_attention", keep=keep, positions=positions) if keep else None
    model.generate(**{k: v[:1] for k, v in inputs.items()}, max_new_tokens=2, do_sample=False)  # warm-up
    clock = Clock()
    model.generate(**inputs, **greedy, logits_processor=[clock])
    total = time.perf_counter() - clock.start
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    kept = visual if patch is None else sum(r.n_after for r in vtprune.last_trace(model))
    tokens = int(inputs["attention_mask"].sum()) - visual + kept
    return {
        "requests_per_s": requests / total,
        "ttft": clock.first_token_seconds,
        "prefill_tokens_per_s": tokens / clock.first_token_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--size", choices=list(bench.RANDOM_MODELS), default="qwen2-0.5b")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    parser.add_argument("--positions", choices=["original", "contiguous"], default="original")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    sizes, heading = bench.RANDOM_MODELS[args.size]
    rows = []
    with tempfile.TemporaryDirectory() as path:
        config = synthetic.llava_config(**sizes)
        plugin.save_for_vllm(
            synthetic.llava_model(config, dtype=getattr(torch, args.dtype)), synthetic.llava_processor(config), path
        )
        for keep in KEEPS:
            setting = "full" if keep is None else f"cls_attention, keep {keep:.0%}"
            for engine, run in (("vLLM + vtprune", served), ("HF + vtprune", transformers_run)):
                rows.append(
                    {
                        "setting": setting,
                        "engine": engine,
                        **run(path, keep, args.requests, args.new_tokens, args.dtype, args.positions),
                    }
                )
    print(
        f"{heading}, {args.requests} requests of one {bench.IMAGE_SIDE}px image, {args.new_tokens} new tokens, "
        f"{args.dtype}, {torch.get_num_threads()} threads, positions={args.positions}"
    )
    print("| setting | engine | requests/s | time to first token of the batch (s) | prefill tokens/s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['setting']} | {row['engine']} | {row['requests_per_s']:.2f} | {row['ttft']:.2f} | "
            f"{row['prefill_tokens_per_s']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

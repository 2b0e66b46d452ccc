"""Prefill of a Qwen2-VL-2B-sized random model, full against pruned at the vision boundary.

    python -m vtprune.eval.qwen_prefill [--repeats 3] [--side 448] [--policy cls_attention] [--dtype bfloat16]

Builds a random-weight Qwen2-VL with the 2B model's sizes (tower: 32 blocks, width 1280, 16 heads; LLM:
28 layers, width 1536, 12 query / 2 key-value heads, MLP 8960; the vocabulary is the tiny test one, which
only shrinks the embedding table), one `--side` x `--side` image, and times `forward` (as generation's
prefill: logits for the last token only) unpatched and patched to keep 25% and 11% of the visual tokens.
Hooks on the language model time its part alone; the vision tower runs in full in every setting (boundary
pruning saves LLM work only). Interleaved, median of `--repeats`. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from vtprune.eval import synthetic

import vtprune

QWEN2_VL_2B = {
    "vision_depth": 32,
    "vision_width": 1280,
    "vision_heads": 16,
    "text_layers": 28,
    "text_hidden": 1536,
    "text_heads": 12,
    "text_kv_heads": 2,
    "text_intermediate": 8960,
}
KEEPS = (None, 0.25, 0.11)


class Stopwatch:
    """Times every call of a module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds: list[float] = []
        self._handles = [
            module.register_forward_pre_hook(lambda *_: setattr(self, "_start", time.perf_counter())),
            module.register_forward_hook(lambda *_: self.seconds.append(time.perf_counter() - self._start)),
        ]


@torch.no_grad()
def measure(repeats: int, side: int, policy: str, dtype: torch.dtype) -> list[dict]:
    config = synthetic.qwen_vl_config("qwen2_vl", **QWEN2_VL_2B)
    config.vision_config.mlp_ratio = 4
    model = synthetic.qwen_vl_model(config, dtype=dtype)
    processor = synthetic.qwen_vl_processor("qwen2_vl", min_tokens=4, max_tokens=(side // 28) ** 2)
    prompt = "user : <|vision_start|><|image_pad|><|vision_end|> " + "what is shown " * 10 + "? assistant :"
    inputs = processor(images=[synthetic.random_image(side, side)], text=[prompt], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    call = {**inputs, "logits_to_keep": 1}
    llm = Stopwatch(model.model.language_model)
    model(**call)  # warm-up
    totals: dict[float | None, list[float]] = {keep: [] for keep in KEEPS}
    lengths: dict[float | None, int] = {}
    for _ in range(repeats):
        for keep in KEEPS:
            if keep is not None:
                vtprune.patch(model, policy, keep=keep)
            start = time.perf_counter()
            model(**call)
            totals[keep].append(time.perf_counter() - start)
            lengths[keep] = (
                inputs["input_ids"].shape[1]
                if keep is None
                else inputs["input_ids"].shape[1] - sum(r.n_before - r.n_after for r in vtprune.last_trace(model))
            )
            vtprune.unpatch(model)
    llm_times = {keep: llm.seconds[1 + i :: len(KEEPS)] for i, keep in enumerate(KEEPS)}
    visual = int((inputs["input_ids"] == config.image_token_id).sum())
    rows = []
    for keep in KEEPS:
        rows.append(
            {
                "setting": "full" if keep is None else f"{policy}, keep {keep:.0%}",
                "visual": visual if keep is None else round(visual * keep),
                "tokens": lengths[keep],
                "total": statistics.median(totals[keep]),
                "llm": statistics.median(llm_times[keep]),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", type=int, default=448, help="image side in pixels (a multiple of 28)")
    parser.add_argument("--policy", default="cls_attention")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    rows = measure(args.repeats, args.side, args.policy, getattr(torch, args.dtype))
    print(
        f"Qwen2-VL-2B-sized random model, one {args.side}x{args.side} image, {args.dtype}, batch 1, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print("| setting | visual tokens | prompt tokens | LLM prefill (ms) | LLM speed-up | forward incl. tower (ms) |")
    print("|---|---|---|---|---|---|")
    full = rows[0]["llm"]
    for row in rows:
        print(
            f"| {row['setting']} | {row['visual']} | {row['tokens']} | {row['llm'] * 1e3:.0f} | "
            f"{full / row['llm']:.2f}x | {row['total'] * 1e3:.0f} |"
        )


if __name__ == "__main__":
    main()

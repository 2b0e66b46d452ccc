"""Prefill time with in-decoder cuts against the full prefill, and against what the token counts promise.

    python -m vtprune.eval.decoder_speed [--repeats 5] [--dtype bfloat16] [--batch 1] [--text-words 40]

Builds a random-weight LLaVA with a CLIP ViT-L/14-336 tower and a Qwen2-0.5B-sized LLM (24 layers,
width 896, 14 query / 2 key-value heads, MLP 4864; the vocabulary is the tiny test one, which only
shrinks the embedding table, since prefill computes logits for the last token only). The image
features are computed once and passed as `mm_encoder_outputs`, so the timings are the LLM's prefill
alone (576 visual tokens plus the prompt's text). For each setting the patched `forward` (with
`logits_to_keep=1`, as generation's prefill) is timed against the unpatched one, interleaved, median
of `--repeats`. "ideal" is the full prefill's layer-tokens over the pruned one's, from the trace's
sequence length at every decoder layer (a cost linear in tokens); "achieved" is the measured ratio.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from vtprune.eval import synthetic

import vtprune

MODEL = {
    **synthetic.CLIP_L_TOWER,
    "text": "qwen2",
    "text_layers": 24,
    "text_hidden": 896,
    "text_heads": 14,
    "text_kv_heads": 2,
    "text_intermediate": 4864,
}
SETTINGS = [
    ("full", None, None, {}),
    ("fastv K=2, 64 kept", "fastv", 64, {"layer": 2}),
    ("transition, paper schedule (keep=0.125)", "transition", 0.125, {}),
    ("transition, 64 kept", "transition", 64, {}),
    ("diversity_kcenter stage 2 only (all removed at layer 12)", "diversity_kcenter", 1.0, {}),
]


def prompt(words: int) -> str:
    return "USER: <image>\n" + " ".join(["what"] * words) + " ? ASSISTANT:"


@torch.no_grad()
def measure(repeats: int, dtype: torch.dtype, batch: int, words: int) -> list[dict]:
    config = synthetic.llava_config(**MODEL)
    model = synthetic.llava_model(config, dtype=dtype)
    processor = synthetic.llava_processor(config)
    images = [synthetic.random_image(336, 336, seed=index) for index in range(batch)]
    inputs = processor(images=images, text=[prompt(words)] * batch, return_tensors="pt", padding=True)
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"].to(dtype)).pooler_output
    call = {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(features))},
        "logits_to_keep": 1,
    }
    depth, length = len(model.model.language_model.layers), inputs["input_ids"].shape[1]
    model(**call)  # warm-up
    rows = []
    for name, policy, keep, options in SETTINGS:
        if policy is None:
            rows.append({"setting": name, "layer_lengths": (length,) * depth})
            continue
        if policy == "diversity_kcenter":
            policy = vtprune.policy("diversity_kcenter")  # keep=1.0: stage 1 keeps every token
        handle = vtprune.patch(model, policy, keep=keep, **options)
        model(**call)
        trace = vtprune.last_trace(model)
        handle.remove()
        rows.append(
            {"setting": name, "policy": policy, "keep": keep, "options": options, "layer_lengths": trace.layer_lengths}
        )
    times: dict[str, list[float]] = {row["setting"]: [] for row in rows}
    for _ in range(repeats):
        for row in rows:
            if "policy" in row:
                vtprune.patch(model, row["policy"], keep=row["keep"], **row["options"])
            start = time.perf_counter()
            model(**call)
            times[row["setting"]].append(time.perf_counter() - start)
            vtprune.unpatch(model)
    full = statistics.median(times["full"])
    full_tokens = sum(rows[0]["layer_lengths"])
    for row in rows:
        row["seconds"] = statistics.median(times[row["setting"]])
        row["ideal"] = full_tokens / sum(row["layer_lengths"])
        row["achieved"] = full / row["seconds"]
        row["mean_tokens"] = sum(row["layer_lengths"]) / depth
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-words", type=int, default=40)
    args = parser.parse_args()
    rows = measure(args.repeats, getattr(torch, args.dtype), args.batch, args.text_words)
    print(
        f"Qwen2-0.5B-sized LLM, CLIP-L features given, {args.dtype}, batch {args.batch}, "
        f"{rows[0]['layer_lengths'][0]} prompt tokens, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print("| setting | prefill (ms) | mean tokens per layer | ideal speed-up | achieved | achieved / ideal |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['setting']} | {row['seconds'] * 1e3:.0f} | {row['mean_tokens']:.0f} | {row['ideal']:.2f}x | "
            f"{row['achieved']:.2f}x | {row['achieved'] / row['ideal']:.2f} |"
        )


if __name__ == "__main__":
    main()

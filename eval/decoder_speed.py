"""Prefill time with in-decoder cuts against the full prefill, and against what the token counts promise.

    python -m vtprune.eval.decoder_speed [--repeats 5] [--dtype bfloat16] [--batch 1] [--text-words 40]

Builds `vtprune bench`'s default model: a random-weight LLaVA with a CLIP ViT-L/14-336 tower and a
Qwen2-0.5B-sized LLM (24 layers, width 896, 14 query / 2 key-value heads, MLP 4864; the vocabulary is the
tiny test one, which only shrinks the embedding table, since prefill computes logits for the last token
only). The image features are computed once and passed as `mm_encoder_outputs`, so the timings are the
LLM's prefill alone (576 visual tokens plus the prompt's text). For each setting the patched `forward`
(with `logits_to_keep=1`, as generation's prefill) is timed against the unpatched one, interleaved, median
of `--repeats`. "ideal" is the full prefill's layer-tokens over the pruned one's, from the trace's
sequence length at every decoder layer (a cost linear in tokens); "achieved" is the measured ratio.
Prints a markdown table.
"""

from __future__ import annotations

import argparse

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from vtprune.eval.bench import QWEN2_05B_LLAVA, Setting, image_inputs, interleaved, prompt, seconds, synthetic_llava

import vtprune

SETTINGS = [
    Setting("full"),
    Setting("fastv K=2, 64 kept", "fastv", 64, {"layer": 2}),
    Setting("duplication (DART) K=2, 68 kept", "duplication", 68),
    Setting("transition, paper schedule (keep=0.125)", "transition", 0.125),
    Setting("transition, 64 kept", "transition", 64),
    # keep=1.0: stage 1 keeps every token
    Setting("diversity_kcenter stage 2 only (all removed at layer 12)", vtprune.policy("diversity_kcenter"), 1.0),
]


@torch.no_grad()
def measure(repeats: int, dtype: torch.dtype, batch: int, words: int) -> list[dict]:
    model, processor = synthetic_llava(QWEN2_05B_LLAVA, dtype)
    inputs = image_inputs(processor, prompt(words), batch)
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"].to(dtype)).pooler_output
    call = {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(features))},
        "logits_to_keep": 1,
    }
    depth, length = len(model.model.language_model.layers), inputs["input_ids"].shape[1]
    full_lengths = (length,) * depth
    model(**call)  # warm-up
    cpu = torch.device("cpu")
    measured = interleaved(model, SETTINGS, lambda: {"seconds": seconds(lambda: model(**call), cpu)}, repeats)
    full = measured[0].medians["seconds"]
    rows = []
    for entry in measured:
        layer_tokens = entry.layer_tokens(full_lengths)
        rows.append(
            {
                "setting": entry.setting.name,
                "length": length,
                "seconds": entry.medians["seconds"],
                "ideal": sum(full_lengths) / layer_tokens,
                "achieved": full / entry.medians["seconds"],
                "mean_tokens": layer_tokens / depth,
            }
        )
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
        f"{rows[0]['length']} prompt tokens, {torch.get_num_threads()} threads, median of {args.repeats}"
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

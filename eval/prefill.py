"""Prefill of a real-sized random model, full against pruned at the vision boundary.

    python -m vtprune.eval.prefill --model qwen2-vl-2b [--side 448]
    python -m vtprune.eval.prefill --model llava-onevision-0.5b [--side 768]
    python -m vtprune.eval.prefill --model glm-4.1v-small [--side 448]
    python -m vtprune.eval.prefill --model internvl3-1b [--side 896]
    python -m vtprune.eval.prefill --model gemma-3-small [--side 896]
    [--repeats 3] [--policy cls_attention] [--dtype bfloat16]

Builds a random-weight model with a real checkpoint's sizes (the vocabulary is the tiny test one, which
only shrinks the embedding table), one `--side` x `--side` image, and times `forward` (as generation's
prefill: logits for the last token only) unpatched and patched to keep 25% and 11% of the visual tokens.
Hooks on the language model time its part alone; the vision tower runs in full in every setting (boundary
pruning saves LLM work only). Visual tokens are counted from the trace (LLaVA-OneVision keeps its newline
tokens beyond the budget). Interleaved, median of `--repeats`. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from vtprune.eval import synthetic

import vtprune

KEEPS = (None, 0.25, 0.11)
PLAIN_PROMPT = "user : {image} " + "what is shown " * 10 + "? assistant :"
"""The prompt of families whose processor expands a bare image token."""


@dataclass(frozen=True)
class RandomModel:
    heading: str
    build: Callable[[torch.dtype], tuple[Any, Any]]
    prompt: str
    """The prompt around one image placeholder, `{image}`."""
    side: int
    """The default image side in pixels."""


def _qwen2_vl_2b(dtype: torch.dtype) -> tuple[Any, Any]:
    # tower: 32 blocks, width 1280, 16 heads; LLM: 28 layers, width 1536, 12 query / 2 key-value heads, MLP 8960
    sizes = {"vision_depth": 32, "vision_width": 1280, "vision_heads": 16, "text_layers": 28, "text_hidden": 1536}
    config = synthetic.qwen_vl_config("qwen2_vl", **sizes, text_heads=12, text_kv_heads=2, text_intermediate=8960)
    config.vision_config.mlp_ratio = 4
    return synthetic.qwen_vl_model(config, dtype=dtype), synthetic.qwen_vl_processor("qwen2_vl", max_tokens=64**2)


def _llava_onevision_05b(dtype: torch.dtype) -> tuple[Any, Any]:
    # SigLIP-so400m/14-384 tower (26 layers as OneVision uses it, width 1152, MLP 4304) with anyres tiles up to 6x6
    # and anyres_max_9; Qwen2-0.5B-sized LLM: 24 layers, width 896, 14 query / 2 key-value heads, MLP 4864
    config = synthetic.llava_config(
        "qwen2",
        vision="siglip",
        family="llava_onevision",
        image_size=384,
        patch_size=14,
        vision_layers=26,
        vision_hidden=1152,
        vision_heads=16,
        vision_intermediate=4304,
        text_layers=24,
        text_hidden=896,
        text_heads=14,
        text_kv_heads=2,
        text_intermediate=4864,
        vision_aspect_ratio="anyres_max_9",
        tiles=6,
    )
    return synthetic.llava_model(config, dtype=dtype), synthetic.llava_processor(config)


def _glm4v_small(dtype: torch.dtype) -> tuple[Any, Any]:
    # GLM-4.1V-9B's tower (24 blocks, width 1536, 12 heads, MLP 13696 in the merger) with a 12-layer LLM of width
    # 1536 (12 query / 2 key-value heads of 128, half rotated; MLP 4608): the 9B's 40 layers of 4096 do not fit 2 cores
    sizes = {"vision_depth": 24, "vision_width": 1536, "vision_heads": 12, "text_layers": 12, "text_hidden": 1536}
    config = synthetic.qwen_vl_config("glm4v", **sizes, text_heads=12, text_kv_heads=2, text_intermediate=4608)
    config.vision_config.intermediate_size = 13696
    config.vision_config.image_size = 336
    return synthetic.qwen_vl_model(config, dtype=dtype), synthetic.qwen_vl_processor("glm4v", max_tokens=64**2)


def _internvl3_1b(dtype: torch.dtype) -> tuple[Any, Any]:
    # InternViT-300M (24 layers, width 1024, 16 heads, MLP 4096, 448-pixel tiles) and a Qwen2.5-0.5B-sized LLM
    # (24 layers, width 896, 14 query / 2 key-value heads, MLP 4864): InternVL3-1B's sizes
    config = synthetic.internvl_config(
        image_size=448, vision_layers=24, vision_hidden=1024, vision_heads=16, text_layers=24, text_hidden=896
    )
    config.vision_config.intermediate_size = 4096
    config.text_config.num_attention_heads, config.text_config.num_key_value_heads = 14, 2
    config.text_config.intermediate_size = 4864
    return synthetic.internvl_model(config, dtype=dtype), synthetic.internvl_processor(config, max_tiles=12)


def _gemma3_small(dtype: torch.dtype) -> tuple[Any, Any]:
    # Gemma 3 4B's SigLIP-so400m/14-896 at 8 of its 27 layers (width 1152, 16 heads, MLP 4304; 4096 patches pooled
    # to 256 tokens) and 12 of its LLM's 34 layers (width 2560, 8 query / 4 key-value heads of 256, MLP 10240;
    # five sliding-window layers of 1024 to each global one): the whole 4B does not fit 2 cores' time
    config = synthetic.gemma3_config(
        image_size=896, patch_size=14, tokens_per_image=256, vision_layers=8, vision_hidden=1152, vision_heads=16,
        text_layers=12, text_hidden=2560, text_heads=8, text_kv_heads=4, head_dim=256, sliding_window=1024,
        layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(12)),
    )  # fmt: skip
    config.vision_config.intermediate_size = 4304
    config.text_config.intermediate_size = 10240
    return synthetic.gemma3_model(config, dtype=dtype), synthetic.gemma3_processor(config)


MODELS = {
    "qwen2-vl-2b": RandomModel(
        "Qwen2-VL-2B-sized random model",
        _qwen2_vl_2b,
        "user : <|vision_start|>{image}<|vision_end|> " + "what is shown " * 10 + "? assistant :",
        448,
    ),
    "llava-onevision-0.5b": RandomModel(
        "LLaVA-OneVision-0.5B-sized random model (anyres)",
        _llava_onevision_05b,
        PLAIN_PROMPT,
        768,
    ),
    "glm-4.1v-small": RandomModel(
        "GLM-4.1V-sized tower with a 12-layer LLM, random",
        _glm4v_small,
        "user : <|begin_of_image|>{image}<|end_of_image|> " + "what is shown " * 10 + "? assistant :",
        448,
    ),
    "internvl3-1b": RandomModel(
        "InternVL3-1B-sized random model (dynamic tiles)",
        _internvl3_1b,
        PLAIN_PROMPT,
        896,
    ),
    "gemma-3-small": RandomModel(
        "Gemma-3-4B-sized random model at 8 tower and 12 LLM layers",
        _gemma3_small,
        PLAIN_PROMPT,
        896,
    ),
}


class Stopwatch:
    """Times every call of a module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds: list[float] = []
        self._handles = [
            module.register_forward_pre_hook(lambda *_: setattr(self, "_start", time.perf_counter())),
            module.register_forward_hook(lambda *_: self.seconds.append(time.perf_counter() - self._start)),
        ]


@torch.no_grad()
def measure(name: str, repeats: int, side: int, policy: str, dtype: torch.dtype) -> list[dict]:
    chosen = MODELS[name]
    model, processor = chosen.build(dtype)
    prompt = chosen.prompt.format(image=processor.image_token)
    inputs = processor(images=[synthetic.random_image(side, side)], text=[prompt], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    call = {**inputs, "logits_to_keep": 1}
    llm = Stopwatch(model.model.language_model)
    model(**call)  # warm-up
    totals: dict[float | None, list[float]] = {keep: [] for keep in KEEPS}
    counts: dict[float | None, tuple[int, int]] = {}
    full = int((inputs["input_ids"] == model.config.image_token_id).sum())
    for _ in range(repeats):
        for keep in KEEPS:
            if keep is not None:
                vtprune.patch(model, policy, keep=keep)
            start = time.perf_counter()
            model(**call)
            totals[keep].append(time.perf_counter() - start)
            visual = full if keep is None else sum(r.n_after for r in vtprune.last_trace(model))
            counts[keep] = (visual, inputs["input_ids"].shape[1] - full + visual)
            vtprune.unpatch(model)
    llm_times = {keep: llm.seconds[1 + i :: len(KEEPS)] for i, keep in enumerate(KEEPS)}
    return [
        {
            "setting": "full" if keep is None else f"{policy}, keep {keep:.0%}",
            "visual": counts[keep][0],
            "tokens": counts[keep][1],
            "total": statistics.median(totals[keep]),
            "llm": statistics.median(llm_times[keep]),
        }
        for keep in KEEPS
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="qwen2-vl-2b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", type=int, help="image side in pixels (default: the model's, 448 or 768)")
    parser.add_argument("--policy", default="cls_attention")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    side = args.side or MODELS[args.model].side
    rows = measure(args.model, args.repeats, side, args.policy, getattr(torch, args.dtype))
    print(
        f"{MODELS[args.model].heading}, one {side}x{side} image, {args.dtype}, batch 1, "
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

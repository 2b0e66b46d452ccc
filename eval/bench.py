"""`vtprune bench`: prefill and decode timing of the full model against each policy, and what the token counts promise.

    vtprune bench                                 # random-weight CLIP-L + Qwen2-0.5B-sized LLaVA, bf16, CPU
    vtprune bench --policies fastv cls_attention --keep 64 --repeats 5 --csv bench.csv
    vtprune bench --model llava-hf/llava-1.5-7b-hf --device cuda --dtype float16 --batch 8 --new-tokens 64
    vtprune bench --size llava-1.5-7b --device cuda # a LLaVA-1.5-7B-sized random model on a GPU
    vtprune bench --tiny                          # a tiny random model, seconds (for tests)

The default model is a random-weight LLaVA with a CLIP ViT-L/14-336 tower and a Qwen2-0.5B-sized LLM (24
layers, width 896, 14 query / 2 key-value heads, MLP 4864; the vocabulary is the tiny test one, which only
shrinks the embedding table); `--model` loads a checkpoint by hub name or local directory instead. Every
setting (the unpatched model, then each policy at `--keep`) gets the same random image(s) and prompt, and
each repeat times, settings interleaved:

- prefill: `forward` with the image (vision tower and pruning included) and `logits_to_keep=1`, as
  generation's prefill; "LLM prefill" is the part from the first decoder layer's start to the last one's end;
- decode: a greedy `generate` of exactly `--new-tokens` tokens, its steps after the first timed by `Clock`
  (tokens per second per sequence, on the cache the pruned prefill left).

"ideal" is the full prefill's layer-tokens (the sequence length each decoder layer ran on, summed over layers)
over the pruned one's, from the trace's `layer_lengths`: the LLM speed-up of a cost linear in tokens.
"achieved" is the measured LLM prefill ratio, "prefill speed-up" the whole forward's. "pruning" is the time the
trace counts for scoring, selection and compaction (host clock; on CUDA it includes the queued work the
policy's code waits on), also as a share of the unpatched prefill. Medians of `--repeats`;
CUDA is synchronised before every clock reading. Prints a markdown table; `--csv` also writes the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BatchFeature
from vtprune.eval import synthetic
from vtprune.eval.efficiency import Clock

import vtprune
from vtprune.budget import keep_from_text

QWEN2_05B_LLAVA = {
    **synthetic.CLIP_L_TOWER,
    "text": "qwen2",
    "text_layers": 24,
    "text_hidden": 896,
    "text_heads": 14,
    "text_kv_heads": 2,
    "text_intermediate": 4864,
}
LLAVA_7B = {
    **synthetic.CLIP_L_TOWER,
    "text": "llama",
    "text_layers": 32,
    "text_hidden": 4096,
    "text_heads": 32,
    "text_kv_heads": 32,
    "text_intermediate": 11008,
}
RANDOM_MODELS = {
    "qwen2-0.5b": (QWEN2_05B_LLAVA, "random LLaVA (CLIP-L/14-336 tower, Qwen2-0.5B-sized LLM)"),
    "llava-1.5-7b": (LLAVA_7B, "random LLaVA-1.5-7B-sized LLaVA (CLIP-L/14-336 tower, Llama-7B-sized LLM)"),
}
"""`--size` choices: `synthetic.llava_config` sizes and how the table's heading names the model."""
TINY_LLAVA = {"text": "qwen2", "text_layers": 24}
"""`synthetic.llava_config` sizes of a model that runs in milliseconds: 16 visual tokens, and as many decoder
layers as the default model (of width 32), so every policy's default cuts fit."""
IMAGE_SIDE = 336
TEXT_WORDS = 40
"""Words of the synthetic models' question (the tokenizer's vocabulary is a few dozen words)."""
QUESTION = "Describe the image in detail."
"""The question asked of a loaded checkpoint, in its chat template."""
COLUMNS = [
    "setting",
    "policy",
    "keep",
    "visual_before",
    "visual_after",
    "mean_visual_per_layer",
    "layer_tokens",
    "prefill_ms",
    "prefill_speedup",
    "pruning_ms",
    "pruning_share",
    "llm_prefill_ms",
    "ideal_speedup",
    "achieved_speedup",
    "achieved_over_ideal",
    "decode_tokens_per_s",
    "decode_speedup",
]


@dataclass(frozen=True)
class Setting:
    """The unpatched model (`policy` None) or one patch of it."""

    name: str
    policy: str | vtprune.Policy | None = None
    keep: int | float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Measured:
    """A setting's median of each measured quantity, and the trace of its last patched call (None unpatched)."""

    setting: Setting
    medians: dict[str, float]
    trace: vtprune.Trace | None

    def layer_tokens(self, full_lengths: tuple[int, ...]) -> int:
        """The sequence lengths the decoder layers ran on in prefill, summed (`full_lengths` unpatched)."""
        return sum(full_lengths if self.trace is None else self.trace.layer_lengths)


@contextlib.contextmanager
def applied(model: nn.Module, setting: Setting) -> Iterator[vtprune.Patch | None]:
    """`model` patched as `setting` says for the block (left as it is for the unpatched setting)."""
    if setting.policy is None:
        yield None
        return
    with vtprune.patched(model, setting.policy, keep=setting.keep, **setting.options) as handle:
        yield handle


def interleaved(
    model: nn.Module, settings: list[Setting], measure: Callable[[], dict[str, float]], repeats: int
) -> list[Measured]:
    """Medians over `repeats` of what `measure` returns under each setting, the settings taking turns within
    each repeat, so drifts in machine speed hit them alike."""
    samples: dict[str, list[dict[str, float]]] = {setting.name: [] for setting in settings}
    traces: dict[str, vtprune.Trace | None] = {}
    for _ in range(repeats):
        for setting in settings:
            with applied(model, setting) as handle:
                sample = measure()
                traces[setting.name] = handle.trace if handle else None
                # the last call's (generate's prefill of the same prompt) scoring, selection and compaction
                sample["pruning"] = handle.trace.seconds if handle else 0.0
                samples[setting.name].append(sample)
    return [Measured(setting, medians(samples[setting.name]), traces[setting.name]) for setting in settings]


def medians(samples: list[dict[str, float]]) -> dict[str, float]:
    """The median of each quantity over samples that all measure the same ones."""
    return {key: statistics.median(sample[key] for sample in samples) for key in samples[0]}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so a clock read next sees it done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(run: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of `run()`, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


class DecoderStopwatch:
    """While open, times each call from the first decoder layer's start to the last decoder layer's end."""

    def __init__(self, layers: nn.ModuleList, device: torch.device) -> None:
        self.layers = layers
        self.device = device
        self.seconds = float("nan")
        self._start = 0.0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> DecoderStopwatch:
        self._handles = [
            self.layers[0].register_forward_pre_hook(self._on_first, prepend=True),
            self.layers[-1].register_forward_hook(self._on_last),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _on_first(self, *_: object) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def _on_last(self, *_: object) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def prompt(words: int) -> str:
    """A LLaVA-1.5 prompt with one image and a question of `words` words, for the synthetic tokenizer."""
    return "USER: <image>\n" + " ".join(["what"] * words) + " ? ASSISTANT:"


def synthetic_llava(sizes: dict[str, Any], dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """A random-weight LLaVA of `synthetic.llava_config` sizes, built in `dtype`, and its processor."""
    config = synthetic.llava_config(**sizes)
    return synthetic.llava_model(config, dtype=dtype), synthetic.llava_processor(config)


def image_inputs(processor: Any, text: str, batch: int) -> BatchFeature:
    """`batch` copies of `text`, each with its own random `IMAGE_SIDE`-square image, through `processor`."""
    images = [synthetic.random_image(IMAGE_SIDE, IMAGE_SIDE, seed=index) for index in range(batch)]
    return processor(images=images, text=[text] * batch, return_tensors="pt", padding=True)


def model_and_inputs(args: argparse.Namespace) -> tuple[nn.Module, BatchFeature, str]:
    """The model on its device, its inputs there, and a description of the model for the table's heading."""
    dtype = getattr(torch, args.dtype)
    if args.model:
        from vtprune.eval.runner import load_model, prompt_text  # imports the benchmarks: only for checkpoints

        model, processor = load_model(args.model, args.device, dtype, None)
        inputs, description = image_inputs(processor, prompt_text(processor, QUESTION), args.batch), args.model
    else:
        sizes, description = (TINY_LLAVA, "tiny random LLaVA") if args.tiny else RANDOM_MODELS[args.size]
        model, processor = synthetic_llava(sizes, dtype)
        model.to(args.device)
        inputs = image_inputs(processor, prompt(TEXT_WORDS), args.batch)
    inputs = inputs.to(args.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return model, inputs, description


def timing(model: nn.Module, inputs: BatchFeature, new_tokens: int) -> Callable[[], dict[str, float]]:
    """One measurement of prefill (whole forward and decoder layers) and decode speed on `inputs`."""
    device = inputs["input_ids"].device
    layers = model.get_decoder().layers
    placeholder_ids = [getattr(model.config, f"{kind}_token_id", None) for kind in ("image", "video")]
    # a random model may emit a placeholder, which the patched model would take for a new prompt's image
    generation = {"do_sample": False, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens}
    generation["suppress_tokens"] = [token for token in placeholder_ids if token is not None]

    def measure() -> dict[str, float]:
        with DecoderStopwatch(layers, device) as llm:
            prefill = seconds(lambda: model(**inputs, logits_to_keep=1), device)
        clock = Clock()
        model.generate(**inputs, **generation, logits_processor=[clock])
        return {"prefill": prefill, "llm_prefill": llm.seconds, "decode": clock.decode_tokens_per_second}

    return measure


def visual_counts(measured: Measured, placeholders: list[int]) -> dict[str, float]:
    """Visual tokens per image before and after pruning and per decoder layer, averaged over the batch."""
    if measured.trace is None:
        before = after = per_layer = statistics.mean(placeholders)
    else:
        before = statistics.mean(record.n_before for record in measured.trace)
        after = statistics.mean(record.n_after for record in measured.trace)
        per_layer = measured.trace.mean_layer_tokens()
    return {"visual_before": before, "visual_after": after, "mean_visual_per_layer": per_layer}


def rows(measured: list[Measured], full_lengths: tuple[int, ...], placeholders: list[int]) -> list[dict[str, Any]]:
    """One row of `COLUMNS` per setting; speed-ups are against the first (unpatched) setting."""
    full = measured[0]
    full_layer_tokens = sum(full_lengths)
    table = []
    for entry in measured:
        layer_tokens = entry.layer_tokens(full_lengths)
        ideal = full_layer_tokens / layer_tokens
        achieved = full.medians["llm_prefill"] / entry.medians["llm_prefill"]
        table.append(
            {
                "setting": entry.setting.name,
                "policy": entry.setting.policy or "",
                "keep": "" if entry.setting.policy is None else entry.setting.keep,
                **visual_counts(entry, placeholders),
                "layer_tokens": layer_tokens,
                "prefill_ms": entry.medians["prefill"] * 1e3,
                "prefill_speedup": full.medians["prefill"] / entry.medians["prefill"],
                "pruning_ms": entry.medians["pruning"] * 1e3,
                "pruning_share": entry.medians["pruning"] / full.medians["prefill"],
                "llm_prefill_ms": entry.medians["llm_prefill"] * 1e3,
                "ideal_speedup": ideal,
                "achieved_speedup": achieved,
                "achieved_over_ideal": achieved / ideal,
                "decode_tokens_per_s": entry.medians["decode"],
                "decode_speedup": entry.medians["decode"] / full.medians["decode"],
            }
        )
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| setting | visual tokens kept | mean visual tokens per layer | prefill (ms) | prefill speed-up "
        "| pruning (ms) | pruning / full prefill | LLM prefill (ms) | ideal LLM speed-up | achieved | achieved / ideal "
        "| decode (tokens/s) | decode speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['setting']} | {row['visual_after']:g} of {row['visual_before']:g} "
            f"| {row['mean_visual_per_layer']:.0f} | {row['prefill_ms']:.0f} | {row['prefill_speedup']:.2f}x "
            f"| {row['pruning_ms']:.1f} | {100 * row['pruning_share']:.2f}% "
            f"| {row['llm_prefill_ms']:.0f} | {row['ideal_speedup']:.2f}x | {row['achieved_speedup']:.2f}x "
            f"| {row['achieved_over_ideal']:.2f} | {row['decode_tokens_per_s']:.1f} | {row['decode_speedup']:.2f}x |"
        )
    return "\n".join(lines)


def write_csv(table: list[dict[str, Any]], path: Path, columns: list[str] = COLUMNS) -> None:
    """The rows as CSV, one column per `columns` entry, numbers unrounded."""
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtprune bench", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="hub name or local directory (default: a random-weight LLaVA)")
    source.add_argument("--tiny", action="store_true", help="a tiny random-weight LLaVA instead (seconds)")
    parser.add_argument("--size", choices=list(RANDOM_MODELS), default="qwen2-0.5b", help="the random model's size")
    names = list(vtprune.policies())
    parser.add_argument(
        "--policies", nargs="+", choices=names, metavar="POLICY", help=f"any of {', '.join(names)} (default: all)"
    )
    parser.add_argument(
        "--keep", type=keep_from_text, default=0.25, help="fraction (0.25, default) or token count (64)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setting, interleaved (default 3)")
    parser.add_argument("--batch", type=int, default=1, help="copies of the prompt, each with its own image")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens each generate makes (default 8, >= 2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    return parser


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = arguments()
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1 or args.batch < 1:
        parser.error("--new-tokens must be at least 2, --repeats and --batch at least 1")
    model, inputs, description = model_and_inputs(args)
    settings = [Setting("full")] + [Setting(name, name, args.keep) for name in args.policies or vtprune.policies()]
    model(**inputs, logits_to_keep=1)  # warm-up
    measured = interleaved(model, settings, timing(model, inputs, args.new_tokens), args.repeats)
    length = inputs["input_ids"].shape[1]
    full_lengths = (length,) * len(model.get_decoder().layers)
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    table = rows(measured, full_lengths, placeholders)
    print(
        f"{description}, {args.dtype} on {args.device}, batch {args.batch}, {length} prompt tokens, keep {args.keep}, "
        f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(markdown(table))
    if args.csv:
        write_csv(table, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`vtprune eval`: how much faster, and how much accuracy lost, for a model, policies, budgets and benchmarks.

    vtprune eval                                  # the embedded model on `shapes`: every policy at 25% and 11%
    vtprune eval --leaderboard                    # every policy at 50%, 25% and 11%, ranked (leaderboard.md)
    vtprune eval --model llava-hf/llava-1.5-7b-hf --benchmarks pope textvqa --policies cls_attention fastv \\
        --budgets 0.25 64 --limit 500 --device cuda --dtype bfloat16 [--scoring official]
    accelerate launch -m vtprune.eval --model ...  # samples sharded over processes (GPUs), results merged

Every (benchmark, policy, budget) setting answers the same samples with greedy decoding, plus the unpruned
model ("none"). Prompts, answer lengths and Qwen-VL's image sizes are lmms-eval's; answers are scored by lmms-eval's
rules, or with `--scoring official` by each benchmark's own script's (see `vtprune.eval.samples.SCORINGS`). Each
answer is a JSON line in `<out>/results.jsonl` (prediction, score, visual tokens before and after, tokens per
decoder layer, analytic prefill FLOPs and KV-cache bytes, and its batch's time to first token, decode speed and
peak memory); a rerun skips the samples already answered with the same answer length and scoring. At the end the
main process writes `table.md` (printed too) and `accuracy_vs_tokens.png`; with `--leaderboard` also
`leaderboard.md` (the policies ranked, see `vtprune.eval.leaderboard`) and `accuracy_vs_prefill.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm import tqdm
from vtprune.eval import leaderboard, lmms_conventions
from vtprune.eval.benchmarks import benchmark, names
from vtprune.eval.efficiency import Clock, DecoderShape, peak_memory_bytes, sequence_layer_tokens
from vtprune.eval.report import write_report
from vtprune.eval.samples import SCORINGS, Benchmark, Sample

import vtprune
from vtprune.budget import keep_from_text

EMBEDDED = "vtprune-shapes"
UNPRUNED = "none"
DEFAULT_BUDGETS = (0.25, 0.11)


class ModelError(ValueError):
    """A model or processor that cannot be loaded; the message says which and why."""


@dataclass(frozen=True)
class Setting:
    """One column of the grid: a policy and its budget, or the unpruned model."""

    policy: str
    keep: float | int | None

    @property
    def key(self) -> str:
        return self.policy if self.keep is None else f"{self.policy}@{self.keep}"


def settings(policies: list[str], budgets: list[float | int]) -> list[Setting]:
    """The unpruned model first, then every policy at every budget."""
    return [Setting(UNPRUNED, None)] + [Setting(policy, keep) for policy in policies for keep in budgets]


def load_model(name: str, device: str, dtype: torch.dtype, device_map: str | None) -> tuple[Any, Any]:
    """The model and processor: the embedded `vtprune-shapes`, or any hub name or local directory; the processor is
    loaded with the options lmms-eval's wrapper for the model type gives it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if name == EMBEDDED:
        from vtprune.eval.shapes import MODEL_DIR

        name = str(MODEL_DIR)
    placement = {"device_map": device_map} if device_map else {}
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, **placement)
        processor = AutoProcessor.from_pretrained(name, **lmms_conventions.processor_options(model.config.model_type))
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model {name!r}: {error}") from error
    if not device_map:
        model.to(device)
    processor.tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
    return model.eval(), processor


def prompt_text(processor: Any, question: str, medium: str = "image") -> str:
    """The question as the model's chat template words a user turn with one image (`medium="video"`: one video)."""
    messages = [{"role": "user", "content": [{"type": medium}, {"type": "text", "text": question}]}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    placeholder = processor.video_token if medium == "video" else processor.image_token
    return f"USER: {placeholder}\n{question} ASSISTANT:"  # LLaVA-1.5's template


class Results:
    """The JSON lines of one output directory: this process's file, and the merge of every process's."""

    def __init__(self, out: Path, rank: int, world: int) -> None:
        self.out = out
        self.merged = out / "results.jsonl"
        self.own = self.merged if world == 1 else out / f"results.rank{rank}.jsonl"
        out.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(row: dict[str, Any]) -> tuple:
        return row["benchmark"], row["split"], row["setting"], row["id"]

    def rows(self, *paths: Path) -> dict[tuple, dict[str, Any]]:
        found = {}
        for path in paths or (self.merged, self.own):
            if path.exists():
                for line in path.read_text().splitlines():
                    if line.strip():
                        row = json.loads(line)
                        found[self.key(row)] = row
        return found

    def append(self, rows: list[dict[str, Any]]) -> None:
        with self.own.open("a") as file:
            for row in rows:
                file.write(json.dumps(row) + "\n")

    def merge(self) -> dict[tuple, dict[str, Any]]:
        """Fold every process's file into `results.jsonl` (later lines win) and remove them."""
        shards = sorted(self.out.glob("results.rank*.jsonl"))
        rows = self.rows(self.merged, *shards)
        self.merged.write_text("".join(json.dumps(row) + "\n" for row in rows.values()))
        for shard in shards:
            shard.unlink()
        return rows


def batches(items: list[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def answer(
    model: Any, processor: Any, bench: Benchmark, samples: list[Sample], setting: Setting, max_new_tokens: int
) -> list[dict[str, Any]]:
    """Greedy answers to one batch under `setting`, with what they cost; images, processor call and answers as the
    model type's lmms-eval wrapper makes them."""
    device = model.device
    model_type = model.config.model_type
    texts = [prompt_text(processor, bench.prompt(sample)) for sample in samples]
    images = [lmms_conventions.prepare_image(sample.image, model_type) for sample in samples]
    call = lmms_conventions.processor_call(model_type)
    inputs, answers, clock = greedy(model, processor, images, texts, max_new_tokens, **call)
    predictions = [lmms_conventions.cut_at_stops(text, bench.stops, model_type) for text in answers]

    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    real = inputs["attention_mask"].sum(1).tolist()
    trace = vtprune.last_trace(model) if setting.policy != UNPRUNED else None
    selection_ms = 1000 * trace.seconds / len(samples) if trace is not None else 0.0
    shape = DecoderShape.of(model.get_decoder().layers, model.config.get_text_config())
    element = torch.finfo(model.dtype).bits // 8
    rows = []
    for index, (sample, prediction) in enumerate(zip(samples, predictions, strict=True)):
        if trace is not None:
            record = trace[index]
            before, after, layers = record.n_before, record.n_after, record.layer_tokens
        else:
            before = after = placeholders[index]
            layers = (before,) * shape.layers
        tokens = sequence_layer_tokens(real[index] - placeholders[index], [layers], shape.layers)
        rows.append(
            {
                "id": sample.id,
                "group": sample.group,
                "prediction": prediction,
                "score": bench.correct(sample, prediction),
                "max_new_tokens": max_new_tokens,
                "visual_before": before,
                "visual_after": after,
                "layer_visual_tokens": sum(layers) / len(layers),
                "prefill_tflops": shape.prefill_flops(tokens) / 1e12,
                "kv_cache_mb": shape.cache_bytes(tokens, element) / 2**20,
                "batch_size": len(samples),
                "selection_ms": selection_ms,
                "first_token_s": clock.first_token_seconds,
                "decode_tokens_per_s": clock.decode_tokens_per_second,
                "peak_memory_mb": peak_memory_bytes(device) / 2**20,
            }
        )
    return rows


def greedy(
    model: Any, processor: Any, images: list[Any], texts: list[str], max_new_tokens: int, **call: Any
) -> tuple[Any, list[str], Clock]:
    """The processed inputs, the greedy answers (new tokens decoded, stripped) and the clock that timed them.
    `call` goes to the processor (videos: `videos=`, `video_metadata=`, `do_sample_frames=`)."""
    media = {"images": [image.convert("RGB") for image in images]} if images else {}
    inputs = processor(text=texts, return_tensors="pt", padding=True, **media, **call).to(model.device)
    for pixels in ("pixel_values", "pixel_values_videos"):
        if pixels in inputs:
            inputs[pixels] = inputs[pixels].to(model.dtype)
    clock = Clock()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=[clock])
    new = out[:, inputs["input_ids"].shape[1] :]
    return inputs, [text.strip() for text in processor.batch_decode(new, skip_special_tokens=True)], clock


def _patched(model: Any, setting: Setting) -> contextlib.AbstractContextManager:
    """The model patched for `setting` for the duration of a `with` block (checked now, so errors come early)."""
    if setting.policy == UNPRUNED:
        return contextlib.nullcontext()
    vtprune.patch(model, setting.policy, keep=setting.keep)
    return contextlib.closing(SimpleNamespace(close=lambda: vtprune.unpatch(model)))


def evaluate(args: argparse.Namespace) -> Path:
    """Run the grid (this process's share of the samples), merge, and write the report. Returns the table path."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # processes without GPUs still shard, over gloo
    device = args.device or (str(state.device) if state.num_processes > 1 else "cpu")
    dtype = getattr(torch, args.dtype)
    model, processor = load_model(args.model, device, dtype, args.device_map)
    out = Path(args.out or f"eval_results/{Path(args.model).name}")
    results = Results(out, state.process_index, state.num_processes)
    done = results.rows()
    grid = settings(args.policies or list(vtprune.policies()), args.budgets)
    loaded, refused, warm = {}, {}, False
    for name in args.benchmarks:
        bench = benchmark(name, args.scoring)
        split = args.split or bench.splits[0]
        samples = bench.load(split, data_dir=args.data_dir, limit=args.limit)
        loaded[name] = (bench, split, samples)
        mine = samples[state.process_index :: state.num_processes]
        length = args.max_new_tokens or lmms_conventions.max_new_tokens(bench.max_new_tokens, model.config.model_type)
        # answered already: under the same answer length and scoring (a change of either answers again)
        kept = {
            key
            for key, row in done.items()
            if (row.get("max_new_tokens"), row.get("scoring")) == (length, args.scoring)
        }
        for setting in grid:
            todo = [s for s in mine if (name, split, setting.key, s.id) not in kept]
            if not todo:
                continue
            if not warm:  # the first forward pays for allocations and lazy set-up: keep it out of the timings
                answer(model, processor, bench, todo[: args.batch_size], Setting(UNPRUNED, None), length)
                warm = True
            try:
                patching = _patched(model, setting)
            except (ValueError, TypeError) as error:  # a policy that does not fit this model: say so, go on
                print(f"skipping {setting.key} on {args.model}: {error}", file=sys.stderr)
                refused[setting.policy] = str(error)
                continue
            progress = tqdm(total=len(todo), desc=f"{name} {setting.key}", disable=args.quiet)
            with patching, progress:
                for chunk in batches(todo, args.batch_size):
                    rows = answer(model, processor, bench, chunk, setting, length)
                    common = {"model": args.model, "benchmark": name, "split": split, "setting": setting.key}
                    common["scoring"] = args.scoring
                    common |= {"policy": setting.policy, "keep": setting.keep, "batch": chunk[0].id}
                    common["process"] = state.process_index
                    results.append([{**common, **row} for row in rows])
                    progress.update(len(chunk))
    state.wait_for_everyone()
    table = out / "table.md"
    if state.is_main_process:
        rows = results.merge()
        text = write_report(rows.values(), loaded, out)
        if args.leaderboard:
            text = leaderboard.write(rows.values(), loaded, args.budgets, refused, out)
        if not args.quiet:
            print(text)
    state.wait_for_everyone()
    return table


def arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=EMBEDDED, help=f"hub name or local directory (default: {EMBEDDED})")
    parser.add_argument("--benchmarks", nargs="+", default=["shapes"], help=f"any of {', '.join(names())}")
    parser.add_argument("--policies", nargs="+", help="policies to compare (default: every registered one)")
    parser.add_argument(
        "--budgets", nargs="+", type=keep_from_text, help="fractions (0.25) or token counts (64) (default: 0.25 0.11)"
    )
    parser.add_argument(
        "--leaderboard",
        action="store_true",
        help="rank every registered policy (default budgets: 0.5 0.25 0.11): leaderboard.md, accuracy_vs_prefill.png",
    )
    parser.add_argument("--split", help="benchmark split (default: each benchmark's first)")
    parser.add_argument("--limit", type=int, default=200, help="samples per benchmark (default 200; 0: all)")
    parser.add_argument("--data-dir", help="read the benchmark from this directory instead of the hub")
    parser.add_argument("--out", help="output directory (default: eval_results/<model name>)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--max-new-tokens", type=int, help="answer length (default: each benchmark's, as lmms-eval sets it)"
    )
    parser.add_argument(
        "--scoring", default=SCORINGS[0], choices=SCORINGS, help="whose rules score the answers (default: lmms-eval)"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu, or each process's GPU under accelerate)")
    parser.add_argument("--device-map", help="'auto' spreads one model over every visible GPU (no sharding then)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no printed table")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = arguments(argparse.ArgumentParser(prog="vtprune eval", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    if args.leaderboard and args.policies:
        parser.error("--leaderboard ranks every registered policy: drop --policies")
    args.budgets = args.budgets or list(leaderboard.BUDGETS if args.leaderboard else DEFAULT_BUDGETS)
    args.limit = args.limit or None
    try:
        evaluate(args)
    except ModelError as error:
        raise SystemExit(str(error)) from error
    return 0

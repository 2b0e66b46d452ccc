"""Time spent scoring and selecting, relative to the vision tower, on a CLIP-L-sized random tower.

    python -m vtprune.eval.selection_overhead [--batch 1] [--repeats 5] [--dtype bfloat16] [--query-scale 1]

Builds a random-weight LLaVA with a CLIP ViT-L/14-336 tower (24 layers, width 1024, 577 tokens) and a
one-layer text model, then for each vision-side policy (and `conditional_dpp` once more with CLIP relevance
from a random CLIP-L-sized text tower) runs the patched `forward` and reads the
trace's scoring+selection seconds, against the time of the unpatched vision tower and
projector (`get_image_features`) on the same images. It also counts the tokens every encoder layer
runs on (in-tower policies such as `information_flow` run later layers on fewer) and times the
patched `forward` against the unpatched one, interleaved: keeping every token (hook dispatch and the
prompt rebuild) and at the budget. A random tower attends almost uniformly, which makes
`information_flow`'s entropy-driven cuts prune nothing before its final cut; `--query-scale 8`
multiplies the tower's query weights so attention concentrates as a trained tower's does. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch
from vtprune.eval import synthetic

import vtprune

CLIP_L = {
    **synthetic.CLIP_L_TOWER,
    "text_layers": 1,
    "text_hidden": 64,
    "text_heads": 4,
    "text_kv_heads": 2,
    "text_intermediate": 128,
}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class LayerTokens:
    """Counts the tokens each encoder layer runs on, summed over calls."""

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        self.total = 0
        self.handles = [layer.register_forward_pre_hook(self._count) for layer in layers]

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        self.total += args[0].shape[0] * args[0].shape[1]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


VISION_ONLY = {"diversity_kcenter": {"relevance_layer": None}}
"""Options that leave a policy's vision stage only (ToDRE without its decoder stage)."""


def timed_policies(config, tokenizer, clip_path: str) -> list[tuple[str, vtprune.Policy]]:
    """Every vision-side policy with its defaults, and CDPruner again with the paper's CLIP relevance (a random
    CLIP-L-sized text tower and joint space paired with the tower, saved at `clip_path`)."""
    named = [(name, vtprune.policy(name, **VISION_ONLY.get(name, {}))) for name in vtprune.policies()]
    synthetic.clip_checkpoint(clip_path, config.vision_config, tokenizer, text=synthetic.CLIP_L_TEXT)
    clip = vtprune.policy("conditional_dpp", clip_model=clip_path, tokenizer=tokenizer)
    return [*named, ("conditional_dpp (CLIP relevance)", clip)]


@torch.no_grad()
def measure(batch: int, repeats: int, dtype: torch.dtype, keep: int, query_scale: float) -> list[dict]:
    config = synthetic.llava_config(**CLIP_L)
    model = synthetic.llava_model(config, dtype=dtype)
    for layer in model.model.vision_tower.encoder.layers:
        layer.self_attn.q_proj.weight.mul_(query_scale)
    processor = synthetic.llava_processor(config)
    images = [synthetic.random_image(336, 336, seed=index) for index in range(batch)]
    inputs = processor(
        images=images, text=["USER: <image>\nwhat is shown ? ASSISTANT:"] * batch, return_tensors="pt", padding=True
    )
    pixel_values = inputs["pixel_values"].to(dtype)
    inputs = {**inputs, "pixel_values": pixel_values}
    model(**inputs)  # warm-up
    layers = model.model.vision_tower.encoder.layers
    full_layer_tokens = batch * len(layers) * (config.vision_config.image_size // 14) ** 2 + batch * len(layers)
    rows = []
    clip_path = tempfile.mkdtemp(prefix="vtprune-clip-")
    for name, policy in timed_policies(config, processor.tokenizer, clip_path):
        if not policy.acts_on_vision:
            continue  # nothing to time at the tower: decoder_speed.py measures the in-decoder cuts
        tower, select, overhead, pruned = [], [], [], []
        counter = LayerTokens(layers)
        for _ in range(repeats):  # interleaved, so drifts in machine speed hit both sides alike
            tower.append(seconds(lambda: model.model.get_image_features(pixel_values=pixel_values)))
            unpatched = seconds(lambda: model(**inputs))
            with vtprune.patched(model, policy, keep=keep):
                counter.total = 0
                pruned.append(seconds(lambda: model(**inputs)) - unpatched)
                layer_tokens = counter.total
                select.append(vtprune.last_trace(model).seconds)
            with vtprune.patched(model, policy, keep=1.0):
                overhead.append(seconds(lambda: model(**inputs)) - unpatched)
        counter.remove()
        tower_s, select_s = statistics.median(tower), statistics.median(select)
        rows.append(
            {
                "policy": name,
                "tower_s": tower_s,
                "select_s": select_s,
                "percent": 100 * select_s / tower_s,
                "layer_tokens": 100 * layer_tokens / full_layer_tokens,
                "wall_overhead_s": statistics.median(overhead),
                "pruned_minus_unpatched_s": statistics.median(pruned),
            }
        )
    shutil.rmtree(clip_path)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--query-scale", type=float, default=1.0, help="multiply the tower's query weights")
    args = parser.parse_args(argv)
    rows = measure(args.batch, args.repeats, getattr(torch, args.dtype), args.keep, args.query_scale)
    print(
        f"CLIP-L/14-336 random tower (queries x{args.query_scale:g}), {args.dtype}, batch {args.batch}, keep "
        f"{args.keep} of 576, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(
        "| policy | vision tower + projector (ms) | scoring + selection (ms) | % of tower "
        "| encoder layer-tokens (% of full) | patched forward minus unpatched: keeping all / at keep (ms) |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['policy']} | {1000 * row['tower_s']:.1f} | {1000 * row['select_s']:.2f} "
            f"| {row['percent']:.2f}% | {row['layer_tokens']:.1f}% "
            f"| {1000 * row['wall_overhead_s']:+.1f} / {1000 * row['pruned_minus_unpatched_s']:+.1f} |"
        )


if __name__ == "__main__":
    main()

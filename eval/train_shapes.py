"""Build and train `vtprune-shapes`, the small LLaVA that answers `shapes` questions, and save it to
`eval/vtprune_shapes/`.

    python -m vtprune.eval.train_shapes [--out DIR] [--steps N] [--seed S]

The model is LLaVA-1.5 in miniature, from the real transformers classes: a CLIP ViT (CLS token, 14-pixel
patches, 168-pixel input: 144 image tokens) whose penultimate layer, without the CLS token, goes through
the 2-layer MLP projector into a small Llama. The tokenizer is word-level over the prompt template and
every question and answer word; the processor is `LlavaProcessor` with a PIL `CLIPImageProcessor`.

Training has two stages, on train-split scenes drawn on the fly (seeded, so a run is reproducible):

1. The tower alone, with heads on its CLS outputs (the feature layer's and the last layer's) for which
   (colour, shape) pairs are present and how many of each shape, and a head on the feature layer's patch
   tokens for the object under each patch and whether its centre is there. The CLS heads are what make
   the CLS attention point at the objects, as in a trained CLIP; the patch heads make each image token
   say what lies under it.
2. The whole LLaVA on train-split questions, cross-entropy on the answer word and end of sequence, with
   the tower at a lower learning rate.

It ends by scoring the first 200 test samples and records seed, steps, time and accuracy in `training.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch import nn
from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
from vtprune.eval import shapes, synthetic

SIZES = {
    "image_size": shapes.IMAGE_SIZE,
    "patch_size": 14,
    "vision_layers": 4,
    "vision_hidden": 128,
    "vision_heads": 4,
    "vision_intermediate": 512,
    "text_layers": 3,
    "text_hidden": 128,
    "text_heads": 4,
    "text_kv_heads": 4,
    "text_intermediate": 512,
}
TEMPLATE_WORDS = ["user", "assistant", ":"]
PAIRS = [(colour, shape) for colour in shapes.COLOURS for shape in shapes.SHAPES]
MAX_COUNT = shapes.OBJECTS[1]
EVAL_SAMPLES = 200


def vocabulary() -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer: the synthetic models' special tokens (same ids), the template and `shapes` words."""
    words = list(dict.fromkeys([*TEMPLATE_WORDS, *shapes.WORDS]))
    vocab = {token: index for index, token in enumerate([*synthetic.SPECIAL, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(synthetic.SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def build(seed: int) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Randomly initialised `vtprune-shapes` and its processor."""
    vocab = vocabulary()
    config = synthetic.llava_config(**SIZES)
    # The synthetic config counts the synthetic vocabulary; the special tokens' ids are the same in both.
    assert config.image_token_id == vocab.convert_tokens_to_ids("<image>") and config.pad_token_id == vocab.pad_token_id
    config.text_config.vocab_size = len(vocab)
    model = synthetic.llava_model(config, seed=seed)
    model.generation_config.eos_token_id = vocab.eos_token_id
    size = config.vision_config.image_size
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=vocab,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    return model, processor


def train_seeds(start: int, batch: int) -> Iterator[list[int]]:
    """Consecutive batches of train-split seeds."""
    index = start
    while True:
        yield [shapes.seed_of("train", i) for i in range(index, index + batch)]
        index += batch


class TowerHeads(nn.Module):
    """Scene labels (pairs present, count of each shape) from CLS outputs; per patch, the object in it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        scene_labels = len(PAIRS) + len(shapes.SHAPES) * (MAX_COUNT + 1)
        self.scene = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, scene_labels))
        self.patch = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(PAIRS) + 1))

    def loss(
        self, cls_outputs: list[torch.Tensor], patches: torch.Tensor, targets: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        # Objects fill a few patches of 144: their patches and the background's weigh the same.
        objects = targets["patch_objects"]
        found = objects < len(PAIRS)
        errors = F.cross_entropy(self.patch(patches).transpose(1, 2), objects, reduction="none")
        total = errors[found].mean() + errors[~found].mean()
        for cls in cls_outputs:
            logits = self.scene(cls)
            presence, counts = logits[:, : len(PAIRS)], logits[:, len(PAIRS) :].unflatten(1, (len(shapes.SHAPES), -1))
            total = total + F.binary_cross_entropy_with_logits(presence, targets["presence"], reduction="sum") / len(
                cls
            )
            total = total + F.cross_entropy(counts.transpose(1, 2), targets["counts"])
        return total


def scene_targets(scene: shapes.Scene, grid: int) -> dict[str, torch.Tensor]:
    """Pair presence, counts per shape, and per patch (raster order) the pair in it or `len(PAIRS)` for none."""
    presence = torch.zeros(len(PAIRS))
    counts = torch.zeros(len(shapes.SHAPES), dtype=torch.long)
    objects = torch.full((grid * grid,), len(PAIRS))
    for item in scene.items:
        pair = PAIRS.index((item.colour, item.shape))
        presence[pair] = 1
        counts[shapes.SHAPES.index(item.shape)] += 1
        objects[item.cell] = pair
    return {"presence": presence, "counts": counts, "patch_objects": objects}


def schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain_tower(model, processor, steps: int, lr: float, seeds: Iterator[list[int]]) -> None:
    """Stage 1: the tower with scene and patch heads (the heads are thrown away)."""
    tower = model.model.vision_tower
    grid = shapes.IMAGE_SIZE // model.config.vision_config.patch_size
    heads = TowerHeads(model.config.vision_config.hidden_size)
    parameters = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    tower.train()
    for step in range(steps):
        scenes = [shapes.generate(seed)[0] for seed in next(seeds)]
        pixels = processor.image_processor([shapes.draw(scene) for scene in scenes], return_tensors="pt")
        targets = [scene_targets(scene, grid) for scene in scenes]
        targets = {key: torch.stack([one[key] for one in targets]) for key in targets[0]}
        out = tower(pixels["pixel_values"], output_hidden_states=True)
        features = out.hidden_states[model.config.vision_feature_layer]
        cls = [tower.post_layernorm(features[:, 0]), out.pooler_output]
        loss = heads.loss(cls, features[:, 1:], targets)
        for group in optimizer.param_groups:
            group["lr"] = lr * schedule(step, steps, warmup=steps // 20)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"tower step {step}/{steps} loss {loss.item():.4f}", flush=True)
    tower.eval()


def answer_batch(processor, seeds: list[int]) -> dict[str, torch.Tensor]:
    """Processor inputs for the seeds' questions followed by their answers and end of sequence, padded on
    the right, with labels on the answer and end-of-sequence tokens only."""
    samples = [shapes.generate(seed) for seed in seeds]
    texts = [
        shapes.PROMPT_TEMPLATE.format(question=query.text) + f" {query.answer(scene.items)} </s>"
        for scene, query in samples
    ]
    processor.tokenizer.padding_side = "right"
    inputs = processor(
        images=[shapes.draw(scene) for scene, _ in samples], text=texts, return_tensors="pt", padding=True
    )
    lengths = inputs["attention_mask"].sum(1)
    positions = torch.arange(inputs["input_ids"].shape[1])
    answer = (positions >= lengths[:, None] - 2) & (positions < lengths[:, None])
    inputs["labels"] = torch.where(answer, inputs["input_ids"], -100)
    return inputs


def train_answers(model, processor, steps: int, lr: float, seeds: Iterator[list[int]]) -> None:
    """Stage 2: projector and LLM on question/answer pairs, the tower frozen."""
    model.model.vision_tower.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    model.train()
    for step in range(steps):
        inputs = answer_batch(processor, next(seeds))
        loss = model(**inputs).loss
        for group in optimizer.param_groups:
            group["lr"] = lr * schedule(step, steps, warmup=steps // 20)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"answer step {step}/{steps} loss {loss.item():.4f}", flush=True)
    model.requires_grad_(True)
    model.eval()


def evaluate(model, processor, limit: int = EVAL_SAMPLES) -> dict[str, float]:
    """Unpruned accuracy (overall and per kind) on the first `limit` test samples."""
    bench = shapes.Shapes()
    samples = bench.load("test", limit=limit)
    processor.tokenizer.padding_side = "left"
    return bench.score(samples, shapes.predict(model, processor, samples))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=shapes.MODEL_DIR, help="where to save (default: the packaged dir)")
    parser.add_argument("--steps", type=int, default=1500, help="question/answer steps")
    parser.add_argument("--tower-steps", type=int, default=600, help="tower pretraining steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    start = time.time()
    model, processor = build(args.seed)
    seeds = train_seeds(0, args.batch)
    pretrain_tower(model, processor, args.tower_steps, lr=1e-3, seeds=seeds)
    train_answers(model, processor, args.steps, lr=1e-3, seeds=seeds)
    minutes = (time.time() - start) / 60
    metrics = evaluate(model, processor)
    print(json.dumps(metrics, indent=1))

    processor.tokenizer.padding_side = "left"
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    record = {
        "seed": args.seed,
        "tower_steps": args.tower_steps,
        "answer_steps": args.steps,
        "batch": args.batch,
        "train_minutes": round(minutes, 1),
        "threads": torch.get_num_threads(),
        "test_accuracy": {key: round(value, 1) for key, value in metrics.items()},
        "test_samples": EVAL_SAMPLES,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Build and train `vtprune-shapes`, the small LLaVA that answers `shapes` questions, and save it to
`eval/vtprune_shapes/`.

    python -m vtprune.eval.train_shapes [--out DIR] [--steps N] [--seed S] [--threads T]

The model is LLaVA-1.5 in miniature, from the real transformers classes: a CLIP ViT (CLS token, 14-pixel
patches, 168-pixel input: 144 image tokens) whose penultimate layer, without the CLS token, goes through
the 2-layer MLP projector into a small Llama. The tokenizer is word-level over the prompt template and
every question and answer word; the processor is `LlavaProcessor` with a PIL `CLIPImageProcessor`.

Training, on train-split scenes drawn on the fly and reproducible from the seed, has three stages:

1. The tower alone. Heads on its CLS outputs (the feature layer's and the last layer's) learn which
   (colour, shape) pairs are present and how many of each shape, which is what makes the CLS attention
   point at the objects, as in a trained CLIP; heads on the feature layer's patch tokens learn the object
   in each patch and the patch's row and column, so each image token says what lies under it and where.
2. Projector and LLM (tower frozen) on sparse sequences: each scene's object tokens and a few background
   tokens, at their original positions, with several questions per scene, at a fraction of the cost.
3. Projector and LLM on full sequences (all 144 image tokens, as at inference), several questions per scene.

Loss is cross-entropy on the answer word and end of sequence, plus `attention_loss`: the token that
predicts the answer is taught to attend to the question's cue words with half the first LLM layer's heads
(the other half are left free to read what the question asks for) and to the image tokens of its evidence
(`shapes.Query.evidence`) in the next layers of the decoder's first half (`EVIDENCE_LAYERS`). The run ends
by scoring the first 200 test samples; seed, steps, time and accuracy go to `training.json` beside the model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch import nn
from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
from transformers.modeling_outputs import BaseModelOutputWithPooling
from vtprune.eval import shapes, synthetic

SIZES = {
    "image_size": shapes.IMAGE_SIZE,
    "patch_size": shapes.CELL,
    "vision_layers": 4,
    "vision_hidden": 128,
    "vision_heads": 4,
    "vision_intermediate": 512,
    "text_layers": 6,
    "text_hidden": 128,
    "text_heads": 4,
    "text_kv_heads": 4,
    "text_intermediate": 512,
}
GRID = shapes.IMAGE_SIZE // shapes.CELL
TEMPLATE_WORDS = ["user", "assistant", ":"]
PAIRS = [(colour, shape) for colour in shapes.COLOURS for shape in shapes.SHAPES]
MAX_COUNT = shapes.OBJECTS[1]
SCENES_PER_STEP = {"tower": 32, "sparse": 16, "full": 4}
QUESTIONS_PER_SCENE = 8
"""Questions per scene in stages 2 and 3: the scene's own and others drawn from `shapes.questions`."""
BACKGROUND_TOKENS = 12
"""Image tokens without an object that stage 2 shows beside the objects' tokens."""
CUE_LAYERS = (0,)
EVIDENCE_LAYERS = tuple(range(1, SIZES["text_layers"] // 2))
"""The LLM layers whose attention from the answer-predicting token is taught to find the image tokens of the
question's evidence (see `attention_loss`): those after the cue layer in the first half of the decoder (1 and 2
of 6). The second half is left free, so by mid-depth the answer has moved into the text tokens, as in a trained
LLaVA (what FastV's early cut and ToDRE's removal of every visual token at half depth rest on)."""
CUE_HEADS = SIZES["text_heads"] // 2
"""How many of the cue layers' heads (the first ones) `attention_loss` teaches; the rest are left to the answer
loss, which needs them to bring in what the question asks for ('what shape is the blue object ?' and 'on which
side is the blue object ?' look up the same object with the same cue word). The evidence layers' heads are all
taught."""
ATTENTION_WEIGHT = 1.0
EXTRA_KINDS = {"colour": 1, "shape": 1, "count": 2, "exists": 2, "position": 2}
"""How often each kind is drawn, relatively, for stage 2's other questions: the harder kinds more."""
PATCH_ATTRIBUTES = {
    "colour": tuple(shapes.COLOURS),
    "shape": shapes.SHAPES,
    "side": ("left", "right"),
    "count": tuple(range(1, MAX_COUNT + 1)),
}
"""What stage 1 reads off each patch that holds an object: its colour and shape, the half of the picture it is
in, and how many objects of its shape the scene holds. Each attribute has one more class, 'no object'."""
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


def grid_position_embeddings(width: int) -> torch.Tensor:
    """2-D sine-cosine embeddings of the patches (raster order), half the channels for the column and half
    for the row, as in MAE: the tower's starting position embeddings, from which it reads places linearly."""
    quarter = width // 4
    frequencies = 1.0 / 100 ** (torch.arange(quarter) / quarter)
    index = torch.arange(GRID * GRID)
    angles = [(index % GRID)[:, None] * frequencies, (index // GRID)[:, None] * frequencies]
    return torch.cat([part for angle in angles for part in (angle.sin(), angle.cos())], dim=1)


def build(seed: int) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Randomly initialised `vtprune-shapes` and its processor."""
    vocab = vocabulary()
    config = synthetic.llava_config(**SIZES)
    # The synthetic config counts the synthetic vocabulary; the special tokens' ids are the same in both.
    assert config.image_token_id == vocab.convert_tokens_to_ids("<image>") and config.pad_token_id == vocab.pad_token_id
    config.text_config.vocab_size = len(vocab)
    model = synthetic.llava_model(config, seed=seed)
    embeddings = model.model.vision_tower.embeddings.position_embedding.weight
    with torch.no_grad():
        embeddings[1:] = grid_position_embeddings(embeddings.shape[1])
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


class TrainSeeds:
    """The train split's seeds in order, from the first; each batch takes the next ones."""

    def __init__(self) -> None:
        self.index = 0

    def take(self, count: int) -> list[int]:
        self.index += count
        return [shapes.seed_of("train", i) for i in range(self.index - count, self.index)]


def schedule(step: int, steps: int) -> float:
    """Learning-rate factor: linear warm-up over 5% of the steps, then cosine decay to a tenth."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def optimise(name: str, parameters: list[nn.Parameter], batch_loss: Callable[[], torch.Tensor], steps: int, lr: float):
    """AdamW for `steps` steps on `batch_loss()` (the loss on the next batch), with `schedule` and gradient
    clipping."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    for step in range(steps):
        loss = batch_loss()
        for group in optimizer.param_groups:
            group["lr"] = lr * schedule(step, steps)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"{name} step {step}/{steps} loss {loss.item():.4f}", flush=True)


class TowerHeads(nn.Module):
    """Stage 1's heads: scene labels from CLS outputs; per patch, each of `PATCH_ATTRIBUTES`."""

    def __init__(self, width: int) -> None:
        super().__init__()
        scene_labels = len(PAIRS) + len(shapes.SHAPES) * (MAX_COUNT + 1)
        self.scene = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, scene_labels))
        self.patch = nn.ModuleDict(
            {
                name: nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(values) + 1))
                for name, values in PATCH_ATTRIBUTES.items()
            }
        )

    def loss(self, cls_outputs: list[torch.Tensor], patches: torch.Tensor, targets: dict[str, torch.Tensor]):
        # Objects fill a few of the 144 patches: their patches and the background's weigh the same.
        found = targets["colour"] < len(shapes.COLOURS)
        total = patches.new_zeros(())
        for name, head in self.patch.items():
            errors = F.cross_entropy(head(patches).transpose(1, 2), targets[name], reduction="none")
            total = total + errors[found].mean() + errors[~found].mean()
        for cls in cls_outputs:
            logits = self.scene(cls)
            presence, counts = logits[:, : len(PAIRS)], logits[:, len(PAIRS) :].unflatten(1, (len(shapes.SHAPES), -1))
            presence_errors = F.binary_cross_entropy_with_logits(presence, targets["presence"], reduction="sum")
            total = total + presence_errors / len(cls)
            total = total + F.cross_entropy(counts.transpose(1, 2), targets["counts"])
        return total


def scene_targets(scene: shapes.Scene) -> dict[str, torch.Tensor]:
    """Pair presence and counts per shape; per patch (raster order) each of `PATCH_ATTRIBUTES`, or its
    'no object' class."""
    presence = torch.zeros(len(PAIRS))
    counts = torch.zeros(len(shapes.SHAPES), dtype=torch.long)
    for item in scene.items:
        presence[PAIRS.index((item.colour, item.shape))] = 1
        counts[shapes.SHAPES.index(item.shape)] += 1
    patches = {name: torch.full((GRID * GRID,), len(values)) for name, values in PATCH_ATTRIBUTES.items()}
    for item in scene.items:
        values = {
            "colour": item.colour,
            "shape": item.shape,
            "side": "left" if item.x < shapes.IMAGE_SIZE / 2 else "right",
            "count": int(counts[shapes.SHAPES.index(item.shape)]),
        }
        for name, value in values.items():
            patches[name][item.cell] = PATCH_ATTRIBUTES[name].index(value)
    return {"presence": presence, "counts": counts, **patches}


def pretrain_tower(model, processor, steps: int, lr: float, seeds: TrainSeeds) -> None:
    """Stage 1: the tower with scene and patch heads (the heads are thrown away)."""
    tower, layer = model.model.vision_tower, model.config.vision_feature_layer
    heads = TowerHeads(model.config.vision_config.hidden_size)

    def batch_loss() -> torch.Tensor:
        scenes = [shapes.generate(seed)[0] for seed in seeds.take(SCENES_PER_STEP["tower"])]
        pixels = processor.image_processor([shapes.draw(scene) for scene in scenes], return_tensors="pt")
        targets = [scene_targets(scene) for scene in scenes]
        targets = {key: torch.stack([one[key] for one in targets]) for key in targets[0]}
        out = tower(pixels["pixel_values"], output_hidden_states=True)
        features = out.hidden_states[layer]
        cls = [tower.post_layernorm(features[:, 0]), out.pooler_output]
        return heads.loss(cls, features[:, 1:], targets)

    tower.train()
    optimise("tower", [*tower.parameters(), *heads.parameters()], batch_loss, steps, lr)
    tower.eval()
    print("tower patch accuracy on objects:", patch_accuracy(tower, heads, processor, layer), flush=True)


@torch.no_grad()
def patch_accuracy(tower, heads: TowerHeads, processor, layer: int, scenes: int = 64) -> dict[str, float]:
    """How often stage 1's heads read each attribute right on the patches of the first test scenes' objects."""
    drawn = [shapes.generate(shapes.seed_of("test", index))[0] for index in range(scenes)]
    pixels = processor.image_processor([shapes.draw(scene) for scene in drawn], return_tensors="pt")
    patches = tower(pixels["pixel_values"], output_hidden_states=True).hidden_states[layer][:, 1:]
    targets = [scene_targets(scene) for scene in drawn]
    found = torch.stack([one["colour"] for one in targets]) < len(shapes.COLOURS)
    accuracy = {}
    for name, head in heads.patch.items():
        right = head(patches).argmax(-1) == torch.stack([one[name] for one in targets])
        accuracy[name] = round(100 * right[found].float().mean().item(), 1)
    return accuracy


def pick_questions(scene: shapes.Scene, query: shapes.Query, rng: np.random.Generator, count: int):
    """The scene's own question and `count - 1` others about it: a random kind, then (for 'exists') a random
    answer, then a random question."""
    by_kind: dict[tuple[str, str], list[shapes.Query]] = {}
    for other in shapes.questions(scene.items):
        key = (other.kind, other.answer(scene.items) if other.kind == "exists" else "")
        by_kind.setdefault(key, []).append(other)
    kinds = sorted({kind for kind, _ in by_kind})
    picked = [query]
    for _ in range(count - 1):
        weights = np.array([EXTRA_KINDS[kind] for kind in kinds], dtype=float)
        kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
        keys = sorted(key for key in by_kind if key[0] == kind)
        options = by_kind[keys[rng.integers(len(keys))]]
        picked.append(options[rng.integers(len(options))])
    return picked


def question_batch(model, processor, seeds: list[int], rng: np.random.Generator, background: int | None):
    """Stages 2 and 3's inputs: per scene, `QUESTIONS_PER_SCENE` questions (`pick_questions`), each after the
    scene's image tokens and followed by its answer and end of sequence; labels on those two. `background`
    image tokens without an object are shown beside the objects' (raster order, original position ids), or
    all 144 tokens when it is None, as at inference. Also returns, per row, the index of the token that
    predicts the answer and a mask of the image tokens of the question's evidence (`Query.evidence`)."""
    tokenizer, image_token = processor.tokenizer, model.config.image_token_id
    before, after = shapes.PROMPT_TEMPLATE.split("<image>")
    start = tokenizer(before, add_special_tokens=False)["input_ids"]
    samples = [shapes.generate(seed) for seed in seeds]
    pixels = processor.image_processor([shapes.draw(scene) for scene, _ in samples], return_tensors="pt")
    features = model.model.get_image_features(
        pixel_values=pixels["pixel_values"],
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    ).pooler_output
    rows, kept = [], []
    for (scene, query), image in zip(samples, features, strict=True):
        cells = range(GRID * GRID)
        if background is not None:
            objects = {item.cell for item in scene.items}
            empty = [cell for cell in cells if cell not in objects]
            cells = sorted(objects | set(rng.choice(empty, background, replace=False).tolist()))
        for question in pick_questions(scene, query, rng, QUESTIONS_PER_SCENE):
            text = after.format(question=question.text) + f" {question.answer(scene.items)} </s>"
            end = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = start + [image_token] * len(cells) + end
            positions = [*range(len(start)), *(len(start) + cell for cell in cells)]
            positions += range(len(start) + GRID * GRID, len(start) + GRID * GRID + len(end))
            evidence = {item.cell for item in question.evidence(scene.items)}
            focus = [False] * len(start) + [cell in evidence for cell in cells] + [False] * len(end)
            words = set(tokenizer.convert_tokens_to_ids(cues(question)))
            cue = [False] * (len(start) + len(cells)) + [token in words for token in end[:-2]] + [False, False]
            rows.append((ids, positions, focus, cue))
            kept.append(image[list(cells)])
    length = max(len(row[0]) for row in rows)

    def padded(values: list, fill) -> list:
        return values + [fill] * (length - len(values))

    tokens = torch.tensor([padded(row[0], tokenizer.pad_token_id) for row in rows])
    answers = torch.tensor([padded([0] * (len(row[0]) - 2) + [1, 1], 0) for row in rows]).bool()
    inputs = {
        "input_ids": tokens,
        "attention_mask": torch.tensor([padded([1] * len(row[0]), 0) for row in rows]),
        "position_ids": torch.tensor([padded(row[1], 0) for row in rows]),
        "labels": torch.where(answers, tokens, -100),
        "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=kept)},
    }
    asking = torch.tensor([len(row[0]) - 3 for row in rows])
    evidence_mask = torch.tensor([padded(row[2], False) for row in rows])
    cue_mask = torch.tensor([padded(row[3], False) for row in rows])
    focus = {layer: evidence_mask for layer in EVIDENCE_LAYERS} | {layer: cue_mask for layer in CUE_LAYERS}
    return inputs, asking, focus


def cues(question: shapes.Query) -> list[str]:
    """The question's words that name what to look for: its colour, its shape or the shape's plural."""
    words = [question.colour, question.shape]
    if question.kind == "count":
        words[1] = shapes.PLURALS[question.shape]
    return [word for word in words if word]


def attention_loss(attentions: tuple[torch.Tensor, ...], asking: torch.Tensor, focus: dict[int, torch.Tensor]):
    """Minus the log of the attention (head mean) that the token predicting the answer pays to the tokens
    `focus[layer]` marks, averaged over those layers and the rows: the question's cue words at `CUE_LAYERS`
    (first `CUE_HEADS` heads only), its evidence's image tokens at `EVIDENCE_LAYERS`. It teaches the LLM the
    two hops of a look-up (gather what the question names, then find it in the image), which a from-scratch
    LLM otherwise finds slowly if at all, and gives the model the question-guided attention that text-aware
    policies read. Teaching every cue-layer head would leave the answer's token no way to see the rest of
    the question: all its attention would go to the cue word, then to the image, which comes before it."""
    rows = torch.arange(len(asking))
    total = 0.0
    for layer, marked in focus.items():
        heads = CUE_HEADS if layer in CUE_LAYERS else None
        weights = attentions[layer][rows, :heads, asking].mean(1)
        total = total - torch.log((weights * marked).sum(-1).clamp_min(1e-6)).mean()
    return total / len(focus)


def train_answers(model, processor, sparse_steps: int, full_steps: int, lr: float, seeds: TrainSeeds, rng) -> None:
    """Stages 2 and 3: projector and LLM, the tower frozen, on the answer and evidence losses."""
    model.model.vision_tower.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    model.train()

    def loss(background: int | None) -> Callable[[], torch.Tensor]:
        def batch_loss() -> torch.Tensor:
            batch_seeds = seeds.take(SCENES_PER_STEP["sparse" if background is not None else "full"])
            inputs, asking, focus = question_batch(model, processor, batch_seeds, rng, background)
            out = model(**inputs, output_attentions=True)
            return out.loss + ATTENTION_WEIGHT * attention_loss(out.attentions, asking, focus)

        return batch_loss

    optimise("sparse", parameters, loss(BACKGROUND_TOKENS), sparse_steps, lr)
    optimise("full", parameters, loss(None), full_steps, lr / 3)
    model.requires_grad_(True)
    model.set_attn_implementation(implementation)
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
    parser.add_argument("--steps", type=int, default=2400, help="question/answer steps, sparse and full (5:1)")
    parser.add_argument("--lr", type=float, default=1.5e-3, help="question/answer learning rate (full stage: a third)")
    parser.add_argument("--tower-steps", type=int, default=800, help="tower pretraining steps")
    parser.add_argument("--tower-lr", type=float, default=2e-3)
    parser.add_argument(
        "--from-tower",
        type=Path,
        help="take the tower of this run (one with --steps 0 will do) instead of doing stage 1",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.time()
    seeds = TrainSeeds()
    torch.manual_seed(args.seed)
    model, processor = build(args.seed)
    if args.from_tower:
        trained = LlavaForConditionalGeneration.from_pretrained(args.from_tower).model.vision_tower
        model.model.vision_tower.load_state_dict(trained.state_dict())
        earlier = json.loads((args.from_tower / "training.json").read_text())
        seeds.take(earlier["tower_steps"] * SCENES_PER_STEP["tower"])
        tower = {key: earlier[key] for key in ("tower_steps", "tower_lr", "tower_minutes")}
    else:
        pretrain_tower(model, processor, args.tower_steps, lr=args.tower_lr, seeds=seeds)
        tower = {"tower_steps": args.tower_steps, "tower_lr": args.tower_lr, "tower_minutes": minutes_since(start)}
    # Seeded again so that a run resumed from a saved tower trains exactly as an uninterrupted one.
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    sparse_steps = 5 * args.steps // 6
    answers_start = time.time()
    train_answers(model, processor, sparse_steps, args.steps - sparse_steps, lr=args.lr, seeds=seeds, rng=rng)
    answer_minutes = minutes_since(answers_start)
    metrics = evaluate(model, processor)
    print(json.dumps(metrics, indent=1))

    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    record = {
        "seed": args.seed,
        **tower,
        "sparse_steps": sparse_steps,
        "full_steps": args.steps - sparse_steps,
        "lr": args.lr,
        "answer_minutes": answer_minutes,
        "total_minutes": minutes_since(start),
        "scenes_per_step": SCENES_PER_STEP,
        "questions_per_scene": QUESTIONS_PER_SCENE,
        "threads": torch.get_num_threads(),
        "test_samples": EVAL_SAMPLES,
        "test_accuracy": {key: round(value, 1) for key, value in metrics.items()},
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


def minutes_since(start: float) -> float:
    return round((time.time() - start) / 60, 1)


if __name__ == "__main__":
    raise SystemExit(main())

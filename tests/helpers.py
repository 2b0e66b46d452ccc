"""Tiny models, images and prompts shared by the tests."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from PIL import Image
from vtprune.eval import synthetic

import vtprune

PROMPTS = [
    "USER: <image>\nwhat is shown ? ASSISTANT:",
    "USER: <image>\nwhat colour is the circle on the left in the picture ? ASSISTANT:",
]


@functools.cache
def _built(text: str, attn: str, **sizes):
    config = synthetic.llava_config(text, attn_implementation=attn, **sizes)
    return synthetic.llava_model(config, seed=0), synthetic.llava_processor(config)


def tiny(text: str = "llama", attn: str = "sdpa", **sizes):
    """(model, processor) with fixed random weights; cached, so tests must leave models unpatched."""
    return _built(text, attn, **sizes)


@functools.cache
def peaked(text: str = "llama", attn: str = "sdpa", **sizes):
    """Like `tiny`, but the vision queries are scaled up 64x so attention concentrates as a trained tower's
    does (random towers attend almost uniformly, which makes entropy-driven policies prune nothing)."""
    config = synthetic.llava_config(text, attn_implementation=attn, **sizes)
    model = synthetic.llava_model(config, seed=0)
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(64.0)
    return model, synthetic.llava_processor(config)


MODEL_TYPES = [
    "gemma3",
    "glm4v",
    "glm4v_moe",
    "internvl",
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_5_vl",
    "qwen2_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
]
"""What `vtprune.supported_models()` lists."""
FAMILIES = [
    "llava-clip",
    "llava-siglip",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
]
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@functools.cache
def _qwen(family: str, attn: str):
    config = synthetic.qwen_vl_config(family, attn_implementation=attn, text_layers=3)
    return synthetic.qwen_vl_model(config), synthetic.qwen_vl_processor(family)


def model_and_inputs(family: str, attn: str = "sdpa", **processing):
    """A tiny model of `family` and a batch of two prompts of different lengths (so one is left-padded)."""
    if family.startswith("qwen"):
        model, processor = _qwen(family, attn)
        side = synthetic.QWEN_FAMILIES[family][3]
        prompts = [f"user : {QWEN_IMAGE} what is shown ? assistant :", f"user : {QWEN_IMAGE} what colour ? assistant :"]
        images = [image(1, (8 * side, 12 * side)), image(2, (10 * side, 6 * side))]
        return model, processor(images=images, text=prompts, return_tensors="pt", **({"padding": True} | processing))
    if family == "llava_onevision":  # one mosaic interpolated down, one kept as it is
        model, processor = tiny("qwen2", attn, vision="siglip", text_layers=3, family=family)
        images, prompts = [image(1, (90, 80)), image(2, (30, 60))], [p.replace("\n", " ") for p in PROMPTS]
        return model, processor(images=images, text=prompts, return_tensors="pt", **({"padding": True} | processing))
    text, vision = ("qwen2", "siglip") if family == "llava-siglip" else ("llama", "clip")
    model, processor = tiny(
        text, attn, vision=vision, text_layers=3, family="llava_next" if family == "llava_next" else "llava"
    )
    images = [image(1, (60, 30)), image(2)]
    return model, processor(images=images, text=PROMPTS, return_tensors="pt", **({"padding": True} | processing))


def vision_side(name: str):
    """The policy `name` acting at the vision boundary only (ToDRE without its decoder stage)."""
    return vtprune.policy(name, relevance_layer=None) if name == "diversity_kcenter" else name


def image(seed: int, size: tuple[int, int] = (40, 50)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def batch(processor, prompts: list[str], images: list[Image.Image]):
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def row(inputs, index: int, images_per_row: list[int]):
    """Row `index` of a processed batch on its own, without padding."""
    keep = inputs["attention_mask"][index].bool()
    first = sum(images_per_row[:index])
    alone = {
        "input_ids": inputs["input_ids"][index][keep][None],
        "attention_mask": inputs["attention_mask"][index][keep][None],
    }
    if images_per_row[index] == 0:  # a text-only row
        return alone
    alone["pixel_values"] = inputs["pixel_values"][first : first + images_per_row[index]]
    if "image_sizes" in inputs:
        alone["image_sizes"] = inputs["image_sizes"][first : first + images_per_row[index]]
    return alone


@torch.no_grad()
def kept_inputs_by_hand(model, inputs, kept: list[torch.Tensor], contiguous: bool = False):
    """Per row, (embeddings, position ids) of an input holding only its text and kept image tokens.

    Written as a plain loop over tokens, independent of vtprune's engine: features come from the
    unpatched `get_image_features`, embeddings are assembled by hand, and each kept token gets the
    position it had in the unpruned prompt (its column, as the unpatched forward numbers it), or
    0..n-1 when `contiguous`.
    """
    vision = {name: inputs[name] for name in ("pixel_values", "image_sizes") if name in inputs}
    features = model.model.get_image_features(**vision).pooler_output
    return image_inputs_by_hand(model, inputs, [(f[k], k) for f, k in zip(features, kept, strict=True)], contiguous)


@torch.no_grad()
def image_inputs_by_hand(model, inputs, images: list[tuple[torch.Tensor, torch.Tensor]], contiguous: bool = False):
    """Per row, (embeddings, position ids) with image `i`'s placeholders replaced by `images[i]`.

    `images[i]` is (tokens `[k, D]`, slots `[k]`): the k tokens go where the image was, in the order
    given, token j at the position of the image's placeholder `slots[j]` (its column), or all renumbered
    0..n-1 when `contiguous`.
    """
    embed = model.get_input_embeddings()
    image_token = model.config.image_token_id
    rows, image = [], 0
    for b in range(inputs["input_ids"].shape[0]):
        vectors, positions, token_in_image = [], [], 0
        tokens = inputs["input_ids"][b].tolist()
        for column, (token, attend) in enumerate(zip(tokens, inputs["attention_mask"][b].tolist(), strict=True)):
            if not attend:
                continue
            if token != image_token:
                vectors.append(embed(torch.tensor(token)))
                positions.append(column)
                continue
            if token_in_image == 0:
                for vector, slot in zip(*images[image], strict=True):
                    vectors.append(vector)
                    positions.append(column + int(slot))
            token_in_image += 1
            if column + 1 == len(tokens) or tokens[column + 1] != image_token:
                image, token_in_image = image + 1, 0
        position_ids = torch.arange(len(positions)) if contiguous else torch.tensor(positions)
        rows.append((torch.stack(vectors)[None], position_ids[None]))
    return rows


@torch.no_grad()
def run_kept_by_hand(model, inputs, kept: list[torch.Tensor], contiguous: bool = False) -> list[torch.Tensor]:
    """Logits of each row run alone on the input `kept_inputs_by_hand` builds."""
    return run_rows(model, kept_inputs_by_hand(model, inputs, kept, contiguous))


@torch.no_grad()
def run_rows(model, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Logits of each (embeddings, position ids) row run alone."""
    return [
        model(inputs_embeds=embeds, position_ids=positions, attention_mask=torch.ones(positions.shape)).logits[0]
        for embeds, positions in rows
    ]


def assert_rows_match(padded_logits, rows):
    """Each row's logits equal the last positions of the (left-padded) batch's row."""
    for b, logits in enumerate(rows):
        torch.testing.assert_close(padded_logits[b, -len(logits) :], logits, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def greedy_by_hand(model, embeds: torch.Tensor, positions: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding with the KV cache, each new token at the previous position + 1, up to `steps` tokens or the
    end of sequence, as generate stops: (tokens, step logits)."""
    ends = model.generation_config.eos_token_id
    ends = set(ends if isinstance(ends, list) else [ends])
    out = model(inputs_embeds=embeds, position_ids=positions, attention_mask=torch.ones(positions.shape))
    logits, position, cache = [out.logits[0, -1]], int(positions[0, -1]), out.past_key_values
    tokens = [int(logits[-1].argmax())]
    for _ in range(steps - 1):
        if tokens[-1] in ends:
            break
        position += 1
        out = model(
            input_ids=torch.tensor([[tokens[-1]]]),
            position_ids=torch.tensor([[position]]),
            attention_mask=torch.ones(1, cache.get_seq_length() + 1),
            past_key_values=cache,
        )
        logits.append(out.logits[0, -1])
        tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits)


def write_video(path, frames: np.ndarray, fps: int = 10) -> None:
    """Write `[frames, H, W, 3]` uint8 frames as an MPEG-4 video with PyAV."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@contextlib.contextmanager
def tokens_entering(layers):
    """The tokens each of `layers` runs on, call after call (their input's second dim), while in the block."""
    seen: list[int] = []
    handles = [layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for layer in layers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()

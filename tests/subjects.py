"""What the conformance suite runs on: one tiny model per family with a two-row batch of its kinds of prompts,
and rows built by hand from the unpatched model's own encoders, independent of vtprune's engine."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch
from helpers import image, tiny
from vtprune.eval import synthetic

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
GLM_IMAGE = "<|begin_of_image|><|image|><|end_of_image|>"
GLM_VIDEO = "<|video|>"


def video(seed: int, frames: int, size: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, *size, 3), dtype=np.uint8)


@dataclass(frozen=True, eq=False)
class Subject:
    """A family's tiny model and a batch of prompts of different lengths (the shorter left-padded), each with its
    media."""

    name: str
    family: str
    prompts: tuple[str, ...]
    media: tuple[tuple[tuple[str, object], ...], ...]
    """Per row, its (modality, picture or `[frames, H, W, 3]` video) in prompt order."""

    @property
    def model_type(self) -> str:
        return "llava" if self.family.startswith("llava-") else self.family

    @property
    def packed(self) -> bool:
        """Whether the family is Qwen-VL-shaped (packed tower, merge units, M-RoPE)."""
        return self.family in synthetic.QWEN_FAMILIES

    @property
    def has_video(self) -> bool:
        return any(modality == "video" for row in self.media for modality, _ in row)

    def __str__(self) -> str:
        return self.name


def _llava(name: str, family: str, prompts, media) -> Subject:
    return Subject(name, family, tuple(prompts), tuple(tuple(row) for row in media))


SUBJECTS = [
    _llava(
        "llava-clip",
        "llava-clip",
        ["USER: <image>\nwhat is shown ? ASSISTANT:", "USER: <image>\nwhat colour is the circle ? ASSISTANT:"],
        [[("image", image(1, (60, 30)))], [("image", image(2))]],
    ),
    _llava(
        "llava-siglip",
        "llava-siglip",
        ["USER: <image>\nwhat is shown ? ASSISTANT:", "USER: <image>\nwhat colour is the circle ? ASSISTANT:"],
        [[("image", image(1, (60, 30)))], [("image", image(2))]],
    ),
    _llava(  # tiles 1x2 and 2x2 with unpadding
        "llava_next",
        "llava_next",
        ["USER: <image>\nwhat is shown ? ASSISTANT:", "USER: <image>\nwhat colour is the circle ? ASSISTANT:"],
        [[("image", image(1, (60, 30)))], [("image", image(2))]],
    ),
    _llava(  # a 3x3 mosaic interpolated down (anyres_max_4) and one unpadded, kept as it is
        "llava_onevision",
        "llava_onevision",
        ["user : <image> what is shown ? assistant :", "user : <image> what colour is the circle ? assistant :"],
        [[("image", image(1, (90, 80)))], [("image", image(2, (30, 60)))]],
    ),
    _llava(  # a multi-image row (base crops and newlines), a video row (pooled frames), an interpolated image
        "llava_onevision-mixed",
        "llava_onevision",
        [
            "user : <image> and <image> which is red ? assistant :",
            "user : <|video_pad|> what happens ? assistant :",
            "user : <image> what is it ? assistant :",
        ],
        [
            [("image", image(3)), ("image", image(4, (30, 50)))],
            [("video", video(5, 3, (40, 50)))],
            [("image", image(9, (90, 80)))],
        ],
    ),
    *[
        Subject(
            family,
            family,
            (f"user : {QWEN_IMAGE} what is shown ? assistant :", f"user : {QWEN_IMAGE} what colour ? assistant :"),
            (
                (("image", image(1, (8 * side, 12 * side))),),
                (("image", image(2, (10 * side, 6 * side))),),
            ),
        )
        for family, side in (("qwen2_vl", 14), ("qwen2_5_vl", 14), ("qwen3_vl", 16), ("qwen3_vl_moe", 16))
    ],
    *[
        Subject(
            family,
            family,
            (f"user : {GLM_IMAGE} what is shown ? assistant :", f"user : {GLM_IMAGE} what colour ? assistant :"),
            ((("image", image(1, (112, 168))),), (("image", image(2, (140, 84))),)),
        )
        for family in ("glm4v", "glm4v_moe")
    ],
    Subject(  # tiles and a thumbnail (2 + 1), a one-tile image and a 2x2-tile one, sharing each image's budget
        "internvl",
        "internvl",
        (
            "user : <IMG_CONTEXT> what is shown ? assistant :",
            "user : <IMG_CONTEXT> and <IMG_CONTEXT> which ? assistant :",
        ),
        ((("image", image(1, (56, 112))),), (("image", image(2, (56, 56))), ("image", image(3, (112, 112))))),
    ),
    Subject(  # 4x4-pooled windows; each image a bidirectional block; the window (20) shorter than the second row
        "gemma3",
        "gemma3",
        (
            "user : <start_of_image> what is shown ? assistant :",
            "user : <start_of_image> and <start_of_image> which ? assistant :",
        ),
        ((("image", image(1, (40, 60))),), (("image", image(2)), ("image", image(3, (64, 32))))),
    ),
    Subject(  # frame groups are images between begin and end of video, each followed by its second; transformers'
        # GLM-4.1V cannot place images and videos of one call (their placeholders are the same token)
        "glm4v-video",
        "glm4v",
        (f"user : {GLM_VIDEO} what happens ? assistant :", f"user : {GLM_VIDEO} and which ? assistant :"),
        ((("video", video(6, 4, (56, 84))),), (("video", video(8, 2, (84, 56))),)),
    ),
    Subject(
        "qwen3_vl_moe-video",
        "qwen3_vl_moe",
        (
            f"user : {QWEN_VIDEO} what happens ? assistant :",
            f"user : {QWEN_IMAGE} and {QWEN_VIDEO} which ? assistant :",
        ),
        (
            (("video", video(6, 4, (64, 96))),),
            (("image", image(7, (64, 64))), ("video", video(8, 2, (96, 64)))),
        ),
    ),
]
"""Every family vtprune patches, each with the kinds of prompts it takes."""


@functools.cache
def model_for(family: str, attn: str):
    """The family's tiny model (3 decoder layers) and processor; cached, so tests must leave them unpatched."""
    if family == "internvl":
        config = synthetic.internvl_config(attn_implementation=attn, text_layers=3)
        return synthetic.internvl_model(config), synthetic.internvl_processor(config)
    if family == "gemma3":
        config = synthetic.gemma3_config(attn_implementation=attn)
        return synthetic.gemma3_model(config), synthetic.gemma3_processor(config)
    if family in synthetic.QWEN_FAMILIES:
        config = synthetic.qwen_vl_config(family, attn_implementation=attn, text_layers=3)
        return synthetic.qwen_vl_model(config), synthetic.qwen_vl_processor(family)
    text, vision = ("llama", "clip") if family in ("llava-clip", "llava_next") else ("qwen2", "siglip")
    shape = "llava" if family.startswith("llava-") else family
    return tiny(text, attn, vision=vision, text_layers=3, family=shape)


def inputs_for(subject: Subject, rows: tuple[int, ...] | None = None) -> dict:
    """The processor's batch of the subject's `rows` (left-padded where they differ in length); a fresh dict."""
    return dict(_processed(subject, rows))


@functools.cache
def _processed(subject: Subject, rows: tuple[int, ...] | None) -> dict:
    rows = tuple(range(len(subject.prompts))) if rows is None else rows
    _, processor = model_for(subject.family, "sdpa")
    prompts = [subject.prompts[row] for row in rows]
    images = [m for row in rows for kind, m in subject.media[row] if kind == "image"]
    videos = [m for row in rows for kind, m in subject.media[row] if kind == "video"]
    if subject.packed:
        return synthetic.qwen_vl_inputs(processor, prompts, images, videos)
    call: dict = {"text": prompts, "return_tensors": "pt", "padding": True}
    if (
        subject.model_type in ("llava_onevision", "internvl", "gemma3") and images
    ):  # images by row: a row with several is multi-image
        images = [[m for kind, m in subject.media[row] if kind == "image"] for row in rows]
        images = [row for row in images if row]
    if images:
        call["images"] = images
    if videos:
        call["videos"] = videos
    return dict(processor(**call))


PLACEHOLDERS = {"image": "image_token_id", "video": "video_token_id"}


@torch.no_grad()
def encoded(model, inputs: dict) -> dict[str, tuple[list[torch.Tensor], list[list[torch.Tensor]]]]:
    """Per modality in the batch, the unpatched model's own features of each item (`[tokens, hidden]`) and, per
    deepstack level (Qwen3-VL), each item's deepstack features."""
    inner, out = model.model, {}
    if inputs.get("pixel_values") is not None and model.config.model_type == "internvl":
        result = inner.get_image_features(inputs["pixel_values"])
        result.pooler_output = [tiles.flatten(0, 1) for tiles in result.pooler_output.split(_tiles(model, inputs))]
        out["image"] = result
    elif inputs.get("pixel_values") is not None:
        if "image_grid_thw" in inputs:
            result = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        else:
            names = ("image_sizes", "batch_num_images")
            result = inner.get_image_features(inputs["pixel_values"], **{n: inputs[n] for n in names if n in inputs})
        out["image"] = result
    if inputs.get("pixel_values_videos") is not None:
        if "video_grid_thw" in inputs:
            out["video"] = inner.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        else:
            out["video"] = inner.get_video_features(inputs["pixel_values_videos"])
    return {
        modality: (
            list(result.pooler_output),
            [list(level) for level in getattr(result, "deepstack_features", None) or []],
        )
        for modality, result in out.items()
    }


def _tiles(model, inputs: dict) -> list[int]:
    """InternVL: each image's tiles, from its run of placeholders in the prompt (`image_seq_length` a tile)."""
    runs = []
    for row in inputs["input_ids"].tolist():
        for token, group in itertools.groupby(row):
            if token == model.config.image_token_id:
                runs.append(len(list(group)) // model.config.image_seq_length)
    return runs


@dataclass(frozen=True)
class HandRow:
    """One row alone: its text and the given visual tokens, each at its position in the unpruned prompt."""

    embeds: torch.Tensor
    """`[1, n, hidden]`."""
    positions: torch.Tensor
    """`[1, n]`, or `[3, 1, n]` (M-RoPE)."""
    items: torch.Tensor
    """`[n]`: per token, the item (placeholder order over the batch) it belongs to, or -1 for text."""
    deepstack: list[torch.Tensor]
    """Per deepstack level, `[visual tokens, hidden]` added to the row's visual tokens after that decoder layer."""


@torch.no_grad()
def hand_rows(
    model, inputs: dict, delivered: list[torch.Tensor] | None = None, contiguous: bool = False
) -> list[HandRow]:
    """Per row alone, written as a plain loop over tokens: the text, and of item i (placeholder order over the
    batch) the tokens `delivered[i]` in that order (None: every token), taken from the unpatched encoders. The
    k-th kept placeholder of an item takes the feature and the position of token `delivered[i][k]`; positions
    are the unpatched forward's (columns, or the model's own M-RoPE on the unpruned prompt), or 0..n-1 when
    `contiguous`."""
    features = encoded(model, inputs)
    ids = {getattr(model.config, PLACEHOLDERS[m]): m for m in features}
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    kinds = inputs.get("mm_token_type_ids")  # where given, it tells the modality (GLM-4.1V's share one placeholder)
    if "mm_token_type_ids" in inputs:
        grids = {name: inputs[name] for name in ("image_grid_thw", "video_grid_thw") if name in inputs}
        positions, _ = model.model.get_rope_index(input_ids, inputs["mm_token_type_ids"], attention_mask=mask, **grids)
    else:
        positions = torch.arange(input_ids.shape[1]).expand(*input_ids.shape)
    embed = model.get_input_embeddings()
    next_item = dict.fromkeys(features, 0)
    current: dict[str, tuple[int, int] | None] = dict.fromkeys(features)  # modality -> (item, tokens seen)
    order: list[tuple[str, int]] = []  # items in placeholder order over the batch
    rows = []
    for b in range(input_ids.shape[0]):
        vectors, columns, items, deep = [], [], [], []
        pending: dict[tuple[str, int], list[int]] = {}  # an item's placeholder columns, in order
        slots: list[tuple[int, tuple[str, int], int]] = []  # (place in row, item, k-th kept placeholder)
        for column in range(input_ids.shape[1]):
            if not mask[b, column]:
                continue
            token = int(input_ids[b, column])
            modality = ids.get(token) if kinds is None else {1: "image", 2: "video"}.get(int(kinds[b, column]))
            if modality is None:
                vectors.append(embed(torch.tensor(token)))
                columns.append(column)
                items.append(-1)
                continue
            if current[modality] is None:
                current[modality] = (next_item[modality], 0)
                order.append((modality, next_item[modality]))
                next_item[modality] += 1
            item, seen = current[modality]
            key = (modality, item)
            pending.setdefault(key, []).append(column)
            count = len(features[modality][0][item])
            chosen = torch.arange(count) if delivered is None else delivered[order.index(key)]
            kept = chosen.sort().values.tolist()
            if seen in kept:
                slots.append((len(vectors), key, kept.index(seen)))
                vectors.append(None)
                columns.append(None)
                items.append(order.index(key))
            current[modality] = None if seen + 1 == count else (item, seen + 1)
        for place, key, k in slots:
            modality, item = key
            chosen = (
                torch.arange(len(features[modality][0][item])) if delivered is None else delivered[order.index(key)]
            )
            token = int(chosen[k])
            vectors[place] = features[modality][0][item][token]
            columns[place] = pending[key][token]
            deep.append([level[item][token] for level in features[modality][1]])
        where = torch.arange(len(columns)) if contiguous else positions[..., b, columns]
        levels = [torch.stack([d[level] for d in deep]) for level in range(len(deep[0]))] if deep and deep[0] else []
        rows.append(
            HandRow(
                embeds=torch.stack(vectors)[None],
                positions=where[..., None, :] if positions.dim() == 3 and not contiguous else where[None],
                items=torch.tensor(items),
                deepstack=levels,
            )
        )
    return rows

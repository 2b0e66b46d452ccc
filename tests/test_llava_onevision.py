"""LLaVA-OneVision: tokens the model resamples after the tower (an interpolated tile mosaic, pooled video frames)
are scored by the same bilinear interpolation of their patches' scores, and numbered as the processor placed
them; multi-image prompts give each image its base crop and a newline."""

import functools
import math

import numpy as np
import pytest
import torch
from helpers import image
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image
from vtprune.eval import synthetic

import vtprune

PROMPT = "user : <image> what is shown ? assistant :"
VIDEO_PROMPT = "user : <|video_pad|> what happens ? assistant :"


@functools.cache
def onevision(image_size: int = 28):
    """A tiny OneVision (7-pixel patches: a 4x4 crop at 28, a 5x5 one at 35, pooled to 2x2 and 3x3)."""
    config = synthetic.llava_config("qwen2", vision="siglip", family="llava_onevision", image_size=image_size)
    return synthetic.llava_model(config), synthetic.llava_processor(config)


def side_of(model) -> int:
    return model.config.vision_config.image_size // model.config.vision_config.patch_size


@torch.no_grad()
def patch_scores(model, crops: torch.Tensor) -> torch.Tensor:
    """`[crops, side, side]` cls_attention scores of each crop's patches, every crop run as one image of a
    multi-image prompt, where an image is its base crop with its tokens as they are (plus a newline)."""
    side, vocab = side_of(model), synthetic.tokenizer()
    words = vocab.convert_tokens_to_ids(["user", ":", "what", "?"])
    ids = words[:2] + [model.config.image_token_id] * (len(crops) * (side * side + 1)) + words[2:]
    inputs = {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": crops[:, None],
        "image_sizes": torch.tensor([[28, 28]] * len(crops)),
        "batch_num_images": torch.tensor([len(crops)]),
    }
    with vtprune.patched(model, "cls_attention", keep=1):
        model(**inputs)
        records = vtprune.last_trace(model)
    assert all(r.n_before == side * side + 1 for r in records)
    return torch.stack([r.scores[:-1].view(side, side) for r in records])


@torch.no_grad()
@pytest.mark.parametrize("image_size", [28, 35], ids=["even-grid", "odd-grid"])
def test_a_video_token_scores_the_bilinear_pool_of_its_patches(image_size):
    """Frames pooled to half the rows and columns (2x2 means on an even grid, overlapping weights on an odd one,
    as the real model's 27x27 grid): each token's score is the same pooling of its frame's patch scores."""
    model, processor = onevision(image_size)
    frames = np.random.default_rng(3).integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    inputs = processor(videos=[frames], text=[VIDEO_PROMPT], return_tensors="pt")
    with vtprune.patched(model, "cls_attention", keep=4):
        model(**inputs)
        (record,) = vtprune.last_trace(model)
    side = side_of(model)
    pooled = math.ceil(side / 2)
    patches = patch_scores(model, inputs["pixel_values_videos"][0])
    expected = torch.nn.functional.interpolate(patches[:, None].double(), size=(pooled, pooled), mode="bilinear")
    assert record.n_before == 3 * pooled * pooled + 1 and record.frames == 3 and record.grid == (pooled, pooled)
    torch.testing.assert_close(record.scores[:-1].double(), expected.flatten(), atol=1e-6, rtol=1e-5)
    assert record.n_after == 4 + 1  # the video's trailing newline is always kept
    assert int(record.kept[-1]) == record.n_before - 1


def mosaic_scores(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The base crop's patch scores `[side, side]`, and the tiles' laid out as the model lays out their features
    (tile rows of patch rows), unpadded: `[rows, cols]` before any interpolation."""
    side, size = side_of(model), inputs["image_sizes"][0]
    tile_size = model.config.vision_config.image_size
    rows, cols = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, tile_size)
    crops = patch_scores(model, inputs["pixel_values"][0, : 1 + rows * cols])
    mosaic = crops[1:].view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(1, rows * side, cols * side)
    return crops[0], unpad_image(mosaic, size)[0]


def pruned_image(model, inputs, keep: int):
    with vtprune.patched(model, "cls_attention", keep=keep):
        model(**inputs)
        (record,) = vtprune.last_trace(model)
    return record


@torch.no_grad()
def test_an_interpolated_mosaic_scores_each_token_by_bilinear_interpolation_of_its_tiles():
    """A 3x3-tile image past anyres_max_4: the mosaic's scores are the tiles' patch scores laid out as the model
    lays out its features, unpadded and interpolated down; the base crop keeps its own; row ends are kept."""
    model, processor = onevision()
    inputs = processor(images=[image(1, (90, 80))], text=[PROMPT], return_tensors="pt")
    record = pruned_image(model, inputs, 12)
    base, mosaic = mosaic_scores(model, inputs)
    side = side_of(model)
    height, width = mosaic.shape
    ratio = math.sqrt(height * width / (4 * side * side))  # the tiny config's anyres_max_4
    assert ratio > 1.1  # interpolated
    shrunk = (int(height // ratio), int(width // ratio))
    expected = torch.nn.functional.interpolate(mosaic[None, None].double(), size=shrunk, mode="bilinear")[0, 0]
    assert record.grid == shrunk
    tiles = record.scores[side * side :].view(shrunk[0], shrunk[1] + 1)
    torch.testing.assert_close(tiles[:, :-1].double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(record.scores[: side * side], base.flatten())
    row_ends = side * side + (shrunk[1] + 1) * torch.arange(1, shrunk[0] + 1) - 1
    assert set(row_ends.tolist()) <= set(record.kept.tolist())
    assert record.n_after == 12 + shrunk[0]


@torch.no_grad()
def test_an_uninterpolated_mosaic_maps_each_token_to_one_patch():
    """Below the limit, a mosaic token is one tile's patch: its score is that patch's."""
    model, processor = onevision()
    inputs = processor(images=[image(2, (30, 60))], text=[PROMPT], return_tensors="pt")
    record = pruned_image(model, inputs, 8)
    _, mosaic = mosaic_scores(model, inputs)
    assert record.grid == tuple(mosaic.shape)
    tiles = record.scores[side_of(model) ** 2 :].view(mosaic.shape[0], mosaic.shape[1] + 1)
    torch.testing.assert_close(tiles[:, :-1], mosaic)


@torch.no_grad()
@pytest.mark.parametrize("policy", ["information_flow", "visionzip"])
@pytest.mark.parametrize(
    ("images", "prompt", "shapes"),
    [
        ([[image(3), image(4, (30, 50))]], "user : <image> and <image> ?", [(17, 7, (4, 4))] * 2),
        ([image(2, (30, 60))], PROMPT, [(94, 12, (6, 12))]),
    ],
    ids=["multi-image", "mosaic-below-the-limit"],
)
def test_policies_inside_the_tower_run_where_tokens_are_the_towers(policy, images, prompt, shapes):
    """A multi-image prompt's images are base crops, and a mosaic below the limit keeps its tiles' tokens: the
    tower's tokens reach the LLM as they are (plus newlines), so pruning inside the tower applies."""
    model, processor = onevision()
    inputs = processor(images=images, text=[prompt], return_tensors="pt")
    logits = model(**inputs).logits
    with vtprune.patched(model, policy, keep=1.0):
        assert torch.equal(model(**inputs).logits, logits)
    with vtprune.patched(model, policy, keep=6):
        model(**inputs)
        trace = vtprune.last_trace(model)
    assert [(r.n_before, r.n_after, r.grid) for r in trace] == shapes


@torch.no_grad()
def test_per_frame_shares_the_budget_and_joint_spends_it_anywhere():
    """cls_attention keeps the top-scored tokens: of each frame (its share, 2 of 4) or of the whole video."""
    model, processor = onevision()
    frames = np.random.default_rng(4).integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    inputs = processor(videos=[frames], text=[VIDEO_PROMPT], return_tensors="pt")
    kept = {}
    for temporal in ("per_frame", "joint"):
        with vtprune.patched(model, "cls_attention", keep=6, temporal=temporal):
            model(**inputs)
            (record,) = vtprune.last_trace(model)
        assert int(record.kept[-1]) == 12 and record.n_after == 7
        kept[temporal], scores = record.kept[:-1], record.scores[:-1]
    per_frame = torch.cat([frame.topk(2).indices + 4 * index for index, frame in enumerate(scores.view(3, 4))])
    assert torch.equal(kept["per_frame"], per_frame.sort().values)
    assert torch.equal(kept["joint"], scores.topk(6).indices.sort().values)

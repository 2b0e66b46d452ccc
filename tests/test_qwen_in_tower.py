"""Pruning inside Qwen-VL's and GLM-4.1V's packed towers (`information_flow`, `visionzip`): after a cut every later
block runs on the kept merge units only, with their rotary embeddings and attention segments (windows too)."""

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import image
from qwen_reference import flowcut_by_hand, rows_by_hand, visionzip_by_hand
from vtprune.eval import synthetic

import vtprune
from vtprune.crops import share

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v"]
PROMPTS = ["user : {} what is shown ? assistant :", "user : {} what colour is the circle ? assistant :"]
PATCHES = [(12, 16), (10, 8)]  # merged grids 6x8 and 5x4: 48 and 20 units
DEPTH = 8  # FlowCut cuts after blocks 0, 2, 4 and 6 (Qwen2.5-VL: after full-attention blocks 1 and 5; 3 only scores)


@functools.cache
def peaked(family: str, attn: str = "sdpa"):
    """A tiny Qwen-VL whose vision queries are scaled up 1024x, so the mean query's attention concentrates as a
    trained tower's does and FlowCut's entropy-driven cuts fire before its last one."""
    config = synthetic.qwen_vl_config(family, attn_implementation=attn, vision_depth=DEPTH)
    model = synthetic.qwen_vl_model(config)
    with torch.no_grad():
        for block in model.model.visual.blocks:
            width = block.attn.qkv.in_features
            block.attn.qkv.weight[:width].mul_(1024.0)
            if block.attn.qkv.bias is not None:  # GLM-4.1V's has none
                block.attn.qkv.bias[:width].mul_(1024.0)
    return model, synthetic.qwen_vl_processor(family)


def inputs_for(family, processor, patches=PATCHES):
    side = synthetic.QWEN_FAMILIES[family][3]
    images = [image(seed, (rows * side, cols * side)) for seed, (rows, cols) in enumerate(patches, 11)]
    prompts = [prompt.format(synthetic.placeholder(family)) for prompt in PROMPTS]
    return synthetic.qwen_vl_inputs(processor, prompts, images)


def per_image(inputs):
    """(pixels, grid) of each image alone."""
    grid = inputs["image_grid_thw"]
    sizes = grid.prod(-1).tolist()
    return list(zip(inputs["pixel_values"].split(sizes), grid.split(1), strict=True))


def encoded(expected):
    """Per-image reference outputs as the tower's output for `rows_by_hand`."""
    features = [features for _, features, _ in expected]
    levels = [list(level) for level in zip(*(levels for _, _, levels in expected), strict=True)]
    return {"image": SimpleNamespace(pooler_output=features, deepstack_features=levels or None)}


def assert_rows_match(model, inputs, logits, orders, expected):
    for b, alone in enumerate(rows_by_hand(model, inputs, {"image": orders}, encoded(expected))):
        want = model(**alone).logits[0]
        torch.testing.assert_close(logits[b, -len(want) :], want, atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("keep", [9, 2])
def test_information_flow_equals_a_block_loop_that_slices_kept_units(family, attn, keep):
    model, processor = peaked(family, attn)
    inputs = inputs_for(family, processor)
    with vtprune.patched(model, "information_flow", keep=keep):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    expected = [flowcut_by_hand(model, pixels, grid, keep) for pixels, grid in per_image(inputs)]
    for record, (kept, _, _) in zip(trace, expected, strict=True):
        assert torch.equal(record.kept, kept) and record.n_after == keep
    assert [r.n_before for r in trace] == [48, 20]
    assert_rows_match(model, inputs, logits, [kept for kept, _, _ in expected], expected)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("keep", "split"), [(9, (8, 1)), (4, (2, 2))])
def test_visionzip_equals_merge_units_zipped_by_hand(family, attn, keep, split):
    model, processor = peaked(family, attn)
    inputs = inputs_for(family, processor)
    with vtprune.patched(model, "visionzip", keep=keep, contextual=split[1]):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    expected = [visionzip_by_hand(model, pixels, grid, *split) for pixels, grid in per_image(inputs)]
    for record, (order, _, _) in zip(trace, expected, strict=True):
        assert torch.equal(record.kept, order.sort().values)
    assert_rows_match(model, inputs, logits, [order for order, _, _ in expected], expected)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_run_on_fewer_tokens_after_each_cut(family):
    model, processor = peaked(family)
    inputs = inputs_for(family, processor)
    seen = []
    blocks = model.model.visual.blocks
    handles = [block.register_forward_pre_hook(lambda m, args: seen.append(len(args[0]))) for block in blocks]
    try:
        with vtprune.patched(model, "information_flow", keep=3):
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    cuts = [1, 3, 5, 7] if family != "qwen2_5_vl" else [2, 6]  # the blocks right after a cut
    assert seen[0] == 4 * 68 and seen[-1] == 4 * 6
    assert all(seen[i] == seen[i - 1] for i in range(1, DEPTH) if i not in cuts)
    assert len({seen[i] for i in cuts}) == len(cuts)  # every cut, the adaptive ones too, dropped units


def video_inputs(family, processor):
    """One 4-frame video: 2 frame groups of 6x8 units."""
    side = synthetic.QWEN_FAMILIES[family][3]
    frames = np.random.default_rng(5).integers(0, 256, (4, 12 * side, 16 * side, 3), dtype=np.uint8)
    prompt = f"user : {synthetic.placeholder(family, 'video')} what happens ? assistant :"
    return synthetic.qwen_vl_inputs(processor, [prompt], videos=[frames])


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_a_video_is_pruned_per_frame_group_as_each_group_alone(family):
    model, processor = peaked(family)
    inputs = video_inputs(family, processor)
    with vtprune.patched(model, "information_flow", keep=7, temporal="per_frame"):
        logits = model(**inputs).logits
        (record,) = vtprune.last_trace(model)
    (groups, height, width) = inputs["video_grid_thw"][0].tolist()
    pixels = inputs["pixel_values_videos"].split(height * width)
    grid = torch.tensor([[1, height, width]])
    expected = [flowcut_by_hand(model, pixels[g], grid, keep) for g, keep in enumerate(share(7, [48] * groups))]
    kept = torch.cat([g * 48 + kept for g, (kept, _, _) in enumerate(expected)])
    assert record.frames == 2 and torch.equal(record.kept, kept)
    levels = [[torch.cat(level)] for level in zip(*(levels for _, _, levels in expected), strict=True)]
    features = [torch.cat([features for _, features, _ in expected])]
    tower = {"video": SimpleNamespace(pooler_output=features, deepstack_features=levels or None)}
    (alone,) = rows_by_hand(model, inputs, {"video": [kept]}, tower)
    want = model(**alone).logits[0]
    torch.testing.assert_close(logits[0, -len(want) :], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("policy", ["information_flow", "visionzip"])
def test_joint_video_pruning_inside_the_tower_is_refused(policy):
    model, processor = peaked("qwen2_vl")
    inputs = video_inputs("qwen2_vl", processor)
    with vtprune.patched(model, policy, keep=7, temporal="joint"), pytest.raises(ValueError, match="per_frame"):
        model(**inputs)

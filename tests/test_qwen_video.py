"""Qwen-VL videos: frame groups pruned per frame or jointly, with images in the same batch."""

import functools

import numpy as np
import pytest
import torch
from helpers import write_video
from qwen_reference import rows_by_hand
from vtprune.eval import synthetic

import vtprune
from vtprune.crops import share

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPTS = [f"user : {VIDEO} what happens ? assistant :", f"user : {IMAGE} and {VIDEO} what ? assistant :"]
FIVE = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}


@functools.cache
def tiny(family: str, attn: str = "sdpa"):
    config = synthetic.qwen_vl_config(family, attn_implementation=attn)
    return synthetic.qwen_vl_model(config), synthetic.qwen_vl_processor(family)


def frames(seed: int, count: int, family: str) -> np.ndarray:
    side = synthetic.QWEN_FAMILIES[family][3]
    return np.random.default_rng(seed).integers(0, 256, (count, 8 * side, 12 * side, 3), dtype=np.uint8)


def inputs_for(family: str, processor):
    """Row 0: a 4-frame video (2 frame groups of 24 tokens); row 1: an image (12 tokens), then a 2-frame video."""
    side = synthetic.QWEN_FAMILIES[family][3]
    picture = synthetic.random_image(8 * side, 6 * side, seed=3)
    return synthetic.qwen_vl_inputs(
        processor, PROMPTS, images=[picture], videos=[frames(1, 4, family), frames(2, 2, family)]
    )


def split(trace) -> dict[str, list[torch.Tensor]]:
    """The trace's kept sets per modality, in placeholder order within each."""
    kept = {"image": [], "video": []}
    for record in trace:
        kept["video" if record.frames else "image"].append(record.kept)
    return kept


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temporal", ["per_frame", "joint"])
def test_keep_all_equals_unpatched(family, temporal):
    model, processor = tiny(family)
    inputs = inputs_for(family, processor)
    logits = model(**inputs).logits
    tokens = model.generate(**inputs, **FIVE)
    with vtprune.patched(model, "cls_attention", keep=1.0, temporal=temporal):
        assert torch.equal(model(**inputs).logits, logits)
        assert torch.equal(model.generate(**inputs, **FIVE), tokens)
        trace = vtprune.last_trace(model)
    assert [(r.n_after, r.frames, r.grid) for r in trace] == [(48, 2, (4, 6)), (12, None, (4, 3)), (24, 1, (4, 6))]


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("temporal", ["per_frame", "joint"])
@pytest.mark.parametrize("policy", ["cls_attention", "hierarchical", "diversity_kcenter", "uniform"])
def test_pruned_equals_kept_tokens_with_their_positions(family, attn, temporal, policy):
    model, processor = tiny(family, attn)
    inputs = inputs_for(family, processor)
    chosen = vtprune.policy(policy, relevance_layer=None) if policy == "diversity_kcenter" else policy
    with vtprune.patched(model, chosen, keep=5, temporal=temporal):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    assert [r.n_after for r in trace] == [5, 5, 5]
    for b, alone in enumerate(rows_by_hand(model, inputs, split(trace))):
        expected = model(**alone).logits[0]
        torch.testing.assert_close(logits[b, -len(expected) :], expected, atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_per_frame_shares_the_budget_and_joint_spends_it_anywhere(family):
    model, processor = tiny(family)
    inputs = inputs_for(family, processor)
    kept = {}
    for temporal in ("per_frame", "joint"):
        with vtprune.patched(model, "cls_attention", keep=9, temporal=temporal):
            model(**inputs)
            kept[temporal] = vtprune.last_trace(model)[0]
    groups = [int((kept["per_frame"].kept // 24 == group).sum()) for group in range(2)]
    assert groups == share(9, [24, 24])  # 5 and 4
    joint = kept["joint"]
    assert torch.equal(joint.kept, joint.scores.topk(9).indices.sort().values)


@torch.no_grad()
def test_a_video_read_from_disk_end_to_end(tmp_path):
    model, processor = tiny("qwen2_vl")
    write_video(tmp_path / "clip.mp4", frames(4, 8, "qwen2_vl"))
    video = vtprune.load_video(tmp_path / "clip.mp4", num_frames=4)
    inputs = synthetic.qwen_vl_inputs(processor, [PROMPTS[0]], videos=[video])
    with vtprune.patched(model, "hierarchical", keep=0.25):
        out = model.generate(**inputs, **FIVE)
        trace = vtprune.last_trace(model)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    assert [(r.n_before, r.n_after, r.frames) for r in trace] == [(48, 12, 2)]


def test_transformers_call_with_the_stand_in_video_processor_equals_the_hand_layout():
    """Qwen2-VL's own processor call, with `synthetic.VideoLayout` as its video processor, gives the inputs the
    tests lay out by hand (`qwen_vl_inputs`): images, videos, their placeholders and their types."""
    _, processor = tiny("qwen2_vl")
    picture = synthetic.random_image(8 * 14, 6 * 14, seed=3)
    video = frames(1, 4, "qwen2_vl")
    prompt = "user : <|image_pad|> and <|video_pad|> what ? assistant :"
    by_hand = synthetic.qwen_vl_inputs(processor, [prompt], images=[picture], videos=[video])
    called = processor(text=[prompt], images=[picture], videos=[video], return_tensors="pt")
    assert sorted(called) == sorted(by_hand)
    for key, value in by_hand.items():
        assert torch.equal(torch.as_tensor(called[key]), value), key
    assert int((called["input_ids"] == processor.video_token_id).sum()) == 2 * 24

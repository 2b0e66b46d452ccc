"""GLM-4.1V and GLM-4.5V beyond the conformance suite: in-decoder scoring with their own RoPE (part of each head,
GLM-4.1V's pairs interleaved) against eager attention, images and video frames sharing one placeholder, and the
test inputs against the real processor."""

import pytest
import torch
from decoder_reference import dart, fastv, run
from helpers import image
from subjects import SUBJECTS, hand_rows, inputs_for, model_for
from vtprune.adapters import for_model
from vtprune.eval import synthetic

import vtprune

FAMILIES = ["glm4v", "glm4v_moe"]
SELECTIONS = {
    "fastv": lambda twin, keep: fastv(2, keep),
    "duplication": lambda twin, keep: dart(twin, 2, keep),
}


def subject(name: str):
    return next(s for s in SUBJECTS if s.name == name)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", sorted(SELECTIONS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_in_decoder_selection_equals_the_loop_on_eager_attention(family, policy, attn):
    """The kept sets and logits of a cut before layer 2 equal the hand-written loop's, whose selection reads the
    eager attention weights (FastV) or the keys rotated by the modeling file's own RoPE (DART)."""
    model, _ = model_for(family, attn)
    twin, _ = model_for(family, "eager")
    inputs = inputs_for(subject(family))
    with vtprune.patched(model, policy, keep=5, layer=2):
        logits = model(**inputs).logits
        kept = [record.kept for record in vtprune.last_trace(model)]
    for b, row in enumerate(hand_rows(model, inputs)):
        image_of = row.items.clamp(max=0)  # each row holds one image: the reference numbers it 0
        expected, chosen = run(twin, row.embeds, row.positions, image_of, {2: SELECTIONS[policy](twin, 5)})
        assert torch.equal(kept[b], chosen[2][0])
        torch.testing.assert_close(logits[b, -len(expected) :], expected, atol=1e-5, rtol=1e-4)


def test_rope_rotates_part_of_each_head():
    model, _ = model_for("glm4v", "sdpa")
    attention = model.model.language_model.layers[0].self_attn
    cos, _ = model.model.language_model.rotary_emb(torch.zeros(1), torch.zeros(3, 1, 1, dtype=torch.long))
    assert cos.shape[-1] == attention.head_dim // 2


def test_video_frames_are_told_from_images_by_their_span():
    """GLM-4.1V writes a video's frame groups as images between begin and end of video."""
    model, processor = model_for("glm4v", "sdpa")
    frames = subject("glm4v-video").media[0][0][1]
    prompt = f"user : {synthetic.placeholder('glm4v')} and {synthetic.placeholder('glm4v', 'video')} which ?"
    inputs = synthetic.qwen_vl_inputs(processor, [prompt], images=[image(3, (56, 56))], videos=[frames])
    adapter = for_model(model)
    ids, kinds = inputs["input_ids"], inputs["mm_token_type_ids"]
    assert torch.equal(adapter.modality_mask(ids, "image"), kinds == 1)
    assert torch.equal(adapter.modality_mask(ids, "video"), kinds == 2)
    assert int((kinds == 1).sum()) == 4 and int((kinds == 2).sum()) == int(inputs["video_grid_thw"].prod()) // 4


def test_the_test_inputs_are_the_processors():
    _, processor = model_for("glm4v", "sdpa")
    placeholder = synthetic.placeholder("glm4v")
    prompts = [f"user : {placeholder} what ? assistant :", f"user : {placeholder} and {placeholder} which ?"]
    images = [image(1, (112, 168)), image(2, (56, 56)), image(3, (84, 140))]
    by_hand = synthetic.qwen_vl_inputs(processor, prompts, images)
    called = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert sorted(by_hand) == sorted(called)
    assert all(torch.equal(torch.as_tensor(by_hand[key]), torch.as_tensor(called[key])) for key in by_hand)

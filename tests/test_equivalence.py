"""The patched model against the unpatched one and against hand-built inputs."""

import pytest
import torch
from helpers import (
    PROMPTS,
    assert_rows_match,
    batch,
    greedy_by_hand,
    image,
    kept_inputs_by_hand,
    run_kept_by_hand,
    tiny,
)

import vtprune

BACKENDS = [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("qwen2", "eager")]
GREEDY = {"max_new_tokens": 6, "do_sample": False}


@pytest.fixture(params=BACKENDS, ids=["-".join(b) for b in BACKENDS])
def setup(request):
    model, processor = tiny(*request.param)
    inputs = batch(processor, PROMPTS, [image(1), image(2)])
    yield model, inputs
    vtprune.unpatch(model)


@torch.no_grad()
@pytest.mark.parametrize("contiguous", [False, True])
def test_pruned_generate_equals_a_hand_written_decode_loop(setup, contiguous):
    model, inputs = setup
    with vtprune.patched(model, "cls_attention", keep=5, positions="contiguous" if contiguous else "original"):
        out = model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_logits=True)
        kept = [r.kept for r in vtprune.last_trace(model)]
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    for b, (embeds, positions) in enumerate(kept_inputs_by_hand(model, inputs, kept, contiguous)):
        tokens, logits = greedy_by_hand(model, embeds, positions, GREEDY["max_new_tokens"])
        ended = new[b, len(tokens) :]  # a row that ended early is padded while the others go on
        assert new[b, : len(tokens)].tolist() == tokens and bool((ended == model.generation_config.pad_token_id).all())
        steps = torch.stack([step[b] for step in out.logits])[: len(tokens)]
        torch.testing.assert_close(steps, logits, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_several_images_in_one_prompt(setup):
    model, _ = setup
    processor = tiny()[1]
    prompts = ["USER: <image> and <image>\nwhich is red ? ASSISTANT:", "USER: <image>\nwhat is shown ? ASSISTANT:"]
    inputs = batch(processor, prompts, [image(3), image(4), image(5)])
    with vtprune.patched(model, "cls_attention", keep=0.25):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    assert len(trace) == 3 and [r.n_after for r in trace] == [4, 4, 4]
    assert_rows_match(logits, run_kept_by_hand(model, inputs, [r.kept for r in trace]))


@torch.no_grad()
def test_generate_keeps_the_callers_prompt_as_prefix(setup):
    model, inputs = setup
    with vtprune.patched(model, "uniform", keep=3):
        out = model.generate(**inputs, **GREEDY)
        dict_out = model.generate(**inputs, **GREEDY, return_dict_in_generate=True)
        positional = model.generate(
            inputs["input_ids"], pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"], **GREEDY
        )
    length = inputs["input_ids"].shape[1]
    assert out.shape == (2, length + 6)
    assert torch.equal(out[:, :length], inputs["input_ids"])
    assert torch.equal(dict_out.sequences, out)
    assert torch.equal(positional, out)


@torch.no_grad()
def test_sampling_matches_unpatched_when_keeping_all(setup):
    model, inputs = setup
    sampling = {"max_new_tokens": 6, "do_sample": True, "top_k": 0, "temperature": 1.5}
    torch.manual_seed(7)
    reference = model.generate(**inputs, **sampling)
    with vtprune.patched(model, "random", keep=1.0):
        torch.manual_seed(7)
        assert torch.equal(model.generate(**inputs, **sampling), reference)
    with vtprune.patched(model, "random", keep=2):
        torch.manual_seed(7)
        pruned = model.generate(**inputs, **sampling)
    assert pruned.shape == reference.shape


@torch.no_grad()
def test_max_length_counts_the_callers_prompt(setup):
    model, inputs = setup
    length = inputs["input_ids"].shape[1]
    with vtprune.patched(model, "uniform", keep=2):
        out = model.generate(**inputs, max_length=length + 4, do_sample=False)
    assert out.shape[1] == length + 4


@torch.no_grad()
def test_forward_with_labels_scores_only_kept_positions(setup):
    model, inputs = setup
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    reference = model(**inputs, labels=labels).loss
    with vtprune.patched(model, "cls_attention", keep=1.0):
        torch.testing.assert_close(model(**inputs, labels=labels).loss, reference)
    with vtprune.patched(model, "cls_attention", keep=4):
        assert torch.isfinite(model(**inputs, labels=labels).loss)

"""The vLLM plugin's original positions (`vtprune.vllm`: laid out at admission, each kept token placed after the
tower, chunk by chunk) equal the position ids HF + vtprune gives the same pruned prompt, prefill and decode.
Runs without vLLM: these are the functions the plugin's models hand vLLM's runner. For Qwen-VL the unpruned
layout comes from the HF model's `get_rope_index` here, from vLLM's own position function under vLLM (the two
agree: tests_vllm checks the served answers)."""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests import helpers
from vtprune import vllm as plugin

TWO_IMAGES = {
    "llava": "USER: <image> and <image>\nwhich is red ? ASSISTANT:",
    "qwen": f"user : {helpers.QWEN_IMAGE} and {helpers.QWEN_IMAGE} which is red ? assistant :",
}


def _model(family: str):
    if family.startswith("qwen"):
        model, processor = helpers._qwen(family, "sdpa")
        side = 28
        images, prompt = [helpers.image(1, (4 * side, 6 * side)), helpers.image(2, (5 * side, 3 * side))], "qwen"
    else:
        model, processor = helpers.tiny("llama", "sdpa", vision="clip", text_layers=2, family=family)
        images, prompt = [helpers.image(1, (60, 30)), helpers.image(2)], "llava"
    return model, processor(images=images, text=[TWO_IMAGES[prompt]], return_tensors="pt")


def _unpruned(model, inputs) -> torch.Tensor:
    """`[3, length]` positions of the unpruned prompt."""
    if model.config.model_type.startswith("qwen"):
        names = ("mm_token_type_ids", "image_grid_thw", "attention_mask")
        positions, _ = model.model.get_rope_index(inputs["input_ids"], **{name: inputs.get(name) for name in names})
        return positions[:, 0]
    return torch.arange(inputs["input_ids"].shape[1]).expand(3, -1)


@torch.no_grad()
def _hf(model, inputs, policy: str) -> tuple[torch.Tensor, list, int]:
    """HF + vtprune's prefill positions (`[rows, pruned length]`), each image's record and the first decoded
    token's position."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True
    )
    try:
        with vtprune.patched(model, policy, keep=6):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            records = list(vtprune.last_trace(model))
    finally:
        hook.remove()
    prefill, decode = (positions.reshape(-1, positions.shape[-1]) for positions in seen[:2])
    return prefill[-3:] if model.config.model_type.startswith("qwen") else prefill, records, int(decode[-1, -1])


@pytest.mark.parametrize("chunk", [7, 1000])
@pytest.mark.parametrize("policy", ["cls_attention", "uniform"])
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_placed_positions_equal_hf_original_positions(family, policy, chunk):
    model, inputs = _model(family)
    expected, records, next_position = _hf(model, inputs, policy)
    qwen = family.startswith("qwen")
    image_token, rows = model.config.image_token_id, (3 if qwen else 1)
    ids = inputs["input_ids"][0].tolist()
    starts = [i for i, t in enumerate(ids) if t == image_token and ids[i - 1] != image_token]
    prompt, images, cursor = [], [], 0  # the prompt vLLM gets: each image's run cut to its kept tokens
    for start, record in zip(starts, records, strict=True):
        prompt += ids[cursor:start]
        images.append((len(prompt), record.n_after, record.n_before))
        prompt += [image_token] * record.n_after
        cursor = start + record.n_before
    prompt += ids[cursor:]

    positions, delta = plugin.pruned_positions(_unpruned(model, inputs), images)
    offsets = [plugin.grid_offsets(r.delivered, r.grid) if qwen else r.delivered for r in records]
    features = [
        plugin.with_offsets(torch.zeros(r.n_after, 4, dtype=torch.bfloat16), o)
        for r, o in zip(records, offsets, strict=True)
    ]
    for computed in range(0, len(prompt), chunk):  # vLLM's runner: each step's chunk of every image in it
        window = []
        for (start, count, _), carried in zip(images, features, strict=True):
            first, last = max(computed - start, 0), min(computed + chunk - start, count)
            if first < last:
                window.append(carried[first:last])
        stripped, positions, _ = plugin.placed_positions(prompt, image_token, window, positions, computed, rows)
        assert [s.shape[1] for s in stripped] == [4] * len(window)
        again = plugin.placed_positions(prompt, image_token, window, positions, computed, rows)[1]
        assert torch.equal(again, positions)  # a window placed twice is placed the same
    final_delta = plugin.placed_positions(prompt, image_token, [], positions, len(prompt), rows)[2]
    assert torch.equal(positions[: len(expected)], expected)
    assert final_delta == delta and len(prompt) + delta == next_position  # decode goes on where HF's does


def test_offsets_survive_bf16_up_to_a_large_mosaic():
    offsets = torch.tensor([0, 1, 255, 256, 2927, 65535])
    carried = plugin.with_offsets(torch.zeros(6, 3, dtype=torch.bfloat16), offsets)
    placed = plugin.placed_positions([5] * 6, 5, [carried], torch.full((3, 6), -1), 0, 1)[1]
    assert placed[0].tolist() == offsets.tolist()

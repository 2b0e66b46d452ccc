"""The vLLM plugin's original positions (`vtprune.vllm`: laid out at admission, each kept token placed after the
tower, chunk by chunk) equal the position ids HF + vtprune gives the same pruned prompt, prefill and decode.
Runs without vLLM: these are the functions the plugin's model hands vLLM's runner."""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests import helpers
from vtprune import vllm as plugin

PROMPT = "USER: <image> and <image>\nwhich is red ? ASSISTANT:"


def _hf_positions(family: str, policy: str) -> tuple[torch.Tensor, list[int], int, list, int]:
    """HF + vtprune on a two-image prompt: the LLM's prefill positions, the pruned prompt's tokens, the image
    token, each image's record, and the position of the first decoded token."""
    model, processor = helpers.tiny("llama", "sdpa", vision="clip", text_layers=2, family=family)
    inputs = processor(images=[helpers.image(1, (60, 30)), helpers.image(2)], text=[PROMPT], return_tensors="pt")
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True
    )
    with vtprune.patched(model, policy, keep=6):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        records = list(vtprune.last_trace(model))
    hook.remove()
    ids, image_token = inputs["input_ids"][0].tolist(), model.config.image_token_id
    pruned, image = [], -1
    for index, token in enumerate(ids):
        if token == image_token and (index == 0 or ids[index - 1] != image_token):
            image += 1
            pruned += [image_token] * records[image].n_after
        elif token != image_token:
            pruned.append(token)
    return seen[0][0], pruned, image_token, records, int(seen[1][0, -1])


@pytest.mark.parametrize("chunk", [7, 1000])
@pytest.mark.parametrize("policy", ["cls_attention", "uniform"])
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_placed_positions_equal_hf_original_positions(family, policy, chunk):
    expected, prompt, image_token, records, next_position = _hf_positions(family, policy)
    starts = [i for i, t in enumerate(prompt) if t == image_token and (i == 0 or prompt[i - 1] != image_token)]
    images = [(start, r.n_after, r.n_before) for start, r in zip(starts, records, strict=True)]
    positions, delta = plugin.admitted_positions(len(prompt), images)
    features = [plugin.with_offsets(torch.zeros(r.n_after, 4, dtype=torch.bfloat16), r.delivered) for r in records]
    for computed in range(0, len(prompt), chunk):  # vLLM's runner: each step's chunk of every image in it
        window = []
        for (start, count, _), embedded in zip(images, features, strict=True):
            first, last = max(computed - start, 0), min(computed + chunk - start, count)
            if first < last:
                window.append(embedded[first:last])
        stripped, positions, chunk_delta = plugin.placed_positions(prompt, image_token, window, positions, computed)
        assert [s.shape[1] for s in stripped] == [4] * len(window)
        assert chunk_delta == delta
        again = plugin.placed_positions(prompt, image_token, window, positions, computed)[1]
        assert torch.equal(again, positions)  # a window placed twice is placed the same
    assert torch.equal(positions[0], expected)
    assert len(prompt) + delta == next_position  # decode continues where HF + vtprune's does


def test_offsets_survive_bf16_up_to_a_large_mosaic():
    offsets = torch.tensor([0, 1, 255, 256, 2927, 65535])
    carried = plugin.with_offsets(torch.zeros(6, 3, dtype=torch.bfloat16), offsets)
    placed = plugin.placed_positions([5] * 6, 5, [carried], torch.zeros(3, 6, dtype=torch.long), 0)[1]
    assert placed[0].tolist() == offsets.tolist()

"""`visionzip` builds the projector input exactly as VisionZip's official CLIP tower does."""

import pytest
import torch
from helpers import (
    PROMPTS,
    assert_rows_match,
    batch,
    image,
    image_inputs_by_hand,
    run_rows,
    tiny,
)

import vtprune
from vtprune.registry import make_policy

SIZES = {"image_size": 56}  # 64 patches; features from layer 2 of 4
BACKENDS = [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("qwen2", "eager")]


@torch.no_grad()
def official_visionzip(model, pixel_values, dominant, contextual):
    """VisionZip's `clip_encoder.py` forward for one image, on the layer that gives LLaVA its features:
    returns (projected tokens in the official order, the visual-token slot of each, as vtprune places them)."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True)
    layer = tower.encoder.layers[-2]
    attn = layer.self_attn
    x = layer.layer_norm1(out.hidden_states[-3])  # the input of the layer whose output is hidden_states[-2]
    shape = (1, -1, attn.num_heads, attn.head_dim)
    q, k = (p(x).view(shape).transpose(1, 2) for p in (attn.q_proj, attn.k_proj))
    attention = ((q * attn.scale) @ k.transpose(-1, -2)).softmax(-1)
    hidden, metric = out.hidden_states[-2][0], k.mean(1)[0]
    tokens = hidden.shape[0]

    top = attention[0, :, 0, 1:].sum(0).topk(dominant - 1).indices + 1
    rest_mask = torch.ones(tokens, dtype=torch.bool)
    rest_mask[torch.cat([torch.tensor([0]), top])] = False
    dominant_tokens, rest = hidden[~rest_mask], rest_mask.nonzero().squeeze(1)
    unit = metric[rest_mask] / metric[rest_mask].norm(dim=-1, keepdim=True)
    step = max(1, len(rest) // max(contextual, 1))  # contextual=0 (the official code divides by it): no merging
    targets = torch.arange(0, len(rest), step)[:contextual]
    others = ~torch.isin(torch.arange(len(rest)), targets)
    assigned = (unit[others] @ unit[targets].T).argmax(1) if contextual else torch.zeros(0, dtype=torch.long)
    onehot = torch.zeros(int(others.sum()), contextual).scatter_(1, assigned[:, None], 1.0)
    counts = onehot.sum(0).clamp(min=1)[:, None]
    merged = hidden[rest_mask][targets] + (onehot.T @ hidden[rest_mask][others]) / counts
    features = model.model.multi_modal_projector(torch.cat([dominant_tokens, merged]))

    slots = torch.cat([(~rest_mask).nonzero().squeeze(1)[1:], rest[targets]]) - 1
    used = torch.zeros(tokens - 1, dtype=torch.bool)
    used[slots] = True
    cls_slot = (~used).nonzero()[0]  # the CLS token takes the first slot no kept patch fills
    return features, torch.cat([cls_slot, slots])


@pytest.fixture(params=BACKENDS, ids=["-".join(b) for b in BACKENDS])
def setup(request):
    model, processor = tiny(*request.param, **SIZES)
    inputs = batch(processor, PROMPTS, [image(71, (70, 70)), image(72, (90, 60))])
    yield model, inputs
    vtprune.unpatch(model)


@torch.no_grad()
@pytest.mark.parametrize(
    ("keep", "options", "split"), [(12, {}, (10, 2)), (9, {"dominant": 4}, (4, 5)), (3, {}, (3, 0))]
)
@pytest.mark.parametrize("contiguous", [False, True])
def test_pruned_forward_equals_the_official_tokens_run_by_hand(setup, keep, options, split, contiguous):
    model, inputs = setup
    mode = "contiguous" if contiguous else "original"
    with vtprune.patched(model, "visionzip", keep=keep, positions=mode, **options):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    expected = [official_visionzip(model, pixels[None], *split) for pixels in inputs["pixel_values"]]
    for record, (_, slots) in zip(trace, expected, strict=True):
        assert record.n_after == keep and torch.equal(record.kept, slots.sort().values)
    assert_rows_match(logits, run_rows(model, image_inputs_by_hand(model, inputs, expected, contiguous)))


@torch.no_grad()
def test_a_budget_of_every_token_equals_unpatched(setup):
    model, inputs = setup
    logits = model(**inputs).logits
    with vtprune.patched(model, "visionzip", keep=64):
        assert torch.equal(model(**inputs).logits, logits)


@torch.no_grad()
def test_siglip_tower_keeps_dominant_patches_by_the_mean_query_row():
    model, processor = tiny("llama", "sdpa", vision="siglip", **SIZES)
    inputs = batch(processor, PROMPTS, [image(78, (70, 70)), image(79, (70, 70))])
    with vtprune.patched(model, "visionzip", keep=8):
        model(**inputs)
        trace = vtprune.last_trace(model)
    for record in trace:  # no CLS: 7 dominant patches by score and 1 merged token at a non-dominant slot
        assert record.n_after == 8 and record.scores.shape == (64,)
        assert set(record.scores.topk(7).indices.tolist()) < set(record.kept.tolist())


def test_a_plain_keep_splits_like_the_paper_and_options_are_checked():
    policy = make_policy("visionzip", {})
    assert [policy.split(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert make_policy("visionzip", {"contextual": 30}).split(64) == (34, 30)
    assert make_policy("visionzip", {"dominant": 54, "contextual": 10}).split(64) == (54, 10)
    model, _ = tiny("llama", "sdpa", **SIZES)
    with pytest.raises(ValueError, match="pass keep=192 or only one of the two"):
        vtprune.patch(model, "visionzip", keep=64, dominant=162, contextual=30)
    with pytest.raises(ValueError, match="needs 0 <= contextual < 64"):
        vtprune.patch(model, "visionzip", keep=64, dominant=70)
    with pytest.raises(ValueError, match="is a fraction"):
        vtprune.patch(model, "visionzip", keep=0.5, dominant=10, contextual=2)
    with pytest.raises(ValueError, match="contextual must be a token count"):
        vtprune.patch(model, "visionzip", contextual=-1)
    assert "forward" not in model.__dict__

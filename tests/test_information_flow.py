"""`information_flow` prunes inside the tower exactly as FlowCut's official encoder loop does."""

import pytest
import torch
from helpers import (
    PROMPTS,
    assert_rows_match,
    batch,
    image,
    image_inputs_by_hand,
    peaked,
    row,
    run_rows,
    tiny,
)

import vtprune

DEEP = {"image_size": 56, "vision_layers": 8}  # 64 patches; features from layer 6: cuts after layers 1, 3 and 5
BACKENDS = [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("qwen2", "eager")]


@torch.no_grad()
def official_flowcut(model, pixel_values, keep):
    """FlowCut's CLIP encoder loop for one image (batch 1, so its batch-wide max is moot), written from
    `flowcut/modeling_clip_flowcut.py` and `utils_flowcut.py`: returns (kept patches, projected features)."""
    tower = model.model.vision_tower
    select = len(tower.encoder.layers) - 2
    target = keep + 1
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    kept, cumulative = torch.arange(hidden.shape[1] - 1), None
    for idx, layer in enumerate(tower.encoder.layers):
        attn = layer.self_attn
        x = layer.layer_norm1(hidden)
        shape = (1, -1, attn.num_heads, attn.head_dim)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        attention = ((q * attn.scale) @ k.transpose(-1, -2)).softmax(-1)
        semantic = (v[:, :, :1] @ v.transpose(-1, -2)).softmax(-1).mean(1)[:, 0]
        hidden = layer(hidden, None)
        if hidden.shape[1] > target:
            cls_attention = attention[:, :, 0, 1:].mean(1)
            relation = cls_attention / cls_attention.sum(-1, keepdim=True)
            sem = semantic[:, 1:] / semantic[:, 1:].sum(-1, keepdim=True)
            score = (relation + sem) * v.mean(1)[:, 1:].norm(p=1, dim=-1)
            cumulative = score if cumulative is None else 0.5 * cumulative + 0.5 * score
            rpl = select - idx - 1
            if rpl % 2 == 0:
                if rpl:
                    n = relation.shape[-1]
                    entropy = -(relation * relation.log()).sum(-1)
                    ratio = entropy / torch.log(torch.tensor(float(n)))
                    prune = int(((n - (target - 1)) / rpl**0.5 * (1 - ratio**2)).round())
                else:
                    prune = hidden.shape[1]
                count = max(hidden.shape[1] - prune, target)
                order = cumulative.topk(count - 1, dim=1).indices.sort(1).values[0]
                hidden = torch.cat([hidden[:, :1], hidden[:, 1:][:, order]], 1)
                cumulative, kept = cumulative[:, order], kept[order]
        if idx == select:
            features = model.model.multi_modal_projector(hidden[:, 1:])[0]
    return kept, features


@pytest.fixture(params=BACKENDS, ids=["-".join(b) for b in BACKENDS])
def setup(request):
    model, processor = peaked(*request.param, **DEEP)
    inputs = batch(processor, PROMPTS, [image(51, (70, 70)), image(52, (90, 60))])
    yield model, inputs
    vtprune.unpatch(model)


@torch.no_grad()
@pytest.mark.parametrize("keep", [10, 3, 1])
@pytest.mark.parametrize("contiguous", [False, True])
def test_pruned_forward_equals_the_official_encoder_loop_then_kept_tokens_by_hand(setup, keep, contiguous):
    model, inputs = setup
    with vtprune.patched(model, "information_flow", keep=keep, positions="contiguous" if contiguous else "original"):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    expected = [official_flowcut(model, pixels[None], keep) for pixels in inputs["pixel_values"]]
    for record, (kept, _) in zip(trace, expected, strict=True):
        assert torch.equal(record.kept, kept) and record.n_after == keep and record.n_before == 64
    assert_rows_match(
        logits, run_rows(model, image_inputs_by_hand(model, inputs, [(f, k) for k, f in expected], contiguous))
    )


@torch.no_grad()
def test_a_budget_past_every_token_equals_unpatched(setup):
    model, inputs = setup
    logits = model(**inputs).logits
    with vtprune.patched(model, "information_flow", keep=500):
        assert torch.equal(model(**inputs).logits, logits)


@torch.no_grad()
def test_the_encoder_runs_on_fewer_tokens_after_each_cut():
    model, processor = peaked("llama", "sdpa", **DEEP)
    inputs = batch(processor, PROMPTS, [image(53, (70, 70)), image(54, (70, 70))])
    seen = []
    handles = [
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
        for layer in model.model.vision_tower.encoder.layers
    ]
    try:
        with vtprune.patched(model, "information_flow", keep=8):
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert seen[:2] == [65, 65]  # layers 0 and 1 run on everything; cuts follow layers 1, 3 and 5
    assert seen[2] == seen[3] and seen[4] == seen[5] and seen[6:] == [9, 9]
    assert 65 > seen[2] >= seen[4] >= 9


@torch.no_grad()
def test_batch_with_different_amounts_per_image_equals_rows_alone():
    model, processor = peaked("qwen2", "sdpa", **DEEP)
    prompts = ["USER: <image> and <image>\nwhich is red ? ASSISTANT:", "USER: <image>\nwhat is shown ? ASSISTANT:"]
    pictures = [image(55, (70, 70)), image(56, (56, 120)), image(57, (90, 60))]
    inputs = batch(processor, prompts, pictures)
    masks = []  # the padding mask layer 2 gets: None unless the images kept different numbers of tokens
    with vtprune.patched(model, "information_flow", keep=6):
        hook = model.model.vision_tower.encoder.layers[2].register_forward_pre_hook(
            lambda module, args: masks.append(args[1])
        )
        try:
            batched = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        finally:
            hook.remove()
        batched_kept = [r.kept for r in vtprune.last_trace(model)]
        for b, images in enumerate([[0, 1], [2]]):
            alone = row(inputs, b, [2, 1])
            tokens = model.generate(**alone, max_new_tokens=5, min_new_tokens=5, do_sample=False)
            alone_kept = [r.kept for r in vtprune.last_trace(model)]
            assert all(torch.equal(a, batched_kept[i]) for a, i in zip(alone_kept, images, strict=True))
            assert torch.equal(tokens[0, alone["input_ids"].shape[1] :], batched[b, inputs["input_ids"].shape[1] :])
    assert masks[0] is not None, "the three images should keep different numbers of tokens after the first cut"


@torch.no_grad()
def test_siglip_tower_uses_the_mean_query_row():
    model, processor = peaked("llama", "sdpa", vision="siglip", image_size=56, vision_layers=6)
    inputs = batch(processor, PROMPTS, [image(60, (70, 70)), image(61, (70, 70))])
    logits = model(**inputs).logits
    with vtprune.patched(model, "information_flow", keep=1.0):
        assert torch.equal(model(**inputs).logits, logits)
    with vtprune.patched(model, "information_flow", keep=9):
        model(**inputs)
        trace = vtprune.last_trace(model)
    assert [r.n_after for r in trace] == [9, 9] and all(r.scores.isfinite().sum() == 64 for r in trace)


def test_a_tower_whose_features_come_from_its_first_layer_is_refused():
    model, _ = tiny("llama", "sdpa", vision_layers=1, vision_feature_layer=-1)
    with pytest.raises(ValueError, match="information_flow prunes after encoder layers below the feature layer"):
        vtprune.patch(model, "information_flow", keep=4)
    assert "forward" not in model.__dict__

"""Gemma 3 beyond the conformance suite: an LLM token is the average-pooled window of 4x4 patches (scores, kept
windows and in-tower units alike), the image block's `token_type_ids` are pruned in step, and in-decoder scoring
keeps to the sliding window of the layer it reads."""

import pytest
import torch
from decoder_reference import fastv, run
from helpers import image, tokens_entering
from subjects import hand_rows
from transformers import GenerationConfig
from vtprune.eval import synthetic

import vtprune

PROMPT = "user : <start_of_image> what is shown ? assistant :"
TWO = "user : <start_of_image> and <start_of_image> which ? assistant :"  # 43 tokens, past the window of 20


def tiny(attn: str = "eager", **sizes):
    config = synthetic.gemma3_config(attn_implementation=attn, **sizes)
    return synthetic.gemma3_model(config), synthetic.gemma3_processor(config)


def window_means(model, per_patch: torch.Tensor) -> torch.Tensor:
    """`[patches]` -> `[tokens]` through the projector's own `AvgPool2d`."""
    side = model.model.multi_modal_projector.patches_per_image
    return model.model.multi_modal_projector.avg_pool(per_patch.view(1, 1, side, side)).flatten()


def tower_of(model):
    """SigLIP's encoder and norms (nested in a `vision_model` before transformers 5.24)."""
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def mean_query_row(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """`[patches]`: the last tower layer's head-mean attention row of the mean query, by hand."""
    tower = tower_of(model)
    layer = tower.encoder.layers[-1]
    attention = layer.self_attn
    normed = layer.layer_norm1(tower(pixel_values, output_hidden_states=True).hidden_states[-2])
    q, k = (p(normed).view(1, -1, attention.num_heads, attention.head_dim).transpose(1, 2) for p in (
        attention.q_proj, attention.k_proj))  # fmt: skip
    return (q.mean(2, keepdim=True) @ k.transpose(-1, -2) * attention.scale).softmax(-1).mean(1)[0, 0]


@torch.no_grad()
def test_received_attention_is_pooled_over_each_window():
    """hierarchical's scores: the eager attention each patch receives at the feature layer (head and query mean),
    averaged over the projector's pooling windows."""
    model, processor = tiny()
    inputs = processor(images=[image(5, (64, 64))], text=[PROMPT], return_tensors="pt")
    with vtprune.patched(model, "hierarchical", keep=6):
        model(**inputs)
        (record,) = vtprune.last_trace(model)
    attentions = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    expected = window_means(model, attentions[-1].mean(1)[0].mean(0))
    torch.testing.assert_close(record.scores, expected, atol=1e-6, rtol=1e-5)
    assert record.n_before == 16 and record.grid == (4, 4)


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_visionzip_keeps_whole_windows_with_their_unpruned_features(attn):
    """VisionZip without contextual tokens: the windows of the highest pooled mean-query attention, each given to
    the LLM as the unpatched projector makes it (the tower runs window by window, then back on the grid)."""
    model, processor = tiny(attn)
    twin, _ = tiny("eager")
    inputs = processor(images=[[image(6, (64, 64))], [image(7, (50, 64))]], text=[PROMPT, PROMPT], padding=True,
                       return_tensors="pt")  # fmt: skip
    with vtprune.patched(model, "visionzip", keep=5, contextual=0):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    for record, pixels in zip(trace, inputs["pixel_values"], strict=True):
        scores = window_means(model, mean_query_row(model, pixels[None]))
        assert torch.equal(record.kept, scores.topk(5).indices.sort().values)
    for b, row in enumerate(hand_rows(model, inputs, [r.delivered for r in trace])):
        expected, _ = run(twin, row.embeds, row.positions, row.items, {})
        torch.testing.assert_close(logits[b, -len(expected) :], expected, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_information_flow_cuts_whole_windows_inside_the_tower():
    model, processor = tiny(vision_layers=6)
    with torch.no_grad():  # a peaked mean query, as a trained tower's, so FlowCut's cuts fire before its last
        for layer in tower_of(model).encoder.layers:
            layer.self_attn.q_proj.weight.mul_(64.0)
    inputs = processor(images=[image(8, (64, 64))], text=[PROMPT], return_tensors="pt")
    with tokens_entering(tower_of(model).encoder.layers) as seen, vtprune.patched(model, "information_flow", keep=3):
        model(**inputs)
        (record,) = vtprune.last_trace(model)
    assert record.n_after == 3 and record.n_before == 16
    assert seen[0] == 256 and all(length % 16 == 0 for length in seen) and seen[-1] < 256
    assert seen == sorted(seen, reverse=True)


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layer", [1, 2])  # FastV reads layer 0 (sliding) or layer 1 (global)
def test_fastv_scores_within_the_sliding_window_and_cuts_every_layer_type(attn, layer):
    """FastV on a prompt longer than the window: kept sets and logits equal the hand-written loop, whose layers
    each get their type's RoPE and mask (bidirectional image blocks; the window counted over the cut sequence)."""
    model, processor = tiny(attn)
    twin, _ = tiny("eager")
    inputs = processor(images=[[image(2), image(3, (64, 32))]], text=[TWO], return_tensors="pt")
    with vtprune.patched(model, vtprune.policy("fastv", layer=layer), keep=5):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    (row,) = hand_rows(model, inputs)
    expected, chosen = run(twin, row.embeds, row.positions, row.items, {layer: fastv(layer, 5)})
    assert [r.kept.tolist() for r in trace] == [c.tolist() for c in chosen[layer]]
    torch.testing.assert_close(logits[0, -len(expected) :], expected, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_token_type_ids_are_pruned_in_step_with_the_placeholders():
    model, processor = tiny()
    inputs = processor(images=[[image(2), image(3)]], text=[TWO], return_tensors="pt")
    given = {}
    handle = model.model.register_forward_pre_hook(lambda m, a, kw: given.update(kw), with_kwargs=True)
    try:
        with vtprune.patched(model, "uniform", keep=4):
            model(**inputs)
    finally:
        handle.remove()
    placeholders = given["input_ids"] == model.config.image_token_id
    assert int(placeholders.sum()) == 8
    assert torch.equal(given["token_type_ids"].bool(), placeholders)


@torch.no_grad()
def test_the_checkpoints_hybrid_cache_default_is_generated_with_a_dynamic_cache():
    """Gemma 3's hub generation config says cache_implementation='hybrid', which generate replaces by a
    DynamicCache: in-decoder stages accept it and generate as without it."""
    model, processor = tiny("sdpa")
    inputs = processor(images=[[image(2), image(3)]], text=[TWO], return_tensors="pt")
    greedy = {"max_new_tokens": 3, "do_sample": False}
    with vtprune.patched(model, "fastv", keep=5):
        plain = model.generate(**inputs, **greedy)
        model.generation_config.cache_implementation = "hybrid"
        try:
            assert torch.equal(model.generate(**inputs, **greedy), plain)
            passed = GenerationConfig(**greedy)  # filled from the model's, "hybrid" included
            assert torch.equal(model.generate(**inputs, generation_config=passed), plain)
            with pytest.raises(ValueError, match="need a DynamicCache"):
                model.generate(**inputs, **greedy, cache_implementation="static")
        finally:
            model.generation_config.cache_implementation = None

"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: M-RoPE positions gathered from the unpruned prompt, merge-unit scoring
on packed towers (windows put back in raster order), deepstack features pruned in step."""

import functools

import pytest
import torch
from decoder_reference import fastv, run, transition
from helpers import image, vision_side
from qwen_reference import rows_by_hand
from transformers.vision_utils import get_vision_window_index
from vtprune.eval import synthetic

import vtprune

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPTS = [f"user : {IMAGE} what is shown ? assistant :", f"user : {IMAGE} what colour is the circle ? assistant :"]
PATCHES = [(8, 12), (10, 6)]  # merged grids 4x6 and 5x3: 24 and 15 tokens
POLICIES = ["cls_attention", "diversity_kcenter", "hierarchical", "random", "uniform"]
FIVE = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
DEEP = {"text_layers": 4}


@functools.cache
def tiny(family: str, attn: str = "sdpa", **sizes):
    config = synthetic.qwen_vl_config(family, attn_implementation=attn, **sizes)
    return synthetic.qwen_vl_model(config), synthetic.qwen_vl_processor(family)


def inputs_for(family, processor, prompts=PROMPTS, patches=PATCHES, seeds=(1, 2)):
    side = synthetic.QWEN_FAMILIES[family][3]
    images = [image(seed, (rows * side, cols * side)) for seed, (rows, cols) in zip(seeds, patches, strict=True)]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def row_alone(inputs, b: int, first: int, count: int) -> dict:
    """Row `b` of a batch without its padding, with its `count` images from image `first` on."""
    grid = inputs["image_grid_thw"]
    start, patches = int(grid[:first].prod(-1).sum()), int(grid[first : first + count].prod(-1).sum())
    real = inputs["attention_mask"][b].bool()
    single = {name: inputs[name][b][real][None] for name in ("input_ids", "attention_mask", "mm_token_type_ids")}
    return single | {
        "pixel_values": inputs["pixel_values"][start : start + patches],
        "image_grid_thw": grid[first : first + count],
    }


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_continues_from_the_last_kept_position(family):
    """Greedy decoding by hand: each new token at the previous M-RoPE position + 1 in all three rows."""
    model, processor = tiny(family)
    inputs = inputs_for(family, processor)
    with vtprune.patched(model, "cls_attention", keep=5):
        out = model.generate(**inputs, **FIVE, return_dict_in_generate=True, output_logits=True)
        kept = [r.kept for r in vtprune.last_trace(model)]
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    for b, alone in enumerate(rows_by_hand(model, inputs, {"image": kept})):
        step = model(**alone)
        cache, position = step.past_key_values, alone["position_ids"][..., -1:]
        for t in range(5):
            torch.testing.assert_close(out.logits[t][b], step.logits[0, -1], atol=1e-5, rtol=1e-4)
            position = position + 1
            step = model(
                input_ids=new[b : b + 1, t : t + 1],
                position_ids=position,
                attention_mask=torch.ones(1, cache.get_seq_length() + 1),
                past_key_values=cache,
            )


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", POLICIES)
def test_batch_and_several_images_equal_rows_alone(family, policy):
    model, processor = tiny(family)
    prompts = [f"user : {IMAGE} and {IMAGE} which is red ? assistant :", PROMPTS[0]]
    inputs = inputs_for(family, processor, prompts, [*PATCHES, (6, 6)], seeds=(3, 4, 5))
    with vtprune.patched(model, vision_side(policy), keep=0.25):
        batched = model.generate(**inputs, **FIVE)
        kept = [r.kept for r in vtprune.last_trace(model)]
        alone = []
        for b, (first, count) in enumerate([(0, 2), (2, 1)]):
            tokens = model.generate(**row_alone(inputs, b, first, count), **FIVE)
            assert tokens[0, -5:].tolist() == batched[b, -5:].tolist()
            alone += [r.kept for r in vtprune.last_trace(model)]
    assert [len(k) for k in kept] == [6, 4, 2]  # a quarter of 24, 15 and 9 tokens
    assert all(torch.equal(a, k) for a, k in zip(alone, kept, strict=True))


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_scores_are_merge_unit_means_of_the_mean_query_row(family):
    """cls_attention on a tower without CLS: per full-attention layer, the mean query's attention row (post-RoPE
    q and k, head mean), averaged over each 2x2 merge unit in raster order, summed over layers; recomputed here
    from the tower's own modules (Qwen2.5-VL's tower runs units in window order: put back here too)."""
    model, processor = tiny(family, "eager", vision_depth=6)
    inputs = inputs_for(family, processor)
    with vtprune.patched(model, "cls_attention", keep=6, start_layer=2):
        model(**inputs)
        trace = vtprune.last_trace(model)
    visual, grid = model.model.visual, inputs["image_grid_thw"]
    captured = {}

    def keep_input(index):
        def hook(module, args, kwargs):
            captured[index] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

        return hook

    handles = [b.attn.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, b in enumerate(visual.blocks)]
    visual(inputs["pixel_values"], grid_thw=grid)
    for handle in handles:
        handle.remove()
    rotate = __import__(type(visual).__module__, fromlist=["x"]).apply_rotary_pos_emb_vision
    full = getattr(visual, "fullatt_block_indexes", range(6))
    raster = torch.arange(int(grid.prod(-1).sum()) // 4)
    if family == "qwen2_5_vl":
        window, _ = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
        raster = window.argsort()
    sizes = grid.prod(-1).tolist()
    total = torch.zeros(sum(sizes) // 4)
    for layer in [layer for layer in range(2, 6) if layer in full]:
        x, (cos, sin) = captured[layer]
        attention = visual.blocks[layer].attn
        q, k, _ = attention.qkv(x).reshape(len(x), 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rotate(q, k, cos, sin)
        units, first = [], 0
        for n in sizes:
            logits = torch.einsum("hd,nhd->hn", q[first : first + n].mean(0), k[first : first + n]) * attention.scaling
            units.append(logits.softmax(-1).mean(0).view(-1, 4).mean(1))
            first += n
        total += torch.cat(units)[raster]
    for record, scores in zip(trace, total.split([n // 4 for n in sizes]), strict=True):
        torch.testing.assert_close(record.scores, scores, atol=1e-6, rtol=1e-5)


CUT_LAYERS = (2, 3, 4)
CUTS = {"fastv": {"layer": 3}, "transition": {"layers": CUT_LAYERS, "ratios": (0.75, 0.5, 0.25)}}


def hand_rows(model, inputs):
    """Per row alone, every visual token: (embeddings, M-RoPE positions, image of each token or -1, deepstack
    features added after the first decoder layers)."""
    vision = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    everything = [torch.arange(24), torch.arange(15)]
    for b, alone in enumerate(rows_by_hand(model, inputs, {"image": everything})):
        embeds = model.model.get_input_embeddings()(alone["input_ids"])
        images = torch.where(alone["input_ids"][0] == model.config.image_token_id, 0, -1)
        embeds[0, images == 0] = vision.pooler_output[b]
        deepstack = [level[b] for level in getattr(vision, "deepstack_features", [])]
        yield embeds, alone["position_ids"], images, deepstack


def hand_cuts(twin, policy: str, count: int) -> dict:
    """The paper's selections at each cut of `policy` (options as CUTS), for an image of `count` tokens."""
    if policy == "fastv":
        return {3: fastv(3, round(count / 4))}
    counts = [int(count * r) for r in (0.75, 0.5)] + [round(count * 0.25)]
    return {layer: transition(twin, n) for layer, n in zip(CUT_LAYERS, counts, strict=True)}


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("policy", ["fastv", "transition"])
def test_in_decoder_cuts_equal_the_loop_by_hand(family, attn, policy):
    """The cut sequence keeps each kept token's M-RoPE position; Qwen3-VL's deepstack features are added to
    the visual tokens after the first decoder layers, before any cut."""
    model, processor = tiny(family, attn, text_layers=5)
    twin = tiny(family, "eager", text_layers=5)[0]
    inputs = inputs_for(family, processor)
    with vtprune.patched(model, policy, keep=0.25, **CUTS[policy]):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    for b, (embeds, positions, images, deepstack) in enumerate(hand_rows(model, inputs)):
        cuts = hand_cuts(twin, policy, int((images == 0).sum()))
        expected, chosen = run(twin, embeds, positions, images, cuts, transition_layers=(1, 2, 3), added=deepstack)
        assert torch.equal(trace[b].kept, chosen[max(cuts)][0])
        torch.testing.assert_close(logits[b, -len(expected) :], expected, atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("policy", ["transition"])
def test_cached_decode_after_each_of_several_cuts_equals_an_uncached_recompute(family, attn, policy):
    """Batched, left-padded generate after TransPrune's three cuts (the conformance suite makes one): every step
    of each row equals the hand loop run on that row alone without a cache, on the prompt plus the tokens
    generated before, cut at each layer to the paper's selection (the decode steps continue from the last kept
    M-RoPE position + 1); and each row generated alone gives the same tokens."""
    model, processor = tiny(family, attn, text_layers=5)
    twin = tiny(family, "eager", text_layers=5)[0]
    inputs = inputs_for(family, processor)
    assert not inputs["attention_mask"].bool().all()  # the shorter prompt is left-padded
    with vtprune.patched(model, policy, keep=0.25, **CUTS[policy]):
        out = model.generate(**inputs, **FIVE, return_dict_in_generate=True, output_logits=True)
        kept = [r.kept for r in vtprune.last_trace(model)]
        for b in range(2):
            solo = model.generate(
                **row_alone(inputs, b, b, 1), **FIVE, return_dict_in_generate=True, output_logits=True
            )
            assert solo.sequences[0, -5:].tolist() == out.sequences[b, -5:].tolist()
            torch.testing.assert_close(
                torch.stack([s[b] for s in out.logits]), torch.stack([s[0] for s in solo.logits]), atol=1e-5, rtol=1e-4
            )
            assert torch.equal(vtprune.last_trace(model)[0].kept, kept[b])
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    for b, (embeds, positions, images, deepstack) in enumerate(hand_rows(model, inputs)):
        cuts = hand_cuts(twin, policy, int((images == 0).sum()))
        _, chosen = run(twin, embeds, positions, images, cuts, transition_layers=(1, 2, 3), added=deepstack)
        assert torch.equal(kept[b], chosen[max(cuts)][0])
        generated = new[b, :-1]
        embeds = torch.cat([embeds, model.model.get_input_embeddings()(generated)[None]], 1)
        positions = torch.cat([positions, positions[..., -1:] + 1 + torch.arange(len(generated))], -1)
        images = torch.cat([images, torch.full((len(generated),), -1)])
        expected, _ = run(twin, embeds, positions, images, chosen, transition_layers=(1, 2, 3), added=deepstack)
        steps = torch.stack([step[b] for step in out.logits])
        torch.testing.assert_close(steps, expected[-len(steps) :], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("policy", "options", "match"),
    [
        ("cls_attention", {"positions": "contiguous"}, "leave positions='original'"),
    ],
)
def test_what_it_cannot_do_is_refused_with_the_reason(family, policy, options, match):
    model, _ = tiny(family)
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, policy, keep=6, **options)
    assert not hasattr(model, "_vtprune_patch")


def test_qwen3_vl_cuts_come_after_the_deepstack_layers():
    model, _ = tiny("qwen3_vl", **DEEP)
    with pytest.raises(ValueError, match="receive deepstack features: choose a layer in 2..3"):
        vtprune.patch(model, "fastv", keep=6, layer=1)


def test_qwen2_5_vl_scores_only_with_full_attention_layers():
    model, _ = tiny("qwen2_5_vl", vision_depth=6)  # full attention in layers 1, 3, 5
    assert vtprune.policy("hierarchical").request(vtprune.adapters.for_model(model).layout).received_attention == (3, 5)
    with pytest.raises(ValueError, match="attends within windows"):
        vtprune.patch(model, "hierarchical", keep=6, object_layer=2)

"""Qwen2-VL: M-RoPE positions gathered from the unpruned prompt, merge-unit scoring, packed towers."""

import functools

import pytest
import torch
from decoder_reference import fastv, run, transition
from helpers import image, vision_side
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from vtprune.eval import synthetic

import vtprune

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPTS = [f"user : {IMAGE} what is shown ? assistant :", f"user : {IMAGE} what colour is the circle ? assistant :"]
SIZES = [(112, 168), (150, 90)]  # merged grids 4x6 and 5x3: 24 and 15 tokens
POLICIES = ["cls_attention", "diversity_kcenter", "hierarchical", "random", "uniform"]
BACKENDS = ["sdpa", "eager"]
FIVE = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}


@functools.cache
def tiny(attn: str = "sdpa", **sizes):
    config = synthetic.qwen_vl_config("qwen2_vl", attn_implementation=attn, **sizes)
    return synthetic.qwen_vl_model(config), synthetic.qwen_vl_processor("qwen2_vl")


def inputs_for(processor, prompts=PROMPTS, sizes=SIZES, seeds=(1, 2)):
    images = [image(seed, size) for seed, size in zip(seeds, sizes, strict=True)]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


@torch.no_grad()
def rows_by_hand(model, inputs, kept: list[torch.Tensor]):
    """Per row alone: embeddings with only the kept image tokens, and their M-RoPE positions `[3, 1, n]`
    taken from the model's own `get_rope_index` on the unpruned prompt."""
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    embed, image_id = model.get_input_embeddings(), model.config.image_token_id
    rows, image = [], 0
    for b, ids in enumerate(inputs["input_ids"]):
        vectors, columns, seen = [], [], 0
        for column, token in enumerate(ids.tolist()):
            if not inputs["attention_mask"][b, column]:
                continue
            if token != image_id:
                vectors.append(embed(torch.tensor(token)))
                columns.append(column)
                continue
            if seen in kept[image].tolist():
                vectors.append(features[image][seen])
                columns.append(column)
            seen += 1
            if seen == len(features[image]):
                image, seen = image + 1, 0
        rows.append((torch.stack(vectors)[None], positions[:, b : b + 1, columns]))
    return rows


def run_rows(model, rows):
    return [
        model(inputs_embeds=e, position_ids=p, attention_mask=torch.ones(e.shape[:2], dtype=torch.long)).logits[0]
        for e, p in rows
    ]


@torch.no_grad()
@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("policy", [*POLICIES, "fastv", "transition"])
def test_keep_all_equals_unpatched(attn, policy):
    model, processor = tiny(attn, text_layers=4)
    inputs = inputs_for(processor)
    logits = model(**inputs).logits
    tokens = model.generate(**inputs, **FIVE)
    options = {"layers": (1, 2, 3)} if policy == "transition" else {}
    with vtprune.patched(model, vision_side(policy), keep=1.0, **options):
        assert torch.equal(model(**inputs).logits, logits)
        assert torch.equal(model.generate(**inputs, **FIVE), tokens)
        assert [r.n_after for r in vtprune.last_trace(model)] == [24, 15]


@torch.no_grad()
@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_pruned_equals_kept_tokens_with_their_positions(attn, policy):
    model, processor = tiny(attn)
    inputs = inputs_for(processor)
    with vtprune.patched(model, vision_side(policy), keep=6):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    assert [r.n_after for r in trace] == [6, 6] and [r.grid for r in trace] == [(4, 6), (5, 3)]
    for b, expected in enumerate(run_rows(model, rows_by_hand(model, inputs, [r.kept for r in trace]))):
        torch.testing.assert_close(logits[b, -len(expected) :], expected, atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("attn", BACKENDS)
def test_generate_continues_from_the_last_kept_position(attn):
    """Greedy decoding by hand: each new token at the previous M-RoPE position + 1 in all three rows."""
    model, processor = tiny(attn)
    inputs = inputs_for(processor)
    with vtprune.patched(model, "cls_attention", keep=5):
        out = model.generate(**inputs, **FIVE, return_dict_in_generate=True, output_logits=True)
        kept = [r.kept for r in vtprune.last_trace(model)]
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    for b, (embeds, positions) in enumerate(rows_by_hand(model, inputs, kept)):
        step = model(inputs_embeds=embeds, position_ids=positions, attention_mask=torch.ones(embeds.shape[:2]))
        cache, position, tokens = step.past_key_values, positions[..., -1:], []
        for t in range(5):
            logits = step.logits[0, -1]
            torch.testing.assert_close(out.logits[t][b], logits, atol=1e-5, rtol=1e-4)
            tokens.append(int(new[b, t]))
            position = position + 1
            step = model(
                input_ids=new[b : b + 1, t : t + 1],
                position_ids=position,
                attention_mask=torch.ones(1, cache.get_seq_length() + 1),
                past_key_values=cache,
            )
        assert tokens == new[b].tolist()


@torch.no_grad()
@pytest.mark.parametrize("policy", POLICIES)
def test_batch_and_several_images_equal_rows_alone(policy):
    model, processor = tiny("sdpa")
    prompts = [f"user : {IMAGE} and {IMAGE} which is red ? assistant :", PROMPTS[0]]
    inputs = inputs_for(processor, prompts, [*SIZES, (84, 84)], seeds=(3, 4, 5))
    with vtprune.patched(model, vision_side(policy), keep=0.25):
        batched = model.generate(**inputs, **FIVE)
        kept = [r.kept for r in vtprune.last_trace(model)]
        alone = []
        for b, (first, count) in enumerate([(0, 2), (2, 1)]):
            patches = inputs["image_grid_thw"][first : first + count].prod(-1)
            start = int(inputs["image_grid_thw"][:first].prod(-1).sum())
            mask = inputs["attention_mask"][b].bool()
            single = {
                "input_ids": inputs["input_ids"][b][mask][None],
                "attention_mask": inputs["attention_mask"][b][mask][None],
                "mm_token_type_ids": inputs["mm_token_type_ids"][b][mask][None],
                "pixel_values": inputs["pixel_values"][start : start + int(patches.sum())],
                "image_grid_thw": inputs["image_grid_thw"][first : first + count],
            }
            tokens = model.generate(**single, **FIVE)
            assert tokens[0, -5:].tolist() == batched[b, -5:].tolist()
            alone += [r.kept for r in vtprune.last_trace(model)]
    assert [len(k) for k in kept] == [6, 4, 2]  # a quarter of 24, 15 and 9 tokens
    assert all(torch.equal(a, k) for a, k in zip(alone, kept, strict=True))


@torch.no_grad()
def test_scores_are_merge_unit_means_of_the_mean_query_row():
    """cls_attention on a tower without CLS: per layer, the mean query's attention row (post-RoPE q and k, head
    mean), averaged over each 2x2 merge unit, summed over layers, recomputed here from the tower's own modules."""
    model, processor = tiny("eager", vision_depth=6)
    inputs = inputs_for(processor)
    with vtprune.patched(model, "cls_attention", keep=6, start_layer=2):
        model(**inputs)
        trace = vtprune.last_trace(model)
    visual = model.model.visual
    grid = inputs["image_grid_thw"]
    captured = {}

    def keep_input(index):
        def hook(module, args, kwargs):
            captured[index] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

        return hook

    handles = [
        block.attn.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, block in enumerate(visual.blocks)
    ]
    visual(inputs["pixel_values"], grid_thw=grid)
    for handle in handles:
        handle.remove()
    sizes = (grid.prod(-1)).tolist()
    expected = [torch.zeros(n // 4) for n in sizes]
    for layer in range(2, 6):
        x, (cos, sin) = captured[layer]
        attention = visual.blocks[layer].attn
        q, k, _ = attention.qkv(x).reshape(len(x), 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        first = 0
        for i, n in enumerate(sizes):
            qi, ki = q[first : first + n], k[first : first + n]
            logits = torch.einsum("hd,nhd->hn", qi.mean(0), ki) * attention.scaling
            expected[i] += logits.softmax(-1).mean(0).view(-1, 4).mean(1)
            first += n
    for record, scores in zip(trace, expected, strict=True):
        torch.testing.assert_close(record.scores, scores, atol=1e-6, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("policy", ["information_flow", "visionzip"])
def test_in_tower_policies_are_refused_with_the_reason(policy):
    model, _ = tiny("sdpa")
    with pytest.raises(ValueError, match="prunes inside the vision tower"):
        vtprune.patch(model, policy, keep=6)
    assert not hasattr(model, "_vtprune_patch")


def test_contiguous_positions_are_refused_for_m_rope():
    model, _ = tiny("sdpa")
    with pytest.raises(ValueError, match="leave positions='original'"):
        vtprune.patch(model, "cls_attention", keep=6, positions="contiguous")


@torch.no_grad()
@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("policy", ["fastv", "transition"])
def test_in_decoder_cuts_equal_the_loop_by_hand(attn, policy):
    """The cut sequence keeps each kept token's M-RoPE position (the rotary embeddings are gathered)."""
    model, processor = tiny(attn, text_layers=4)
    twin = tiny("eager", text_layers=4)[0]
    inputs = inputs_for(processor)
    options = {"layer": 2} if policy == "fastv" else {"layers": (1, 2, 3), "ratios": (0.75, 0.5, 0.25)}
    with vtprune.patched(model, policy, keep=0.25, **options):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    everything = [torch.arange(24), torch.arange(15)]
    for b, (embeds, positions) in enumerate(rows_by_hand(model, inputs, everything)):
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        images = torch.where(ids == model.config.image_token_id, 0, -1)
        count = int((images == 0).sum())
        if policy == "fastv":
            cuts = {2: fastv(2, round(count / 4))}
        else:
            counts = [int(count * 0.25 / 0.25 * r) for r in (0.75, 0.5)] + [round(count * 0.25)]
            cuts = {layer: transition(twin, n) for layer, n in zip((1, 2, 3), counts, strict=True)}
        expected, chosen = run(twin, embeds, positions, images, cuts, transition_layers=(0, 1, 2))
        assert torch.equal(trace[b].kept, chosen[max(cuts)][0])
        torch.testing.assert_close(logits[b, -len(expected) :], expected, atol=1e-5, rtol=1e-4)

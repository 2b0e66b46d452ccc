"""In-decoder cuts (`fastv`, `transition`, `diversity_kcenter` stage 2) against a hand-written layer loop."""

import pytest
import torch
from decoder_reference import fastv, instruction_attention, run, transition
from helpers import PROMPTS, batch, image, image_inputs_by_hand, row, tiny

import vtprune

BACKENDS = [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("qwen2", "eager")]
DEEP = {"text_layers": 6}
GREEDY = {"max_new_tokens": 5, "do_sample": False}
FIVE = {**GREEDY, "min_new_tokens": 5}  # rows compared with each other: no early end-of-sequence
TRANSITION = {"layers": (2, 3, 5)}
ROWS = [1, 1]


def eager_twin(text: str):
    """The same weights with eager attention: the reference reads its attention weights."""
    return tiny(text, "eager", **DEEP)[0]


def setup(text: str, attn: str, prompts=PROMPTS, seeds=(1, 2)):
    model, processor = tiny(text, attn, **DEEP)
    return model, batch(processor, prompts, [image(seed) for seed in seeds])


def rows_by_hand(model, inputs, images_per_row, contiguous=False):
    """Per row alone: (embeddings, positions, image index of each token or -1) with every visual token."""
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    everything = [(f, torch.arange(len(f))) for f in features]
    rows = image_inputs_by_hand(model, inputs, everything, contiguous)
    out = []
    for b, (embeds, positions) in enumerate(rows):
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        visual = ids == model.config.image_token_id
        starts = visual & ~torch.cat([torch.tensor([False]), visual[:-1]])
        images = torch.where(visual, torch.cumsum(starts.long(), 0) - 1, -1)
        out.append((embeds, positions, images))
    return out


def transition_counts(entering: int, keep: float) -> list[int]:
    return [int(entering * keep / 0.125 * r) for r in (0.875, 0.625)] + [round(entering * keep)]


@torch.no_grad()
@pytest.mark.parametrize(("text", "attn"), BACKENDS, ids=["-".join(b) for b in BACKENDS])
@pytest.mark.parametrize("contiguous", [False, True], ids=["original", "contiguous"])
@pytest.mark.parametrize("layer", [1, 3])
def test_fastv_equals_the_loop_by_hand(text, attn, contiguous, layer):
    model, inputs = setup(text, attn)
    positions = "contiguous" if contiguous else "original"
    with vtprune.patched(model, "fastv", keep=5, layer=layer, positions=positions):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    for b, (embeds, pos, images) in enumerate(rows_by_hand(model, inputs, ROWS, contiguous)):
        expected, chosen = run(eager_twin(text), embeds, pos, images, {layer: fastv(layer, 5)}, contiguous=contiguous)
        assert torch.equal(trace[b].kept, chosen[layer][0])
        torch.testing.assert_close(logits[b, -len(expected) :], expected, atol=1e-5, rtol=1e-4)
    assert [r.stages for r in trace] == [(("vision", 16), (f"fastv@{layer}", 5))] * 2
    assert trace[0].layer_tokens == (16,) * layer + (5,) * (6 - layer)


@torch.no_grad()
@pytest.mark.parametrize(("text", "attn"), BACKENDS, ids=["-".join(b) for b in BACKENDS])
@pytest.mark.parametrize("contiguous", [False, True], ids=["original", "contiguous"])
def test_transition_equals_the_loop_by_hand(text, attn, contiguous):
    model, inputs = setup(text, attn)
    positions = "contiguous" if contiguous else "original"
    with vtprune.patched(model, "transition", keep=0.25, positions=positions, **TRANSITION):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    counts = transition_counts(16, 0.25)
    assert counts == [28, 20, 4]  # 28 and 20 exceed the 16 tokens: the first cuts keep all
    twin = eager_twin(text)
    for b, (embeds, pos, images) in enumerate(rows_by_hand(model, inputs, ROWS, contiguous)):
        cuts = {layer: transition(twin, count) for layer, count in zip((2, 3, 5), counts, strict=True)}
        expected, chosen = run(twin, embeds, pos, images, cuts, transition_layers=(1, 2, 3, 4), contiguous=contiguous)
        assert torch.equal(trace[b].kept, chosen[5][0])
        torch.testing.assert_close(logits[b, -len(expected) :], expected, atol=1e-5, rtol=1e-4)
    assert trace[0].stages[1:] == (("transition@2", 16), ("transition@3", 16), ("transition@5", 4))


@torch.no_grad()
@pytest.mark.parametrize(("text", "attn"), [("llama", "sdpa"), ("qwen2", "eager")], ids=["llama-sdpa", "qwen2-eager"])
def test_transition_cuts_progressively(text, attn):
    """With 12 of 16 kept before layer 2, 8 before 3 and 4 before 5, every cut selects."""
    model, inputs = setup(text, attn)
    with vtprune.patched(model, "transition", keep=4, ratios=(0.75, 0.5, 0.25), **TRANSITION):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    twin = eager_twin(text)
    for b, (embeds, pos, images) in enumerate(rows_by_hand(model, inputs, ROWS)):
        cuts = {2: transition(twin, 12), 3: transition(twin, 8), 5: transition(twin, 4)}
        expected, chosen = run(twin, embeds, pos, images, cuts, transition_layers=(1, 2, 3, 4))
        assert torch.equal(trace[b].kept, chosen[5][0])
        torch.testing.assert_close(logits[b, -len(expected) :], expected, atol=1e-5, rtol=1e-4)
        assert trace[b].layer_tokens == (16, 16, 12, 8, 8, 4)
    assert trace.layer_lengths[2] == trace.layer_lengths[0] - 4


@torch.no_grad()
@pytest.mark.parametrize(("text", "attn"), [("llama", "sdpa"), ("qwen2", "eager")], ids=["llama-sdpa", "qwen2-eager"])
def test_diversity_kcenter_stage_two_keeps_what_the_instruction_attends_to(text, attn):
    model, inputs = setup(text, attn)
    with vtprune.patched(model, "diversity_kcenter", keep=8, relevance_layer=3, relevance_keep=3):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    with vtprune.patched(model, vtprune.policy("diversity_kcenter", relevance_layer=None), keep=8):
        model(**inputs)
        first = [r.kept for r in vtprune.last_trace(model)]
    twin = eager_twin(text)

    def relevant(state, image):
        scores = instruction_attention(twin, state)[state.images == image]
        return scores.topk(3).indices.sort().values

    features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    rows = image_inputs_by_hand(model, inputs, [(f[k], k) for f, k in zip(features, first, strict=True)])
    for b, (embeds, pos) in enumerate(rows):
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()
        start = ids.index(model.config.image_token_id)
        images = torch.full((embeds.shape[1],), -1)
        images[start : start + 8] = 0
        expected, chosen = run(twin, embeds, pos, images, {3: relevant})
        assert torch.equal(trace[b].kept, first[b][chosen[3][0]])
        torch.testing.assert_close(logits[b, -len(expected) :], expected, atol=1e-5, rtol=1e-4)
    assert trace[0].stages == (("vision", 8), ("diversity_kcenter@3", 3))


@torch.no_grad()
@pytest.mark.parametrize("text", ["llama", "qwen2"])
def test_stage_two_removes_every_visual_token_by_default(text):
    model, inputs = setup(text, "sdpa")
    with vtprune.patched(model, "diversity_kcenter", keep=8):  # relevance_layer: 6 // 2 = 3
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    assert [r.n_after for r in trace] == [0, 0]
    assert trace[0].layer_tokens == (8, 8, 8, 0, 0, 0)
    assert trace[0].stages == (("vision", 8), ("diversity_kcenter@3", 0))
    assert logits.shape[1] == inputs["input_ids"].shape[1] - 16


def with_generated(model, embeds, pos, images, tokens):
    """A row's inputs followed by generated `tokens`, each at the previous position + 1."""
    extra = model.get_input_embeddings()(tokens)[None]
    after = pos[0, -1] + 1 + torch.arange(len(tokens))
    images = torch.cat([images, torch.full((len(tokens),), -1)])
    return torch.cat([embeds, extra], 1), torch.cat([pos, after[None]], 1), images


@torch.no_grad()
@pytest.mark.parametrize(("text", "attn"), BACKENDS, ids=["-".join(b) for b in BACKENDS])
@pytest.mark.parametrize("contiguous", [False, True], ids=["original", "contiguous"])
@pytest.mark.parametrize(
    ("policy", "options", "cuts"),
    [("fastv", {"layer": 2}, (2,)), ("transition", {"ratios": (0.75, 0.5, 0.25), **TRANSITION}, (2, 3, 5))],
    ids=["fastv", "transition"],
)
def test_cached_decode_equals_an_uncached_recompute(text, attn, contiguous, policy, options, cuts):
    """Each generated token's logits equal the hand loop run without a cache on the prompt plus the tokens
    generated before it, cutting to the same kept sets."""
    model, inputs = setup(text, attn)
    positions = "contiguous" if contiguous else "original"
    with vtprune.patched(model, policy, keep=4, positions=positions, **options):
        out = model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_logits=True)
    twin = eager_twin(text)
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    select = {2: fastv(2, 4)}
    if policy == "transition":
        select = {2: transition(twin, 12), 3: transition(twin, 8), 5: transition(twin, 4)}
    for b, row_inputs in enumerate(rows_by_hand(model, inputs, ROWS, contiguous)):
        _, chosen = run(twin, *row_inputs, select, transition_layers=(1, 2, 3, 4), contiguous=contiguous)
        extended = with_generated(model, *row_inputs, new[b, :-1])
        expected, _ = run(twin, *extended, chosen, transition_layers=(1, 2, 3, 4), contiguous=contiguous)
        steps = torch.stack([step[b] for step in out.logits])
        ended = (new[b] == model.generation_config.eos_token_id).nonzero()
        length = int(ended[0]) + 1 if len(ended) else len(steps)  # after its end a row only pads
        torch.testing.assert_close(steps[:length], expected[-len(steps) :][:length], atol=1e-5, rtol=1e-4)
        assert new[b, :length].tolist() == expected[-len(steps) :][:length].argmax(-1).tolist()
    assert set(cuts) == set(select)


@torch.no_grad()
@pytest.mark.parametrize(("text", "attn"), BACKENDS, ids=["-".join(b) for b in BACKENDS])
@pytest.mark.parametrize("contiguous", [False, True], ids=["original", "contiguous"])
def test_rows_dropping_different_counts_equal_each_row_alone(text, attn, contiguous):
    """Two images in one row and one in the other: the rows drop 24 and 12 tokens, so the shorter row is
    re-padded inside the decoder; forward and generate still equal each row run alone."""
    model, processor = tiny(text, attn, **DEEP)
    prompts = ["USER: <image> and <image>\nwhich is red ? ASSISTANT:", PROMPTS[1]]
    inputs = batch(processor, prompts, [image(3), image(4), image(5)])
    positions = "contiguous" if contiguous else "original"
    with vtprune.patched(model, "fastv", keep=4, layer=2, positions=positions):
        logits = model(**inputs).logits
        kept = [r.kept for r in vtprune.last_trace(model)]
        out = model.generate(**inputs, **FIVE, return_dict_in_generate=True, output_logits=True)
        alone_kept, alone = [], []
        for b in range(2):
            single = row(inputs, b, [2, 1])
            alone.append(model(**single).logits[0])
            alone_kept += [r.kept for r in vtprune.last_trace(model)]
            solo = model.generate(**single, **FIVE, return_dict_in_generate=True, output_logits=True)
            assert out.sequences[b, -GREEDY["max_new_tokens"] :].tolist() == solo.sequences[0, -5:].tolist()
            torch.testing.assert_close(
                torch.stack([s[b] for s in out.logits]), torch.stack([s[0] for s in solo.logits]), atol=1e-5, rtol=1e-4
            )
    assert all(torch.equal(a, k) for a, k in zip(alone_kept, kept, strict=True))
    for b, expected in enumerate(alone):
        torch.testing.assert_close(logits[b, -len(expected) :], expected, atol=1e-5, rtol=1e-4)
    twin = eager_twin(text)
    for b, row_inputs in enumerate(rows_by_hand(model, inputs, [2, 1], contiguous)):
        expected, chosen = run(twin, *row_inputs, {2: fastv(2, 4)}, contiguous=contiguous)
        first = [0, 2][b]
        assert all(torch.equal(kept[first + i], c) for i, c in enumerate(chosen[2]))
        torch.testing.assert_close(logits[b, -len(expected) :], expected, atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize(("text", "attn"), [("llama", "sdpa"), ("qwen2", "eager")], ids=["llama-sdpa", "qwen2-eager"])
def test_a_vision_policy_then_fastv(text, attn):
    model, inputs = setup(text, attn)
    with vtprune.patched(model, "cls_attention", keep=8):
        model(**inputs)
        boundary = [r.kept for r in vtprune.last_trace(model)]
    with vtprune.patched(model, ["cls_attention", vtprune.policy("fastv", layer=3)], keep=[8, 3]):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    rows = image_inputs_by_hand(model, inputs, [(f[k], k) for f, k in zip(features, boundary, strict=True)])
    twin = eager_twin(text)
    for b, (embeds, pos) in enumerate(rows):
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()
        start = ids.index(model.config.image_token_id)
        images = torch.full((embeds.shape[1],), -1)
        images[start : start + 8] = 0
        expected, chosen = run(twin, embeds, pos, images, {3: fastv(3, 3)})
        assert torch.equal(trace[b].kept, boundary[b][chosen[3][0]])
        torch.testing.assert_close(logits[b, -len(expected) :], expected, atol=1e-5, rtol=1e-4)
    assert trace.policy == "cls_attention+fastv"
    assert trace[0].stages == (("vision", 8), ("fastv@3", 3))
    assert trace[0].layer_tokens == (8, 8, 8, 3, 3, 3)
    assert trace.mean_layer_tokens() == pytest.approx(5.5)


@torch.no_grad()
@pytest.mark.parametrize("contiguous", [False, True], ids=["original", "contiguous"])
@pytest.mark.parametrize(
    ("vision", "prompts", "images_per_row", "policy", "keep"),
    [
        ("clip", [PROMPTS[0], "USER: what is shown ? ASSISTANT:"], [1, 0], vtprune.policy("fastv", layer=2), 4),
        ("siglip", PROMPTS, [1, 1], ["cls_attention", vtprune.policy("fastv", layer=3)], [8, 3]),
    ],
    ids=["text-only-row", "siglip-cls-then-fastv"],
)
def test_generate_equals_each_row_alone(vision, prompts, images_per_row, policy, keep, contiguous):
    """Cases transformers 5.24's cache rename broke silently: a text-only row batched with an image row, and a
    vision-side policy then fastv on a SigLIP LLaVA, generate what each row generates alone."""
    model, processor = tiny("qwen2" if vision == "siglip" else "llama", "sdpa", vision=vision, **DEEP)
    inputs = batch(processor, prompts, [image(seed) for seed in range(1, 1 + sum(images_per_row))])
    positions = "contiguous" if contiguous else "original"
    with vtprune.patched(model, policy, keep=keep, positions=positions):
        out = model.generate(**inputs, **FIVE, return_dict_in_generate=True, output_logits=True)
        for b in range(2):
            solo = model.generate(
                **row(inputs, b, images_per_row), **FIVE, return_dict_in_generate=True, output_logits=True
            )
            assert out.sequences[b, -5:].tolist() == solo.sequences[0, -5:].tolist()
            torch.testing.assert_close(
                torch.stack([s[b] for s in out.logits]), torch.stack([s[0] for s in solo.logits]), atol=1e-5, rtol=1e-4
            )


@torch.no_grad()
def test_unpatch_removes_every_hook():
    model, inputs = setup("llama", "sdpa")
    logits = model(**inputs).logits
    layers = model.model.language_model.layers
    with vtprune.patched(model, "transition", keep=4, **TRANSITION):
        model(**inputs)
        assert all(layer._forward_pre_hooks for layer in layers)
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    for layer in layers:
        assert not (layer._forward_pre_hooks or layer.self_attn._forward_hooks or layer.mlp._forward_hooks)
    assert torch.equal(model(**inputs).logits, logits)


@torch.no_grad()
@pytest.mark.parametrize(
    ("call", "match"),
    [
        ({"num_beams": 2}, "beam search"),
        ({"cache_implementation": "static"}, "DynamicCache"),
    ],
)
def test_generation_modes_it_cannot_follow_are_refused(call, match):
    model, inputs = setup("llama", "sdpa")
    with vtprune.patched(model, "fastv", keep=4), pytest.raises(ValueError, match=match):
        model.generate(**inputs, max_new_tokens=2, **call)


@torch.no_grad()
def test_labels_and_filled_caches_are_refused():
    model, inputs = setup("llama", "sdpa")
    with vtprune.patched(model, "fastv", keep=4):
        with pytest.raises(ValueError, match="line up with labels"):
            model(**inputs, labels=inputs["input_ids"])
        text_only = {"input_ids": inputs["input_ids"][:, :3], "attention_mask": inputs["attention_mask"][:, :3]}
        cache = model(**text_only, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="empty cache"):
            model(**inputs, past_key_values=cache)


@torch.no_grad()
def test_a_generated_placeholder_id_is_a_decode_step_not_a_prompt():
    model, inputs = setup("llama", "sdpa")
    placeholder = torch.full((2, 1), model.config.image_token_id)
    with vtprune.patched(model, "fastv", keep=4):
        prefill = model(**inputs, use_cache=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        step = model(input_ids=placeholder, attention_mask=mask, past_key_values=prefill.past_key_values)
    assert step.logits.shape[:2] == (2, 1)


@pytest.mark.parametrize(
    ("policy", "options", "match"),
    [
        ("fastv", {"layer": 0}, "layer must be a decoder layer >= 1"),
        ("fastv", {"layer": 6}, "choose a layer in 1..5"),
        ("transition", {"layers": (2, 4, 6)}, "no room for transition's cuts"),
        ("transition", {"layers": (3, 2, 4)}, "layers must be increasing"),
        ("transition", {"ratios": (0.5, 0.9, 0.1)}, "ratios must be decreasing"),
        ("transition", {"ratios": (0.5, 0.25)}, "give layers"),
        ("diversity_kcenter", {"relevance_layer": 7}, "choose a layer in 1..5"),
        ("diversity_kcenter", {"relevance_keep": -1}, "relevance_keep must be"),
    ],
)
def test_bad_decoder_options_are_refused(policy, options, match):
    model, _ = setup("llama", "sdpa")
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, policy, keep=4, **options)
    assert not hasattr(model, "_vtprune_patch")


def test_transition_schedule_and_depth_scaling():
    policy = vtprune.policy("transition")
    assert [c.layer for c in policy.decoder_cuts(32)] == [7, 9, 12]
    assert policy.decoder_cuts(32)[-1].transitions == tuple(range(6, 12))
    assert [c.layer for c in policy.decoder_cuts(24)] == [5, 7, 9]
    assert [c.layer for c in policy.decoder_cuts(16)] == [4, 5, 6]  # rounding alone gives (4, 4, 6)
    assert [c.layer for c in policy.decoder_cuts(8)] == [2, 3, 4]
    assert [c.layer for c in policy.decoder_cuts(4)] == [1, 2, 3]
    with pytest.raises(ValueError, match="no room for transition's cuts"):
        policy.decoder_cuts(3)
    paper, tokens = vtprune.Budget(0.125), vtprune.Budget(64)
    assert [policy.cut_keep(i, 576, paper) for i in range(3)] == [504, 360, 72]
    assert [policy.cut_keep(i, 576, tokens) for i in range(3)] == [448, 320, 64]


@torch.no_grad()
@pytest.mark.parametrize(("text", "attn"), [("llama", "sdpa"), ("qwen2", "eager")], ids=["llama-sdpa", "qwen2-eager"])
@pytest.mark.parametrize(
    ("policy", "options"), [("fastv", {}), ("transition", TRANSITION)], ids=["fastv", "transition"]
)
def test_llava_next_images_of_different_sizes(text, attn, policy, options):
    """LLaVA-NeXT images bring different token counts (crops, row ends), so rows drop different numbers."""
    model, processor = tiny(text, attn, family="llava_next", **DEEP)
    inputs = batch(processor, PROMPTS, [image(6, (60, 30)), image(7, (30, 40))])
    logits = model(**inputs).logits
    with vtprune.patched(model, policy, keep=1.0, **options):
        assert torch.equal(model(**inputs).logits, logits)
    with vtprune.patched(model, policy, keep=0.25, **options):
        logits = model(**inputs).logits
        trace = vtprune.last_trace(model)
        tokens = model.generate(**inputs, **FIVE)[:, -5:]
        for b in range(2):
            single = row(inputs, b, ROWS)
            alone = model(**single).logits[0]
            assert torch.equal(vtprune.last_trace(model)[0].kept, trace[b].kept)
            torch.testing.assert_close(logits[b, -len(alone) :], alone, atol=1e-5, rtol=1e-4)
            assert model.generate(**single, **FIVE)[0, -5:].tolist() == tokens[b].tolist()
    assert [r.n_after for r in trace] == [round(0.25 * r.n_before) for r in trace]
    assert trace[0].n_before != trace[1].n_before


@torch.no_grad()
def test_rows_without_padding_that_drop_different_counts():
    """No padding, so sdpa gets no mask from the model; vtprune builds one for the re-padded row."""
    model, processor = tiny("llama", "sdpa", **DEEP)
    prompts = ["USER: <image> <image>\nwhat ? ASSISTANT:", "USER: <image>\nwhat ? ASSISTANT:"]
    lengths = [len(processor.tokenizer(p).input_ids) for p in prompts]
    prompts[1] = prompts[1].replace("what", "red " * (lengths[0] - lengths[1] + 15) + "what")  # 15: one image less
    inputs = batch(processor, prompts, [image(8), image(9), image(10)])
    assert bool(inputs["attention_mask"].all())
    with vtprune.patched(model, "fastv", keep=2):
        logits = model(**inputs).logits  # all ones: the model passes its layers no mask
        out = model.generate(**inputs, **FIVE, return_dict_in_generate=True, output_logits=True)
        for b in range(2):
            single = row(inputs, b, [2, 1])
            torch.testing.assert_close(logits[b, -1], model(**single).logits[0, -1], atol=1e-5, rtol=1e-4)
            solo = model.generate(**single, **FIVE, return_dict_in_generate=True, output_logits=True)
            assert out.sequences[b, -5:].tolist() == solo.sequences[0, -5:].tolist()
            torch.testing.assert_close(
                torch.stack([s[b] for s in out.logits]), torch.stack([s[0] for s in solo.logits]), atol=1e-5, rtol=1e-4
            )

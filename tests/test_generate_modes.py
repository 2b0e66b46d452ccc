"""Generate modes a user reaches for: each behaves as the unpatched model would, or is refused with the fix;
a patched model keeps nothing of a call alive and serves concurrent calls as sequential ones."""

from __future__ import annotations

import copy
import gc
import pickle
import threading
import weakref

import peft
import pytest
import torch
from helpers import PROMPTS, batch, image, tiny
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer
from vtprune.adapters import for_model
from vtprune.eval import synthetic

import vtprune

GREEDY = {"do_sample": False}
FIVE = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
VISION = ["cls_attention", "information_flow"]


@pytest.fixture
def setup():
    model, processor = tiny("llama", "sdpa", text_layers=4)
    yield model, batch(processor, PROMPTS, [image(1), image(2)])
    vtprune.unpatch(model)


def prompt_of(inputs) -> torch.Tensor:
    return inputs["input_ids"]


@torch.no_grad()
@pytest.mark.parametrize("policy", VISION)
@pytest.mark.parametrize(
    "mode",
    [{"do_sample": True, "top_k": 4, "num_return_sequences": 3}, {"num_beams": 2, "num_return_sequences": 2}],
    ids=["sampling", "beams"],
)
def test_num_return_sequences(setup, policy, mode):
    """Keep-all equals the unpatched model; pruned, every returned row starts with its caller's prompt row."""
    model, inputs = setup
    count = mode["num_return_sequences"]
    torch.manual_seed(0)
    expected = model.generate(**inputs, max_new_tokens=4, **mode)
    vtprune.patch(model, policy, keep=1.0)
    torch.manual_seed(0)
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, **mode), expected)
    vtprune.patch(model, policy, keep=4)
    out = model.generate(**inputs, max_new_tokens=4, **mode)
    prompt = prompt_of(inputs)
    assert out.shape[0] == 2 * count
    assert torch.equal(out[:, : prompt.shape[1]], prompt.repeat_interleave(count, 0))


@torch.no_grad()
@pytest.mark.parametrize(
    "limits",
    [
        lambda length: {"max_length": length + 5, "min_length": length + 5},
        lambda length: {"generation_config": GenerationConfig(max_length=length + 5, min_length=length + 5)},
        lambda length: {"model_config": {"max_length": length + 5, "min_length": length + 5}},
    ],
    ids=["keywords", "passed-config", "model-config"],
)
@pytest.mark.parametrize("policy", ["cls_attention", vtprune.policy("fastv", layer=2)], ids=["vision", "fastv"])
def test_length_limits_count_the_callers_prompt(setup, limits, policy):
    model, inputs = setup
    limit = limits(prompt_of(inputs).shape[1])
    saved = model.generation_config
    try:
        if "model_config" in limit:
            model.generation_config = GenerationConfig(
                **limit.pop("model_config"), pad_token_id=saved.pad_token_id, eos_token_id=saved.eos_token_id
            )
        expected = model.generate(**inputs, **limit, **GREEDY)
        vtprune.patch(model, policy, keep=4)
        out = model.generate(**inputs, **limit, **GREEDY)
    finally:
        model.generation_config = saved
    assert out.shape == expected.shape == (2, prompt_of(inputs).shape[1] + 5)


class Recorder(BaseStreamer):
    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []
        self.ended = False

    def put(self, value):
        self.values.append(value)

    def end(self):
        self.ended = True


@torch.no_grad()
@pytest.mark.parametrize("policy", ["cls_attention", vtprune.policy("fastv", layer=2)], ids=["vision", "fastv"])
def test_a_streamer_is_shown_the_callers_prompt(setup, policy):
    model, inputs = setup
    single = {name: inputs[name][:1] for name in ("input_ids", "attention_mask", "pixel_values")}
    vtprune.patch(model, policy, keep=4)
    streamer = Recorder()
    out = model.generate(**single, **FIVE, streamer=streamer)
    assert torch.equal(streamer.values[0], single["input_ids"])
    assert torch.equal(torch.cat([v.view(-1) for v in streamer.values[1:]]), out[0, single["input_ids"].shape[1] :])
    assert streamer.ended


@pytest.mark.parametrize("policy", VISION)
def test_generate_runs_the_tower_without_autograd(setup, policy):
    """As the unpatched `generate` (which is no_grad): nothing of the call carries a graph."""
    model, inputs = setup
    projector = for_model(model).projector
    seen = []
    handle = projector.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    try:
        model.generate(**inputs, **FIVE)
        unpatched = list(seen)
        seen.clear()
        vtprune.patch(model, policy, keep=4)
        model.generate(**inputs, **FIVE)
    finally:
        handle.remove()
    assert unpatched == [False] and seen == [False]
    for record in vtprune.last_trace(model):
        assert record.scores is not None and not record.scores.requires_grad


@pytest.mark.parametrize("policy", [vtprune.policy("fastv", layer=2), "information_flow"], ids=["fastv", "flow"])
def test_nothing_of_a_call_stays_alive(setup, policy):
    """After generate returns, neither the KV cache nor the tower's activations are reachable from the model."""
    model, inputs = setup
    adapter = for_model(model)
    caches, activations = [], []

    def keep_cache(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and not caches:
            caches.append(weakref.ref(cache))

    handles = [
        adapter.decoder_layers[3].register_forward_pre_hook(keep_cache, with_kwargs=True),
        adapter.projector.register_forward_hook(lambda m, a, out: activations.append(weakref.ref(out))),
    ]
    try:
        vtprune.patch(model, policy, keep=4)
        model.generate(**inputs, **FIVE)
    finally:
        for handle in handles:
            handle.remove()
    gc.collect()
    assert caches and caches[0]() is None
    assert activations and all(ref() is None for ref in activations)
    assert vtprune.last_trace(model) is not None


@torch.no_grad()
@pytest.mark.parametrize("policy", [*VISION, vtprune.policy("fastv", layer=2)], ids=[*VISION, "fastv"])
def test_threads_equal_sequential_calls(setup, policy):
    model, processor = tiny("llama", "sdpa", text_layers=4)
    calls = [batch(processor, [PROMPTS[i % 2]], [image(10 + i)]) for i in range(4)]
    vtprune.patch(model, policy, keep=4)
    expected = [model.generate(**call, **FIVE) for call in calls]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for i, call in enumerate(calls):
                results[thread, i] = model.generate(**call, **FIVE)
        except BaseException as error:  # noqa: BLE001  (reported by the main thread)
            errors.append(error)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(torch.equal(results[t, i], expected[i]) for t in range(4) for i in range(4))


@torch.no_grad()
@pytest.mark.parametrize(
    ("call", "match"),
    [
        ({"use_cache": False}, "use_cache=False every step would re-run"),
        ({"num_return_sequences": 2, "do_sample": True}, "num_return_sequences copies"),
        ({"embeds": True}, "pass input_ids .* rather than inputs_embeds"),
    ],
    ids=["no-cache", "return-sequences", "inputs-embeds"],
)
def test_in_decoder_modes_it_cannot_follow_are_refused(setup, call, match):
    model, inputs = setup
    vtprune.patch(model, "fastv", keep=4, layer=2)
    call = dict(call)
    if call.pop("embeds", False):
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        with pytest.raises(ValueError, match=match):
            model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"])
        call = {"inputs_embeds": embeds}
        inputs = {k: v for k, v in inputs.items() if k != "input_ids"}
    with pytest.raises(ValueError, match=match):
        model.generate(**inputs, **call, max_new_tokens=2)


def fresh():
    """A model of its own (not the shared cached one), for tests that copy or wrap it."""
    config = synthetic.llava_config(text_layers=4)
    return synthetic.llava_model(config, seed=0), synthetic.llava_processor(config)


@torch.no_grad()
@pytest.mark.parametrize("policy", ["cls_attention", vtprune.policy("fastv", layer=2)], ids=["vision", "fastv"])
def test_a_deep_copy_is_an_independent_patched_model(policy):
    model, processor = fresh()
    inputs = batch(processor, PROMPTS, [image(1), image(2)])
    vtprune.patch(model, policy, keep=4)
    expected = model.generate(**inputs, **FIVE)
    twin = copy.deepcopy(model)
    assert torch.equal(twin.generate(**inputs, **FIVE), expected)
    assert vtprune.last_trace(twin) is not None and vtprune.last_trace(twin) is not vtprune.last_trace(model)
    with torch.no_grad():
        twin.lm_head.weight.zero_()  # the copy runs its own weights, not the original's
    assert not torch.equal(twin.generate(**inputs, **FIVE), expected)
    assert torch.equal(model.generate(**inputs, **FIVE), expected)
    vtprune.unpatch(twin)
    assert "forward" not in twin.__dict__ and all(not m._forward_pre_hooks for m in twin.modules())
    twin(**inputs)  # callable once unpatched
    assert torch.equal(model.generate(**inputs, **FIVE), expected)  # the original is still patched


@torch.no_grad()
@pytest.mark.parametrize("policy", ["cls_attention", vtprune.policy("fastv", layer=2)], ids=["vision", "fastv"])
def test_a_patched_model_pickles_and_saves(tmp_path, policy):
    model, processor = fresh()
    inputs = batch(processor, PROMPTS, [image(1), image(2)])
    vtprune.patch(model, policy, keep=4)
    # before any call: once run, a transformers model holds output-capturing closures, patched or not
    loaded = pickle.loads(pickle.dumps(model))
    torch.save(model, tmp_path / "model.pt")
    saved = torch.load(tmp_path / "model.pt", weights_only=False)
    expected = model.generate(**inputs, **FIVE)
    assert torch.equal(loaded.generate(**inputs, **FIVE), expected)
    assert torch.equal(saved.generate(**inputs, **FIVE), expected)
    vtprune.unpatch(saved)
    assert all(not m._forward_pre_hooks for m in saved.modules())


@torch.no_grad()
@pytest.mark.parametrize("policy", ["cls_attention", vtprune.policy("fastv", layer=2)], ids=["vision", "fastv"])
def test_a_peft_model_is_patched_through_its_base_model(policy):

    model, processor = fresh()
    inputs = batch(processor, PROMPTS, [image(1), image(2)])
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, lora)
    unpatched = wrapped.generate(**inputs, **FIVE)
    vtprune.patch(wrapped, policy, keep=1.0)
    assert torch.equal(wrapped.generate(**inputs, **FIVE), unpatched)  # the adapters still run
    vtprune.patch(wrapped, policy, keep=4)
    wrapped.generate(**inputs, **FIVE)
    assert [record.n_after for record in vtprune.last_trace(wrapped)] == [4, 4]
    vtprune.unpatch(wrapped)
    assert "forward" not in model.__dict__ and torch.equal(wrapped.generate(**inputs, **FIVE), unpatched)


@torch.no_grad()
def test_continuing_a_cache_a_pruned_prompt_filled_is_refused(setup):
    """The returned sequences start with the caller's prompt, the cache with the pruned one: continuing it
    would misplace every later token. Keeping all, the cache lines up and continues as the unpatched one."""
    model, inputs = setup

    def turn():
        out = model.generate(**inputs, **FIVE, return_dict_in_generate=True)
        follow = {"input_ids": out.sequences, "attention_mask": torch.ones_like(out.sequences)}
        return follow, out.past_key_values

    follow, cache = turn()
    expected = model.generate(**follow, past_key_values=cache, **FIVE)
    vtprune.patch(model, "cls_attention", keep=4)
    follow, cache = turn()
    with pytest.raises(ValueError, match="continue the conversation without it"):
        model.generate(**follow, past_key_values=cache, **FIVE)
    vtprune.patch(model, "cls_attention", keep=1.0)
    follow, cache = turn()
    assert torch.equal(model.generate(**follow, past_key_values=cache, **FIVE), expected)


@torch.no_grad()
def test_in_decoder_attention_and_hidden_state_outputs_follow_the_cut():
    """Layers from the cut on run on the shorter sequence: their attentions and hidden states have its length,
    as `trace.layer_lengths` says, in prefill and in every decode step."""
    model, processor = tiny("llama", "eager", text_layers=4)
    inputs = batch(processor, PROMPTS, [image(1), image(2)])
    with vtprune.patched(model, "fastv", keep=4, layer=2):
        out = model.generate(
            **inputs, **FIVE, return_dict_in_generate=True, output_attentions=True, output_hidden_states=True
        )
        lengths = vtprune.last_trace(model).layer_lengths
    full = inputs["input_ids"].shape[1]
    assert lengths == (full, full, full - 12, full - 12)  # each row's image of 16 tokens keeps 4
    assert [a.shape[-1] for a in out.attentions[0]] == list(lengths)
    assert [h.shape[1] for h in out.hidden_states[0]] == [full, *lengths]  # the embeddings, then each layer's output
    for step, attentions in enumerate(out.attentions[1:], start=1):
        assert [a.shape[-1] for a in attentions] == [length + step for length in lengths]


def test_a_grad_enabled_forward_leaves_no_graph_in_the_trace():
    """Training-style calls keep their graph in the outputs only: the trace is detached, so the model still
    deep-copies afterwards."""
    model, processor = fresh()
    inputs = batch(processor, PROMPTS, [image(1), image(2)])
    vtprune.patch(model, "information_flow", keep=4)
    assert model(**inputs).logits.requires_grad
    assert all(not record.scores.requires_grad for record in vtprune.last_trace(model))
    copy.deepcopy(model)


@torch.no_grad()
def test_text_only_calls_on_an_in_decoder_patch_run_as_unpatched(setup):
    """The in-decoder refusals are about prompts with images: a text-only call is the unpatched model's."""
    model, inputs = setup
    ids = inputs["input_ids"][:, -6:]
    embeds = model.get_input_embeddings()(ids)
    calls = [
        lambda: model(inputs_embeds=embeds).logits,
        lambda: model.generate(input_ids=ids, use_cache=False, **FIVE),
        lambda: model.generate(input_ids=ids, num_beams=2, num_return_sequences=2, max_new_tokens=3),
    ]
    expected = [call() for call in calls]
    vtprune.patch(model, "fastv", keep=4, layer=2)
    for call, unpatched in zip(calls, expected, strict=True):
        assert torch.equal(call(), unpatched)


@torch.no_grad()
def test_a_masked_image_token_under_an_in_decoder_stage(setup):
    """A placeholder under a 0 in the mask still takes its feature, so the in-decoder engine counts it."""
    model, inputs = setup
    column = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[1])
    inputs = {**inputs, "attention_mask": inputs["attention_mask"].clone()}
    inputs["attention_mask"][0, column] = 0
    expected = model(**inputs).logits
    with vtprune.patched(model, "fastv", keep=1.0, layer=2):
        assert torch.equal(model(**inputs).logits, expected)
    with vtprune.patched(model, ["cls_attention", vtprune.policy("fastv", layer=2)], keep=[1.0, 4]):
        model(**inputs)
        assert [r.n_after for r in vtprune.last_trace(model)] == [4, 4]

"""patch / unpatch / patched, bad input, and the trace."""

import pytest
import torch
from helpers import MODEL_TYPES, PROMPTS, batch, image, tiny
from transformers import LlamaConfig, LlamaForCausalLM

import vtprune


@pytest.fixture
def setup():
    model, processor = tiny()
    inputs = batch(processor, PROMPTS, [image(1), image(2)])
    yield model, inputs
    vtprune.unpatch(model)


def unpatched_state(model):
    return "forward" not in model.__dict__ and "generate" not in model.__dict__ and not hasattr(model, "_vtprune_patch")


@torch.no_grad()
def test_unpatch_restores_identical_outputs(setup):
    model, inputs = setup
    logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    vtprune.patch(model, "cls_attention", keep=3)
    model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert [r.n_after for r in vtprune.last_trace(model)] == [3, 3]
    vtprune.unpatch(model)
    assert unpatched_state(model)
    assert torch.equal(model(**inputs).logits, logits)
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), tokens)
    vtprune.unpatch(model)  # a second unpatch is a no-op


@torch.no_grad()
def test_patch_twice_replaces(setup):
    model, inputs = setup
    vtprune.patch(model, "cls_attention", keep=3)
    handle = vtprune.patch(model, "uniform", keep=5)
    model(**inputs)
    trace = vtprune.last_trace(model)
    assert trace.policy == "uniform" and [r.n_after for r in trace] == [5, 5]
    assert model.forward.__wrapped__.__self__ is model  # wraps the class forward, not the first patch
    handle.remove()
    assert unpatched_state(model)


@torch.no_grad()
def test_patched_context_restores_on_error(setup):
    model, inputs = setup
    with pytest.raises(RuntimeError), vtprune.patched(model, "random", keep=2):
        raise RuntimeError
    assert unpatched_state(model)


def test_unpatch_keeps_an_instance_forward_installed_before_patching(setup):
    model, _ = setup
    sentinel = model.forward
    model.forward = sentinel  # e.g. accelerate's hooks replace forward on the instance
    vtprune.patch(model, keep=2)
    vtprune.unpatch(model)
    assert model.__dict__["forward"] is sentinel
    del model.forward


@torch.no_grad()
def test_trace_records_each_image(setup):
    model, inputs = setup
    with vtprune.patched(model, "cls_attention", keep=0.5) as handle:
        assert vtprune.last_trace(model) is None
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        trace = vtprune.last_trace(model)
        assert handle.trace is trace
    assert len(trace) == 2 and trace.policy == "cls_attention" and trace.seconds > 0
    for record in trace:
        assert record.n_before == 16 and record.n_after == 8 and record.grid == (4, 4)
        assert record.kept.dtype == torch.long and torch.equal(record.kept, record.kept.sort().values)
        assert record.scores.shape == (16,) and not record.scores.requires_grad
        assert torch.equal(record.kept, record.scores.topk(8).indices.sort().values)
        assert record.stages == (("vision", 8),)


def test_text_only_calls_pass_through(setup):
    model, inputs = setup
    with torch.no_grad(), vtprune.patched(model, keep=2):
        ids = inputs["input_ids"][:, :5]
        assert model.generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape == (2, 7)
        assert vtprune.last_trace(model) is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"policy": "nope"}, ValueError, "unknown policy 'nope'; registered policies are: cls_attention"),
        ({"keep": 0}, ValueError, "keeps no tokens"),
        ({"keep": -1}, ValueError, "keeps no tokens"),
        ({"keep": 1.5}, ValueError, r"not a fraction in \(0, 1\]"),
        ({"keep": 0.0}, ValueError, r"not a fraction in \(0, 1\]"),
        ({"keep": "64"}, TypeError, "keep must be an int"),
        ({"keep": True}, TypeError, "keep must be an int"),
        ({"positions": "shifted"}, ValueError, "positions must be one of"),
        ({"bogus": 1}, TypeError, "has no option bogus; its options are: start_layer=None"),
        ({"start_layer": -2}, ValueError, "start_layer must be"),
        ({"start_layer": 9}, ValueError, "above the feature layer"),
        ({"policy": 3}, TypeError, "policy must be a policy name"),
        ({"policy": ["cls_attention", "fastv"]}, ValueError, "takes a list of as many keeps"),
        ({"policy": ["cls_attention", "hierarchical"], "keep": [8, 4]}, ValueError, "one vision-side policy"),
        ({"policy": ["fastv"], "keep": [4], "layer": 1}, TypeError, "ambiguous with a list of policies"),
        ({"policy": "fastv", "layer": 9}, ValueError, "choose a layer in 1..1"),
    ],
)
def test_bad_arguments_raise_and_leave_the_model_alone(setup, kwargs, error, match):
    model, inputs = setup
    with pytest.raises(error, match=match):
        vtprune.patch(model, **kwargs)
    assert unpatched_state(model)
    first = vtprune.patch(model, "uniform", keep=3)
    with pytest.raises(error, match=match):
        vtprune.patch(model, **kwargs)
    assert model._vtprune_patch is first  # a failed re-patch keeps the patch in place


def test_unsupported_model_is_named_with_the_fix():
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    listed = r"model_type='llama'\); supported model types: gemma3, glm4v, glm4v_moe, internvl,"
    with pytest.raises(TypeError, match=listed):
        vtprune.patch(model)
    assert "forward" not in model.__dict__
    with pytest.raises(TypeError, match=r"cannot patch Linear \(model_type=None\)"):
        vtprune.patch(torch.nn.Linear(2, 2))
    base = tiny()[0].model
    with pytest.raises(TypeError, match="patches the generation model"):
        vtprune.patch(base)
    assert "forward" not in base.__dict__


def test_last_trace_on_an_unpatched_model_says_how_to_patch():
    model, _ = tiny()
    with pytest.raises(ValueError, match=r"call vtprune.patch\(model"):
        vtprune.last_trace(model)


@torch.no_grad()
def test_bad_call_inputs_are_named(setup):
    model, inputs = setup
    vtprune.patch(model, keep=2)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ValueError, match="pass input_ids"):
        model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match=r"^Image features and image tokens do not match.*16 visual tokens\); build"):
        model(input_ids=inputs["input_ids"][:, -20:], pixel_values=inputs["pixel_values"][:1])


def test_listings():
    assert {"cls_attention", "random", "uniform"} <= set(vtprune.policies())
    assert all(isinstance(text, str) and text for text in vtprune.policies().values())
    assert vtprune.supported_models() == MODEL_TYPES

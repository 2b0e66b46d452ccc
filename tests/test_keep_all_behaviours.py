"""Keep-all changes nothing: what transformers' own model tests exercise, per family, patched at keep=1.0 equals
the unpatched model (attention and hidden-state outputs, `logits_to_keep`, every `return_dict_in_generate`
field, static caches, continuing from a cache, `padding="max_length"`, padding-free inputs, `inputs_embeds`
beside `input_ids`); where pruning cannot keep a behaviour, it is refused with the fix."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from helpers import FAMILIES, model_and_inputs
from qwen_reference import rows_by_hand
from transformers import CompileConfig

import vtprune

POLICY = "cls_attention"
FIVE = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}


def assert_same(patched, unpatched) -> None:
    """Equal tensors, or equal nested tuples/lists of them, or equal values."""
    if isinstance(unpatched, torch.Tensor):
        assert isinstance(patched, torch.Tensor) and torch.equal(patched, unpatched)
    elif isinstance(unpatched, (tuple, list)):
        assert len(patched) == len(unpatched)
        for p, u in zip(patched, unpatched, strict=True):
            assert_same(p, u)
    else:
        assert patched == unpatched


def both(model, call):
    """`call(model)` unpatched, then patched at keep=1.0."""
    expected = call(model)
    with vtprune.patched(model, POLICY, keep=1.0):
        return call(model), expected


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_and_hidden_state_outputs(family):
    model, inputs = model_and_inputs(family, "eager")
    patched, unpatched = both(model, lambda m: m(**inputs, output_attentions=True, output_hidden_states=True))
    assert_same(patched.logits, unpatched.logits)
    assert_same(patched.attentions, unpatched.attentions)
    assert_same(patched.hidden_states, unpatched.hidden_states)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_to_keep(family):
    model, inputs = model_and_inputs(family)
    patched, unpatched = both(model, lambda m: m(**inputs, logits_to_keep=1).logits)
    assert patched.shape[1] == 1
    assert_same(patched, unpatched)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_every_return_dict_in_generate_field(family):
    model, inputs = model_and_inputs(family, "eager")
    fields = {"output_scores": True, "output_logits": True, "output_attentions": True, "output_hidden_states": True}

    def run(m):
        return m.generate(**inputs, **FIVE, return_dict_in_generate=True, **fields)

    patched, unpatched = both(model, run)
    for name in ("sequences", "scores", "logits", "attentions", "hidden_states"):
        assert_same(getattr(patched, name), getattr(unpatched, name))


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_a_static_cache(family):
    model, inputs = model_and_inputs(family)
    patched, unpatched = both(model, lambda m: m.generate(**inputs, **FIVE, cache_implementation="static"))
    assert_same(patched, unpatched)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_continuing_from_the_returned_cache(family):
    model, inputs = model_and_inputs(family)

    def conversation(m):
        out = m.generate(**inputs, **FIVE, return_dict_in_generate=True)
        follow = {"input_ids": out.sequences, "attention_mask": torch.ones_like(out.sequences)}
        if "mm_token_type_ids" in inputs:
            follow["mm_token_type_ids"] = torch.nn.functional.pad(
                inputs["mm_token_type_ids"], (0, out.sequences.shape[1] - inputs["input_ids"].shape[1])
            )
        follow["attention_mask"][:, : inputs["input_ids"].shape[1]] = inputs["attention_mask"]
        return m.generate(**follow, past_key_values=out.past_key_values, **FIVE)

    patched, unpatched = both(model, conversation)
    assert_same(patched, unpatched)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_padding_to_max_length(family):
    """Every row padded: the columns no row uses stay, as the unpatched model keeps them."""
    length = model_and_inputs(family)[1]["input_ids"].shape[1] + 3
    model, inputs = model_and_inputs(family, padding="max_length", max_length=length)
    assert inputs["input_ids"].shape[1] == length and not inputs["attention_mask"][:, 0].any()
    patched, unpatched = both(model, lambda m: (m(**inputs).logits, m.generate(**inputs, **FIVE)))
    assert_same(patched, unpatched)


@torch.no_grad()
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llava_next"])  # NeXT's image_sizes: one per row
def test_padding_free_inputs(family):
    """Two prompts packed in one row, told apart by their position ids alone (Qwen-VL: the text row restarts,
    the M-RoPE rows are each prompt's own): keep-all attends within each as the unpatched model does; pruning,
    which renumbers positions, is refused."""
    model, inputs = model_and_inputs(family)
    real = [inputs["attention_mask"][b].bool() for b in range(2)]
    carried = ("pixel_values", "image_grid_thw", "image_sizes", "batch_num_images")  # per image, not per row
    packed = {name: inputs[name] for name in carried if name in inputs}
    packed["input_ids"] = torch.cat([inputs["input_ids"][b][real[b]] for b in range(2)])[None]
    text = torch.cat([torch.arange(int(r.sum())) for r in real])[None]
    packed["position_ids"] = text
    if family.startswith("qwen"):
        alone = rows_by_hand(model, inputs, {"image": [torch.arange(24), torch.arange(15)]})
        packed["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"][b][real[b]] for b in range(2)])[None]
        packed["position_ids"] = torch.cat([text[None], torch.cat([a["position_ids"] for a in alone], -1)])
    patched, unpatched = both(model, lambda m: m(**packed).logits)
    assert_same(patched, unpatched)
    with vtprune.patched(model, POLICY, keep=4), pytest.raises(ValueError, match="padding-free"):
        model(**packed)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_embeds_beside_input_ids(family):
    """Where the model takes both, the embeddings are pruned in step with the ids: equal to passing the ids
    alone; where it refuses both, so does the patched model, with the model's own error."""
    model, inputs = model_and_inputs(family)
    embedded = {**inputs, "inputs_embeds": model.get_input_embeddings()(inputs["input_ids"])}
    try:
        unpatched = model(**embedded).logits
    except ValueError as error:
        for policy, keep in ((POLICY, 1.0), (POLICY, 4), (vtprune.policy("fastv", layer=2), 4)):
            with vtprune.patched(model, policy, keep=keep), pytest.raises(ValueError, match=str(error)):
                model(**embedded)
        return
    with vtprune.patched(model, POLICY, keep=1.0):
        assert_same(model(**embedded).logits, unpatched)
    for policy in (POLICY, vtprune.policy("fastv", layer=2)):
        with vtprune.patched(model, policy, keep=4):
            torch.testing.assert_close(model(**embedded).logits, model(**inputs).logits)
            assert [r.n_after for r in vtprune.last_trace(model)] == [4, 4]


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava-clip", "llava-siglip", "llava_next"])
def test_a_masked_image_token(family):
    """An image placeholder under a 0 in the attention mask stays masked, as in the unpatched model (Qwen-VL's
    own position code cannot take one)."""
    model, inputs = model_and_inputs(family)
    image_token = model.config.image_token_id
    column = int((inputs["input_ids"][0] == image_token).nonzero()[1])
    masked = {**inputs, "attention_mask": inputs["attention_mask"].clone()}
    masked["attention_mask"][0, column] = 0
    patched, unpatched = both(model, lambda m: m(**masked).logits)
    assert_same(patched, unpatched)


@pytest.mark.parametrize("keep", [1.0, 4])
def test_assisted_generation_with_a_vision_side_policy(keep):
    """Greedy assisted decoding returns what greedy decoding does, with the pruned prompt given to both models
    (outside no_grad, as a user calls it: the pruned features carry no graph to copy)."""
    model, inputs = model_and_inputs("llava-clip")
    inputs = {name: value[:1] for name, value in inputs.items()}  # transformers assists batches of one
    assistant = model_and_inputs("llava-siglip")[0]
    with vtprune.patched(model, POLICY, keep=keep):
        expected = model.generate(**inputs, **FIVE)
        assisted = model.generate(**inputs, **FIVE, assistant_model=assistant)
    assert_same(assisted, expected)


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_without_mm_token_type_ids(family):
    """Without `mm_token_type_ids` the model numbers every token as text, or refuses: so does the patched model,
    keeping or pruning (pruned, each kept token keeps its text position)."""
    model, full = model_and_inputs(family)
    inputs = {name: value for name, value in full.items() if name != "mm_token_type_ids"}
    tokens = model.generate(**inputs, **FIVE)  # generate numbers such a prompt as text
    with vtprune.patched(model, POLICY, keep=1.0):
        assert_same(model.generate(**inputs, **FIVE), tokens)
    with vtprune.patched(model, POLICY, keep=4):
        assert model.generate(**inputs, **FIVE).shape == tokens.shape
    try:
        unpatched = (model(**inputs).logits, tokens)
    except ValueError as error:
        for keep in (1.0, 4):
            with vtprune.patched(model, POLICY, keep=keep), pytest.raises(ValueError, match=re.escape(str(error))):
                model(**inputs)
        return
    with vtprune.patched(model, POLICY, keep=1.0):
        assert_same((model(**inputs).logits, model.generate(**inputs, **FIVE)), unpatched)
    with vtprune.patched(model, POLICY, keep=4):
        logits = model(**inputs).logits
        kept = [r.kept for r in vtprune.last_trace(model)]
    for b, alone in enumerate(rows_by_hand(model, full, {"image": kept})):
        visual = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().squeeze(1)
        text = (inputs["attention_mask"][b].bool() & (inputs["input_ids"][b] != model.config.image_token_id)).nonzero()
        columns = torch.cat([text.squeeze(1), visual[kept[b]]]).sort().values
        alone = {**alone, "position_ids": columns.expand(3, 1, -1)}
        alone.pop("mm_token_type_ids")
        torch.testing.assert_close(logits[b, -len(columns) :], model(**alone).logits[0], atol=1e-5, rtol=1e-4)


def test_a_tower_without_full_attention_gets_advice_that_fits():
    model, _ = model_and_inputs("qwen2_5_vl")
    adapter = vtprune.adapters.for_model(model)
    layout = dataclasses.replace(adapter.layout, full_attention=())
    with pytest.raises(ValueError, match="this tower has none up to its feature layer: use a policy"):
        vtprune.policy("cls_attention", start_layer=0).request(layout)
    layout = dataclasses.replace(adapter.layout, full_attention=(0,), feature_layer=3)
    with pytest.raises(ValueError, match="pass start_layer=0 or lower"):
        vtprune.policy("cls_attention", start_layer=2).request(layout)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_generate_with_a_static_cache(family):
    """generate's own compiled decoding (forced on CPU, backend eager) over a static cache: keep-all equals the
    unpatched model, pruned equals the same patch uncompiled."""
    model, inputs = model_and_inputs(family)
    compiled = CompileConfig(backend="eager", fullgraph=False)
    compiled._compile_all_devices = True  # transformers compiles on accelerators only, unless told
    static = {**FIVE, "cache_implementation": "static"}
    patched, unpatched = both(model, lambda m: m.generate(**inputs, **static, compile_config=compiled))
    assert_same(patched, unpatched)
    with vtprune.patched(model, POLICY, keep=4):
        assert_same(model.generate(**inputs, **static, compile_config=compiled), model.generate(**inputs, **static))

"""What the installed transformers hands vtprune's hooks, per family and per stage.

Each test names one convention the binding layer (`vtprune.hf`) relies on and checks it on the modules the
adapters name, by recording real calls of a tiny model: a rename in a new release fails here, by name,
rather than as wrong output downstream. Run on every release of the CI matrix.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import pytest
import torch
import transformers
from helpers import FAMILIES, model_and_inputs
from packaging.version import Version
from vtprune.adapters import for_model

import vtprune
from vtprune import hf

GREEDY = {"max_new_tokens": 2, "do_sample": False}


@contextlib.contextmanager
def recording(modules: dict[str, torch.nn.Module]):
    """Records `(args, kwargs)` of every call of each named module, as a forward pre-hook receives them, and
    `lengths`: what the call's cache held when it was made."""
    calls: dict[str, list[tuple[tuple, dict]]] = {name: [] for name in modules}
    calls["lengths"] = {name: [] for name in modules}

    def record(name, args, kwargs):
        calls[name].append((args, dict(kwargs)))
        calls["lengths"][name].append(hf.cache_length(hf.caller_cache(kwargs)))

    handles = [
        module.register_forward_pre_hook(lambda m, a, k, name=name: record(name, a, k), with_kwargs=True)
        for name, module in modules.items()
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def cache_keyword() -> str:
    """The keyword transformers passes the cache under: renamed in 5.24."""
    return "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"


def test_the_installed_release_is_one_the_matrix_tests():
    low, high = Version(hf.TESTED[0]), Version(hf.TESTED[-1])
    assert low <= Version(transformers.__version__) <= high, (
        f"transformers {transformers.__version__} is outside the tested range {hf.SUPPORTED}"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_every_hooked_module_binds(family):
    """Each module the engines hook resolves every role it is read for, under this release's names."""
    model, _ = model_and_inputs(family)
    adapter = for_model(model)
    layer = hf.bind(adapter.decoder_layers[0], hf.DECODER_LAYER)
    assert layer.names == {
        "hidden": "hidden_states",
        "mask": "attention_mask",
        "positions": "position_ids",
        "position_embeddings": "position_embeddings",
        "cache": cache_keyword(),
    }
    assert layer.slots["hidden"] == 0
    assert hf.bind(adapter.backbone, hf.BACKBONE).names["cache"] == cache_keyword()
    parts = adapter.decoder_parts(0)
    assert hf.bind(parts.attention, hf.SUBLAYER).names == {"hidden": "hidden_states"}
    assert hf.bind(parts.mlp, hf.SUBLAYER).slots == {"hidden": 0}
    assert adapter.tower_call.slots["hidden"] == 0
    if family.startswith("qwen"):
        assert adapter.tower_call.names["bounds"] == "cu_seqlens"
        assert adapter.attention_call.names == {"bounds": "cu_seqlens", "position_embeddings": "position_embeddings"}
    else:
        assert adapter.tower_call.slots["mask"] == 1
    assert hf.ENCODER_OUTPUTS in inspect.signature(type(model).forward).parameters


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decoder_layers_receive_what_the_engine_reads(family, attn):
    """In prefill and in decode, the decoder layers and the inner model get the prompt, a mask of a known form,
    positions, position embeddings and the cache, under the names the binding resolved."""
    model, inputs = model_and_inputs(family, attn)
    adapter = for_model(model)
    layer_call = hf.bind(adapter.decoder_layers[1], hf.DECODER_LAYER)
    backbone_call = hf.bind(adapter.backbone, hf.BACKBONE)
    batch_size, length = inputs["input_ids"].shape
    with recording({"layer": adapter.decoder_layers[1], "backbone": adapter.backbone}) as calls:
        model.generate(**inputs, **GREEDY)
    (prefill, decode), (outer, step) = calls["layer"][:2], calls["backbone"][:2]
    assert all(cache_keyword() in kwargs for _, kwargs in (prefill, decode, outer, step))

    first = backbone_call.view(*outer)
    assert torch.equal(first["input_ids"], inputs["input_ids"])
    assert hf.is_dynamic_cache(first["cache"]) and backbone_call.view(*step)["cache"] is first["cache"]
    assert calls["lengths"]["backbone"][:2] == [0, length]
    assert any(outer[1].get(name) is not None for name in hf.IMAGE_INPUTS)

    for (args, kwargs), queries in ((prefill, length), (decode, 1)):
        call = layer_call.view(args, kwargs)
        assert call["hidden"].shape[:2] == (batch_size, queries)
        mask = call["mask"]
        assert mask is not None  # the batch is padded: the model builds a 4-D mask
        assert mask.dim() == 4 and mask.shape[0] == batch_size and mask.shape[2] == queries
        assert mask.dtype == (torch.bool if attn == "sdpa" else model.dtype)
        assert hf.allowed(mask).dtype == torch.bool
        cos, sin = call["position_embeddings"]
        assert cos.shape[-2] == queries and sin.shape == cos.shape
        assert call["positions"] is None or call["positions"].shape[-1] == queries
        assert hf.is_dynamic_cache(call["cache"])


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava-clip", "llava-siglip", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_tower_modules_receive_what_the_hooks_read(family):
    """A CLIP/SigLIP encoder layer gets its hidden states and mask in the slots the binding found; a packed
    tower's blocks and attention modules get the image boundaries and rotary embeddings by keyword."""
    model, inputs = model_and_inputs(family)
    adapter = for_model(model)
    vision = {name: inputs[name] for name in adapter.modalities["image"] if name in inputs}
    watched = {"layer": adapter.encoder_layers[1]}
    if family.startswith("qwen"):
        watched["attention"] = adapter.packed_attentions((1,))[1].attention
    with recording(watched) as calls:
        adapter.encode(vision, "image")
    call = adapter.tower_call.view(*calls["layer"][0])
    hidden = call["hidden"]
    if not family.startswith("qwen"):
        assert hidden.dim() == 3 and len(calls["layer"][0][0]) == 2  # (hidden_states, attention_mask) by position
        return
    tokens = int(inputs["image_grid_thw"].prod(-1).sum())
    assert hidden.shape[0] == tokens
    bounds = call["bounds"]
    assert bounds[0] == 0 and bounds[-1] == tokens
    assert [t.shape[0] for t in call["position_embeddings"]] == [tokens, tokens]
    attention = adapter.attention_call.view(*calls["attention"][0])
    assert torch.equal(attention["bounds"], bounds) or family == "qwen2_5_vl"  # 2.5's layer 1 is windowed
    assert attention["position_embeddings"][0].shape[0] == tokens


def test_a_call_view_reads_and_writes_where_each_value_came():
    class Layer(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
            return hidden_states

    binding = hf.bind(Layer(), {"hidden": hf.HIDDEN, "mask": hf.MASK, "cache": hf.CACHE})
    positional = binding.view((1, 2), {})
    assert (positional["hidden"], positional["mask"], positional["cache"]) == (1, 2, None)
    positional["mask"] = 3
    assert positional.arguments() == ((1, 3), {})
    old_name = binding.view((1,), {"past_key_values": "c"})  # a caller still on the deprecated name
    assert old_name["cache"] == "c"
    old_name["cache"] = "d"
    assert old_name.arguments() == ((1,), {"past_key_values": "d"})


def test_an_unknown_call_convention_is_refused_before_the_model_is_touched():
    model, _ = model_and_inputs("llava-clip")
    layers = for_model(model).decoder_layers
    original = type(layers[0])

    class Renamed(original):
        def forward(
            self, hidden_states, attention_mask=None, position_ids=None, kv_store=None, position_embeddings=None, **kw
        ):
            return super().forward(hidden_states, attention_mask, position_ids, None, **kw)

    forward = model.forward
    try:
        for layer in layers:
            layer.__class__ = Renamed
        with pytest.raises(hf.UnsupportedTransformers, match=rf"takes no cache or past_key_values .*{hf.TESTED[0]}"):
            vtprune.patch(model, "fastv", keep=4)
        assert not hasattr(model, "_vtprune_patch") and model.forward == forward
        assert all(not layer._forward_pre_hooks for layer in layers)
        vtprune.patch(model, "cls_attention", keep=4)  # a vision-side policy does not call the decoder layers
        vtprune.unpatch(model)
    finally:
        for layer in layers:
            layer.__class__ = original


def test_mask_forms_it_cannot_follow_are_refused():
    with pytest.raises(hf.UnsupportedTransformers, match="form vtprune does not know"):
        hf.allowed(torch.ones(2, 5, dtype=torch.long))
    model, _ = model_and_inputs("llava-clip")
    config = for_model(model).text_model.config
    saved = config._attn_implementation
    try:
        config._attn_implementation = "flash_attention_2"
        with pytest.raises(ValueError, match="sdpa and eager attention"):
            vtprune.patch(model, "fastv", keep=4)
        assert not hasattr(model, "_vtprune_patch")
    finally:
        config._attn_implementation = saved


def test_additive_masks_round_trip():
    allowed = torch.tensor([[True, False], [True, True]])[None, None]
    additive = hf.in_form(allowed, torch.zeros(1, 1, 2, 2), "eager")
    assert additive.dtype == torch.float32 and torch.equal(hf.allowed(additive), allowed)
    assert hf.in_form(allowed, None, "sdpa") is allowed
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        hf.in_form(allowed, None, "flash_attention_2")


def test_an_untested_release_is_warned_about(monkeypatch):
    model, _ = model_and_inputs("llava-clip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vtprune.patch(model, "fastv", keep=4)  # the installed release is a tested one: no warning
    vtprune.unpatch(model)
    monkeypatch.setattr(hf.transformers, "__version__", "5.99.0")  # the module object hf reads
    with pytest.warns(UserWarning, match=r"tested on transformers>=5.18.0,<=.* not 5.99.0"):
        vtprune.patch(model, "fastv", keep=4)
    vtprune.unpatch(model)

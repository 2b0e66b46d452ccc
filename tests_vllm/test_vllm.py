"""vLLM serving a tiny LLaVA through vtprune's plugin equals HF transformers + vtprune on the same checkpoint:
greedy tokens, log-probs and kept tokens, with two images in one batch, two images in one prompt and an
image split over two prefill chunks. What the plugin cannot serve is refused with the fix."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from vtprune.eval import synthetic

import vtprune
from vtprune import vllm as plugin

KEEP = 16
PROMPTS = [
    "USER: <image>\nwhat is shown ? ASSISTANT:",
    "USER: what colour is the circle on the left in the picture ? <image>\nanswer one ASSISTANT:",
    "USER: <image> and <image>\nwhich is red ? ASSISTANT:",
]
"""The second's image starts at token 15 of the pruned prompt, so it spans two chunks of 20 tokens."""
CHUNK = 20
STEPS = 6


def pictures(seed: int, count: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (50 + 10 * i, 40, 3), dtype=np.uint8)) for i in range(count)]


REQUESTS = [(PROMPTS[0], pictures(1, 1)), (PROMPTS[1], pictures(2, 1)), (PROMPTS[2], pictures(3, 2))]


FAMILIES = {"llava": {"image_size": 56}, "llava_next": {"family": "llava_next"}}
"""Tiny LLaVA (56-pixel crops: 64 tokens) and LLaVA-NeXT (28-pixel crops of 16 tokens, tiles up to 2x2)."""


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Per family, a tiny random model (CLIP tower, Llama LLM with head dim 32, which vLLM's CPU attention takes)
    saved in the hub's key layout, as vLLM loads it."""
    text = {"text_layers": 4, "text_hidden": 64, "text_heads": 2, "text_kv_heads": 1}
    saved = {}
    for family, sizes in FAMILIES.items():
        config = synthetic.llava_config("llama", **text, **sizes)
        model, processor = synthetic.llava_model(config), synthetic.llava_processor(config)
        saved[family] = plugin.save_for_vllm(model, processor, tmp_path_factory.mktemp(family))
    return saved


@torch.no_grad()
def hf_reference(checkpoint, policy, positions) -> list[tuple[list[int], list[float], list[list[int]], int]]:
    """Per request alone: HF + vtprune's greedy tokens, their log-probs, each image's kept tokens and the length of
    the pruned prompt."""
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    answers = []
    with vtprune.patched(model, policy, keep=KEEP, positions=positions):
        for prompt, images in REQUESTS:
            inputs = processor(images=images, text=[prompt], return_tensors="pt")
            out = model.generate(
                **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
            tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
            logprobs = [float(step[0].log_softmax(-1)[t]) for step, t in zip(out.logits, tokens, strict=True)]
            trace = vtprune.last_trace(model)
            length = inputs["input_ids"].shape[1] - sum(r.n_before - r.n_after for r in trace)
            answers.append((tokens, logprobs, [r.kept.tolist() for r in trace], length))
    return answers


def served(checkpoint, policy, positions, **engine) -> tuple[list, list[list[int]]]:
    """vLLM's greedy answers to all requests at once, and the kept tokens of every image it encoded."""
    from vllm import LLM, SamplingParams

    name, options = (policy, {}) if isinstance(policy, str) else (policy.name, _options(policy))
    llm = LLM(
        model=str(checkpoint),
        enforce_eager=True,
        max_model_len=512,
        dtype="float32",
        limit_mm_per_prompt={"image": 2},
        gpu_memory_utilization=0.25,  # on CPU, the share of memory the KV cache reserves
        hf_overrides=plugin.overrides(name, keep=KEEP, positions=positions, **options),
        **engine,
    )
    outputs = llm.generate(
        [{"prompt": prompt, "multi_modal_data": {"image": images}} for prompt, images in REQUESTS],
        SamplingParams(max_tokens=STEPS, temperature=0.0, logprobs=0),
    )
    (kept,) = llm.apply_model(lambda model: [order.tolist() for order in model.vtprune_kept])
    answers = []
    for output in outputs:
        completion = output.outputs[0]
        chosen = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids, strict=True)]
        answers.append((list(completion.token_ids), chosen, len(output.prompt_token_ids)))
    del llm
    return answers, kept


def _options(policy) -> dict:
    return {name: getattr(policy, name) for name in vtprune.registry.option_defaults(policy.name)}


CHUNKED = {"max_num_batched_tokens": CHUNK, "enable_chunked_prefill": True}


@pytest.mark.parametrize(
    ("family", "policy", "positions", "engine"),
    [
        ("llava", "cls_attention", "original", CHUNKED),
        ("llava", "cls_attention", "contiguous", CHUNKED),
        ("llava", "uniform", "original", {}),
        ("llava", vtprune.policy("diversity_kcenter", relevance_layer=None), "contiguous", {}),
        ("llava_next", "cls_attention", "original", {}),
        ("llava_next", "uniform", "contiguous", {}),
    ],
    ids=[
        "llava-cls_attention-original-chunked",
        "llava-cls_attention-contiguous-chunked",
        "llava-uniform-original",
        "llava-diversity_kcenter-contiguous",
        "llava_next-cls_attention-original",
        "llava_next-uniform-contiguous",
    ],
)
def test_served_equals_hf_with_vtprune(checkpoints, family, policy, positions, engine):
    """Each image keeps `KEEP` tokens (LLaVA-NeXT: shared among its crops, plus its mosaic's row ends)."""
    expected = hf_reference(checkpoints[family], policy, positions)
    answers, kept = served(checkpoints[family], policy, positions, **engine)
    for (tokens, logprobs, _, length), (served_tokens, served_logprobs, served_length) in zip(
        expected, answers, strict=True
    ):
        assert served_tokens == tokens
        assert np.allclose(served_logprobs, logprobs, atol=1e-4, rtol=0)
        assert served_length == length  # vLLM's prompt holds only the kept placeholders
    wanted = sorted(image for _, _, images, _ in expected for image in images)
    assert sorted(kept) == wanted and all(len(k) >= KEEP for k in kept)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"policy": "fastv", "keep": 8}, "acts in the decoder, which vtprune runs with HF transformers only"),
        ({"policy": "transition"}, "acts in the decoder"),
        ({"policy": "diversity_kcenter"}, "acts in the decoder"),
        ({"policy": "information_flow"}, "inside the vision tower"),
        ({"policy": "visionzip"}, "inside the vision tower"),
        ({"policy": "uniform", "positions": "shifted"}, "positions must be one of"),
        ({"policy": "uniform", "keep": 0}, "keep"),
        ({"policy": "uniform", "colour": 1}, "has no option colour"),
        ({"keep": 8}, "must be a dict with a 'policy'"),
    ],
)
def test_what_the_plugin_cannot_serve_is_refused_with_the_fix(entry, match):
    with pytest.raises((ValueError, TypeError), match=match):
        plugin.Settings.parse(entry)


def test_other_families_refuse_an_entry_they_would_ignore():
    from vtprune import vllm_refusals

    for architecture in plugin.REFUSED:
        refusing = getattr(vllm_refusals, architecture)
        text = SimpleNamespace(num_hidden_layers=4)
        config = SimpleNamespace(vtprune={"policy": "uniform", "keep": 4}, model_type=architecture, text_config=text)
        with pytest.raises(ValueError, match="prunes LLaVA-1.5 and LLaVA-NeXT only"):
            refusing(vllm_config=SimpleNamespace(model_config=SimpleNamespace(hf_config=config)))


def test_untested_vllm_releases_are_refused():
    plugin.check_version("0.32.0")
    plugin.check_version("0.32.1")
    with pytest.raises(RuntimeError, match=r"tested on vLLM 0\.32, found 0\.33\.0"):
        plugin.check_version("0.33.0")

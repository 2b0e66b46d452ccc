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

PROMPTS = [
    "USER: {image}\nwhat is shown ? ASSISTANT:",
    "USER: what colour is the circle on the left in the picture ? {image}\nanswer one ASSISTANT:",
    "USER: {image} and {image}\nwhich is red ? ASSISTANT:",
]
"""The second's image starts at token 15 of the pruned prompt, so it spans two chunks of 20 tokens."""
CHUNK = 20
STEPS = 6
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def pictures(seed: int, count: int, height: int, width: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height + 28 * i, width, 3), dtype=np.uint8)) for i in range(count)]


FAMILIES = {
    "llava": ({"image_size": 56}, "<image>", (50, 40), 16),
    "llava_next": ({"family": "llava_next"}, "<image>", (50, 40), 16),
    "qwen2_vl": ({}, QWEN_IMAGE, (112, 168), 10),
    "qwen2_5_vl": ({}, QWEN_IMAGE, (112, 168), 10),
}
"""Per family: the tiny model's sizes, the prompt's image placeholder, the first picture's size, and each image's
budget. LLaVA: 56-pixel crops of 64 tokens; LLaVA-NeXT: 28-pixel crops of 16 tokens, tiles up to 2x2; Qwen-VL:
24 merge units and more per picture."""


def requests(family: str) -> list[tuple[str, list[Image.Image]]]:
    _, image, (height, width), _ = FAMILIES[family]
    counts = [prompt.count("{image}") for prompt in PROMPTS]
    return [
        (prompt.format(image=image), pictures(seed, count, height, width))
        for seed, (prompt, count) in enumerate(zip(PROMPTS, counts, strict=True), start=1)
    ]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Per family, a tiny random model (LLM head dim 32, which vLLM's CPU attention takes) saved in the hub's key
    layout, as vLLM loads it."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    text = {"text_layers": 4, "text_hidden": 64, "text_heads": 2, "text_kv_heads": 1}
    saved = {}
    for family, (sizes, *_) in FAMILIES.items():
        path = tmp_path_factory.mktemp(family)
        if family.startswith("qwen"):
            model = synthetic.qwen_vl_model(synthetic.qwen_vl_config(family, **text))
            processor = synthetic.qwen_vl_processor(family)
            processor.video_processor = Qwen2VLVideoProcessor(patch_size=14)  # torchvision's, which vLLM's env has
        else:
            config = synthetic.llava_config("llama", **text, **sizes)
            model, processor = synthetic.llava_model(config), synthetic.llava_processor(config)
        _sharpen(model)
        if family.startswith("qwen"):
            model.save_pretrained(path)
            processor.save_pretrained(path)
            saved[family] = path
        else:
            saved[family] = plugin.save_for_vllm(model, processor, path)
    return saved


@torch.no_grad()
def _sharpen(model) -> None:
    """Scale the LLM's queries and keys up, so its attention depends on positions as a trained model's does (a
    random LLM attends almost uniformly, where a token placed one step off changes a log-prob by less than the
    tolerance)."""
    for layer in model.model.language_model.layers:
        layer.self_attn.q_proj.weight.mul_(6.0)
        layer.self_attn.k_proj.weight.mul_(6.0)


@torch.no_grad()
def hf_reference(
    family, checkpoint, policy, positions, keeps
) -> list[tuple[list[int], list[float], list[list[int]], int]]:
    """Per request alone, patched with its budget: HF + vtprune's greedy tokens, their log-probs, each image's kept
    tokens and the length of the pruned prompt."""
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    answers = []
    for (prompt, images), keep in zip(requests(family), keeps, strict=True):
        with vtprune.patched(model, policy, keep=FAMILIES[family][3] if keep is None else keep, positions=positions):
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


def served(family, checkpoint, policy, positions, keeps, **engine) -> tuple[list, list[list[int]]]:
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
        hf_overrides=plugin.overrides(name, keep=FAMILIES[family][3], positions=positions, **options),
        **engine,
    )
    outputs = llm.generate(
        [
            {"prompt": prompt, "multi_modal_data": {"image": images}}
            | ({} if keep is None else {"mm_processor_kwargs": {plugin.REQUEST_KEEP: keep}})
            for (prompt, images), keep in zip(requests(family), keeps, strict=True)
        ],
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


EACH = (None, None, None)
"""Every request with the entry's budget."""
OWN = (8, 0.5, None)
"""The first request's images keep 8 tokens, the second's half theirs (`mm_processor_kwargs`), the third's the
entry's budget."""
CASES = {
    "llava-cls_attention-original-chunked": ("llava", "cls_attention", "original", CHUNKED, EACH),
    "llava-cls_attention-contiguous-chunked": ("llava", "cls_attention", "contiguous", CHUNKED, EACH),
    "llava-uniform-original-own-budgets": ("llava", "uniform", "original", {}, OWN),
    "llava-visual_cues-original": ("llava", "visual_cues", "original", {}, EACH),
    "llava-diversity_kcenter-contiguous": (
        "llava",
        vtprune.policy("diversity_kcenter", relevance_layer=None),
        "contiguous",
        {},
        EACH,
    ),
    "llava_next-cls_attention-original-own-budgets": ("llava_next", "cls_attention", "original", {}, OWN),
    "llava_next-uniform-contiguous": ("llava_next", "uniform", "contiguous", {}, EACH),
    "llava_next-max_min_diversity-original": ("llava_next", "max_min_diversity", "original", {}, EACH),
    "llava_next-conditional_dpp-original": (
        "llava_next",
        vtprune.policy("conditional_dpp", relevance="none"),
        "original",
        {},
        EACH,
    ),
    "qwen2_vl-cls_attention-chunked": ("qwen2_vl", "cls_attention", "original", CHUNKED, EACH),
    "qwen2_vl-diversity_kcenter": (
        "qwen2_vl",
        vtprune.policy("diversity_kcenter", relevance_layer=None),
        "original",
        {},
        EACH,
    ),
    "qwen2_5_vl-cls_attention-own-budgets": ("qwen2_5_vl", "cls_attention", "original", {}, OWN),
    "qwen2_5_vl-visual_cues": ("qwen2_5_vl", "visual_cues", "original", {}, EACH),
}
"""Qwen-VL's positions are M-RoPE, which vtprune keeps original."""


@pytest.mark.parametrize(("family", "policy", "positions", "engine", "keeps"), list(CASES.values()), ids=list(CASES))
def test_served_equals_hf_with_vtprune(checkpoints, family, policy, positions, engine, keeps):
    """Each image keeps its budget of tokens (LLaVA-NeXT: shared among its crops, plus its mosaic's row ends)."""
    expected = hf_reference(family, checkpoints[family], policy, positions, keeps)
    answers, kept = served(family, checkpoints[family], policy, positions, keeps, **engine)
    for (tokens, logprobs, _, length), (served_tokens, served_logprobs, served_length) in zip(
        expected, answers, strict=True
    ):
        assert served_tokens == tokens
        assert np.allclose(served_logprobs, logprobs, atol=1e-4, rtol=0)
        assert served_length == length  # vLLM's prompt holds only the kept placeholders
    wanted = sorted(image for _, _, images, _ in expected for image in images)
    assert sorted(kept) == wanted


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"policy": "fastv", "keep": 8}, "acts in the decoder, which vtprune runs with HF transformers only"),
        ({"policy": "transition"}, "acts in the decoder"),
        ({"policy": "duplication"}, "acts in the decoder"),
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


def test_a_policy_weighing_by_the_instruction_is_refused_at_start_up(checkpoints):
    """vLLM hands the vision encoder no prompt, so CDPruner's relevance cannot be served; without it, it can."""
    from vllm import LLM

    with pytest.raises(ValueError, match=r"configure it without one \(e\.g\. relevance='none'\)"):
        LLM(
            model=str(checkpoints["llava"]),
            enforce_eager=True,
            max_model_len=512,
            dtype="float32",
            gpu_memory_utilization=0.25,
            hf_overrides=plugin.overrides("conditional_dpp", keep=16),
        )


def test_other_families_refuse_an_entry_they_would_ignore():
    from vtprune import vllm_refusals

    for architecture in plugin.REFUSED:
        refusing = getattr(vllm_refusals, architecture)
        text = SimpleNamespace(num_hidden_layers=4)
        config = SimpleNamespace(vtprune={"policy": "uniform", "keep": 4}, model_type=architecture, text_config=text)
        with pytest.raises(ValueError, match="prunes LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL only"):
            refusing(vllm_config=SimpleNamespace(model_config=SimpleNamespace(hf_config=config)))


def test_untested_vllm_releases_are_refused():
    plugin.check_version("0.32.0")
    plugin.check_version("0.32.1")
    with pytest.raises(RuntimeError, match=r"tested on vLLM 0\.32, found 0\.33\.0"):
        plugin.check_version("0.33.0")


def test_qwen_served_pruned_takes_no_videos():
    """The plugin prunes Qwen-VL images only: the engine's video limit goes to 0, and a video limit asked for is
    refused with the fix (a video would otherwise reach positions laid out for images alone)."""
    from vllm.config.multimodal import ImageDummyOptions, VideoDummyOptions

    def engine_config(limits: dict) -> SimpleNamespace:
        text = SimpleNamespace(num_hidden_layers=4, rope_parameters={"mrope_section": [4, 6, 6]})
        config = SimpleNamespace(
            vtprune={"policy": "uniform", "keep": 4}, text_config=text, get_text_config=lambda: text
        )
        mm = SimpleNamespace(limit_per_prompt=limits)
        return SimpleNamespace(hf_config=config, architecture="Qwen2VLForConditionalGeneration", multimodal_config=mm)

    unasked = engine_config({"image": ImageDummyOptions(count=2)})
    plugin.configure_engine(unasked)
    assert unasked.multimodal_config.limit_per_prompt["video"].count == 0
    assert unasked.hf_config.text_config.rope_parameters == {"mrope_section": [4, 6, 6]}  # Qwen's own M-RoPE kept
    with pytest.raises(ValueError, match=r"prunes Qwen-VL images, not videos: pass --limit-mm-per-prompt"):
        plugin.configure_engine(engine_config({"video": VideoDummyOptions(count=1)}))


def test_request_budgets_travel_exactly_and_bad_ones_are_refused():
    settings = plugin.Settings.parse({"policy": "cls_attention", "keep": 16})
    assert settings.request_budget(None) == settings.budget == settings.request_budget({"other": 1})
    for keep in (1, 8, 576, 1.0, 0.5, 0.11, 0.25):
        budget = settings.request_budget({plugin.REQUEST_KEEP: keep})
        assert plugin.decode_budget(plugin.encode_budget(budget)) == budget
        assert type(plugin.decode_budget(plugin.encode_budget(budget)).keep) is type(keep)  # 1 token is not 100%
    for keep, match in ((0, "keeps no tokens"), (1.5, "not a fraction"), ("8", "must be an int")):
        with pytest.raises((ValueError, TypeError), match=match):
            settings.request_budget({plugin.REQUEST_KEEP: keep})

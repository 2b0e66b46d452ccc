"""`conditional_dpp` selects what CDPruner's conditional DPP selects: hand-worked examples, a transcription of the
official greedy loop (`llava_arch.py`) on random features over many seeds, the exhausted-kernel rule, relevance
normalised per image, and the CLIP relevance from a locally saved CLIP checkpoint, checked end to end."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import image, tiny
from vtprune.eval import synthetic

import vtprune
from vtprune.registry import make_policy
from vtprune.signals import ImageSignals, VisionLayout

ANGLES = [0, 10, 90]


def on_circle(angles: list[float]) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])


def official(features: torch.Tensor, relevance: torch.Tensor, keep: int) -> list[int]:
    """CDPruner's loop as its code writes it (float64 here): min-max normalised relevance (+1e-6 in the numerator)
    as quality, L = diag(q) S diag(q) with S the cosine matrix, the dense incremental Cholesky greedy, kept sorted."""
    units = F.normalize(features.double(), dim=-1)
    relevance = relevance.double()
    q = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = q[:, None] * (units @ units.T) * q[None, :]
    gains, factors, picks = kernel.diagonal().clone(), torch.zeros(keep, len(units), dtype=torch.float64), []
    for step in range(keep):
        j = int(gains.argmax())
        picks.append(j)
        factor = (kernel[j] - (factors[:step, j, None] * factors[:step]).sum(0)) / gains[j].sqrt()
        factors[step] = factor
        gains = gains - factor**2
        gains[j] = -math.inf
    return sorted(picks)


def kept(signals: ImageSignals, keep: int, **options) -> list[int]:
    return make_policy("conditional_dpp", options).select(signals, keep).kept.tolist()


def test_hand_worked_plain_dpp():
    # Unit tokens at 0, 10 and 90 degrees, r = 1 (no instruction): every d² starts at 1, so token 0 first (the
    # lowest index); then d² = 1 - cos²(angle to token 0): token 1 sin²(10°) = 0.03, token 2 1 -> token 2.
    signals = ImageSignals(n_tokens=3, features=on_circle(ANGLES) * torch.tensor([[1.0], [2.0], [3.0]]))
    assert kept(signals, 1, relevance="none") == [0]
    assert kept(signals, 2, relevance="none") == [0, 2]
    assert kept(signals, 3, relevance="none") == [0, 1, 2]


def test_hand_worked_conditional_dpp():
    # The instruction's one embedding points at token 1 (10 degrees): cosines cos 10°, 1, cos 80°, normalised to
    # q = (0.9816, 1.0000012, 1.2e-6). d² = q² picks token 1; then token 0 has d² = q0² sin² 10° = 0.029 and
    # token 2 q2² sin² 80° ~ 1e-12: token 0. The instruction turns the plain DPP's pick of token 2 into token 0.
    signals = ImageSignals(
        n_tokens=3, features=on_circle(ANGLES), instruction=on_circle([10]), instruction_ids=torch.tensor([5])
    )
    assert kept(signals, 1, relevance="llm") == [1]
    assert kept(signals, 2, relevance="llm") == [0, 1]
    selection = make_policy("conditional_dpp", {"relevance": "llm"}).select(signals, 2)
    low, high = math.cos(math.radians(80)), 1.0
    expected = [(math.cos(math.radians(a)) - low + 1e-6) / (high - low) for a in (10, 0, 80)]
    assert selection.scores.tolist() == pytest.approx(expected, rel=1e-5)
    assert selection.details == (("relevance", "llm"),)


def test_theta_weighs_relevance_exponentially():
    signals = ImageSignals(n_tokens=3, features=on_circle(ANGLES), instruction=on_circle([10]))
    plain = make_policy("conditional_dpp", {"relevance": "llm"}).select(signals, 1).scores
    weighted = make_policy("conditional_dpp", {"relevance": "llm", "theta": 0.5}).select(signals, 1).scores
    assert torch.allclose(weighted, torch.exp(0.5 * plain))


@pytest.mark.parametrize("seed", range(40))
def test_equals_the_official_loop_on_random_features(seed):
    generator = torch.Generator().manual_seed(seed)
    n, width, words = [(64, 128, 1), (144, 64, 3), (96, 96, 2)][seed % 3]
    features = torch.randn(n, width, generator=generator)
    instruction = torch.randn(words, width, generator=generator)
    keep = [8, 16, 32, 48][seed % 4]
    relevance = (F.normalize(features, dim=-1) @ F.normalize(instruction, dim=-1).T).mean(1)
    signals = ImageSignals(n_tokens=n, features=features, instruction=instruction)
    assert kept(signals, keep, relevance="llm") == official(features, relevance, keep)


def test_an_exhausted_kernel_fills_by_quality_without_repeats():
    # 64 tokens in 4 directions: the kernel has rank 4, so after 4 picks every d² is float32 noise. The official
    # divides by sqrt(0) and goes NaN (or picks by the noise); vtprune takes the 4 directions' first tokens, then
    # the rest by quality. (theta keeps every quality >= 1: plain min-max relevance gives one direction ~1e-6.)
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(4, 8, generator=generator)
    features = directions.repeat(16, 1)
    instruction = torch.randn(1, 8, generator=generator)
    selection = make_policy("conditional_dpp", {"relevance": "llm", "theta": 0.5}).select(
        ImageSignals(n_tokens=64, features=features, instruction=instruction), 10
    )
    assert len(selection.kept) == 10 == len(set(selection.kept.tolist()))
    by_quality = torch.sort(selection.scores, descending=True, stable=True).indices
    assert set(selection.kept.tolist()) == {0, 1, 2, 3} | set(by_quality[by_quality >= 4][:6].tolist())


def test_relevance_is_normalised_over_an_images_crops_not_the_batch():
    generator = torch.Generator().manual_seed(1)
    crops = [torch.randn(20, 16, generator=generator) for _ in range(3)]
    instruction = torch.randn(2, 16, generator=generator)
    signals = [
        ImageSignals(n_tokens=20, features=f, instruction=instruction, image=i // 2) for i, f in enumerate(crops)
    ]
    selections = make_policy("conditional_dpp", {"relevance": "llm"}).select_batch(signals, [5, 5, 5])
    raw = [(F.normalize(f, dim=-1) @ F.normalize(instruction, dim=-1).T).mean(1) for f in crops]
    joint = torch.cat(raw[:2])
    expected = [(r - joint.min() + 1e-6) / (joint.max() - joint.min()) for r in raw[:2]]
    expected.append((raw[2] - raw[2].min() + 1e-6) / (raw[2].max() - raw[2].min()))
    for selection, quality in zip(selections, expected, strict=True):
        assert torch.allclose(selection.scores, quality, atol=1e-6)
    alone = make_policy("conditional_dpp", {"relevance": "llm"}).select(signals[2], 5)
    assert torch.equal(alone.kept, selections[2].kept)


def test_no_instruction_is_a_plain_dpp():
    features = torch.randn(30, 8, generator=torch.Generator().manual_seed(2))
    empty = ImageSignals(n_tokens=30, features=features, instruction=torch.zeros(0, 8))
    plain = ImageSignals(n_tokens=30, features=features)
    ones = torch.ones(30)
    assert kept(empty, 6, relevance="llm") == kept(plain, 6, relevance="none")
    assert make_policy("conditional_dpp", {"relevance": "llm"}).select(empty, 6).scores.tolist() == ones.tolist()


def test_options_are_checked():
    with pytest.raises(ValueError, match="relevance must be one of"):
        make_policy("conditional_dpp", {"relevance": "text"})
    with pytest.raises(ValueError, match="needs clip_model"):
        make_policy("conditional_dpp", {"relevance": "clip"})
    with pytest.raises(ValueError, match="tokenizer=processor.tokenizer"):
        make_policy("conditional_dpp", {"clip_model": "some/path"})
    with pytest.raises(ValueError, match="theta must be in"):
        make_policy("conditional_dpp", {"theta": 1.0})
    request = make_policy("conditional_dpp", {}).request(VisionLayout(num_layers=4, feature_layer=2, has_cls=True))
    assert request.features and request.instruction and not request.tower_features


# --- the instruction and the CLIP relevance, end to end ---------------------------------------------------------


def clip_checkpoint(path, model, processor, width: int | None = None):
    """A random CLIP model whose vision tower is `model`'s (or `width` wide), saved with a tokenizer as a checkpoint."""
    return synthetic.clip_checkpoint(path, model.config.vision_config, processor.tokenizer, width=width)


PROMPTS = [
    "USER: <image>\nwhat colour is the circle on the left in the picture and what is shown near it ? ASSISTANT:",
    "USER: <image>\nwhat is shown ? ASSISTANT:",
]


@torch.no_grad()
def test_clip_relevance_from_a_saved_checkpoint_selects_as_computed_by_hand(tmp_path):
    model, processor = tiny("llama", text_layers=2)
    clip = clip_checkpoint(tmp_path, model, processor)
    inputs = processor(images=[image(1), image(2)], text=PROMPTS, return_tensors="pt", padding=True)
    keep = 5
    vtprune.patch(model, policy="conditional_dpp", keep=keep, clip_model=str(tmp_path), tokenizer=processor.tokenizer)
    try:
        model(**inputs)
        trace = vtprune.last_trace(model)
    finally:
        vtprune.unpatch(model)
    tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    patches = tower.hidden_states[model.config.vision_feature_layer][:, 1:]
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    image_id = model.config.image_token_id
    for row, record in enumerate(trace):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
        after = ids[(ids == image_id).nonzero().max() + 1 :]
        text = processor.tokenizer.decode(after.tolist(), skip_special_tokens=True).strip()
        clip_ids = processor.tokenizer(text)["input_ids"]
        segments = torch.zeros(-(-len(clip_ids) // 16) * 16, dtype=torch.long)
        segments[: len(clip_ids)] = torch.tensor(clip_ids)
        text_embeds = clip.get_text_features(input_ids=segments.view(-1, 16)).pooler_output
        image_embeds = clip.visual_projection(clip.vision_model.post_layernorm(patches[row]))
        relevance = -(F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T).mean(1)
        assert (len(segments) > 16) == (row == 0)  # the long instruction spans two segments
        assert record.kept.tolist() == official(features[row], relevance, keep)
        assert record.details == (("relevance", "clip"),)


def test_clip_of_another_tower_is_refused(tmp_path):
    model, processor = tiny("llama", text_layers=2)
    clip_checkpoint(tmp_path, model, processor, width=model.config.vision_config.hidden_size + 8)
    inputs = processor(images=[image(1)], text=PROMPTS[1:], return_tensors="pt")
    vtprune.patch(model, policy="conditional_dpp", keep=4, clip_model=str(tmp_path), tokenizer=processor.tokenizer)
    try:
        with pytest.raises(ValueError, match="pass the CLIP checkpoint the VLM's vision tower comes from"):
            model(**inputs)
    finally:
        vtprune.unpatch(model)


@torch.no_grad()
def test_llm_relevance_reads_the_rows_own_instruction():
    model, processor = tiny("llama", text_layers=2)
    inputs = processor(images=[image(1), image(2)], text=PROMPTS, return_tensors="pt", padding=True)
    vtprune.patch(model, policy="conditional_dpp", keep=6)
    try:
        model(**inputs)
        trace = vtprune.last_trace(model)
    finally:
        vtprune.unpatch(model)
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    embeddings = model.get_input_embeddings()
    for row, record in enumerate(trace):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
        after = ids[(ids == model.config.image_token_id).nonzero().max() + 1 :]
        relevance = (F.normalize(features[row], dim=-1) @ F.normalize(embeddings(after), dim=-1).T).mean(1)
        assert record.kept.tolist() == official(features[row], relevance, 6)
        assert record.details == (("relevance", "llm"),)


def test_a_runtime_without_the_prompt_is_told_to_drop_the_instruction():
    model, processor = tiny("llama", text_layers=2)
    inputs = processor(images=[image(1)], text=PROMPTS[1:], return_tensors="pt")
    engine = vtprune.patch(model, policy="conditional_dpp", keep=4).engine
    try:
        with pytest.raises(ValueError, match="relevance='none'"):
            engine.select({"pixel_values": inputs["pixel_values"]}, "image")
        vtprune.patch(model, policy="conditional_dpp", keep=4, relevance="none").engine.select(
            {"pixel_values": inputs["pixel_values"]}, "image"
        )
    finally:
        vtprune.unpatch(model)

"""`visual_cues` selects what VisPruner selects: a hand-worked example, a transcription of the official loop
(`llava_arch.py`) on random tensors over many seeds, exact budgets where the official loop fails, and end to end
on tiny LLaVA models against the tower's own eager attention and hidden states."""

import pytest
import torch
from helpers import image, tiny

import vtprune
from vtprune.registry import make_policy
from vtprune.signals import ImageSignals, VisionLayout


def official(importance: torch.Tensor, features: torch.Tensor, keep: int, ratio: float) -> list[int] | None:
    """VisPruner's loop as its code writes it (one crop, in float32 as vtprune scores: the loop is chaotic in the
    residual order, so a reference must share the policy's arithmetic); None where the official code fails (the a/b
    halves differ in length, or r exceeds a half)."""
    important_num = int(keep * ratio)
    diverse_num = keep - important_num
    order = torch.sort(importance.float(), descending=True, stable=True).indices
    important, residual = order[:important_num], order[important_num:]
    normalized = features.float() / features.float().norm(dim=-1, keepdim=True)
    while True:
        rest = len(residual)
        r = min(8, rest - diverse_num)
        if r <= 0:
            break
        tokens = normalized[residual]
        a, b = tokens[::2], tokens[1::2]
        scores = (a @ b.T).max(-1).values
        distinct = torch.sort(scores, descending=True, stable=True).indices[r:]
        if len(distinct) != rest // 2 - r or rest // 2 - r < 0:
            return None
        residual = torch.cat([residual[::2][distinct], residual[1::2]])
    return sorted(torch.cat([important, residual]).tolist())


def select(importance: torch.Tensor, features: torch.Tensor, keep: int, ratio: float = 0.5):
    signals = ImageSignals(n_tokens=len(features), attention_rows=importance[None], tower_features=features)
    return make_policy("visual_cues", {"important_ratio": ratio}).select(signals, keep)


def test_hand_worked_selection():
    # 6 tokens, importance descending 5, 4, 3, 2, 1, 0; token 3 points as token 2 does, token 1 is orthogonal to 0.
    # keep 4 (2 important: {5, 4}; residual [3, 2, 1, 0] to 2): a = [3, 1], b = [2, 0], r = 2 drops both a's.
    # keep 5 (2 important, residual to 3): r = 1 drops token 3 (cosine 1 with token 2; token 1's best is 0.05).
    # keep 2 (1 important: {5}; residual [4, 3, 2, 1, 0] to 1): r = 4 but a = [4, 2, 0] has 3, all dropped,
    # leaving [3, 1]; then r = 1 drops token 3 (a = [3]) -> {1, 5}.
    importance = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [1.0, 0.05], [1.0, 1.0], [-1.0, 0.0]])
    assert select(importance, features, 4).kept.tolist() == [0, 2, 4, 5]
    assert select(importance, features, 5).kept.tolist() == [0, 1, 2, 4, 5]
    assert select(importance, features, 2).kept.tolist() == [1, 5]
    assert select(importance, features, 6).kept.tolist() == list(range(6))
    assert torch.equal(select(importance, features, 3).scores, importance)


@pytest.mark.parametrize("seed", range(48))
def test_equals_the_official_loop_where_it_runs(seed):
    generator = torch.Generator().manual_seed(seed)
    n = [576, 144][seed % 2]
    keep = min(n, [32, 64, 96, 128, 63, 192][seed % 6])
    ratio = [0.25, 0.5, 0.75, 0.6][seed % 4]
    importance = torch.rand(n, generator=generator)
    features = torch.randn(n, 24, generator=generator)
    expected = official(importance, features, keep, ratio)
    got = select(importance, features, keep, ratio).kept
    assert len(got) == keep == len(set(got.tolist()))
    if expected is not None:
        assert got.tolist() == expected


def test_exact_budgets_where_the_official_loop_fails():
    generator = torch.Generator().manual_seed(7)
    importance, features = torch.rand(100, generator=generator), torch.randn(100, 8, generator=generator)
    failing = [keep for keep in range(1, 101) if official(importance, features, keep, 0.5) is None]
    assert failing  # odd residual lengths the official loop cannot pair
    for keep in range(1, 101):
        assert len(select(importance, features, keep).kept) == keep


def test_requests_follow_the_tower():
    policy = make_policy("visual_cues", {})
    cls = policy.request(VisionLayout(num_layers=4, feature_layer=2, has_cls=True))
    assert cls.attention_rows == (2,) and cls.tower_features and not cls.features
    siglip = policy.request(VisionLayout(num_layers=4, feature_layer=3, has_cls=False))
    assert siglip.received_attention == (3,) and not siglip.attention_rows
    with pytest.raises(ValueError, match="attends within windows"):
        policy.request(VisionLayout(num_layers=4, feature_layer=3, has_cls=False, full_attention=(1,)))
    with pytest.raises(ValueError, match="important_ratio must be in"):
        make_policy("visual_cues", {"important_ratio": 1.5})


PROMPTS = ["USER: <image>\nwhat is shown ? ASSISTANT:", "USER: <image>\nwhat colour is the circle ? ASSISTANT:"]


@torch.no_grad()
@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_a_patched_llava_keeps_what_the_official_loop_keeps_from_the_eager_tower(vision):
    model, processor = tiny("llama", "eager", vision=vision, text_layers=2)
    inputs = processor(images=[image(1), image(2)], text=PROMPTS, return_tensors="pt", padding=True)
    keep, ratio = 12, 0.5  # of 16: a budget whose residual halves pair evenly, so the official loop runs
    with vtprune.patched(model, "visual_cues", keep=keep, important_ratio=ratio):
        model(**inputs)
        trace = vtprune.last_trace(model)
    tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
    layer = model.config.vision_feature_layer % (len(tower.hidden_states))  # hidden_states[layer] is layer-1's output
    offset = 1 if vision == "clip" else 0
    features = tower.hidden_states[layer][:, offset:]
    attention = tower.attentions[layer - 1].float().mean(1)  # [B, N, N], head mean, inside the feature layer
    importance = attention[:, 0, 1:] if vision == "clip" else attention.mean(1)
    for row, record in enumerate(trace):
        expected = official(importance[row], features[row], keep, ratio)
        assert expected is not None
        assert record.kept.tolist() == expected


@torch.no_grad()
def test_qwen_units_are_judged_on_their_patches_concatenated():
    """On Qwen2-VL a merge unit's tower features are its 4 patches' outputs side by side, in raster order of units:
    what the merger receives, regrouped per image."""
    from helpers import model_and_inputs
    from vtprune.adapters import for_model

    model, inputs = model_and_inputs("qwen2_vl")
    adapter = for_model(model)
    adapter.resolve_calls()
    vision = {name: inputs[name] for name in adapter.modalities["image"]}
    layout = adapter.crop_layout(vision, "image", "per_frame")
    with adapter.projector_probe(layout, vision) as probe:
        adapter.encode(vision, "image")
    patches = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).last_hidden_state
    units = patches.reshape(-1, 4 * patches.shape[-1]).split(inputs["image_grid_thw"].prod(1).div(4).int().tolist())
    for crop, expected in enumerate(units):
        assert torch.equal(probe.features[crop, : len(expected)], expected)
        assert not probe.features[crop, len(expected) :].any()

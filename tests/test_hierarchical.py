"""`hierarchical` selects what HiPrune's official algorithm selects (with neighbours that do not wrap rows)."""

import pytest
import torch
from helpers import PROMPTS, batch, image, tiny

import vtprune
from vtprune.registry import make_policy
from vtprune.signals import ImageSignals, VisionLayout

EIGHT_BY_EIGHT = {"image_size": 56}  # 64 patches on a 4-layer tower: features from layer 2, object layer 1


@torch.no_grad()
def official_hiprune(model, pixel_values, keep, alpha, object_layer, deep_layer):
    """HiPrune's LLaVA code path, from eager attentions: received attention, anchors, buffers, registers."""
    attentions = model.model.vision_tower(pixel_values, output_attentions=True).attentions
    middle = attentions[object_layer].mean(1).mean(1)[:, 1:]  # mean over heads, then over every query
    deep = attentions[deep_layer].mean(1).mean(1)[:, 1:]
    side = int(middle.shape[1] ** 0.5)
    kept = []
    for obj, dee in zip(middle, deep, strict=True):
        chosen = set()
        for a in obj.topk(round(keep * alpha / 5)).indices.tolist():
            r, c = divmod(a, side)
            for rr, cc in ((r, c), (r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < side and 0 <= cc < side:
                    chosen.add(rr * side + cc)
        rest = dee.clone()
        rest[list(chosen)] = float("-inf")
        chosen |= set(rest.topk(keep - len(chosen)).indices.tolist())
        kept.append(torch.tensor(sorted(chosen)))
    return deep, kept


@torch.no_grad()
@pytest.mark.parametrize(("keep", "alpha"), [(20, 0.5), (30, 1.0), (8, 0.1)])
def test_kept_set_and_scores_match_the_official_algorithm_on_eager_attentions(keep, alpha):
    model, processor = tiny("llama", "eager", **EIGHT_BY_EIGHT)
    inputs = batch(processor, PROMPTS, [image(41, (70, 70)), image(42, (90, 60))])
    with vtprune.patched(model, "hierarchical", keep=keep, alpha=alpha):
        model(**inputs)
        trace = vtprune.last_trace(model)
    deep, kept = official_hiprune(model, inputs["pixel_values"], keep, alpha, object_layer=1, deep_layer=2)
    for record, scores, expected in zip(trace, deep, kept, strict=True):
        assert record.grid == (8, 8) and record.n_after == keep
        torch.testing.assert_close(record.scores, scores, atol=1e-6, rtol=1e-5)
        assert torch.equal(record.kept, expected)


def test_buffers_do_not_wrap_across_grid_rows():
    # grid 3x4; the anchor is token 4, the first of row 1: its left neighbour under the official flat
    # index would be token 3, the last of row 0. Here the buffers are 0 (up), 8 (down) and 5 (right).
    middle = torch.zeros(12)
    middle[4] = 1.0
    deep = torch.arange(12, 0, -1, dtype=torch.float32)  # registers: lowest indices not yet chosen
    signals = ImageSignals(n_tokens=12, received_attention=torch.stack([middle, deep]), grid=(3, 4))
    selection = make_policy("hierarchical", {"alpha": 5 / 6}).select(signals, keep=6)
    assert selection.kept.tolist() == [0, 1, 2, 4, 5, 8]


def test_a_budget_too_small_for_the_buffers_keeps_only_anchors():
    # keep=3, alpha=1: round(3/5) = 1 anchor, whose 4 neighbours would make 5 tokens > 3
    middle = torch.zeros(16)
    middle[5] = 1.0
    deep = torch.arange(16, 0, -1, dtype=torch.float32)
    signals = ImageSignals(n_tokens=16, received_attention=torch.stack([middle, deep]), grid=(4, 4))
    assert make_policy("hierarchical", {"alpha": 1.0}).select(signals, keep=3).kept.tolist() == [0, 1, 5]


def test_layers_default_to_the_official_object_layer_and_scale_with_depth():
    policy = make_policy("hierarchical", {})
    assert policy.request(VisionLayout(num_layers=24, feature_layer=22, has_cls=True)).received_attention == (8, 22)
    assert policy.request(VisionLayout(num_layers=12, feature_layer=10, has_cls=True)).received_attention == (4, 10)
    with pytest.raises(ValueError, match="object_layer=5 is above the feature layer 2"):
        make_policy("hierarchical", {"object_layer": 5}).request(VisionLayout(4, 2, True))
    with pytest.raises(ValueError, match="alpha must be in"):
        make_policy("hierarchical", {"alpha": 2.0})

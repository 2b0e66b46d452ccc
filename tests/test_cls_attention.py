"""`cls_attention` selects what VTC-CLS's official algorithm selects."""

import pytest
import torch
from helpers import PROMPTS, batch, image, tiny

import vtprune
from vtprune.registry import make_policy
from vtprune.signals import ImageSignals, VisionLayout

TWO_LAYERS = {"vision_layers": 3}  # features from layer 1 (hidden_states[-2]), so layers 0..1 are summed


@torch.no_grad()
def official_scores(model, pixel_values, start_layer):
    """VTC-CLS as its repository computes it: eager attentions, head mean, CLS row, patch keys, summed."""
    out = model.model.vision_tower(pixel_values, output_attentions=True)
    score = torch.zeros(pixel_values.shape[0], out.attentions[0].shape[-1] - 1)
    for attention in out.attentions[start_layer:-1]:  # layers start_layer..L-2: the last layer is excluded
        score += attention.mean(dim=1)[:, 0, 1:]
    return score


@torch.no_grad()
@pytest.mark.parametrize("text", ["llama", "qwen2"])
def test_two_layer_scores_and_kept_set_match_eager_attentions(text):
    model, processor = tiny(text, "eager", **TWO_LAYERS)
    inputs = batch(processor, PROMPTS, [image(11), image(12)])
    with vtprune.patched(model, "cls_attention", keep=5):
        model(**inputs)
        trace = vtprune.last_trace(model)
    expected = official_scores(model, inputs["pixel_values"], start_layer=0)
    for record, score in zip(trace, expected, strict=True):
        torch.testing.assert_close(record.scores, score, atol=1e-6, rtol=1e-5)
        assert torch.equal(record.kept, score.topk(5).indices.sort().values)


@torch.no_grad()
def test_start_layer_option_sums_from_that_layer():
    model, processor = tiny("llama", "eager")  # 4 layers: features from layer 2
    inputs = batch(processor, PROMPTS, [image(13), image(14)])
    with vtprune.patched(model, "cls_attention", keep=5, start_layer=2):
        model(**inputs)
        scores = torch.stack([r.scores for r in vtprune.last_trace(model)])
    torch.testing.assert_close(scores, official_scores(model, inputs["pixel_values"], 2), atol=1e-6, rtol=1e-5)


def test_default_layers_are_vtc_cls_16_to_22_on_clip_large():
    policy = make_policy("cls_attention", {})
    layout = VisionLayout(num_layers=24, feature_layer=22, has_cls=True)
    assert policy.request(layout).attention_rows == tuple(range(16, 23))
    shallow = VisionLayout(num_layers=4, feature_layer=2, has_cls=True)
    assert policy.request(shallow).attention_rows == (0, 1, 2)
    with pytest.raises(ValueError, match="start_layer=5 is above the feature layer 2"):
        make_policy("cls_attention", {"start_layer": 5}).request(shallow)


def test_hand_worked_selection():
    rows = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.3, 0.1, 0.5, 0.1]])  # sums: 0.4 0.5 0.7 0.4
    selection = make_policy("cls_attention", {}).select(ImageSignals(n_tokens=4, attention_rows=rows), keep=2)
    assert selection.kept.tolist() == [1, 2]
    torch.testing.assert_close(selection.scores, torch.tensor([0.4, 0.5, 0.7, 0.4]))


@torch.no_grad()
def mean_query_rows(model, pixel_values, layers):
    """The mean-query attention row recomputed by hand from each layer's input, layer norm and q/k projections."""
    tower = model.model.vision_tower
    hidden = tower(pixel_values, output_hidden_states=True).hidden_states
    rows = []
    for index in layers:
        layer = getattr(tower, "vision_model", tower).encoder.layers[index]
        x = layer.layer_norm1(hidden[index])
        heads, width = layer.self_attn.num_heads, x.shape[-1]
        q = layer.self_attn.q_proj(x).mean(1).view(-1, heads, 1, width // heads)
        k = layer.self_attn.k_proj(x).view(x.shape[0], -1, heads, width // heads).transpose(1, 2)
        rows.append(((q @ k.transpose(-1, -2)) * (width // heads) ** -0.5).softmax(-1).mean(1)[:, 0])
    return torch.stack(rows).sum(0)


@torch.no_grad()
def test_towers_without_cls_score_with_the_mean_query_row():
    model, processor = tiny("llama", "sdpa", vision="siglip")  # features: every patch of layer 2's output
    inputs = batch(processor, PROMPTS, [image(31), image(32)])
    reference = model(**inputs).logits
    with vtprune.patched(model, "cls_attention", keep=1.0):
        torch.testing.assert_close(model(**inputs).logits, reference, atol=0, rtol=0)
    with vtprune.patched(model, "cls_attention", keep=5):
        model(**inputs)
        trace = vtprune.last_trace(model)
    expected = mean_query_rows(model, inputs["pixel_values"], layers=(0, 1, 2))
    for record, score in zip(trace, expected, strict=True):
        assert record.n_before == 16 and record.grid == (4, 4)
        torch.testing.assert_close(record.scores, score, atol=1e-6, rtol=1e-5)
        assert torch.equal(record.kept, score.topk(5).indices.sort().values)

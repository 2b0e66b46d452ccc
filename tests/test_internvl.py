"""InternVL beyond the conformance suite: its LLM tokens are pixel-shuffled 2x2 blocks of patches scored through its
real CLS token, its tiles read off the prompt share each image's budget, and bad prompts are refused."""

import pytest
import torch
from helpers import image, tokens_entering
from vtprune.adapters import for_model
from vtprune.eval import synthetic

import vtprune

PROMPT = "user : <IMG_CONTEXT> what is shown ? assistant :"


def tiny(attn: str = "eager", **sizes):
    config = synthetic.internvl_config(attn_implementation=attn, **sizes)
    return synthetic.internvl_model(config), synthetic.internvl_processor(config)


def shuffled_blocks(model, rows: int, cols: int) -> torch.Tensor:
    """`[tokens, 4]`: the patches (raster index) pixel shuffle puts into each LLM token, found by shuffling the
    patches' own indices with the model's `pixel_shuffle`."""
    index = torch.arange(rows * cols, dtype=torch.float32).view(1, rows, cols, 1)
    return model.model.pixel_shuffle(index, scale_factor=0.5).reshape(-1, 4).long().sort(1).values


@torch.no_grad()
def test_cls_attention_scores_each_token_by_its_four_patches():
    """Scores: the CLS row of every layer's eager attention (head mean), summed, each LLM token the mean of the
    patches pixel shuffle gives it; the top `keep` are kept."""
    model, processor = tiny(image_size=112)  # 8x8 patches, 16 tokens a tile
    inputs = processor(images=[image(5, (112, 112))], text=[PROMPT], return_tensors="pt", max_patches=1)
    with vtprune.patched(model, vtprune.policy("cls_attention", start_layer=0), keep=5):
        model(**inputs)
        (record,) = vtprune.last_trace(model)
    attentions = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    patches = sum(attention.mean(1)[0, 0, 1:] for attention in attentions)
    expected = patches[shuffled_blocks(model, 8, 8)].mean(1)
    torch.testing.assert_close(record.scores, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(record.kept, expected.topk(5).indices.sort().values)


@torch.no_grad()
def test_an_images_tiles_and_thumbnail_share_its_budget():
    model, processor = tiny()
    pictures = [image(6, (56, 112)), image(7, (112, 112))]  # 2 tiles + thumbnail, 4 tiles + thumbnail
    prompt = "user : <IMG_CONTEXT> and <IMG_CONTEXT> ? assistant :"
    inputs = processor(images=pictures, text=[prompt], return_tensors="pt")
    with vtprune.patched(model, "uniform", keep=7):
        model(**inputs)
        trace = vtprune.last_trace(model)
    assert [r.n_before for r in trace] == [12, 20] and [r.n_after for r in trace] == [7, 7]
    per_tile = [torch.bincount(r.kept // 4, minlength=r.n_before // 4).tolist() for r in trace]
    assert per_tile == [[3, 2, 2], [2, 2, 1, 1, 1]]  # vtprune.crops.share: even, the first tiles take the rest


def test_a_prompt_whose_placeholders_are_not_whole_tiles_is_refused():
    model, processor = tiny()
    inputs = processor(images=[image(8, (56, 56))], text=[PROMPT], return_tensors="pt")
    inputs["input_ids"][0, (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0]] = 0
    with vtprune.patched(model, "uniform", keep=2), pytest.raises(ValueError, match="not 1 tiles of 4 tokens"):
        model(**inputs)


def test_a_tower_without_the_default_strategy_is_refused():
    model, _ = tiny()
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(TypeError, match="vision_feature_select_strategy='default'"):
        for_model(model)


def first_free(taken: torch.Tensor, count: int) -> int:
    free = torch.ones(count, dtype=torch.bool)
    free[taken] = False
    return int(free.nonzero()[0])


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_visionzip_keeps_whole_blocks_by_the_cls_row_with_their_unpruned_features(attn):
    """VisionZip without contextual tokens: the CLS token and the blocks of the highest CLS attention at the last
    layer (eager, head mean, each block the mean of its four patches); each kept block reaches the LLM as the
    unpatched projector makes it from the full tile, and the CLS token takes the first slot no block fills."""
    model, processor = tiny(attn, image_size=112)  # 8x8 patches, 16 tokens a tile
    inputs = processor(images=[image(5, (112, 112))], text=[PROMPT], return_tensors="pt", max_patches=1)
    given = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: given.update(kw), with_kwargs=True)
    try:
        with vtprune.patched(model, "visionzip", keep=5, contextual=0):
            model(**inputs)
            (record,) = vtprune.last_trace(model)
    finally:
        hook.remove()
    eager = tiny("eager", image_size=112)[0].model.vision_tower(inputs["pixel_values"], output_attentions=True)
    attention = eager.attentions[-1]
    scores = attention.mean(1)[0, 0, 1:][shuffled_blocks(model, 8, 8)].mean(1)
    blocks = scores.topk(4).indices
    cls_slot = first_free(blocks, 16)
    assert torch.equal(record.kept, torch.cat([blocks, torch.tensor([cls_slot])]).sort().values)
    features = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
    placed = given["inputs_embeds"][0][given_placeholders(model, inputs, record)]
    for slot, feature in zip(record.kept.tolist(), placed, strict=True):
        if slot != cls_slot:
            torch.testing.assert_close(feature, features[slot], atol=1e-5, rtol=1e-4)


def given_placeholders(model, inputs, record) -> torch.Tensor:
    """The columns of the pruned prompt's placeholders: the prompt keeps the kept ones, in slot order."""
    ids = inputs["input_ids"][0]
    first = int((ids == model.config.image_token_id).nonzero()[0])
    return torch.arange(first, first + record.n_after)


@torch.no_grad()
def test_information_flow_cuts_whole_blocks_and_keeps_the_cls_token_inside_the_tower():
    model, processor = tiny("eager", image_size=112, vision_layers=6)
    for layer in model.model.vision_tower.encoder.layer:  # a peaked CLS query, so the cuts fire before the last
        layer.attention.q_proj.weight.mul_(64.0)
    inputs = processor(images=[image(6, (112, 112))], text=[PROMPT], return_tensors="pt", max_patches=1)
    layers = model.model.vision_tower.encoder.layer
    with tokens_entering(layers) as seen, vtprune.patched(model, "information_flow", keep=3):
        model(**inputs)
        (record,) = vtprune.last_trace(model)
    assert record.n_after == 3 and record.n_before == 16
    # the CLS token and 64 patches, then after each cut the CLS unit (the CLS and 3 masked fillers) and whole
    # blocks; the last cut leaves the CLS unit and the 3 kept blocks
    assert seen[0] == 65 and all(length % 4 == 0 for length in seen[1:]) and seen[-1] == 4 + 3 * 4
    assert seen[1:] == sorted(seen[1:], reverse=True)


def test_in_tower_pruning_of_another_feature_layer_is_refused():
    model, processor = tiny()
    model.config.vision_feature_layer = -2
    inputs = processor(images=[image(8, (56, 56))], text=[PROMPT], return_tensors="pt")
    with vtprune.patched(model, "visionzip", keep=2), pytest.raises(ValueError, match="vision_feature_layer=-1"):
        model(**inputs)

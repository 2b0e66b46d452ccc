"""LLaVA-NeXT: every policy selects per crop, row-end tokens are always kept, the model's own packing is respected."""

import pytest
import torch
from helpers import (
    PROMPTS,
    batch,
    image,
    tiny,
    vision_side,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import vtprune

NEXT = {"family": "llava_next"}  # 28x28 crops of 16 tokens; tiles in 1x2, 2x1 or 2x2 layouts
PICTURES = [(60, 30), (30, 40)]  # a 2x1 and a 1x2 tile layout, both with padding removed
POLICIES = [name for name in sorted(vtprune.policies()) if vtprune.policy(name).acts_on_vision]
SELECT_AFTER_THE_TOWER = ["cls_attention", "diversity_kcenter", "hierarchical", "random", "uniform"]


@pytest.fixture(params=[("llama", "sdpa"), ("qwen2", "eager")], ids=["llama-sdpa", "qwen2-eager"])
def setup(request):
    model, processor = tiny(*request.param, **NEXT)
    inputs = batch(processor, PROMPTS, [image(81, PICTURES[0]), image(82, PICTURES[1])])
    yield model, inputs
    vtprune.unpatch(model)


def crops_per_image(model, inputs):
    config = model.config
    return [
        image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
        for size in inputs["image_sizes"]
    ]


def crop_of_each_token(model, inputs):
    """Per image, the crop (counted over the batch) that produced each visual token, -1 for row ends: read off the
    model's packed features by finding each among the projected features of every crop."""
    tower = model.model.vision_tower
    pixels = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], crops_per_image(model, inputs), strict=True)])
    hidden = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    crops = model.model.multi_modal_projector(hidden)  # [crops, 16, D]
    packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    owners = []
    for features in packed:
        owner = []
        for vector in features:
            if torch.equal(vector, model.model.image_newline):
                owner.append(-1)
                continue
            distance = (crops - vector).abs().amax(-1)  # [crops, 16]
            assert float(distance.min()) < 1e-5
            owner.append(int(distance.min(1).values.argmin()))
        owners.append(torch.tensor(owner))
    return owners


@torch.no_grad()
@pytest.mark.parametrize("policy", POLICIES)
def test_each_crop_keeps_its_share_and_row_ends_are_kept(setup, policy):
    model, inputs = setup
    owners = crop_of_each_token(model, inputs)
    with vtprune.patched(model, vision_side(policy), keep=10):
        model(**inputs)
        trace = vtprune.last_trace(model)
    first = 0
    for record, owner, crops in zip(trace, owners, crops_per_image(model, inputs), strict=True):
        row_ends = (owner == -1).nonzero().squeeze(1)
        assert set(row_ends.tolist()) <= set(record.kept.tolist())
        assert record.n_before == len(owner) and record.n_after == 10 + len(row_ends)
        kept_owners = owner[record.kept]
        per_crop = torch.bincount(kept_owners[kept_owners >= 0] - first, minlength=crops).tolist()
        available = torch.bincount(owner[owner >= 0] - first, minlength=crops).tolist()
        expected = [10 // crops + int(c < 10 % crops) for c in range(crops)]  # the first crops take the remainder
        assert all(a >= e for a, e in zip(available, expected, strict=True))
        assert per_crop == expected
        first += crops


@torch.no_grad()
def test_grid_reports_the_unpadded_tile_mosaic(setup):
    model, inputs = setup
    owners = crop_of_each_token(model, inputs)
    with vtprune.patched(model, "uniform", keep=4):
        model(**inputs)
        grids = [r.grid for r in vtprune.last_trace(model)]
    for (rows, cols), owner in zip(grids, owners, strict=True):
        assert int((owner == -1).sum()) == rows
        assert len(owner) == 16 + rows * (cols + 1)
        assert all(int(t) == -1 for t in owner[16:].view(rows, cols + 1)[:, -1])  # each mosaic row ends so


@torch.no_grad()
@pytest.mark.parametrize("policy", POLICIES)
def test_a_siglip_tower_without_cls(policy):
    model, processor = tiny("llama", "sdpa", vision="siglip", **NEXT)
    inputs = batch(processor, PROMPTS, [image(87, PICTURES[0]), image(88, PICTURES[1])])
    logits = model(**inputs).logits
    with vtprune.patched(model, vision_side(policy), keep=1.0):
        assert torch.equal(model(**inputs).logits, logits)
    with vtprune.patched(model, vision_side(policy), keep=6):
        model(**inputs)
        trace = vtprune.last_trace(model)
    assert [r.n_after - r.grid[0] for r in trace] == [6, 6]

"""Qwen-VL inputs built by hand: each row alone, holding only the kept image and video tokens."""

from __future__ import annotations

import math
import sys

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
from transformers.vision_utils import get_vision_window_index

GRIDS = {"image": "image_grid_thw", "video": "video_grid_thw"}


@torch.no_grad()
def rows_by_hand(model, inputs, kept: dict[str, list[torch.Tensor]], encoded: dict | None = None) -> list[dict]:
    """Per row alone: a prompt holding only the kept placeholders, the kept image and video features (and
    Qwen3-VL's deepstack features) picked here, and M-RoPE positions `[3, 1, n]` from the model's own
    `get_rope_index` on the unpruned prompt. `kept[modality][i]`: item i's kept tokens in the LLM's order (the
    j-th kept placeholder gets the feature and the position of token `kept[i][j]`). `encoded[modality]`: the
    tower's output to pick from (`pooler_output` per item, full length); default: the model's own encoders."""
    encoders = {"image": model.model.get_image_features, "video": model.model.get_video_features}
    pixels = {"image": "pixel_values", "video": "pixel_values_videos"}
    encoded = encoded or {m: encoders[m](inputs[pixels[m]], inputs[GRIDS[m]]) for m in kept}
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        **{GRIDS[m]: inputs[GRIDS[m]] for m in kept},
        attention_mask=inputs["attention_mask"],
    )
    item, rows = dict.fromkeys(kept, 0), []
    for b, row in enumerate(inputs["input_ids"]):
        columns, sources, picked, seen = [], [], {m: [] for m in kept}, dict.fromkeys(kept, 0)
        placeholders = {}  # (modality, item) -> the column of each of its tokens
        for column in range(len(row)):  # mm_token_type_ids tells the modality (GLM-4.1V's share one placeholder)
            if not inputs["attention_mask"][b, column]:
                continue
            modality = {1: "image", 2: "video"}.get(int(inputs["mm_token_type_ids"][b, column]))
            if modality not in kept:
                columns.append(column)
                sources.append(column)
                continue
            index = item[modality]
            placeholders.setdefault((modality, index), []).append(column)
            if seen[modality] in kept[modality][index].tolist():
                columns.append(column)
                sources.append((modality, index))
            seen[modality] += 1
            if seen[modality] == len(encoded[modality].pooler_output[index]):
                picked[modality].append(index)
                item[modality], seen[modality] = index + 1, 0
        queues = {key: [placed[o] for o in kept[key[0]][key[1]].tolist()] for key, placed in placeholders.items()}
        sources = [source if isinstance(source, int) else queues[source].pop(0) for source in sources]
        rows.append(
            {
                "input_ids": row[columns][None],
                "attention_mask": torch.ones(1, len(columns), dtype=torch.long),
                "mm_token_type_ids": inputs["mm_token_type_ids"][b, columns][None],
                "position_ids": positions[:, b : b + 1, sources],
                "mm_encoder_outputs": {m: _kept_output(encoded[m], picked[m], kept[m]) for m in kept if picked[m]},
            }
        )
    return rows


def _kept_output(encoded, items: list[int], kept: list[torch.Tensor]):
    features = [encoded.pooler_output[i][kept[i]] for i in items]
    if getattr(encoded, "deepstack_features", None) is None:
        return BaseModelOutputWithPooling(pooler_output=features)
    levels = [[level[i][kept[i]] for i in items] for level in encoded.deepstack_features]
    return BaseModelOutputWithDeepstackFeatures(pooler_output=features, deepstack_features=levels)


def rotate(visual):
    """The tower's own rotary function for q and k."""
    return sys.modules[type(visual).__module__].apply_rotary_pos_emb_vision


@torch.no_grad()
def block_inputs(visual, pixels, grid) -> tuple[torch.Tensor, list[dict]]:
    """The hidden states the tower's first block gets on these pixels, and every block's keyword arguments
    (`cu_seqlens`, rotary `position_embeddings`), from one unpruned run of the tower."""
    calls = {}

    def keep(index):
        def hook(module, args, kwargs):
            calls[index] = (args[0] if args else kwargs["hidden_states"], kwargs)

        return hook

    handles = [block.register_forward_pre_hook(keep(i), with_kwargs=True) for i, block in enumerate(visual.blocks)]
    try:
        visual(pixels, grid_thw=grid)
    finally:
        for handle in handles:
            handle.remove()
    return calls[0][0], [calls[i][1] for i in range(len(visual.blocks))]


def segments(bounds: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The attention segments (`cu_seqlens`) of the `present` tokens, those left empty dropped."""
    owner = torch.bucketize(present, bounds[1:].long(), right=True)
    counts = torch.bincount(owner)
    return torch.nn.functional.pad(counts[counts > 0].cumsum(0), (1, 0)).to(torch.int32)


def raster_units(visual, grid) -> torch.Tensor:
    """For each unit in the tower's order, its index in raster order (Qwen2.5-VL runs units in window order)."""
    if not hasattr(visual, "window_size"):
        return torch.arange(int(grid.prod()) // 4)
    return get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)[0]


def merge_units(visual, tokens: torch.Tensor) -> torch.Tensor:
    """`[n, out]`: the tower's merge of `n` units' tokens `[4n, D]` (each unit's 4 consecutive): Qwen's merger, or
    GLM-4.1V's norm, 2x2 convolution and merger."""
    if not hasattr(visual, "downsample"):
        return visual.merger(tokens)
    units = visual.post_layernorm(tokens).view(-1, 2, 2, tokens.shape[-1]).permute(0, 3, 1, 2)
    return visual.merger(visual.downsample(units).view(len(units), -1))


def full_length(values: torch.Tensor, units: torch.Tensor, raster: torch.Tensor) -> torch.Tensor:
    """Per-unit `values` of tower `units`, at their raster places among all `len(raster)` units, zeros elsewhere."""
    out = values.new_zeros(len(raster), values.shape[-1])
    out[raster[units]] = values
    return out


@torch.no_grad()
def flowcut_by_hand(model, pixels, grid, keep: int):
    """FlowCut on one image of a Qwen-VL tower, as a loop over its blocks that slices the kept merge units out
    of the hidden states, rotary embeddings and attention segments. vtprune's decisions for towers without CLS
    and with merge units: mean query and mean value rows; a unit scores the mean of its 4 tokens' scores and
    its attention (for the entropy) is their sum; Qwen2.5-VL scores and cuts only at full-attention blocks.
    Returns (kept units in raster order, the image's features at full length, its deepstack features)."""
    visual = model.model.visual
    hidden, calls = block_inputs(visual, pixels, grid)
    raster = raster_units(visual, grid)
    full = getattr(visual, "fullatt_block_indexes", None) or range(len(visual.blocks))
    schedule = [layer for layer in range(len(visual.blocks) - 1) if layer in full]
    deepstack = getattr(visual, "deepstack_visual_indexes", [])
    present, cumulative, levels = torch.arange(len(hidden)), None, []
    for index, block in enumerate(visual.blocks):
        cos, sin = (t[present] for t in calls[index]["position_embeddings"])
        x = block.norm1(hidden)
        hidden = block(hidden, cu_seqlens=segments(calls[index]["cu_seqlens"], present), position_embeddings=(cos, sin))
        units = len(present) // 4
        if index in schedule and units > keep:
            attention = block.attn
            q, k, v = attention.qkv(x).reshape(len(x), 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = rotate(visual)(q, k, cos, sin)
            relation = torch.einsum("hd,nhd->hn", q.mean(0), k).mul(attention.scaling).softmax(-1).mean(0)
            semantic = torch.einsum("hd,nhd->hn", v.mean(0), v).softmax(-1).mean(0)
            relation, semantic = relation / relation.sum(), semantic / semantic.sum()
            scores = ((relation + semantic) * v.mean(1).abs().sum(-1)).view(-1, 4).mean(1)
            cumulative = scores if cumulative is None else 0.5 * cumulative + 0.5 * scores
            left = sum(later > index for later in schedule)
            if left % 2 == 0:
                if left:
                    mass = relation.view(-1, 4).sum(1)
                    entropy = -torch.special.xlogy(mass, mass).sum() / math.log(units)
                    prune = int(((units - keep) / left**0.5 * (1 - entropy**2)).round())
                else:
                    prune = units
                order = cumulative.topk(max(units - prune, keep)).indices.sort().values
                tokens = (order[:, None] * 4 + torch.arange(4)).flatten()
                hidden, present, cumulative = hidden[tokens], present[tokens], cumulative[order]
        if index in deepstack:
            merger = visual.deepstack_merger_list[deepstack.index(index)]
            levels.append(full_length(merger(hidden), present[::4] // 4, raster))
    features = full_length(merge_units(visual, hidden), present[::4] // 4, raster)
    return raster[present[::4] // 4].sort().values, features, levels


@torch.no_grad()
def visionzip_by_hand(model, pixels, grid, dominant: int, contextual: int):
    """VisionZip on one image of a Qwen-VL tower, per merge unit: the mean query's attention (head mean) at the
    last block, a unit's the mean of its tokens'; the `dominant` top units, then `contextual` evenly strided
    targets among the rest (tower order), each absorbing the units whose mean head-mean keys are most similar.
    Returns (units in the LLM's order, raster numbered; the image's features at full length; deepstack)."""
    visual = model.model.visual
    hidden, calls = block_inputs(visual, pixels, grid)
    raster = raster_units(visual, grid)
    deepstack = getattr(visual, "deepstack_visual_indexes", [])
    levels = []
    for index, block in enumerate(visual.blocks):
        cos, sin = calls[index]["position_embeddings"]
        x = block.norm1(hidden)
        hidden = block(hidden, cu_seqlens=calls[index]["cu_seqlens"], position_embeddings=(cos, sin))
        if index in deepstack:
            merger = visual.deepstack_merger_list[deepstack.index(index)]
            levels.append(full_length(merger(hidden), torch.arange(len(raster)), raster))
    attention = block.attn
    q, k, _ = attention.qkv(x).reshape(len(x), 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rotate(visual)(q, k, cos, sin)
    scores = torch.einsum("hd,nhd->hn", q.mean(0), k).mul(attention.scaling).softmax(-1).mean(0).view(-1, 4).mean(1)
    keys = k.mean(1).view(len(raster), 4, -1).mean(1)
    units = hidden.reshape(len(raster), -1)
    chosen = scores.topk(dominant).indices.sort().values
    rest = torch.tensor([u for u in range(len(raster)) if u not in chosen.tolist()])
    picks = list(range(0, len(rest), max(1, len(rest) // contextual)))[:contextual]
    targets, others = rest[picks], rest[[i for i in range(len(rest)) if i not in picks]]
    unit_keys = torch.nn.functional.normalize(keys, dim=-1)
    nearest = (unit_keys[others] @ unit_keys[targets].T).argmax(1)
    merged = torch.stack(
        [units[t] + (units[others[nearest == j]].mean(0) if (nearest == j).any() else 0) for j, t in enumerate(targets)]
    )
    tokens = torch.cat([units[chosen], merged]).reshape(-1, hidden.shape[-1])
    order = torch.cat([chosen, targets])
    return raster[order], full_length(merge_units(visual, tokens), order, raster), levels

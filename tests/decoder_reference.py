"""A hand-written decoder loop with cuts, and the papers' selections computed from eager attentions.

Independent of vtprune's engine and probes: one row at a time, no padding, every layer run by hand
(norm, HF's own eager attention with a mask built here, MLP), attention weights taken from the eager
attention module's output, token transitions computed from the sublayers' inputs and outputs.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LoopState:
    """What a selection sees before the layer it cuts at, for one row."""

    layer: int
    hidden: torch.Tensor  # [1, L, D], the layer's input
    positions: torch.Tensor  # [1, L]
    images: torch.Tensor  # [L]: image index of each visual token, -1 for text
    attentions: dict[int, torch.Tensor]  # layer -> [H, L, L] eager post-softmax weights of the layers run so far
    transitions: torch.Tensor  # [L]: TransPrune TTV summed over the transition layers run so far
    keys: dict[int, torch.Tensor]  # layer -> [H_kv, L, d] keys after RoPE (what the layer caches) of the layers run


Select = Callable[[LoopState, int], torch.Tensor]
"""(state, image) -> sorted indices (among that image's current tokens) to keep."""


BIDIRECTIONAL_IMAGES = ("gemma3",)
"""Families whose image tokens attend to every token of their own image (Gemma 3's `token_type_ids` blocks)."""


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(1, 1, *allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def layer_mask(model, index: int, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask of decoder layer `index` over one row of tokens (`images` per token, -1 for text), written out:
    causal; each image's tokens see each other where the family says so; within the layer's sliding window."""
    length = len(images)
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    if model.config.model_type in BIDIRECTIONAL_IMAGES:
        allowed |= (images[:, None] == images[None, :]) & (images[:, None] >= 0)
    window = getattr(model.model.language_model.layers[index].self_attn, "sliding_window", None)
    if window is not None:
        slots = torch.arange(length)
        allowed &= slots[None, :] > slots[:, None] - window
    return additive(allowed, dtype)


def rotary(text, hidden: torch.Tensor, positions: torch.Tensor, index: int):
    """(cos, sin) of decoder layer `index` (per layer type where the model has several, as Gemma 3)."""
    layer_types = getattr(text.config, "layer_types", None)
    if "layer_type" in inspect.signature(text.rotary_emb.forward).parameters:
        return text.rotary_emb(hidden, positions, layer_types[index])
    return text.rotary_emb(hidden, positions)


def ttv(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """TransPrune's `compute_transf_weight` for a batch of one: `[L]`."""
    ratio = after.norm(dim=-1) / before.norm(dim=-1)
    necessity = torch.exp(1 - torch.nn.functional.cosine_similarity(before, after, dim=-1))
    return (ratio * necessity / necessity.sum())[0]


@torch.no_grad()
def run(
    model,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    images: torch.Tensor,
    cuts: dict[int, Select | list[torch.Tensor]],
    transition_layers: tuple[int, ...] = (),
    contiguous: bool = False,
    added: list[torch.Tensor] = (),
) -> tuple[torch.Tensor, dict[int, list[torch.Tensor]]]:
    """Logits `[L_final, V]` of one row, cut before each layer in `cuts`, and per cut the kept indices of
    each image (among its tokens at the decoder's entry). A cut is a selection, or per image the indices
    (at the decoder's entry) to keep. `added[i]` is added to the visual tokens after layer i (Qwen3-VL's
    deepstack features)."""
    text = model.model.language_model
    hidden, images = embeds, images.clone()
    entry = torch.full_like(images, -1)
    for image in images.unique():
        if image >= 0:
            entry[images == image] = torch.arange(int((images == image).sum()))
    attentions, keys, transitions, chosen = {}, {}, torch.zeros(images.shape), {}
    for index, layer in enumerate(text.layers):
        if index in cuts:
            state = LoopState(index, hidden, positions, images, attentions, transitions, keys)
            keep = images < 0
            chosen[index] = []
            for image in range(int(images.max()) + 1 if (images >= 0).any() else 0):
                members = (images == image).nonzero().squeeze(1)
                cut = cuts[index]
                if isinstance(cut, list):  # forced: indices among the image's tokens at the decoder's entry
                    kept = torch.isin(entry[members], cut[image]).nonzero().squeeze(1)
                else:
                    kept = cut(state, image)
                chosen[index].append(entry[members[kept]])
                keep[members[kept]] = True
            dropped_before = torch.cumsum((~keep).long(), 0)
            hidden, images, entry, transitions = hidden[:, keep], images[keep], entry[keep], transitions[keep]
            positions = positions[..., keep] - (dropped_before[keep] if contiguous else 0)
        cos_sin = rotary(text, hidden, positions, index)
        mask = layer_mask(model, index, images, hidden.dtype)
        normed = layer.input_layernorm(hidden)
        attended, weights = layer.self_attn(hidden_states=normed, position_embeddings=cos_sin, attention_mask=mask)
        attentions[index] = weights[0]
        keys[index] = rotated_keys(layer.self_attn, normed, *cos_sin)
        attention_norm, mlp_norm, mlp_out_norm = _norms(layer)
        middle = hidden + _post_norm(layer, attention_norm, attended)
        normed_middle = getattr(layer, mlp_norm)(middle)
        transformed = layer.mlp(normed_middle)
        hidden = middle + _post_norm(layer, mlp_out_norm, transformed)
        if index < len(added):
            hidden[0, images >= 0] += added[index]
        if index in transition_layers:
            transitions = transitions + ttv(normed, attended) + ttv(normed_middle, transformed)
    logits = model.lm_head(text.norm(hidden))[0]
    return logits, chosen


def _norms(layer) -> tuple[str, str, str]:
    """The names of a layer's norm of its attention's output, of its MLP's input, and of its MLP's output: Gemma 3
    norms both sublayers' outputs and has a norm before the MLP, GLM-4 calls them otherwise, Llama has the
    MLP's input norm alone."""
    if hasattr(layer, "pre_feedforward_layernorm"):
        return "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"
    return "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"


def _post_norm(layer, name: str, output: torch.Tensor) -> torch.Tensor:
    """A sublayer's output under the layer's norm of it, where it has one."""
    norm = getattr(layer, name, None)
    return output if norm is None else norm(output)


def rotated_keys(attention, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`[H_kv, L, d]`: one row's keys as the attention makes them (projection, then its modeling file's RoPE)."""
    keys = attention.k_proj(normed).view(normed.shape[1], -1, attention.head_dim).transpose(0, 1)
    rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    return rotate(keys[None], keys[None], cos, sin)[1][0]


def fastv(layer: int, keep: int) -> Select:
    """FastV: the last token's head-mean attention at layer K-1, top-k, sorted."""

    def select(state: LoopState, image: int) -> torch.Tensor:
        row = state.attentions[layer - 1].mean(0)[-1]
        scores = row[state.images == image]
        return scores.topk(min(keep, len(scores))).indices.sort().values

    return select


def instruction_attention(model, state: LoopState) -> torch.Tensor:
    """`[L]`: head-mean attention of the layer about to run (its own q/k on the current hidden states),
    averaged over the tokens after the last visual token (TransPrune's IGA queries)."""
    layer = model.model.language_model.layers[state.layer]
    cos_sin = rotary(model.model.language_model, state.hidden, state.positions, state.layer)
    mask = layer_mask(model, state.layer, state.images, state.hidden.dtype)
    _, weights = layer.self_attn(
        hidden_states=layer.input_layernorm(state.hidden), position_embeddings=cos_sin, attention_mask=mask
    )
    last_visual = int((state.images >= 0).nonzero().max())
    return weights[0].mean(0)[last_visual + 1 :].mean(0)


def transition(model, count: int) -> Select:
    """TransPrune at one cut keeping `count`: normalised TTV + normalised IGA over the image's tokens, top-k, sorted."""

    def select(state: LoopState, image: int) -> torch.Tensor:
        members = state.images == image
        ttv_scores = state.transitions[members]
        iga = instruction_attention(model, state)[members]
        scores = ttv_scores / (ttv_scores.sum() + 1e-8) + iga / (iga.sum() + 1e-8)
        return scores.topk(min(count, int(members.sum()))).indices.sort().values

    return select


def dart(model, layer: int, keep: int, pivot_image: int = 4, pivot_text: int = 4) -> Select:
    """DART's loop (`modeling_llama_self.py`) on one row: pivots by the L1 norm of layer K-1's rotated keys (over
    heads, repeated to the query heads as the official's `repeat_kv` does), iterated in `list(set(...))` order of
    their row indices; each takes the tokens of the pool least similar to it (cosine, under the final norm). The
    official gives every pivot `(keep - pivot_image) // pivots`; past that count, the first pivots take one more."""

    def select(state: LoopState, image: int) -> torch.Tensor:
        text_model = model.model.language_model
        heads = text_model.config.num_attention_heads // text_model.config.num_key_value_heads
        keys = state.keys[layer - 1].repeat_interleave(heads, 0)  # [H, L, d]
        norms = keys.transpose(0, 1).reshape(keys.shape[1], -1).float().norm(p=1, dim=-1)
        hidden = text_model.norm(state.hidden)[0].float()
        members = (state.images == image).nonzero().squeeze(1)
        after = torch.arange(len(state.images)) > members.max()
        text = (after & (state.images < 0)).nonzero().squeeze(1)
        image_pivots = members[norms[members].topk(min(pivot_image, keep)).indices].tolist()
        text_pivots = text[norms[text].topk(min(pivot_text, len(text))).indices].tolist()
        pivots = list(set(image_pivots + text_pivots))
        share, extra = divmod(keep - len(image_pivots), len(pivots))
        pool = sorted(set(members.tolist()) - set(image_pivots))
        kept = list(image_pivots)
        for place, pivot in enumerate(pivots):
            count = share + (place < extra)
            if count == 0 or keep == len(image_pivots):
                continue
            similarity = F.cosine_similarity(hidden[pivot][None], hidden[pool], dim=-1)
            taken = [pool[i] for i in (-similarity).topk(count).indices.tolist()]
            kept += taken
            pool = sorted(set(pool) - set(taken))
        local = {token: i for i, token in enumerate(members.tolist())}
        return torch.tensor(sorted(local[token] for token in kept))

    return select

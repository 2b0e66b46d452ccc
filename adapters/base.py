"""What every model-family adapter provides to the pruning engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vtprune import hf
from vtprune.crops import CropLayout
from vtprune.decoder_probes import rotate_half
from vtprune.probes import AttentionProbe, AttentionProjections, ProjectorProbe
from vtprune.signals import VisionLayout
from vtprune.tower import TowerPruning
from vtprune.tower_hooks import TowerHooks


@dataclass(frozen=True)
class DecoderParts:
    """The modules of one LLM decoder layer that the in-decoder engine hooks or recomputes attention with."""

    attention: nn.Module
    mlp: nn.Module
    input_norm: nn.Module
    """The norm the attention's input goes through."""
    q_proj: nn.Module
    k_proj: nn.Module
    q_norm: nn.Module | None
    """Per-head norms of queries and keys before RoPE (Qwen3), None where the layer has none."""
    k_norm: nn.Module | None
    head_dim: int
    scaling: float
    rotate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = rotate_half
    """RoPE as the layer applies it: `[B, H, N, d]` queries or keys, and `cos`, `sin` as the LLM's rotary embedding
    gives them (`[B, N, rotary dims]`)."""
    window: int | None = None
    """The layer's sliding window (a query sees the keys less than `window` slots before it), None for global."""


class Adapter:
    """Knows one model family: where its vision layers, placeholders and positions are.

    An adapter never knows which policy runs. Subclasses set `model_types` and fill the attributes
    in `__init__`, raising `TypeError` with the fix when a model of that type is built in a way
    they cannot handle.
    """

    model_types: ClassVar[tuple[str, ...]]
    modalities: ClassVar[dict[str, tuple[str, ...]]]
    """Per modality ('image', 'video'), the keyword arguments of `forward`/`generate` its encoder consumes; the
    first is the pixels, whose presence means the call carries that modality."""
    token_inputs: ClassVar[tuple[str, ...]] = ()
    """Per-token `[B, L]` inputs that are pruned in step with `input_ids` (padding gets 0)."""
    multi_row_positions: ClassVar[bool] = False
    """Whether position ids carry several rows (M-RoPE), which only keep their original values."""
    first_cut_layer: int = 1
    """The lowest decoder layer an in-decoder cut may come before (Qwen3-VL adds deepstack features below it)."""

    layout: VisionLayout
    placeholders: dict[str, int]
    """Per modality, the token id of its placeholders in `input_ids`."""
    pad_token_id: int
    probe_query: str
    """'cls' or 'mean': which query row scores the visual tokens."""
    pool_scores: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Where an LLM token is a group of tower tokens after the tower (InternVL's pixel shuffle): per-token scores
    `[crops, tower tokens]` -> per LLM token, as `AttentionProbe`'s `pool`; None where they are one to one."""
    token_offset: int
    """Index, in the tower's token sequence, of the first visual token given to the LLM."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def backbone(self) -> nn.Module:
        """The VLM's inner model: `forward` and `generate` call it with the prompt, the images and the cache."""
        return self.model.model

    def decoder_parts(self, index: int) -> DecoderParts:
        """The parts of decoder layer `index` (Llama, Qwen2 and Qwen3 anatomy)."""
        layer = self.decoder_layers[index]
        attention = layer.self_attn
        return DecoderParts(
            attention=attention,
            mlp=layer.mlp,
            input_norm=layer.input_layernorm,
            q_proj=attention.q_proj,
            k_proj=attention.k_proj,
            q_norm=getattr(attention, "q_norm", None),
            k_norm=getattr(attention, "k_norm", None),
            head_dim=attention.head_dim,
            scaling=attention.scaling,
            window=self.layer_window(index),
        )

    def layer_window(self, index: int) -> int | None:
        """Decoder layer `index`'s sliding window in slots (Gemma 3's local layers), None where it attends globally."""
        return getattr(self.decoder_layers[index].self_attn, "sliding_window", None)

    def resolve_calls(self) -> None:
        """Resolve how the vision tower's hooked modules are called, when the model is patched: a convention
        vtprune does not know is refused (`hf.UnsupportedTransformers`) before the model is touched."""
        self.tower_call = hf.bind(self.encoder_layers[0], hf.TOWER_LAYER)
        self.projector_call = hf.bind(self.projector, hf.SUBLAYER)

    @property
    def vision_inputs(self) -> tuple[str, ...]:
        """Every keyword argument the vision encoders consume."""
        return tuple(name for names in self.modalities.values() for name in names)

    encoder_layers: nn.ModuleList
    """The vision encoder's layers, in order."""
    projector: nn.Module
    """The module that maps the tower's visual tokens `[crops, tokens, width]` to the LLM's width."""
    text_model: nn.Module
    """The LLM's decoder stack (the module holding `layers` and `rotary_emb`)."""

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers, in order."""
        return self.text_model.layers

    @property
    def attention_implementation(self) -> str:
        """The attention backend the LLM runs with now ('sdpa', 'eager', ...)."""
        return hf.attention_implementation(self.text_model.config)

    def modality_mask(self, input_ids: torch.Tensor, modality: str) -> torch.Tensor:
        """`[B, L]` bool: the placeholders of `modality` in `input_ids`."""
        return input_ids == self.placeholders[modality]

    def placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[B, L]` bool: the placeholders of every modality in `input_ids`."""
        return torch.isin(input_ids, torch.tensor(list(self.placeholders.values()), device=input_ids.device))

    @property
    def final_norm(self) -> nn.Module:
        """The norm the LLM applies after its last layer."""
        return self.text_model.norm

    def rotary_embedding(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for `position_ids`, as the LLM computes them before its layers, for decoder layer `layer`."""
        return self.text_model.rotary_emb(hidden, position_ids)

    def attention_projections(self, layers: tuple[int, ...]) -> dict[int, AttentionProjections]:
        raise NotImplementedError

    def attention_probe(
        self, rows: tuple[int, ...], columns: tuple[int, ...], layout: CropLayout, vision_inputs: dict[str, Any]
    ) -> AttentionProbe:
        """A probe capturing query rows at `rows` and received attention at `columns` (0-based layers) for the
        crops of `layout`, as `[crops, crop_tokens]` per layer."""
        projections = self.attention_projections(tuple(sorted({*rows, *columns})))
        return AttentionProbe(projections, rows, columns, self.probe_query, pool=self.pool_scores)

    def projector_probe(self, layout: CropLayout, vision_inputs: dict[str, Any]) -> ProjectorProbe:
        """A probe capturing the tower's features of the crops of `layout` as the projector receives them, as
        `[crops, crop_tokens, width]`."""
        return ProjectorProbe(self.projector, self.projector_call)

    def tower_hooks(self, pruning: TowerPruning, layout: CropLayout, vision_inputs: dict[str, Any]) -> TowerHooks:
        """Hooks that drive `pruning` (one row per crop of `layout`) through the tower's next run."""
        projections = self.attention_projections(pruning.layers)
        projector = (self.projector, self.projector_call)
        return TowerHooks(pruning, self.encoder_layers, self.tower_call, projections, projector, layout.crop_tokens)

    def crop_layout(
        self, vision_inputs: dict[str, Any], modality: str, temporal: str, input_ids: torch.Tensor | None = None
    ) -> CropLayout:
        """How the crops the tower runs on make up each item's (image's, video's) visual tokens; a video's frame
        groups are crops of their own (`temporal="per_frame"`) or one crop together (`"joint"`). `input_ids`, where
        the runtime has the prompt, is for families whose vision inputs do not say how many crops each item has."""
        raise NotImplementedError

    def encode(self, vision_inputs: dict[str, Any], modality: str) -> list[torch.Tensor]:
        """Run the vision tower and projector once: one `[n_tokens, hidden]` tensor per item."""
        raise NotImplementedError

    def encoder_output(self, features: list[torch.Tensor], orders: list[torch.Tensor], modality: str) -> Any:
        """Pruned features (item i's are its last `encode` features at `orders[i]`) as `forward`'s
        `mm_encoder_outputs[modality]` takes them; families with more per-token outputs prune them alike."""
        raise NotImplementedError

    def default_positions(self, call: dict[str, Any], past_length: int, for_generate: bool) -> torch.Tensor:
        """The position ids the unpatched model would use for the call's inputs (`input_ids`, `attention_mask`,
        the vision inputs): `[B, L]`, or `[rows, B, L]`."""
        raise NotImplementedError

    def kept_positions(self, positions: torch.Tensor, attention_mask: torch.Tensor, for_generate: bool) -> torch.Tensor:
        """Positions of the pruned prompt from the kept tokens' original ones (`attention_mask` is the pruned one)."""
        return positions


def pad_token_id(model: nn.Module, image_token_id: int) -> int:
    """A padding id for rebuilt prompts: the model's own, never the image placeholder."""
    for source in (model.config, model.config.text_config, model.generation_config):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int) and pad != image_token_id:
            return pad
    return 0 if image_token_id != 0 else 1

"""What a policy may know about a model, and the signals it asks for and receives.

Policies are pure tensor functions of these types: they never see a model, an adapter or a module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisionLayout:
    """The shape of a vision tower, as far as a policy needs it."""

    num_layers: int
    feature_layer: int
    """0-based index of the encoder layer whose output becomes the visual tokens."""
    has_cls: bool
    """Whether the tower has a CLS token (token 0) whose attention row can score patches."""
    token_offset: int = 0
    """Tower tokens before the first visual token: 1 where the CLS token is not passed to the LLM."""
    full_attention: tuple[int, ...] | None = None
    """0-based layers whose attention spans a whole image (Qwen2.5-VL's others attend within windows); None: all."""

    def attends_fully(self, layer: int) -> bool:
        return self.full_attention is None or layer in self.full_attention

    def full_layer_from(self, layer: int) -> int:
        """The first layer at or after `layer` whose attention spans the whole image (the feature layer at most)."""
        later = [full for full in range(layer, self.feature_layer + 1) if self.attends_fully(full)]
        return later[0] if later else self.feature_layer


@dataclass(frozen=True)
class SignalRequest:
    """The signals a policy needs from the vision tower."""

    attention_rows: tuple[int, ...] = ()
    """0-based vision layers whose CLS attention row (head mean, softmax over all tokens) is needed."""
    received_attention: tuple[int, ...] = ()
    """0-based vision layers whose attention received per token (mean over all queries and heads) is needed."""
    features: bool = False
    """Whether the policy needs the image's projected features (what the LLM would see)."""
    tower_features: bool = False
    """Whether the policy needs the tower's features of each visual token, as the projector receives them (on
    Qwen-VL, a merge unit's patches concatenated)."""
    instruction: bool = False
    """Whether the policy needs the instruction: the row's text tokens after the image (ids and LLM embeddings)."""


@dataclass(frozen=True)
class ImageSignals:
    """The signals captured for one image."""

    n_tokens: int
    attention_rows: torch.Tensor | None = None
    """`[len(request.attention_rows), n_tokens]` float32: the CLS query's attention to each visual token."""
    received_attention: torch.Tensor | None = None
    """`[len(request.received_attention), n_tokens]` float32: attention each visual token receives."""
    grid: tuple[int, int] | None = None
    """(rows, cols) of the image's token grid, raster order, where it has one."""
    features: torch.Tensor | None = None
    """`[n_tokens, hidden]`: the image's projected features, where the request asks for them."""
    tower_features: torch.Tensor | None = None
    """`[n_tokens, width]`: the tower's features of the visual tokens before the projector, where asked for."""
    instruction_ids: torch.Tensor | None = None
    """`[M]`: the token ids of the row's text after the image (no placeholders, no padding), where asked for."""
    instruction: torch.Tensor | None = None
    """`[M, hidden]`: the LLM's input embeddings of `instruction_ids`."""
    image: int = 0
    """The item of the call these tokens belong to: the crops of one image share it."""


@dataclass(frozen=True)
class Selection:
    """What a policy keeps of one image."""

    kept: torch.Tensor
    """Sorted `LongTensor` of kept visual-token indices."""
    scores: torch.Tensor | None = None
    """One float per visual token, or None where the policy has no score."""
    details: tuple[tuple[str, str], ...] = ()
    """(name, value) facts about how the policy selected, recorded in the trace (e.g. the relevance source)."""
    order: torch.Tensor | None = None
    """Where the LLM's tokens for this image take their positions from, in sequence order: a permutation of
    `kept` for policies whose output is not in raster order (VisionZip's merged tokens come last); None
    means `kept` itself."""

    @property
    def delivered(self) -> torch.Tensor:
        """The kept tokens in the order the LLM gets them."""
        return self.kept if self.order is None else self.order


@dataclass(frozen=True)
class DecoderCut:
    """One in-decoder cut: visual tokens dropped before decoder `layer` runs, scored from what came before."""

    layer: int
    """0-based decoder layer that is the first to run on the cut sequence."""
    attention_layer: int | None = None
    """0-based layer whose own q/k, applied to its input, give the attention signal; None: no attention."""
    queries: str = "last"
    """Which tokens' attention rows are averaged: 'last' (the row's last prompt token) or 'instruction'
    (every prompt token after the row's last visual token)."""
    transitions: tuple[int, ...] = ()
    """0-based layers whose token transitions (TransPrune's TTV) are summed into the transition signal."""
    key_layer: int | None = None
    """0-based layer whose post-RoPE keys, applied to its input, give each token's key L1 norm; None: none."""
    states: bool = False
    """Whether the cut sees the hidden states entering its layer under the LLM's final norm (DART's duplication
    space), with the text after each image (its key norms and states) beside the image's own."""


@dataclass(frozen=True)
class CutSignals:
    """The signals of one image's remaining visual tokens at a cut, in sequence order."""

    n_tokens: int
    attention: torch.Tensor | None = None
    """`[n_tokens]` float32: attention received from the cut's queries (head mean, query mean)."""
    transitions: torch.Tensor | None = None
    """`[n_tokens]` float32: token transitions summed over the cut's `transitions` layers run so far."""
    key_norms: torch.Tensor | None = None
    """`[n_tokens]` float32: L1 norm of each token's post-RoPE keys over every head at the cut's `key_layer`."""
    states: torch.Tensor | None = None
    """`[n_tokens, hidden]` float32: the tokens' hidden states entering the cut's layer, under the final norm."""
    rows: torch.Tensor | None = None
    """`[n_tokens]` long: each token's index in its row without padding (as a batch-of-one prompt numbers it)."""
    text_key_norms: torch.Tensor | None = None
    """`[m]`: `key_norms` of the row's m real text tokens after the image (with `states`)."""
    text_states: torch.Tensor | None = None
    """`[m, hidden]`: `states` of those text tokens."""
    text_rows: torch.Tensor | None = None
    """`[m]`: `rows` of those text tokens."""

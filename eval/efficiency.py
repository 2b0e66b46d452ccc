"""What a generate call cost: time to first token, decode speed, and analytic prefill FLOPs and KV-cache bytes.

FLOPs and cache sizes are analytic, from the model's config and the token counts each decoder layer
ran on (`Trace.layer_tokens` per image, plus the prompt's text tokens), so they are exact for what
pruning changed and independent of the machine. Times are measured around the real `generate`.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LogitsProcessor


class Clock(LogitsProcessor):
    """A logits processor that only notes when each decoding step's logits arrive.

    The first arrival ends prefill (vision tower, pruning and the prompt's forward): time to first
    token. Later arrivals time the decode steps.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.arrivals: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.is_cuda:
            torch.cuda.synchronize(scores.device)
        self.arrivals.append(time.perf_counter())
        return scores

    @property
    def first_token_seconds(self) -> float:
        return self.arrivals[0] - self.start

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Decode steps per second after the first token (per sequence; None with a single step)."""
        if len(self.arrivals) < 2:
            return None
        return (len(self.arrivals) - 1) / (self.arrivals[-1] - self.arrivals[0])


@dataclass(frozen=True)
class DecoderShape:
    """What prefill cost scales with, read off a model's text config and decoder layers."""

    layers: int
    hidden: int
    layer_weights: tuple[int, ...]
    """Per decoder layer, the matrix weights one token goes through (attention and MLP projections; of a sparse
    MoE block, the router and the experts it is routed to): 2 FLOPs each per token."""
    kv_width: int
    """Key (and value) width per token and layer: key-value heads x head dim."""

    @classmethod
    def of(cls, decoder_layers: nn.ModuleList, text_config) -> DecoderShape:
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        routed = getattr(text_config, "num_experts_per_tok", None)
        weights = tuple(_active_weights(layer, routed) for layer in decoder_layers)
        return cls(len(decoder_layers), heads * head_dim, weights, kv_heads * head_dim)

    def prefill_flops(self, layer_tokens: list[int]) -> float:
        """Forward FLOPs of the decoder layers on `layer_tokens[l]` tokens each: projections, plus causal
        attention scores and weighted values (2 x n^2/2 x width x 2)."""
        layers = zip(layer_tokens, self.layer_weights, strict=True)
        return float(sum(2 * n * weights + 2 * n * n * self.hidden for n, weights in layers))

    def cache_bytes(self, layer_tokens: list[int], element_size: int) -> int:
        """Bytes of keys and values the prompt leaves in the cache."""
        return sum(2 * n * self.kv_width * element_size for n in layer_tokens)


def _active_weights(layer: nn.Module, routed: int | None) -> int:
    """Weights of a layer's matrices one token is multiplied by: every 2-D weight, and of experts stacked in 3-D
    weights `[experts, out, in]` (sparse MoE blocks), the `routed` experts' share."""
    total = 0
    for parameter in layer.parameters():
        if parameter.dim() == 2:
            total += parameter.numel()
        elif parameter.dim() == 3 and routed:
            total += parameter.numel() // parameter.shape[0] * routed
    return total


def sequence_layer_tokens(text_tokens: int, image_layer_tokens: list[tuple[int, ...]], layers: int) -> list[int]:
    """Tokens one prompt holds in each decoder layer: its text tokens plus each image's visual tokens there."""
    return [text_tokens + sum(tokens[layer] for tokens in image_layer_tokens) for layer in range(layers)]


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocated on the GPU, or the process's peak resident size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024

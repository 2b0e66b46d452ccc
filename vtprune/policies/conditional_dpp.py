"""`conditional_dpp`: CDPruner (arXiv 2506.10967, NeurIPS 2025): a DPP over the visual tokens conditioned on the
instruction, solved by fast greedy MAP inference after the projector.

As the official code (`llava/model/llava_arch.py`): the similarity is the cosine of the projected features (what
the LLM would see); each token's quality is its relevance to the instruction, min-max normalised over the image's
tokens (+1e-6 in the numerator); the kernel is `L = diag(q) S diag(q)`, and `keep` tokens are picked greedily by
the incremental Cholesky update, kept in raster order.

The relevance (`relevance`): `"clip"` is the paper's: the negated cosine, averaged over the instruction's
77-token segments, between CLIP's joint-space image embeddings of the tower's feature-layer patches and its text
embeddings of the instruction (needs `clip_model`, the CLIP checkpoint the VLM's tower comes from, and the VLM's
`tokenizer` to give CLIP the instruction's text). `"llm"`, vtprune's fallback where there is no paired CLIP (SigLIP
towers, Qwen-VL, no `clip_model`): the cosine between the projected features and the LLM's input embeddings of the
instruction tokens, averaged over them. `"none"`: r = 1, a plain DPP on similarity. `"auto"`: "clip" where
`clip_model` is given, else "llm". The trace records the source used (`details`). The instruction is the row's
text after the image (the official passes the bare question). `theta` (the paper's trade-off, commented out in
the official code) gives `q = exp(theta / (2 (1 - theta)) r)`; None uses r itself, as the code ships.

vtprune's decisions (policies-more.md): float32 throughout; relevance normalised per image (over its crops on
LLaVA-NeXT), never over the batch; when the kernel is exhausted (`keep` above its rank, or duplicates) the
remaining picks are the unpicked tokens by quality (the official goes NaN, or picks
near-duplicates by float32 noise); ties to the lowest index.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from vtprune.clip_relevance import clip_space, text_tokenizer
from vtprune.kernels import dpp_greedy
from vtprune.registry import Policy, register
from vtprune.signals import ImageSignals, Selection, SignalRequest, VisionLayout

RELEVANCES = ("auto", "clip", "llm", "none")
EPSILON = 1e-6
"""Added to the numerator of the min-max normalisation, as the official code does."""


@register(
    "conditional_dpp",
    stage="vision",
    description="CDPruner: greedy MAP of a DPP on the projected features, each token weighted by its relevance to "
    "the instruction (CLIP's joint space, or the LLM's embeddings)",
)
class ConditionalDPP(Policy):
    relevance: str = "auto"
    """Where the instruction relevance comes from: 'clip', 'llm', 'none' or 'auto' ('clip' with clip_model)."""
    clip_model: Any = None
    """For 'clip': a transformers CLIPModel, or the path of its checkpoint, whose vision tower is the VLM's."""
    tokenizer: Any = None
    """For 'clip': the VLM's tokenizer (or its path), which turns the instruction back into text for CLIP."""
    theta: float | None = None
    """The relevance/diversity trade-off in [0, 1): quality exp(theta / (2 (1 - theta)) r); None: r itself."""

    def __post_init__(self) -> None:
        if self.relevance not in RELEVANCES:
            raise ValueError(f"relevance must be one of {RELEVANCES}, got {self.relevance!r}")
        if self.relevance == "clip" and self.clip_model is None:
            raise ValueError(
                "relevance='clip' needs clip_model: the CLIP checkpoint the VLM's vision tower comes from (e.g. "
                "'openai/clip-vit-large-patch14-336' for LLaVA-1.5); or use relevance='llm'"
            )
        if self.source == "clip" and self.tokenizer is None:
            raise ValueError(
                "CLIP relevance needs the VLM's tokenizer to give CLIP the instruction's text: pass "
                "tokenizer=processor.tokenizer (or its path)"
            )
        if self.theta is not None and not (isinstance(self.theta, (int, float)) and 0.0 <= self.theta < 1.0):
            raise ValueError(f"theta must be in [0, 1) or None, got {self.theta!r}")

    @property
    def source(self) -> str:
        """The relevance source this configuration uses."""
        if self.relevance == "auto":
            return "clip" if self.clip_model is not None else "llm"
        return self.relevance

    def request(self, layout: VisionLayout) -> SignalRequest:
        if self.source == "clip":
            clip_space(self.clip_model)  # loaded when patching, so a wrong path fails there
            text_tokenizer(self.tokenizer)
        return SignalRequest(features=True, tower_features=self.source == "clip", instruction=self.source != "none")

    def select(self, signals: ImageSignals, keep: int) -> Selection:
        return self.select_batch([signals], [keep])[0]

    def select_batch(self, signals: list[ImageSignals], keeps: list[int]) -> list[Selection]:
        if not signals:
            return []
        quality = self._quality(signals)
        lengths = [image.n_tokens for image in signals]
        keeps = [min(keep, n) for keep, n in zip(keeps, lengths, strict=True)]
        device = signals[0].features.device
        x = torch.nn.utils.rnn.pad_sequence(
            [F.normalize(image.features.detach().to(device, torch.float32), dim=-1) for image in signals],
            batch_first=True,
        )
        q = torch.nn.utils.rnn.pad_sequence([r.to(device) for r in quality], batch_first=True)
        picks = dpp_greedy(x, q, torch.tensor(lengths, device=device), max(keeps)).cpu()
        details = (("relevance", self.source),)
        return [
            Selection(kept=_filled(picks[b, :keep], quality[b].cpu()).sort().values, scores=quality[b], details=details)
            for b, keep in enumerate(keeps)
        ]

    def _quality(self, signals: list[ImageSignals]) -> list[torch.Tensor]:
        """Per group, `[n]` float32 quality: the relevance normalised over the group's image, then theta."""
        instructions = {s.image: self._instruction(s) for s in signals}  # once per image, for all its crops
        relevance = [self._relevance(s, instructions[s.image]) for s in signals]
        for image in {s.image for s in signals}:
            members = [i for i, s in enumerate(signals) if s.image == image]
            values = torch.cat([relevance[i] for i in members])
            low, high = values.min(), values.max()
            for i in members:
                if not bool(high > low):  # no instruction, or one every token answers alike
                    relevance[i] = torch.ones_like(relevance[i])
                else:
                    relevance[i] = (relevance[i] - low + EPSILON) / (high - low)
        if self.theta is None:
            return relevance
        alpha = self.theta / (2 * (1 - self.theta))
        return [torch.exp(alpha * r) for r in relevance]

    def _instruction(self, image: ImageSignals) -> torch.Tensor | None:
        """The instruction on the text side of the relevance: the LLM's embeddings of its tokens, or CLIP's of its
        text (one per 77-token segment); None without one."""
        if self.source == "none":
            return None
        if self.source == "llm":
            return image.instruction
        words = text_tokenizer(self.tokenizer).decode(image.instruction_ids.tolist(), skip_special_tokens=True)
        return clip_space(self.clip_model).text_embeds(words.strip()) if words.strip() else None

    def _relevance(self, image: ImageSignals, text: torch.Tensor | None) -> torch.Tensor:
        """`[n]` float32: each token's mean cosine to the instruction `text` (negated in CLIP's space); zeros
        without one."""
        if text is None or len(text) == 0:
            return torch.zeros(image.n_tokens)
        if self.source == "llm":
            visual, sign = image.features, 1.0
        else:
            visual, sign = clip_space(self.clip_model).image_embeds(image.tower_features), -1.0
        visual = F.normalize(visual.detach().float(), dim=-1)
        text = F.normalize(text.detach().to(visual.device, torch.float32), dim=-1)
        return (sign * visual @ text.T).mean(1).cpu()


def _filled(picks: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """The picks, with the steps after the kernel ran out (-1) taken by the unpicked tokens of highest quality."""
    chosen = picks[picks >= 0]
    missing = len(picks) - len(chosen)
    if not missing:
        return chosen
    rest = torch.ones(len(quality), dtype=torch.bool)
    rest[chosen] = False
    order = torch.sort(quality.masked_fill(~rest, -math.inf), descending=True, stable=True).indices
    return torch.cat([chosen, order[:missing]])

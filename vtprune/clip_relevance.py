"""CLIP's joint image-text space, for policies that weigh visual tokens by the instruction (CDPruner).

A transformers `CLIPModel` checkpoint whose vision tower is the VLM's (`openai/clip-vit-large-patch14-336` for
LLaVA-1.5) gives both sides: its `visual_projection` after its own `post_layernorm` maps the tower's feature-layer
patch tokens into the joint space, and its text tower with `text_projection` maps the instruction there. The
instruction is tokenised without truncation, zero-padded to a multiple of the text tower's context (77) and
encoded as that many segments, one embedding each, as CDPruner's `clip_encoder.py` does.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


class ClipSpace:
    """A CLIP model's two projections into its joint space, and its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, owned: bool = False) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.owned = owned
        """Whether vtprune loaded the model, and so moves it to the device the VLM's features are on."""
        self.width = model.vision_model.post_layernorm.normalized_shape[0]
        self.context = model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def image_embeds(self, patches: torch.Tensor) -> torch.Tensor:
        """`[n, projection]` float32 from the tower's feature-layer patch tokens `[n, width]`."""
        if patches.shape[-1] != self.width:
            raise ValueError(
                f"the CLIP model's vision tower is {self.width} wide but the VLM's gives {patches.shape[-1]}-wide "
                f"tokens: pass the CLIP checkpoint the VLM's vision tower comes from as clip_model"
            )
        self._follow(patches.device)
        device, dtype = self.model.visual_projection.weight.device, self.model.visual_projection.weight.dtype
        normed = self.model.vision_model.post_layernorm(patches.to(device, dtype))
        return self.model.visual_projection(normed).float().to(patches.device)

    @torch.no_grad()
    def text_embeds(self, text: str) -> torch.Tensor:
        """`[M, projection]` float32: one embedding per 77-token segment of `text`."""
        ids = self.tokenizer(text, truncation=False)["input_ids"]
        segments = -(-len(ids) // self.context)
        padded = torch.zeros(segments * self.context, dtype=torch.long)
        padded[: len(ids)] = torch.tensor(ids)
        device = self.model.text_projection.weight.device
        pooled = self.model.text_model(input_ids=padded.view(segments, self.context).to(device)).pooler_output
        return self.model.text_projection(pooled).float()

    def _follow(self, device: torch.device) -> None:
        if self.owned and self.model.visual_projection.weight.device != device:
            self.model.to(device)


def clip_space(source: Any) -> ClipSpace:
    """The joint space of a `CLIPModel` or of the checkpoint at `source` (a local path or hub name), with the
    tokenizer saved beside it."""
    if isinstance(source, str):
        return _loaded(source)
    from transformers import CLIPModel

    if not isinstance(source, CLIPModel):
        raise TypeError(
            f"clip_model must be a transformers CLIPModel or the path of a CLIP checkpoint, got {type(source).__name__}"
        )
    return ClipSpace(source, _tokenizer(source.name_or_path))


@functools.cache
def _loaded(path: str) -> ClipSpace:
    from transformers import CLIPModel

    return ClipSpace(CLIPModel.from_pretrained(path), _tokenizer(path), owned=True)


def text_tokenizer(source: Any) -> Any:
    """The VLM's tokenizer: given, or loaded from a path or hub name."""
    if isinstance(source, str):
        return _tokenizer(source)
    if not callable(getattr(source, "decode", None)):
        raise TypeError(f"tokenizer must be the VLM's tokenizer or its path, got {type(source).__name__}")
    return source


@functools.cache
def _tokenizer(path: str) -> Any:
    """A tokenizer loaded once per path (the VLM's, or the one saved beside a CLIP checkpoint)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)

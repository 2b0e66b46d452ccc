"""What a patched model did on its last call: one record per image."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageRecord:
    """One image's pruning, in the order of its placeholders in the batch (row-major)."""

    kept: torch.Tensor
    """Sorted LongTensor of kept indices into this image's visual tokens, numbered as the processor placed them."""
    n_before: int
    n_after: int
    scores: torch.Tensor | None
    """One float per original visual token, or None where the policy has no score."""
    grid: tuple[int, int] | None
    """(rows, cols) of the image's token grid where it has one."""
    stages: tuple[tuple[str, int], ...]
    """(stage, tokens left after it) for each stage that acted on this image: 'vision', then
    'policy@layer' for each in-decoder cut."""
    layer_tokens: tuple[int, ...] = ()
    """This image's visual tokens in each decoder layer's input during prefill."""
    frames: int | None = None
    """For a video, its frame groups (temporal patches of the tower); None for an image."""
    details: tuple[tuple[str, str], ...] = ()
    """(name, value) facts the policy recorded about its selection (e.g. `("relevance", "llm")`)."""
    order: torch.Tensor | None = None
    """The kept tokens in the order the LLM gets them, each at its own position, where that is not `kept`'s
    (VisionZip's merged tokens come after the dominant ones); None: `kept`'s."""

    @property
    def delivered(self) -> torch.Tensor:
        """The kept tokens in the order the LLM gets them."""
        return self.kept if self.order is None else self.order


@dataclass(frozen=True)
class Trace(Sequence[ImageRecord]):
    """The last call's records; indexable and iterable over images."""

    policy: str
    images: tuple[ImageRecord, ...]
    seconds: float
    """Time spent scoring and selecting, for the whole batch (the vision tower's own run excluded)."""
    layer_lengths: tuple[int, ...] = ()
    """The sequence length (padded batch) each decoder layer ran on during prefill."""

    def mean_layer_tokens(self) -> float:
        """Visual tokens per image averaged over decoder layers and images (what prefill cost scales with)."""
        counts = [sum(r.layer_tokens) / len(r.layer_tokens) for r in self.images if r.layer_tokens]
        return sum(counts) / len(counts) if counts else 0.0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):  # type: ignore[override]
        return self.images[index]

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.images)

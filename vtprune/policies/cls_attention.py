"""`cls_attention`: VTC-CLS (arXiv 2412.05819).

Each patch is scored by the attention the CLS query pays it, averaged over heads and summed (no
per-layer normalisation) over the vision layers from `start_layer` to the feature layer. On CLIP-L
with LLaVA's penultimate-layer features that is layers 16..22 (0-based), the official default. The
top `keep` patches are kept in raster order. On towers that attend within windows in most layers
(Qwen2.5-VL) only the layers with full attention are summed.
"""

from __future__ import annotations

from vtprune.registry import Policy, register
from vtprune.signals import ImageSignals, Selection, SignalRequest, VisionLayout

LAYERS_SUMMED = 7
"""Official default `--layer 16` on CLIP-L with features from layer 22: seven layers."""


@register(
    "cls_attention",
    stage="vision",
    description="VTC-CLS: CLS attention to each patch, summed over the vision layers up to the feature layer",
)
class ClsAttention(Policy):
    start_layer: int | None = None
    """0-based first vision layer of the sum; default: six layers below the feature layer (16 on CLIP-L)."""

    def __post_init__(self) -> None:
        if self.start_layer is not None and (isinstance(self.start_layer, bool) or self.start_layer < 0):
            raise ValueError(f"start_layer must be a 0-based layer index >= 0, got {self.start_layer!r}")

    def request(self, layout: VisionLayout) -> SignalRequest:
        start = self.start_layer
        if start is None:
            start = max(0, layout.feature_layer - (LAYERS_SUMMED - 1))
        if start > layout.feature_layer:
            raise ValueError(
                f"start_layer={start} is above the feature layer {layout.feature_layer} of this vision tower; "
                f"pass a start_layer between 0 and {layout.feature_layer}"
            )
        layers = tuple(layer for layer in range(start, layout.feature_layer + 1) if layout.attends_fully(layer))
        if not layers:
            lower = [layer for layer in layout.full_attention or () if layer < start]
            fix = (
                f"pass start_layer={max(lower)} or lower"
                if lower
                else "this tower has none up to its feature layer: use a policy that scores without the tower's "
                "attention (e.g. random, uniform, diversity_kcenter or fastv)"
            )
            raise ValueError(
                f"no layer from start_layer={start} to the feature layer {layout.feature_layer} attends across the "
                f"whole image (full attention in layers {layout.full_attention}); {fix}"
            )
        return SignalRequest(attention_rows=layers)

    def select(self, signals: ImageSignals, keep: int) -> Selection:
        scores = signals.attention_rows.sum(0)
        kept = scores.topk(keep).indices.sort().values
        return Selection(kept=kept, scores=scores)

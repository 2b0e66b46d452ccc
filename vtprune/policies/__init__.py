"""The registered policies. Importing this package registers every policy in it."""

from vtprune.policies import (
    cls_attention,
    conditional_dpp,
    controls,
    diversity_kcenter,
    duplication,
    fastv,
    hierarchical,
    information_flow,
    max_min_diversity,
    transition,
    visionzip,
    visual_cues,
)

__all__ = [
    "cls_attention",
    "conditional_dpp",
    "controls",
    "diversity_kcenter",
    "duplication",
    "fastv",
    "hierarchical",
    "information_flow",
    "max_min_diversity",
    "transition",
    "visionzip",
    "visual_cues",
]

"""vtprune: training-free visual-token pruning for Hugging Face vision-language models.

import vtprune
vtprune.patch(model, policy="cls_attention", keep=64)
out = model.generate(**inputs)
"""

from vtprune import policies as _policies  # noqa: F401  (registers the built-in policies)
from vtprune.adapters import supported_models
from vtprune.api import Patch, last_trace, patch, patched, policy, unpatch
from vtprune.budget import Budget
from vtprune.registry import Policy, policies, register
from vtprune.trace import ImageRecord, Trace
from vtprune.video import load_video

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "ImageRecord",
    "Patch",
    "Policy",
    "Trace",
    "last_trace",
    "load_video",
    "patch",
    "patched",
    "policies",
    "policy",
    "register",
    "supported_models",
    "unpatch",
]

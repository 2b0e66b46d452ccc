"""Which implementation runs a kernel: Triton on CUDA tensors when triton imports, the PyTorch reference
otherwise. `VTPRUNE_KERNELS=reference` forces the reference; `VTPRUNE_KERNELS=triton` forces Triton (on
CPU tensors only under Triton's interpreter, `TRITON_INTERPRET=1`, as the tests run it)."""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from . import reference

CHOICES = ("auto", "reference", "triton")
TRITON_MODULES = {
    "gather_tokens": ".triton_gather",
    "score_rows": ".triton_scores",
    "farthest_first": ".triton_kcenter",
    "dpp_greedy": ".triton_dpp",
}


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend(*tensors: torch.Tensor) -> str:
    """'triton' or 'reference': what `VTPRUNE_KERNELS` and the tensors' device choose."""
    choice = os.environ.get("VTPRUNE_KERNELS", "auto")
    if choice not in CHOICES:
        raise ValueError(f"VTPRUNE_KERNELS={choice!r} is not one of {CHOICES}; unset it to choose automatically")
    if choice == "reference":
        return "reference"
    on_cuda = all(tensor.is_cuda for tensor in tensors)
    if choice == "auto":
        return "triton" if on_cuda and triton_available() else "reference"
    if not triton_available():
        raise RuntimeError("VTPRUNE_KERNELS=triton, but triton does not import: pip install triton, or unset it")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "VTPRUNE_KERNELS=triton with tensors off CUDA needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before importing vtprune, or unset VTPRUNE_KERNELS"
        )
    return "triton"


def implementation(kernel: str, *tensors: torch.Tensor) -> ModuleType:
    """The module whose `kernel` function runs on these tensors."""
    return reference if backend(*tensors) == "reference" else triton_module(kernel)


def triton_module(kernel: str) -> ModuleType:
    """The Triton module of `kernel` (imports triton)."""
    return importlib.import_module(TRITON_MODULES[kernel], __package__)

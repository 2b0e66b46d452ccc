"""Test-session set-up. Without a GPU, Triton kernels run in Triton's interpreter; the variable must be set
before triton is first imported, which is why it is set here."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

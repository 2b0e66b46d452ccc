"""Token compaction kernels.

Every tensor that vtprune compacts goes through this package, so there is one place to make it fast.
The functions here are the pure-PyTorch references: vectorised, no Python loop over rows, and the
oracle that faster kernels are tested against.
"""

from vtprune.kernels.gather import gather_tokens

__all__ = ["gather_tokens"]

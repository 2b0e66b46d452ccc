"""The `keep` budget: a token count per image, or a fraction of each image's tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """How many visual tokens each image keeps after the last stage."""

    keep: int | float

    def __post_init__(self) -> None:
        keep = self.keep
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise TypeError(
                f"keep must be an int (tokens per image) or a float in (0, 1] (fraction of each image's "
                f"tokens), got {type(keep).__name__} {keep!r}"
            )
        if isinstance(keep, int) and keep <= 0:
            raise ValueError(f"keep={keep} keeps no tokens: pass a positive token count such as keep=64")
        if isinstance(keep, float) and not (0.0 < keep <= 1.0 and math.isfinite(keep)):
            raise ValueError(
                f"keep={keep} is not a fraction in (0, 1]: pass e.g. keep=0.25 for a quarter of each image's "
                f"tokens, or an int such as keep=64 for a token count"
            )

    def tokens(self, available: int) -> int:
        """Tokens kept out of `available`: never more than there are, and at least one."""
        if isinstance(self.keep, int):
            return min(self.keep, available)
        return min(available, max(1, round(self.keep * available)))

    def __str__(self) -> str:
        return f"{self.keep:g} of each image" if isinstance(self.keep, float) else f"{self.keep} tokens per image"


def keep_from_text(text: str) -> int | float:
    """A `keep` written on a command line: digits count tokens ('64'), anything with a point is a fraction ('0.25')."""
    return float(text) if "." in text else int(text)

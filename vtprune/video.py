"""Reading videos for the processors: frames sampled with decord."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_video(path: str | Path, num_frames: int | None = None, fps: float | None = None) -> np.ndarray:
    """Frames of the video at `path` as a `[frames, height, width, 3]` uint8 array, what the processors' `videos=`
    takes. `num_frames` samples that many evenly over the whole video; `fps` samples at that rate; neither
    keeps every frame. Needs decord (`pip install "vtprune[video]"`)."""
    if num_frames is not None and fps is not None:
        raise ValueError("pass num_frames or fps, not both")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    try:
        import decord
    except ImportError as error:
        raise ImportError('load_video reads videos with decord: pip install "vtprune[video]" (decord2)') from error
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    total = len(reader)
    if num_frames is not None:
        indices = np.linspace(0, total - 1, num_frames).round().astype(int)
    elif fps is not None:
        indices = np.arange(0, total, reader.get_avg_fps() / fps).astype(int)
    else:
        indices = np.arange(total)
    return reader.get_batch(indices.tolist()).asnumpy()

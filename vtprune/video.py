"""Reading videos for the processors: frames sampled with decord."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def load_video(
    path: str | Path, num_frames: int | None = None, fps: float | None = None, with_metadata: bool = False
) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    """Frames of the video at `path` as a `[frames, height, width, 3]` uint8 array, what the processors' `videos=`
    takes. `num_frames` samples that many evenly over the whole video; `fps` samples at that rate; neither
    keeps every frame. `with_metadata` also returns what the processors' `video_metadata=` takes (the video's
    frame rate, frame count and the sampled frames' indices), from which Qwen2.5-VL and Qwen3-VL time the
    frames. Needs decord (`pip install "vtprune[video]"`)."""
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
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        total = len(reader)
        if num_frames is not None:
            indices = np.linspace(0, total - 1, num_frames).round().astype(int)
        elif fps is not None:
            indices = np.arange(0, total, reader.get_avg_fps() / fps).astype(int)
        else:
            indices = np.arange(total)
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except (decord.DECORDError, RuntimeError) as error:  # decord raises both for files it cannot decode
        raise ValueError(f"cannot read a video from {str(path)!r}: {str(error).splitlines()[0]}") from error
    if not with_metadata:
        return frames
    rate = reader.get_avg_fps()
    return frames, {
        "total_num_frames": total,
        "fps": rate,
        "duration": total / rate,
        "frames_indices": indices.tolist(),
        "height": frames.shape[1],
        "width": frames.shape[2],
        "video_backend": "decord",
    }

"""`load_video` reads frames with decord from a video the test writes with PyAV."""

import numpy as np
import pytest
from helpers import write_video

import vtprune


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 2-second 10-fps video of 20 frames, each a flat grey whose level is its index x 10."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, np.stack([np.full((48, 64, 3), index * 10, dtype=np.uint8) for index in range(20)]))
    return path


def levels(frames: np.ndarray) -> list[int]:
    return [round(float(frame.mean()) / 10) for frame in frames]


def test_every_frame(video):
    frames = vtprune.load_video(video)
    assert frames.shape == (20, 48, 64, 3) and frames.dtype == np.uint8
    assert levels(frames) == list(range(20))


def test_evenly_spaced_frames(video):
    assert levels(vtprune.load_video(video, num_frames=4)) == [0, 6, 13, 19]


def test_metadata_of_the_sampled_frames(video):
    frames, metadata = vtprune.load_video(video, num_frames=3, with_metadata=True)
    assert levels(frames) == levels(vtprune.load_video(video, num_frames=3))
    assert metadata["fps"] == 10 and metadata["total_num_frames"] == 20 and metadata["frames_indices"] == [0, 10, 19]
    assert (metadata["height"], metadata["width"]) == frames.shape[1:3]


def test_frames_at_a_rate(video):
    assert levels(vtprune.load_video(video, fps=2.5)) == [0, 4, 8, 12, 16]


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"num_frames": 4, "fps": 2}, "not both"), ({"num_frames": 0}, "positive")]
)
def test_bad_sampling_is_refused(video, kwargs, match):
    with pytest.raises(ValueError, match=match):
        vtprune.load_video(video, **kwargs)


def test_a_file_that_is_no_video_is_refused_by_name(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video")
    with pytest.raises(ValueError, match="cannot read a video from .*notes.mp4"):
        vtprune.load_video(path)

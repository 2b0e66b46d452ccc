"""The demo's plain parts: token layout over the picture, the overlay, and answering under a policy."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from helpers import PROMPTS, batch, image, tiny, write_video
from PIL import Image
from vtprune.demo import app as demo_app
from vtprune.demo import browser
from vtprune.demo.inference import Models, Video, ask, draw, frame_pictures
from vtprune.demo.layout import Panel, panels, processed_region
from vtprune.demo.overlay import DIM, OUTLINE, overlay
from vtprune.eval import synthetic
from vtprune.eval.runner import ModelError

import vtprune

CLIP = types.SimpleNamespace(do_center_crop=True, do_pad=False)
PAD = types.SimpleNamespace(do_center_crop=False, do_pad=True)
SQUASH = types.SimpleNamespace(do_center_crop=False, do_pad=False)


@pytest.mark.parametrize(
    ("processor", "region"),
    [(CLIP, (50, 0, 250, 200)), (PAD, (0, -50, 300, 250)), (SQUASH, (0, 0, 300, 200))],
    ids=["centre-crop", "pad", "squash"],
)
def test_llava_grid_covers_what_the_processor_keeps(processor, region):
    assert processed_region(processor, (300, 200)) == region
    (panel,) = panels("llava", (2, 2), (300, 200), 4, image_processor=processor)
    left, top, right, bottom = region
    half_w, half_h = (right - left) / 2, (bottom - top) / 2
    assert panel.boxes()[3] == (left + half_w, top + half_h, right, bottom)  # last token: bottom right


def test_llava_next_base_then_tile_mosaic_with_row_ends():
    base, tiles = panels("llava_next", (2, 3), (300, 200), 4 + 2 * 4, crop_grid=(2, 2))
    assert (base.first, base.last, tiles.first, tiles.last) == (0, 4, 4, 12)
    assert base.boxes()[3] == (150, 100, 300, 200)
    boxes = tiles.boxes()
    assert sorted(boxes) == [4, 5, 6, 8, 9, 10]  # 7 and 11 end the rows: no pixels
    assert boxes[10] == (200, 100, 300, 200)
    (only,) = panels("llava_next", (2, 2), (300, 200), 4, crop_grid=(2, 2))
    assert only.name == "base"


def test_qwen_merge_units_over_the_whole_picture_and_one_grid_per_frame_group():
    (panel,) = panels("qwen2_vl", (3, 4), (400, 300), 12)
    assert panel.boxes()[5] == (100, 100, 200, 200)
    video = panels("qwen3_vl", (3, 4), (400, 300), 24, frames=2)
    assert [p.first for p in video] == [0, 12]
    assert video[1].boxes()[12 + 5] == (100, 100, 200, 200)


def test_panels_that_do_not_fit_the_tokens_are_refused():
    with pytest.raises(ValueError, match="n_before"):
        panels("llava", (2, 2), (30, 30), 5)
    with pytest.raises(ValueError, match="crop_grid"):
        panels("llava_next", (2, 2), (30, 30), 12)


def test_overlay_keeps_kept_tokens_dims_the_rest_and_outlines_kept():
    picture = Image.new("RGB", (40, 40), (200, 100, 40))
    grid = Panel("image", 0, (2, 2), (0, 0, 40, 40), 2)
    drawn = overlay(picture, [grid], torch.tensor([1]))
    assert drawn.size == (40, 40)
    assert drawn.getpixel((30, 10)) == (200, 100, 40)  # inside kept token 1
    assert drawn.getpixel((10, 30)) == tuple(int(v * DIM) for v in (200, 100, 40))  # pruned token 2
    assert drawn.getpixel((20, 5)) == OUTLINE  # kept token's left edge


def test_heatmap_tints_by_score_and_needs_scores():
    picture = Image.new("RGB", (20, 10), (0, 0, 0))
    grid = Panel("image", 0, (1, 2), (0, 0, 20, 10), 2)
    drawn = overlay(picture, [grid], [0], scores=torch.tensor([0.0, 1.0]), heatmap=True)
    assert drawn.getpixel((5, 5)) == (0, 0, 0)  # lowest score: untinted
    assert drawn.getpixel((15, 5))[0] > 150  # highest: red
    with pytest.raises(ValueError, match="no scores"):
        overlay(picture, [grid], [0], heatmap=True)


def test_panels_side_by_side():
    picture = Image.new("RGB", (30, 20), (90, 90, 90))
    base, tiles = panels("llava_next", (1, 2), (30, 20), 4 + 3, crop_grid=(2, 2))
    assert overlay(picture, [base, tiles], [0, 4]).size == (30 + 8 + 30, 20)


@torch.no_grad()
def test_ask_answers_unpruned_and_pruned_with_a_drawing():
    model, processor = tiny()
    picture = image(5, (40, 50))
    full = ask(model, processor, picture, "what is shown ?", None, None)
    assert full.tokens_before == full.tokens_after == 16 and full.heatmap is None
    assert full.picture.tobytes() == picture.tobytes()  # nothing pruned: the picture as it is
    pruned = ask(model, processor, picture, "what is shown ?", "cls_attention", 4)
    assert (pruned.policy, pruned.tokens_before, pruned.tokens_after) == ("cls_attention", 16, 4)
    assert pruned.picture.size == picture.size and pruned.heatmap is not None
    assert 0 < pruned.first_token_s <= pruned.total_s
    with pytest.raises(ValueError, match="not patched"):
        vtprune.last_trace(model)  # the policy was patched in for that call only


@torch.no_grad()
def test_drawings_fit_real_traces_of_llava_next_and_qwen():
    model, processor = tiny(family="llava_next")
    inputs = batch(processor, PROMPTS, [image(81, (60, 30)), image(82, (30, 40))])
    with vtprune.patched(model, "uniform", keep=4):
        model(**inputs)
        trace = vtprune.last_trace(model)
    for record, size in zip(trace, [(30, 60), (40, 30)], strict=True):
        drawn = draw(model, processor, Image.new("RGB", size), record)
        assert drawn.height == size[1] and drawn.width == 2 * size[0] + 8  # base and tiles

    config = synthetic.qwen_vl_config("qwen2_vl")
    model, processor = synthetic.qwen_vl_model(config), synthetic.qwen_vl_processor("qwen2_vl")
    picture = synthetic.random_image(56, 84)
    inputs = synthetic.qwen_vl_inputs(processor, ["<|image_pad|> what ?"], images=[picture])
    with vtprune.patched(model, "uniform", keep=3):
        model(**inputs)
        (record,) = vtprune.last_trace(model)
    assert draw(model, processor, picture, record).size == picture.size


def test_compare_reports_bad_input_and_models_it_cannot_use(tmp_path):
    models = Models()
    picture = image(1)
    assert (
        "Upload a picture"
        in demo_app.compare(models, "", None, None, 8, "q", ["random"], 25, demo_app.PERCENT, False)[0]
    )
    assert "question" in demo_app.compare(models, "", picture, None, 8, " ", ["random"], 25, demo_app.PERCENT, False)[0]
    assert "policy" in demo_app.compare(models, "", picture, None, 8, "q", [], 25, demo_app.PERCENT, False)[0]
    missing = str(tmp_path / "missing")
    status, gallery, rows = demo_app.compare(models, missing, picture, None, 8, "q", ["random"], 25, "%", False)
    assert status.startswith("**Cannot run this:** cannot load model") and gallery == rows == []
    (tmp_path / "paligemma").mkdir()
    (tmp_path / "paligemma" / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    status, _, _ = demo_app.compare(
        models, str(tmp_path / "paligemma"), picture, None, 8, "q", ["random"], 25, "%", False
    )
    assert "paligemma model, which vtprune cannot patch" in status


def test_compare_runs_the_unpruned_model_and_each_policy(tmp_path):
    model, processor = tiny()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    status, gallery, rows = demo_app.compare(
        Models(),
        str(tmp_path),
        image(3),
        None,
        8,
        "what is shown ?",
        ["cls_attention", "uniform"],
        4,
        demo_app.TOKENS,
        True,
    )
    assert status.startswith("Unpruned answer:")
    assert [row[0] for row in rows] == ["unpruned", "cls_attention", "uniform"]
    assert [row[2] for row in rows] == ["16 -> 16", "16 -> 4", "16 -> 4"]
    assert len(gallery) == 3
    assert all(caption.startswith(row[0]) for (_, caption), row in zip(gallery, rows, strict=True))


QWEN = "tiny-qwen2-vl"
"""The name a synthetic Qwen2-VL (random weights, processor made in code) is preloaded under in `Models`."""


def qwen_models() -> Models:
    models = Models()
    config = synthetic.qwen_vl_config("qwen2_vl")
    models.loaded[QWEN] = synthetic.qwen_vl_model(config), synthetic.qwen_vl_processor("qwen2_vl")
    return models


def coloured_frames(count: int, height: int = 56, width: int = 84) -> np.ndarray:
    """`count` frames, frame i a flat grey of level 40 * i + 20."""
    levels = 40 * np.arange(count, dtype=np.uint8) + 20
    return np.broadcast_to(levels[:, None, None, None], (count, height, width, 3)).copy()


@torch.no_grad()
def test_ask_about_a_video_draws_each_frame_group_on_its_own_frame():
    model, processor = qwen_models().get(QWEN)
    video = Video(coloured_frames(4))
    full = ask(model, processor, video, "what happens ?", None, None)
    assert [picture.getpixel((0, 0)) for picture in frame_pictures(processor, video)] == [(20,) * 3, (100,) * 3]
    assert full.tokens_before == full.tokens_after == 2 * 6  # two frame groups of 2x3 merge units
    assert full.picture.size == (2 * 84 + 8, 56)
    pruned = ask(model, processor, video, "what happens ?", "uniform", 4)
    assert (pruned.tokens_before, pruned.tokens_after) == (12, 4)
    assert pruned.picture.size == (2 * 84 + 8, 56)
    for panel, level in ((0, 20), (1, 100)):  # each group's kept tokens show its own first frame
        left = panel * (84 + 8)
        shown = {pruned.picture.getpixel((left + x, y)) for x in range(3, 84, 28) for y in range(3, 56, 28)}
        assert (level,) * 3 in shown and (int(level * DIM),) * 3 in shown


def test_a_picture_model_refuses_a_video():
    model, processor = tiny()
    with pytest.raises(ModelError, match="takes pictures, not videos"):
        ask(model, processor, Video(coloured_frames(2)), "what ?", None, None)


def test_compare_reads_an_uploaded_video(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, coloured_frames(12, 64, 128))  # decord 0.7 misreads frames 96 pixels wide
    models = qwen_models()
    status, gallery, rows = demo_app.compare(
        models, QWEN, image(3), str(path), 4, "what happens ?", ["uniform"], 50, demo_app.PERCENT, False
    )
    assert status.startswith("Unpruned answer:")
    assert [row[2] for row in rows] == ["20 -> 20", "20 -> 10"]  # the video (2 groups of 2x5), not the picture
    assert gallery[1][0].size == (2 * 128 + 8, 64)
    (tmp_path / "notes.mp4").write_text("not a video")
    status, _, _ = demo_app.compare(
        models, QWEN, None, str(tmp_path / "notes.mp4"), 4, "q", ["uniform"], 50, demo_app.PERCENT, False
    )
    assert "cannot read a video" in status


def test_the_app_in_a_real_browser(tmp_path):
    """Start the app on a free localhost port, upload a picture in headless Chromium, run one policy, and
    read the answer and the overlays off the page."""
    pytest.importorskip("gradio")
    pytest.importorskip("playwright")
    if browser.chromium() is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium); .ci/run installs it")
    model, processor = tiny()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    picture = tmp_path / "picture.png"
    image(7, (40, 50)).save(picture)
    with browser.served(demo_app.build(model_name=str(tmp_path / "model"))) as url:
        page = browser.drive(url, picture, "what is shown ?", screenshot=tmp_path / "page.png")
    assert page.status.startswith("Unpruned answer:")
    assert page.pictures >= 2  # the unpruned picture and cls_attention's overlay
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_a_video_in_a_real_browser(tmp_path):
    """Upload a video in headless Chromium to the app running a Qwen2-VL: the answer and the overlays appear."""
    pytest.importorskip("gradio")
    pytest.importorskip("playwright")
    if browser.chromium() is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium); .ci/run installs it")
    path = tmp_path / "clip.mp4"
    write_video(path, coloured_frames(12, 64, 128))
    with browser.served(demo_app.build(qwen_models(), model_name=QWEN)) as url:
        page = browser.drive(url, path, "what happens ?")
    assert page.status.startswith("Unpruned answer:")
    assert "visual tokens 40 -> 40" in page.status  # 8 frames sampled: 4 frame groups of 2x5 merge units
    assert page.pictures >= 2

"""The demo's plain parts: token layout over the picture, the overlay, and answering under a policy."""

from __future__ import annotations

import functools
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
from vtprune.demo.overlay import DIM, GAP, OUTLINE, overlay
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


def test_onevision_single_image_is_base_then_tile_mosaic_as_on_llava_next():
    base, tiles = panels("llava_onevision", (8, 7), (80, 90), 16 + 8 * 8, crop_grid=(4, 4))
    assert (len(base.boxes()), len(tiles.boxes()), tiles.first, tiles.last) == (16, 8 * 7, 16, 80)
    row_ends = {16 + row * 8 + 7 for row in range(8)}
    assert not row_ends & tiles.boxes().keys()
    assert tiles.boxes()[16 + 7 * 8 + 6] == pytest.approx((80 * 6 / 7, 90 * 7 / 8, 80, 90))  # the grid over it all


def test_onevision_multi_image_item_is_its_base_crop_then_one_newline():
    (base,) = panels("llava_onevision", (4, 4), (60, 30), 16 + 1, crop_grid=(4, 4))
    assert base.name == "base" and sorted(base.boxes()) == list(range(16))  # token 16, the newline: no pixels
    assert base.boxes()[15] == (45, 22.5, 60, 30)


def test_onevision_video_is_one_grid_per_frame_then_one_newline():
    video = panels("llava_onevision", (2, 2), (50, 40), 3 * 4 + 1, crop_grid=(4, 4), frames=3)
    assert [(panel.name, panel.first, len(panel.boxes())) for panel in video] == [
        ("frame 1", 0, 4),
        ("frame 2", 4, 4),
        ("frame 3", 8, 4),
    ]
    assert set().union(*(panel.boxes() for panel in video)) == set(range(12))  # token 12, the newline: no pixels
    assert video[2].boxes()[11] == (25, 20, 50, 40)


@pytest.mark.parametrize(
    ("grid", "tokens", "frames"),
    [((8, 7), 16 + 8 * 8 + 1, None), ((4, 4), 16, None), ((4, 4), 16 + 2, None), ((2, 2), 12, 3), ((2, 2), 14, 3)],
    ids=["mosaic-and-newline", "base-without-newline", "base-and-two", "video-without-newline", "video-and-two"],
)
def test_onevision_panels_that_do_not_fit_the_tokens_are_refused(grid, tokens, frames):
    with pytest.raises(ValueError, match="n_before"):
        panels("llava_onevision", grid, (50, 40), tokens, crop_grid=(4, 4), frames=frames)


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

    for family in ("qwen2_vl", "glm4v"):
        config = synthetic.qwen_vl_config(family)
        model, processor = synthetic.qwen_vl_model(config), synthetic.qwen_vl_processor(family)
        picture = synthetic.random_image(56, 84)
        inputs = synthetic.qwen_vl_inputs(processor, [f"{synthetic.placeholder(family)} what ?"], images=[picture])
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


@functools.cache
def onevision():
    """A tiny LLaVA-OneVision (model, processor): tiles up to 3x3 of a 4x4-token tower, mosaics over 4 crops'
    worth interpolated; cached, so tests must leave it unpatched."""
    config = synthetic.llava_config("qwen2", vision="siglip", family="llava_onevision", text_layers=3)
    return synthetic.llava_model(config), synthetic.llava_processor(config)


def bright_boxes(drawing: Image.Image, levels: set[int]) -> int:
    """Kept token boxes in a drawing of flat grey pictures: 4-connected regions of pixels still at one of the
    pictures' grey `levels` (the outlines part neighbouring kept boxes; pruned ones are dimmed)."""
    pixels = np.asarray(drawing)
    bright = (
        np.isin(pixels[..., 0], list(levels)) & (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])
    )
    regions = 0
    for start in zip(*np.nonzero(bright), strict=True):
        if not bright[start]:
            continue
        regions += 1
        stack = [start]
        bright[start] = False
        while stack:
            y, x = stack.pop()
            for near in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= near[0] < bright.shape[0] and 0 <= near[1] < bright.shape[1] and bright[near]:
                    bright[near] = False
                    stack.append(near)
    return regions


BASE_TOKENS = 4 * 4
"""A tiny OneVision crop's tokens: 28 pixels in 7-pixel patches a side."""
ONEVISION_ITEMS = {
    # processor arguments; the (width, height) of each item's picture; a video's frames; whether a mosaic follows
    # the base crop (a single image per prompt)
    "interpolated-mosaic": (
        {"images": [image(91, (90, 80))], "text": ["user : <image> what is shown ? assistant :"]},
        [(80, 90)],
        None,
        True,
    ),
    "mosaic": (
        {"images": [image(92, (30, 60))], "text": ["user : <image> what is shown ? assistant :"]},
        [(60, 30)],
        None,
        True,
    ),
    "multi-image": (
        {
            "images": [[image(93, (30, 60)), image(94, (90, 80))]],
            "text": ["user : <image> and <image> which ? assistant :"],
        },
        [(60, 30), (80, 90)],
        None,
        False,
    ),
    "video": (
        {"videos": [coloured_frames(3, 40, 50)], "text": ["user : <|video_pad|> what happens ? assistant :"]},
        [(50, 40)],
        3,
        False,
    ),
}


@torch.no_grad()
@pytest.mark.parametrize("item", list(ONEVISION_ITEMS))
def test_drawings_fit_real_traces_of_llava_onevision(item):
    """Each kept token but the newlines shows as one bright box: the mosaic's row ends, and the newline that
    closes a base crop alone or a video, cover nothing."""
    model, processor = onevision()
    arguments, sizes, frames, mosaic = ONEVISION_ITEMS[item]
    with vtprune.patched(model, "cls_attention", keep=0.3):
        model(**processor(return_tensors="pt", **arguments))
        trace = vtprune.last_trace(model)
    assert len(trace) == len(sizes)
    for record, (width, height) in zip(trace, sizes, strict=True):
        rows, cols = record.grid
        assert record.frames == frames
        if mosaic:
            assert record.n_before == BASE_TOKENS + rows * (cols + 1)
            newlines = {BASE_TOKENS + row * (cols + 1) + cols for row in range(rows)}
        else:
            assert record.n_before == (frames or 1) * rows * cols + 1
            newlines = {record.n_before - 1}
        assert newlines <= set(record.kept.tolist())
        if frames:
            media = Video(np.full((frames, height, width, 3), 200, dtype=np.uint8))
        else:
            media = Image.new("RGB", (width, height), (200,) * 3)
        drawn = draw(model, processor, media, record)
        shown = 2 if mosaic else frames or 1  # base and tiles, each frame, or the base crop
        assert drawn.size == (shown * width + (shown - 1) * GAP, height)
        assert bright_boxes(drawn, {200}) == record.n_after - len(newlines)
        assert draw(model, processor, media, record, heatmap=True).size == drawn.size
    if item == "interpolated-mosaic":
        assert trace[0].grid == (8, 7)  # 3x3 tiles' unpadded 12x10 mosaic, interpolated to 4 crops' worth


@torch.no_grad()
def test_ask_llava_onevision_about_a_video_draws_every_frame():
    model, processor = onevision()
    video = Video(coloured_frames(3, 40, 50))
    assert [picture.getpixel((0, 0)) for picture in frame_pictures(processor, video)] == [
        (20,) * 3,
        (60,) * 3,
        (100,) * 3,
    ]
    full = ask(model, processor, video, "what happens ?", None, None)
    assert full.tokens_before == full.tokens_after == 3 * 4 + 1  # a 2x2 pooled grid per frame, one newline
    assert full.picture.size == (3 * 50 + 2 * GAP, 40)
    pruned = ask(model, processor, video, "what happens ?", "cls_attention", 4)
    assert (pruned.tokens_before, pruned.tokens_after) == (13, 4 + 1)  # the newline is always kept
    assert pruned.picture.size == pruned.heatmap.size == full.picture.size
    assert bright_boxes(pruned.picture, {20, 60, 100}) == 4
    for panel, level in enumerate((20, 60, 100)):  # each frame's tokens show on that frame
        left = panel * (50 + GAP)
        shown = {pruned.picture.getpixel((left + x, y)) for x in (12, 37) for y in (10, 30)}
        assert shown <= {(level,) * 3, (int(level * DIM),) * 3}


def test_a_picture_model_refuses_a_video():
    model, processor = tiny()
    with pytest.raises(ModelError, match="takes pictures, not videos") as refused:
        ask(model, processor, Video(coloured_frames(2)), "what ?", None, None)
    assert "LLaVA-OneVision" in str(refused.value)


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


@torch.no_grad()
def test_ask_gemma3_draws_its_pooled_windows_over_the_picture():
    config = synthetic.gemma3_config()
    model, processor = synthetic.gemma3_model(config), synthetic.gemma3_processor(config)
    picture = image(7, (40, 50))
    pruned = ask(model, processor, picture, "what is shown ?", "cls_attention", 4)
    assert (pruned.tokens_before, pruned.tokens_after) == (16, 4)
    assert pruned.picture.size == picture.size and pruned.heatmap.size == picture.size


@torch.no_grad()
def test_ask_internvl_draws_each_tile_over_its_part_then_the_thumbnail():
    config = synthetic.internvl_config()
    model, processor = synthetic.internvl_model(config), synthetic.internvl_processor(config)
    picture = image(8, (56, 112))  # 1x2 tiles and a thumbnail, 4 tokens each
    pruned = ask(model, processor, picture, "what is shown ?", "cls_attention", 5)
    assert (pruned.tokens_before, pruned.tokens_after) == (12, 5)
    assert pruned.picture.size == (3 * picture.width + 2 * GAP, picture.height)  # three panels side by side
    (tile, second, thumbnail) = panels("internvl", (2, 2), picture.size, 12, crop_grid=(2, 2), tiles=(1, 2))
    assert tile.region == (0.0, 0.0, 56.0, 56.0) and second.region == (56.0, 0.0, 112.0, 56.0)
    assert (thumbnail.first, thumbnail.region) == (8, (0.0, 0.0, 112.0, 56.0))

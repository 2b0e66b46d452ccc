"""What `vtprune eval` mirrors of lmms-eval's model wrappers (answer lengths, processor options, image preparation)
and `vtprune lmms-task`'s offline task files; lmms-eval itself is not installed here (tests_lmms runs it)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from vtprune.eval import lmms_conventions, lmms_tasks
from vtprune.eval.benchmarks import benchmark


def test_answer_lengths_are_the_tasks_else_the_wrappers():
    assert lmms_conventions.max_new_tokens(benchmark("pope").max_new_tokens, "llava") == 128
    assert lmms_conventions.max_new_tokens(benchmark("mmbench").max_new_tokens, "qwen2_vl") == 1024
    textvqa = benchmark("textvqa").max_new_tokens
    assert textvqa is None
    assert lmms_conventions.max_new_tokens(textvqa, "llava_next") == 1024  # llava_hf's default
    assert lmms_conventions.max_new_tokens(textvqa, "qwen2_vl") == 128
    assert lmms_conventions.max_new_tokens(textvqa, "gemma3") == 16  # no wrapper: vtprune's own default


def test_qwen_processors_get_the_wrappers_pixel_bounds():
    assert lmms_conventions.processor_options("qwen2_vl") == {"max_pixels": 602112, "min_pixels": 3136}
    assert lmms_conventions.processor_options("llava") == {}


@pytest.mark.parametrize(
    ("size", "resized"),
    [
        ((60, 90), (56, 84)),  # sides rounded to multiples of 28
        ((1000, 1000), (756, 756)),  # 1008^2 > 602112: scaled by sqrt(1e6 / 602112), floored to 28s
        ((20, 20), (56, 56)),  # 28^2 < 3136: scaled up by 2.8, ceiled to 28s
    ],
)
def test_qwen2_vl_images_are_resized_as_qwen_vl_utils_does(size, resized):
    assert lmms_conventions.WRAPPERS["qwen2_vl"].resize.size(*size) == resized


def test_qwen2_vl_images_make_a_jpeg_round_trip_and_llava_images_none():
    pixels = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    prepared = lmms_conventions.prepare_image(image, "qwen2_vl")
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG", quality=85)
    assert prepared.size == (84, 56)
    assert np.array_equal(np.asarray(prepared), np.asarray(Image.open(encoded).convert("RGB")))
    assert lmms_conventions.prepare_image(image, "llava") is image


def test_local_tasks_include_lmms_evals_yaml_and_read_the_parquet_files(tmp_path, monkeypatch):
    (tmp_path / "pope").mkdir()
    (tmp_path / "pope" / "b.parquet").write_bytes(b"")
    (tmp_path / "pope" / "a.parquet").write_bytes(b"")
    monkeypatch.setattr(lmms_tasks, "task_yaml", lambda name: tmp_path / "lmms_eval" / "tasks" / "pope" / "pope.yaml")
    assert lmms_tasks.main(["pope", "--data-dir", str(tmp_path / "pope"), "--out", str(tmp_path / "tasks")]) == 0
    written = (tmp_path / "tasks" / "pope_local.yaml").read_text().splitlines()
    files = [str((tmp_path / "pope" / name).resolve()) for name in ("a.parquet", "b.parquet")]
    assert written == [
        f'include: "{tmp_path}/lmms_eval/tasks/pope/pope.yaml"',
        'task: "pope_local"',
        'dataset_path: "parquet"',
        'dataset_kwargs: {"data_files": {"test": ["' + '", "'.join(files) + '"]}}',
    ]


def test_local_tasks_refuse_what_cannot_run_offline_and_need_lmms_eval(tmp_path):
    with pytest.raises(ValueError, match="process_docs loads the image config from the hub"):
        lmms_tasks.write_local_task("gqa", tmp_path, tmp_path)
    with pytest.raises(ModuleNotFoundError, match="lmms-eval is not installed"):
        lmms_tasks.write_local_task("pope", tmp_path, tmp_path)
    with pytest.raises(ValueError, match="no lmms-eval task for 'shapes'"):
        lmms_tasks.task_yaml("shapes")


def test_qwen2_vl_answers_are_cut_at_the_tasks_stop_strings_and_llavas_are_not():
    answer = "Yes\n\nThe picture shows a dog. ASSISTANT: no"
    assert lmms_conventions.cut_at_stops(answer, benchmark("pope").stops, "qwen2_vl") == "Yes"
    assert lmms_conventions.cut_at_stops(answer, benchmark("mmbench").stops, "qwen2_vl") == (
        "Yes\n\nThe picture shows a dog."
    )
    assert lmms_conventions.cut_at_stops(f" {answer} ", benchmark("pope").stops, "llava") == answer


def test_later_qwen_wrappers_resize_with_qwen_vl_utils_defaults():
    qwen3 = lmms_conventions.WRAPPERS["qwen3_vl"]
    assert lmms_conventions.processor_call("qwen3_vl_moe") == {"do_resize": False}  # the wrapper resizes alone
    assert qwen3.resize.size(224, 224) == (224, 224)  # factor 32, 4096 to 16384 * 32^2 pixels
    assert lmms_conventions.WRAPPERS["qwen2_5_vl"].resize.size(60, 90) == (56, 84)
    assert lmms_conventions.processor_call("qwen2_5_vl") == {}

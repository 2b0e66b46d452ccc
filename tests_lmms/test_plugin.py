"""lmms-eval runs vtprune's plugin offline on local parquet files (POPE and MME, a tiny LLaVA and a tiny
Qwen2-VL): every answer and every image's visual-token counts equal those of the same checkpoint patched by hand
and prompted as `vtprune eval` prompts it, and `vtprune eval`'s scoring gives each answer lmms-eval's score."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import datasets
import pytest
import torch
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from vtprune.eval import lmms_conventions, runner, synthetic
from vtprune.eval.benchmarks import benchmark
from vtprune.eval.lmms_tasks import write_local_task

import vtprune
from vtprune import lmms

LLAVA_TEMPLATE = (  # llava-hf/llava-1.5's, for one user turn
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\\n' }}{% else %}{{ content['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_TEMPLATE = (  # Qwen2-VL-Instruct's, for images
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\\n"
    "You are a helpful assistant.<|im_end|>\\n{% endif %}<|im_start|>{{ message['role'] }}\\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}"
)
TEXT = {"text_layers": 2, "text_hidden": 64, "text_heads": 2, "text_kv_heads": 1}
SIZES = [(60, 90), (84, 56), (70, 70), (112, 84)]
"""Picture sizes (height, width): Qwen-VL's wrapper resizes the first and third to multiples of 28."""


def png(seed: int) -> dict:
    height, width = SIZES[seed % len(SIZES)]
    encoded = io.BytesIO()
    synthetic.random_image(height, width, seed).save(encoded, format="PNG")
    return {"bytes": encoded.getvalue(), "path": None}


ROWS = {
    "pope": {
        "question_id": [str(i) for i in range(6)],
        "question": [f"Is there a {w} in the image?" for w in ("circle", "square", "dog") * 2],
        "answer": ["yes", "no"] * 3,
        "image_source": [f"COCO_val2014_{i:012d}" for i in range(6)],
        "image": [png(i) for i in range(6)],
        "category": ["adversarial", "popular", "random"] * 2,
    },
    "mme": {
        "question_id": [f"{c}/{i // 2}.png" for i, c in enumerate(["existence"] * 4 + ["code_reasoning"] * 4)],
        "image": [png(i // 2) for i in range(8)],
        "question": [f"Is the {w} red? Please answer yes or no." for w in ("circle", "square") * 4],
        "answer": ["Yes", "No"] * 4,
        "category": ["existence"] * 4 + ["code_reasoning"] * 4,
    },
}
"""The hub datasets' schemas (lmms-lab/POPE, lmms-lab/MME)."""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    config = synthetic.llava_config("llama", **TEXT, image_size=56)
    llava, llava_processor = synthetic.llava_model(config), synthetic.llava_processor(config)
    llava_processor.chat_template = LLAVA_TEMPLATE
    qwen = synthetic.qwen_vl_model(synthetic.qwen_vl_config("qwen2_vl", **TEXT))
    qwen_processor = synthetic.qwen_vl_processor("qwen2_vl")
    qwen_processor.video_processor = Qwen2VLVideoProcessor(patch_size=14)  # torchvision's, which this env has
    qwen_processor.chat_template = QWEN_TEMPLATE
    for name, model, processor in (("llava", llava, llava_processor), ("qwen2_vl", qwen, qwen_processor)):
        model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    for name, columns in ROWS.items():
        (root / name).mkdir()
        table = datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
        table.to_parquet(str(root / name / "test-00000-of-00001.parquet"))
        write_local_task(name, root / name, root / "tasks")
    return root


CASES = [
    ("llava", "llava_hf", "pope", {"policy": "cls_attention", "keep": 0.25}),
    ("llava", "llava_hf", "mme", {"policy": "fastv", "keep": 8, "layer": 1}),
    ("qwen2_vl", "qwen2_vl", "pope", {"policy": "cls_attention", "keep": 0.5, "positions": "original"}),
    ("qwen2_vl", "qwen2_vl", "mme", {"policy": "fastv", "keep": 2, "layer": 1}),
]


def lmms_eval_run(workspace, checkpoint: str, wrapper: str, task: str, pruning: dict, out) -> list[dict]:
    arguments = ",".join(f"{key}={value}" for key, value in {"pretrained": workspace / checkpoint, **pruning}.items())
    command = [sys.executable, "-m", "lmms_eval", "--model", lmms.model_name(wrapper), "--device", "cpu"]
    command += ["--model_args", f"{arguments},device_map=cpu", "--tasks", f"{task}_local", "--batch_size", "1"]
    command += ["--include_path", str(workspace / "tasks"), "--log_samples", "--output_path", str(out)]
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(out / "hf")}
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **offline}, timeout=600)
    log = done.stdout + done.stderr
    # lmms-eval logs an evaluation that raised and still exits 0
    assert done.returncode == 0 and "Error during evaluation" not in log and "Traceback" not in log, log[-5000:]
    (samples,) = list(out.rglob(f"*_samples_{task}_local.jsonl"))
    return sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda row: row["doc_id"])


@pytest.mark.parametrize(("checkpoint", "wrapper", "task", "pruning"), CASES)
def test_lmms_eval_runs_the_plugin_as_the_model_patched_by_hand(
    workspace, tmp_path, checkpoint, wrapper, task, pruning
):
    logged = lmms_eval_run(workspace, checkpoint, wrapper, task, pruning, tmp_path)
    bench = benchmark(task)
    samples = bench.load(data_dir=str(workspace / task))
    assert len(logged) == len(samples)

    model, processor = runner.load_model(str(workspace / checkpoint), "cpu", torch.float32, None)
    policy, keep = pruning["policy"], pruning["keep"]
    vtprune.patch(model, policy, keep=keep, **{k: v for k, v in pruning.items() if k not in ("policy", "keep")})
    length = lmms_conventions.max_new_tokens(bench.max_new_tokens, model.config.model_type)
    metric = {"pope": "pope_accuracy", "mme": "mme_perception_score"}[task]
    for sample, row in zip(samples, logged, strict=True):
        assert row["input"] == bench.prompt(sample)  # the task's text: what `vtprune eval` words
        (answered,) = runner.answer(model, processor, bench, [sample], runner.Setting(policy, keep), length)
        (record,) = vtprune.last_trace(model)
        response = row["filtered_resps"]
        assert response.strip() == answered["prediction"]
        (counts,) = row["token_counts"]
        assert counts["policy"] == policy
        assert (counts["visual_tokens"], counts["kept_tokens"]) == ([record.n_before], [record.n_after])
        assert counts["layer_visual_tokens"] == [list(record.layer_tokens)]
        assert record.n_after < record.n_before
        scores = row.get(metric) or row["mme_cognition_score"]
        assert bench.correct(sample, response) == answered["score"] == scores["score"]


def test_task_settings_for_a_wrapper_reach_its_vtprune_name():
    import lmms_eval.evaluator  # noqa: F401 (the evaluator loads the models' registry, and so the entry point)
    from lmms_eval.api.task import ConfigurableTask

    def task(name: str, **settings) -> SimpleNamespace:
        kwargs = {"default": {"post_prompt": "default"}, "qwen3_vl": {"post_prompt": "qwen3"}, **settings}
        config = SimpleNamespace(
            lmms_eval_specific_kwargs=kwargs,
            model_specific_target_kwargs=None,
            model_specific_generation_kwargs={"qwen3_vl": {"max_new_tokens": 7}},
            generation_kwargs={},
        )
        return SimpleNamespace(model_name=name, config=config)

    for name in ("qwen3_vl", "vtprune_qwen3_vl"):
        prepared = task(name)
        ConfigurableTask._prepare_model_specific_config(prepared)
        assert prepared.lmms_eval_specific_kwargs == {"post_prompt": "qwen3"}
        assert prepared.config.generation_kwargs == {"max_new_tokens": 7}
        assert prepared.model_name == name
    own = task("vtprune_qwen3_vl", vtprune_qwen3_vl={"post_prompt": "ours"})
    ConfigurableTask._prepare_model_specific_config(own)
    assert own.lmms_eval_specific_kwargs == {"post_prompt": "ours"}
    other = task("llava_hf")
    ConfigurableTask._prepare_model_specific_config(other)
    assert other.lmms_eval_specific_kwargs["post_prompt"] == "default"


def test_every_family_with_a_wrapper_has_a_plugin_name():
    from lmms_eval.models import get_model

    assert set(lmms.CLASSES) == {wrapper.name for wrapper in lmms_conventions.WRAPPERS.values()}
    for wrapper in lmms.CLASSES:
        chat = get_model(lmms.model_name(wrapper))
        simple = get_model(lmms.model_name(wrapper), force_simple=True)
        base = get_model(wrapper)
        assert issubclass(chat, base) and chat.is_simple == base.is_simple
        assert issubclass(simple, get_model(wrapper, force_simple=True)) and simple.is_simple


def test_untested_lmms_eval_releases_get_no_models_and_a_warning(monkeypatch):
    import lmms_eval.models  # noqa: F401 (its registry loads the entry point now, on the real release)

    monkeypatch.setattr(lmms.importlib.metadata, "version", lambda name: "0.8.0")
    with pytest.warns(UserWarning, match="tested on lmms-eval 0.7.3, not 0.8.0, and offers no models: install"):
        assert lmms.manifests() == []


def test_a_bad_policy_option_is_refused_before_the_checkpoint_loads(tmp_path):
    from lmms_eval.models import get_model

    with pytest.raises(TypeError, match="policy 'fastv' has no option device_mapp; its options are: layer=2"):
        get_model("vtprune_llava_hf")(pretrained=str(tmp_path / "missing"), policy="fastv", keep=8, device_mapp="cpu")


def test_model_args_strings_read_as_python_literals():
    from vtprune.lmms_models import literal

    assert [literal(value) for value in ("None", "3", "half", 0.5)] == [None, 3, "half", 0.5]


def test_a_request_without_images_logs_no_pruning(workspace, monkeypatch):
    from lmms_eval.models import get_model
    from lmms_eval.models.chat.llava_hf import LlavaHf

    model = get_model("vtprune_llava_hf")(pretrained=str(workspace / "llava"), device_map="cpu", device="cpu", keep=4)
    processor = model._image_processor
    picture = synthetic.random_image(60, 90, 0)

    def answer(self, requests):  # the wrapper's generate_until, on a request that is a picture or None
        (request,) = requests
        images = [picture] if request else []
        text = runner.prompt_text(processor, "what ?") if request else "USER: what ? ASSISTANT:"
        return [runner.greedy(self.model, processor, images, [text], 2)[1][0]]

    monkeypatch.setattr(LlavaHf, "generate_until", answer)
    with_image, without = model.generate_until(["picture", None])
    assert (with_image.token_counts.visual_tokens, with_image.token_counts.kept_tokens) == ([64], [4])
    assert (without.token_counts.visual_tokens, without.token_counts.kept_tokens) == ([], [])
    assert without.token_counts.policy == ""

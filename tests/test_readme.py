"""The README's quick start runs as written, on a tiny model saved in the hub's format."""

import re
from pathlib import Path

import numpy as np
from PIL import Image
from vtprune.eval import synthetic

README = Path(__file__).resolve().parent.parent / "README.md"
HUB_MODEL = '"llava-hf/llava-1.5-7b-hf"'


def quick_start() -> str:
    section = README.read_text().split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    config = synthetic.llava_config()
    synthetic.llava_model(config).save_pretrained(tmp_path / "model")
    synthetic.llava_processor(config).save_pretrained(tmp_path / "model")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    code = quick_start()
    assert HUB_MODEL in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace(HUB_MODEL, repr(str(tmp_path / "model"))), "README.md", "exec"), scope)
    record = scope["vtprune"].last_trace(scope["model"])[0]
    assert record.n_before == 16 and record.n_after == 16  # keep=64 is more than the tiny model's 16 tokens
    assert "tensor([" in capsys.readouterr().out

import subprocess
import sys
from pathlib import Path

from helpers import MODEL_TYPES

from vtprune.cli import main


def test_policies_lists_each_policy_with_its_options(capsys):
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    assert "cls_attention" in out and "start_layer=None" in out and "seed=0" in out and "uniform" in out


def test_models(capsys):
    assert main(["models"]) == 0
    assert capsys.readouterr().out.split() == MODEL_TYPES


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "vtprune"
    out = subprocess.run([str(script), "models"], capture_output=True, text=True, check=True).stdout
    assert out.split() == MODEL_TYPES

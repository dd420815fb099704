"""Files in an --out folder are data: a planted pickle that would run code when unpickled is refused with an
error naming the file, and its code never runs (warm-up and checkpoint on --resume, the cached warm-up
under --compare). Config files go through safe parsers only."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from lens_kernels.train.cli import main  # noqa: E402
from lens_kernels.train.config import parse_config  # noqa: E402
from lens_kernels.train.loop import load_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _WritesMarker:
    """Unpickling this calls exec, which creates ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _plant(path, marker):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": _WritesMarker(marker), "eval": {}, "step": 3}, path)


def test_the_planted_file_runs_code_when_loaded_unsafely(tmp_path):
    """The plant is real (so the refusals below can fail): an unsafe load in another process runs it."""
    planted, marker = str(tmp_path / "warmup.pt"), str(tmp_path / "ran")
    _plant(planted, marker)
    code = f"import torch; torch.load({planted!r}, weights_only=bool(0))"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120)
    assert os.path.exists(marker)


def test_load_checkpoint_refuses_a_planted_pickle_and_names_the_file(tmp_path):
    planted, marker = str(tmp_path / "checkpoint.pt"), str(tmp_path / "ran")
    _plant(planted, marker)
    with pytest.raises(ValueError, match="not saved weights-only") as err:
        load_checkpoint(planted, "cpu")
    assert planted in str(err.value) and not os.path.exists(marker)
    torch.save([1, 2], planted)  # loads weights-only, but is not a checkpoint
    with pytest.raises(ValueError, match="not a lens-train checkpoint"):
        load_checkpoint(planted, "cpu")


@pytest.mark.parametrize("planted_name, argv", [
    ("warmup.pt", ["--smoke", "--resume"]),
    ("checkpoint.pt", ["--smoke", "--resume"]),
    (os.path.join("seed0", "warmup.pt"), ["--smoke", "--compare", "--seeds", "1"]),  # no --resume needed
])
def test_lens_train_refuses_a_planted_pickle(tmp_path, capsys, planted_name, argv):
    out = str(tmp_path / "shared_out")
    planted, marker = os.path.join(out, planted_name), str(tmp_path / "ran")
    _plant(planted, marker)
    assert main([*argv, "--out", out, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lens-train: error:" in err and planted in err and "not saved weights-only" in err, err
    assert not os.path.exists(marker)


def test_toml_config_without_tomllib_says_what_to_do(tmp_path, monkeypatch, capsys):
    """On Python 3.10 (no tomllib) a TOML --config is refused with the way out; .json works there."""
    cfg = tmp_path / "run.toml"
    cfg.write_text("steps = 7\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # import tomllib now raises ImportError, as on 3.10
    with pytest.raises(SystemExit):
        parse_config(["--config", str(cfg)])
    assert "needs Python 3.11 or later (tomllib)" in capsys.readouterr().err


def test_help_states_each_default_once(capsys):
    from dataclasses import fields

    from lens_kernels.train.config import TrainConfig

    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("(default:") == len(fields(TrainConfig))
    assert "(default: 1200)" in text and "(default: lens_train_out)" in text
    assert text.count("(default: None)") == 1  # --model's own default, not argparse's for every flag

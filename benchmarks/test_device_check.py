"""benchmarks/device_check.sh, CPU dry run: every step runs in order, each lens-bench step writes its JSON,
the split variant's steps come last, and the short table is printed last."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"


def test_budgets_sum_to_under_six_minutes():
    # The step limits in the script's table (and in its limit calls) leave room for two runs in 15 minutes.
    text = SCRIPT.read_text()
    limits = [int(s) for s in re.findall(r"^#\s+(?:\d\.|[ab]\.).*?(\d+) s\s", text, re.M)]
    assert len(limits) == 9 and sum(limits) <= 360, limits
    calls = [int(s) for s in re.findall(r"^\s*(?:\S+=\S+ )?limit (\d+) ", text, re.M)]
    assert sum(calls) - 5 <= 360, calls  # nvidia-smi's 5 s runs inside the environment step's 10 s
    assert "--no-files" not in text


@pytest.mark.skipif(shutil.which("timeout") is None or sys.platform != "linux", reason="needs GNU timeout")
def test_cpu_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), DRY_SHAPE="4x8x101x16", PYTHON=sys.executable,
               CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    assert "CPU dry run" in out and "step cut" not in out, out[-3000:]
    steps = re.findall(r"^=== \[\d+ s\] (.*)$", out, re.M)
    assert steps[-1] == "short table"
    split = [i for i, s in enumerate(steps) if "split" in s and s.startswith("last")]
    assert len(split) == 2 and split[0] == len(steps) - 3, steps
    files = sorted(p.name for p in tmp_path.iterdir())
    jsons = [f for f in files if f.endswith(".json")]
    assert len(jsons) == 3 and len(files) <= 7 and "device_check.log" in files, files
    by_paths = {}
    for name in jsons:
        result = json.loads((tmp_path / name).read_text())
        assert result["complete"] and result["rounds"] == 3 and "commit" in result["environment"]
        by_paths[frozenset(r["path"] for r in result["rows"])] = result
    assert frozenset({"logits"}) in by_paths and frozenset({"lens-step"}) in by_paths
    # The short table comes last: after it, only the tables themselves and the total time.
    tail = out[out.rindex("=== "):]
    assert tail.count("--- lens-bench_") == 3 and tail.rstrip().splitlines()[-1].startswith("device_check:")

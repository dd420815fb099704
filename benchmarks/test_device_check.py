"""benchmarks/device_check.sh: its step limits fit one device call, and its CPU dry run runs every step in
order (GPU tests before timing, the split variant after the rest, the compile-heavy rows last, the short
table last), each lens-bench step writes its JSON, and at most 8 flat files come back."""
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


def _limit_calls(text):
    """The seconds of every limit the script's code sets (limit N, gpu_tests N), comments left out."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return [int(s) for s in re.findall(r"(?:^|[\s(])(?:limit|gpu_tests) (\d+) (?!s\b)", code, re.M)]


def test_step_limits_fit_one_call():
    # Every step limit, the CUDA extension's included, adds to at most 420 s: the whole check fits one
    # 600 s call of the device tool with room for the machine's own start, and the table at the top
    # says the same limits as the code.
    text = SCRIPT.read_text()
    table = [int(s) for s in re.findall(r"^#.*?\s(\d+) s\s+(?:log|JSON|pytest_gpu|stdout)", text, re.M)]
    calls = _limit_calls(text)
    assert len(table) == 12 and sum(table) <= 420, table
    assert sum(calls) == sum(table), (calls, table)
    assert "limit 115 bash csrc/test/device_check.sh" in text  # the CUDA step counts too
    assert "--no-files" not in text


def test_correctness_before_timing_and_compile_heavy_last():
    text = SCRIPT.read_text()
    code = [line for line in text.splitlines() if line.startswith("step ")]
    order = [i for i, line in enumerate(code) if line.startswith('step "GPU tests')]
    bench = [i for i, line in enumerate(code) if "lens-bench" in line or "headline" in line]
    assert order and bench and max(order) < min(bench), code
    assert "compile-heavy" in code[-2] and "compile-heavy" in code[-3] and code[-1] == 'step "short table"', code
    assert "unset TRITON_INTERPRET" in text


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
    split = [i for i, s in enumerate(steps) if s.startswith("split variant")]
    assert split == [len(steps) - 5, len(steps) - 4], steps
    assert all(s.startswith("last, compile-heavy") for s in steps[-3:-1]), steps
    # the peers' absence is said loudly, first
    wheels = ROOT / "benchmarks" / "wheels"
    have_peers = all(any(wheels.glob(p + "-*.whl")) for p in ("liger_kernel", "cut_cross_entropy"))
    if not have_peers:
        assert out.lstrip().startswith("ERROR: peer wheels missing"), out[:500]
        assert 'pip download --no-deps liger-kernel cut-cross-entropy -d benchmarks/wheels' in out
        assert 'carry: ["benchmarks/wheels"]' in out
    files = sorted(p.name for p in tmp_path.iterdir())
    assert all((tmp_path / f).is_file() for f in files), files
    jsons = [f for f in files if f.endswith(".json")]
    assert len(jsons) == 3 and len(files) <= 8, files
    assert "device_check.log" in files and "pytest_gpu.log" in files, files
    pytest_log = (tmp_path / "pytest_gpu.log").read_text()
    assert "--- pytest -m gpu tests/gpu/" in pytest_log and "skipped" in pytest_log, pytest_log[-2000:]
    by_paths = {}
    for name in jsons:
        result = json.loads((tmp_path / name).read_text())
        assert result["complete"] and result["rounds"] == 3 and "commit" in result["environment"]
        by_paths[frozenset(r["path"] for r in result["rows"])] = result
    assert frozenset({"logits"}) in by_paths and frozenset({"hidden"}) in by_paths, list(by_paths)
    assert any("lens-step" in paths and "advantages" in paths for paths in by_paths), list(by_paths)
    # The short table comes last: after it, only the tables themselves and the total time.
    tail = out[out.rindex("=== "):]
    assert tail.count("--- lens-bench_") == 3 and tail.rstrip().splitlines()[-1].startswith("device_check:")


REHEARSAL = ROOT / "benchmarks" / "rehearse_device_check.sh"


def test_rehearsal_pins_the_gpu_image_versions():
    text = REHEARSAL.read_text()
    proc = subprocess.run(["bash", "-n", str(REHEARSAL)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_VERSION=2.11.0" in text and "TRITON_VERSION=3.6.0" in text and '"numpy>=2.4,<3"' in text
    assert "(3, 12)" in text and 'torch.version.cuda.startswith("13")' in text
    assert "bash benchmarks/device_check.sh" in text and 'CUDA_VISIBLE_DEVICES=""' in text


@pytest.mark.skipif(os.environ.get("LENS_REHEARSAL") != "1",
                    reason="downloads about 3 GB the first time: set LENS_REHEARSAL=1 to run it")
def test_rehearsal_passes(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(REHEARSAL)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

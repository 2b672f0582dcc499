"""benchmarks/gpu_check.sh --dry-run: every step of the GPU check on the CPU (CUDA hidden, tiny
shapes), so the first real run on a lent GPU does not fail on a typo. A few minutes: slow tier."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_dry_and_writes_its_report(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and [s["step"] for s in report["steps"]] == ["pytest", "fused_moe", "gptq", "rtn"]
    assert all(s["rc"] == 0 for s in report["steps"]), report["steps"]
    # the GPU tests were collected, and skipped: CUDA was hidden
    assert report["pytest"]["tests"] >= 10 and report["pytest"]["skipped"] == report["pytest"]["tests"]
    configs = {(r["config"], r["tokens"]) for r in report["fused_moe"]["rows"]}
    assert configs == {(c, t) for c in ("bf16", "4bit", "2bit", "mixed") for t in (1, 4)}
    # the flow ran GPTQ end to end, every stage metered; a dry run's figures are never judged
    assert {"routing", "calibration (gptq)", "quantization (gptq)", "validation", "evaluation"} <= set(report["gptq_stages"])
    assert {"quantization", "evaluation"} <= set(report["rtn_stages"])
    assert report["targets"] and all(t["met"] is None for t in report["targets"])
    assert "dry run: figures mean nothing" in (tmp_path / "gpu_check.md").read_text()


def test_the_gpu_check_refuses_an_unknown_option(tmp_path):
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dryrun"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown option --dryrun" in done.stderr

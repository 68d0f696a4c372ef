"""benchmarks/gpu_session.sh --dry-run: every stage of the one-call GPU acceptance run (build,
GPU tests, ops benchmarks, PGD and AutoAttack against torchattacks, summary) runs end to end on
the CPU, on tiny sizes, and writes its figures as JSON under $OUT."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_session_dry_run(tmp_path):
    pytest.importorskip("torchattacks")
    pytest.importorskip("pytest_benchmark")
    from gpu_session import PGD_ROWS

    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(["bash", os.path.join("benchmarks", "gpu_session.sh"), "--dry-run"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["autoattack.json", "ops.json", "pgd.json", "session.log",
                                            "summary.json"]
    with open(tmp_path / "summary.json") as fh:
        s = json.load(fh)
    assert s["dry_run"] is True and s["device"].startswith("CPU") and s["date"] and s["torch"]
    assert [(t["stage"], t["rc"]) for t in s["stages"]] == [
        ("build", 0), ("tests", 0), ("ops", 0), ("pgd", 0), ("autoattack", 0)]
    # ops: bench_ops' rows with bandwidth and the ratio to the eager sequence; bench_triton ran
    # (and skipped: no GPU)
    ops = [r for r in s["ops"] if r["backend"] != "eager"]
    assert ops and all(r["gb_per_s"] > 0 and r["copy_fraction"] > 0 and r["vs_eager"] > 0 for r in ops)
    assert s["triton"] == []
    # PGD: every row timed on both sides, with the strength each leaves
    rows = s["pgd"]["rows"]
    assert [r["case"] for r in rows] == list(PGD_ROWS)
    for r in rows:
        assert r["fastadv_s"] > 0 and r["baseline_s"] > 0 and r["speedup"] > 0 and r["floor_ratio"] > 0
        assert 0 <= r["robust_fastadv"] <= 1 and 0 <= r["robust_baseline"] <= 1
    aa = s["autoattack"]
    assert aa["n"] == 6 and aa["speedup_wall"] > 0
    for side in ("fastadv", "reference"):
        assert 0 <= aa[side]["robust_accuracy"] <= 1 and aa[side]["wall_s"] > 0
    with open(tmp_path / "pgd.json") as fh:
        assert json.load(fh)["rows"] == rows
    log = (tmp_path / "session.log").read_text()
    for stage in ("build", "tests", "ops", "pgd", "autoattack", "summary"):
        assert f"===== {stage}: rc=0" in log

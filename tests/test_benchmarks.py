"""Every benchmarks/*.py runs end to end with --smoke: a tiny budget that writes only under its
working folder or $TMPDIR (both a fresh temporary folder here), so a benchmark that no longer
matches the scripts it drives fails here rather than on the next long measurement."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))


@pytest.mark.parametrize("script", BENCHMARKS, ids=os.path.basename)
def test_benchmark_smoke_run(script, tmp_path):
    # One thread per process: the smoke budgets are sized for a shared 2-core machine.
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, script, "--smoke"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, f"{os.path.basename(script)} --smoke failed:\n{result.stderr[-4000:]}"

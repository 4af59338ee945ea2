"""Every benchmarks/*.py runs end to end with --smoke: a tiny budget that writes only under its
working folder or $TMPDIR (both a fresh temporary folder here), so a benchmark that no longer
matches the scripts it drives fails here rather than on the next long measurement."""
import glob
import os
import subprocess
import sys

import numpy as np
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


def test_centre_scores_pick_the_nearest_combination_mean():
    """text_fashion_experiment's centres stage: a centre counts for its class when the nearest of the 40
    (class, size, tone) means is one of that class's 4, and for its combination when it is that one."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import text_fashion_experiment

    means = torch.randn(40, 2, 3, 3, generator=torch.Generator().manual_seed(0)) * 10
    combination = np.array([0, 5, 17, 39])
    centres = means[[0, 6, 2, 39]] + 0.01  # right; same class (5 -> 6); other class (17 -> 2); right
    scores = text_fashion_experiment.centre_scores(centres, combination, means)
    assert scores["item"] == 0.75 and scores["all"] == 0.5
    assert list(scores["nearest_class"]) == [0, 1, 0, 9]

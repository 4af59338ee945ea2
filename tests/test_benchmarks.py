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


def test_the_budget_planner_gives_training_what_evaluation_leaves(tmp_path, capsys):
    """fashion_experiment's --budget-minutes: evaluation first (judged images x seconds per image, plus
    start-up per command), then the steps that fit; too small a budget is one line, not a plan."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import fashion_experiment

    args = fashion_experiment.parse_args(["--out", str(tmp_path), "--configs", "condot", "class-sigma1",
                                          "--seeds", "0", "1", "--num-images", "100",
                                          "--budget-minutes", "10"])
    os.makedirs(tmp_path / "calibration")
    (tmp_path / "calibration" / "plan.json").write_text(
        '{"step_seconds": 0.5, "start_seconds": 3.0, "image_seconds": 0.01}')
    plan = fashion_experiment.evaluation_plan(args)
    judged = sum(len(nfes) * count for *_, nfes, _, count in plan) * 100
    commands = sum(count for *_, count in plan)
    # condot, seed 0: Euler 1-32, midpoint 2-8, NFE 8 at 3 earlier checkpoints; seed 1: Euler 2 and 8.
    # class-sigma1 (a variant), both seeds: Euler 1, 2, 8; seed 0 also NFE 8 at the 3 earlier checkpoints.
    assert judged == ((6 + 3 + 3 + 2) + (3 + 3 + 3)) * 100 and commands == (1 + 1 + 3 + 1) + (1 + 3 + 1)
    evaluation = judged * 0.01 + commands * 3.0
    assert fashion_experiment.plan(args) == int((600 - evaluation) / (4 * 0.5))
    assert "plan for 10 min" in capsys.readouterr().out
    args.budget_minutes = 0.5  # less than the evaluation alone
    with pytest.raises(SystemExit, match="^error: --budget-minutes 0.5 leaves 0 training steps"):
        fashion_experiment.plan(args)

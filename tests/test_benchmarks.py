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


def fake_text_results(accuracy, seeds=(0, 1)):
    """A results.json of text_fashion_experiment with one measure per (config, seed, NFE): every split's
    judge score is accuracy[config][seed] at every NFE and key."""
    judge = {split: {key: None for key in ("item", "size", "tone", "all")} for split in
             ("val", "heldout-word", "heldout-template", "heldout-combination", "seen", "heldout")}
    runs = {}
    for config, by_seed in accuracy.items():
        for seed in seeds:
            scores = {split: dict.fromkeys(keys, by_seed[seed]) for split, keys in judge.items()}
            runs[f"{config}-minilm-seed{seed}"] = {"nfe": {str(n): {"judge": scores} for n in (2, 4, 8)}}
    real = {split: dict.fromkeys(keys, 0.9) for split, keys in judge.items()}
    centres = {"minilm": {"runs": {"text-minilm-seed0": {"heldout-word": {"item": 0.6}},
                                   "sweep: as the runs": {"heldout-word": {"item": 0.5}}}}}
    return {"runs": runs, "floors": {"real": {"judge": real}}, "centres": centres}


def test_text_targets_read_the_means_over_seeds_against_condot_and_the_encoder_ceiling():
    """text_fashion_experiment's targets: means over the seeds; gains in points over CondOT's mean;
    held-out words as a share of the ceiling of the runs' own mapper (not of a sweep variant)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import text_fashion_experiment

    results = fake_text_results({"condot": {0: 0.20, 1: 0.30}, "text": {0: 0.50, 1: 0.56},
                                 "text-ot": {0: 0.80, 1: 0.76}})
    targets = text_fashion_experiment.targets(results, "minilm")
    assert targets["text"]["seen_item_nfe8"] == pytest.approx(0.53)
    assert not targets["text"]["seen_item_at_least_70"] and targets["text-ot"]["seen_item_at_least_70"]
    gains = targets["text"]["all_correct_gain_over_condot"]
    assert len(gains) == 6 and all(gain == pytest.approx(0.53 - 0.25) for gain in gains.values())
    assert targets["text"]["gains_at_least_10_points"]
    assert targets["text-ot"]["encoder_ceiling"] == 0.6
    assert targets["text-ot"]["share_of_encoder_ceiling"] == pytest.approx(0.78 / 0.6)
    assert targets["text-ot"]["at_least_90_percent_of_ceiling"] and not targets["text"][
        "at_least_90_percent_of_ceiling"]  # 0.53 / 0.6 = 0.88


def test_text_tables_give_mean_and_sample_std_over_seeds():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import text_fashion_experiment

    assert text_fashion_experiment.spread([0.2, 0.3]) == "25 ± 7"  # sample std of 20, 30: 7.07
    assert text_fashion_experiment.spread([0.2]) == "20" and text_fashion_experiment.spread([]) == "-"
    name = text_fashion_experiment.run_name("text-ot-sigma1", "minilm", 2)
    assert text_fashion_experiment.parse_name(name) == ("text-ot-sigma1", "minilm", 2)


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


def test_recipe_search_reads_recipes_minutes_and_rows(tmp_path):
    """text_recipe_search: MODEL:PATCH:STEPS parsed or refused in one line; training minutes summed record
    by record from the log's images/s; one table row per configuration with seen / held-out accuracy."""
    import json

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import text_recipe_search as search

    assert search.parse_recipe("mini:4:2760") == ("mini", 4, 2760)
    for bad in ("mini:4", "huge:2:10", "mini:x:10", "mini:0:10"):
        with pytest.raises(ValueError, match="recipe"):
            search.parse_recipe(bad)
    run = tmp_path / "run"
    run.mkdir()
    records = [{"stage": "mapper", "step": 10}, {"stage": "flow", "step": 10, "images_per_s": 64.0},
               {"stage": "flow", "step": 30, "images_per_s": 32.0}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert search.training_minutes(str(run), batch=128) == pytest.approx((10 * 2 + 20 * 4) / 60)
    judge = {"seen": {"item": 0.5, "size": 0.75, "tone": 1.0, "all": 0.25},
             "heldout": {"item": 0.4, "size": 0.5, "tone": 0.5, "all": 0.125}}
    row = {"recipe": search.recipe_name("mini", 4, 2760), "config": "condot", "parameters": 1.78e6,
           "train_minutes": 11.04, "curve": {690: 0.1, 2760: 0.25},
           "nfe": {4: {"judge": judge, "fd_seen": 700.4}, 8: {"judge": judge, "fd_seen": 1}}}
    floors = {"real": {"judge": {"seen": {"all": 0.9}, "heldout": {"all": 0.88}}, "fd": {"seen": 200.0}}}
    table = search.markdown([row], floors).splitlines()
    assert table[2] == ("| mini p4, 2760 steps | CondOT (N(0, I)) | 1.78M | 11.0 | - | - | 25% / 12% "
                        "| 25% / 12% | 50% / 75% / 100% | 700 | 10 / 25 |")
    assert "90% / 88%" in table[-1]


def test_a_stage_run_for_added_runs_keeps_what_was_measured_before(tmp_path):
    """text_fashion_experiment.keep_earlier: entries of the earlier file that this call did not measure are
    kept when it was measured the same way, replaced otherwise; entries measured now win."""
    import json

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import text_fashion_experiment

    path = tmp_path / "results.json"
    path.write_text(json.dumps({"setup": {"nfe": [4]}, "runs": {"a": 1, "b": 2}}))
    fresh = {"setup": {"nfe": [4]}, "runs": {"b": 20, "c": 30}}
    text_fashion_experiment.keep_earlier(str(path), fresh, lambda e: e["setup"] == fresh["setup"], "runs")
    assert fresh["runs"] == {"a": 1, "b": 20, "c": 30}
    other = {"setup": {"nfe": [8]}, "runs": {"c": 30}}
    text_fashion_experiment.keep_earlier(str(path), other, lambda e: e["setup"] == other["setup"], "runs")
    assert other["runs"] == {"c": 30}
    by_encoder = {"builtin": {"x": 1}}
    path.write_text(json.dumps({"minilm": {"y": 2}, "builtin": {"x": 0}}))
    text_fashion_experiment.keep_earlier(str(path), by_encoder, lambda e: True)
    assert by_encoder == {"builtin": {"x": 1}, "minilm": {"y": 2}}

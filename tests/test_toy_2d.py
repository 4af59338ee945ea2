"""toy_2d.py: data, the W2 measure against brute force, a smoke run, and clear errors."""
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import toy_2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", toy_2d.DATASETS)
def test_make_data_shapes_types_and_reproducibility(name):
    x, y = toy_2d.make_data(name, 500, seed=3)
    assert x.shape == (500, 2) and x.dtype == torch.float32 and y.shape == (500,) and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(toy_2d.NUM_CLASSES[name]))
    x_again, y_again = toy_2d.make_data(name, 500, seed=3)
    assert torch.equal(x, x_again) and torch.equal(y, y_again)
    assert not torch.equal(x, toy_2d.make_data(name, 500, seed=4)[0])
    assert x.abs().max() < 3.5  # about unit spread, so N(0, I) is a fair baseline


def test_ring_class_means_coincide_at_the_empty_centre_and_blob_means_do_not():
    x, y = toy_2d.make_data("rings", 30_000, seed=0)
    means = torch.stack([x[y == c].mean(0) for c in range(3)])
    assert means.norm(dim=1).max() < 0.05  # every ring's mean is the centre, far from its data
    assert x.norm(dim=1).min() > 0.4
    x, y = toy_2d.make_data("blobs", 30_000, seed=0)
    means = torch.stack([x[y == c].mean(0) for c in range(4)])
    assert torch.pdist(means).min() > 1.5


def test_make_data_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown dataset 'swiss'"):
        toy_2d.make_data("swiss", 10, 0)


def test_class_conditional_w2_matches_brute_force_and_known_shifts():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 2, generator=generator).double(), torch.randn(12, 2, generator=generator).double()
    labels = torch.tensor([0] * 6 + [1] * 6)
    expected = []
    for c in (0, 1):
        pa, pb = a[labels == c], b[labels == c]
        best = min(sum(((pa[i] - pb[j]) ** 2).sum().item() for i, j in enumerate(p))
                   for p in itertools.permutations(range(6)))
        expected.append(math.sqrt(best / 6))
    assert toy_2d.class_conditional_w2(a, b, labels) == pytest.approx(np.mean(expected), rel=1e-9)
    shift = torch.tensor([0.3, -0.4])  # a translation is paired with itself: W2 = |shift|
    assert toy_2d.class_conditional_w2(a + shift, a, labels) == pytest.approx(0.5, rel=1e-6)
    within_class_shuffle = torch.tensor([5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6])
    assert toy_2d.class_conditional_w2(a[within_class_shuffle], a, labels) == pytest.approx(0, abs=1e-12)


def test_class_prior_shortens_pairs_and_with_ot_samples_well_in_one_step(tmp_path):
    args = toy_2d.parse_args(["--steps", "300", "--quiet", "--device", "cpu", "--out", str(tmp_path)])
    x, y = toy_2d.make_data("blobs", 4000, 0)
    x_test, y_test = toy_2d.make_data("blobs", 400, 1)
    noise = torch.randn(400, 2, generator=torch.Generator().manual_seed(0))
    w2, cost = {}, {}
    for method in ("condot", "cprior", "cprior-ot"):
        model, prior, cost[method], _ = toy_2d.train(method, x, y, 4, args)
        samples = toy_2d.generate(model, prior, y_test, 1, "euler", noise).x
        w2[method] = toy_2d.class_conditional_w2(samples, x_test, y_test)
    # Blobs sit on a circle of radius 2 with each class mean near its blobs: the class prior's
    # pairs are several times shorter, and OT within the class makes them nearly straight, so a
    # single Euler step already lands near the data while CondOT collapses onto class averages.
    assert cost["cprior"] < 0.3 * cost["condot"] and cost["cprior-ot"] < cost["cprior"]
    assert w2["cprior-ot"] < 0.75 * w2["condot"], w2


def test_default_style_run_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    toy_2d.main(toy_2d.parse_args(["--steps", "30", "--train-size", "500", "--test-size", "120",
                                   "--nfe", "1", "2", "--methods", "condot", "cprior-ot", "--out", str(out),
                                   "--quiet", "--device", "cpu"]))
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == (f"wrote {out} (args.json, results.json, samples.npz, trajectories.png, samples.png, "
                    "w2_vs_nfe.png)")
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "blobs" and list(results["methods"]) == ["condot", "cprior-ot"]
    for result in results["methods"].values():
        assert set(result) == {"transport_cost", "straightness", "train_seconds", "w2"}
        assert list(result["w2"]["euler"]) == ["1", "2"] and list(result["w2"]["midpoint"]) == ["2"]
        assert all(np.isfinite(v) for curve in result["w2"].values() for v in curve.values())
    samples = np.load(out / "samples.npz")
    assert samples["data"].shape == (120, 2) and samples["data_labels"].shape == (120,)
    assert samples["cprior-ot/midpoint/2"].shape == (120, 2)
    assert np.array_equal(samples["cprior-ot/euler/1/labels"], samples["data_labels"])
    assert "condot/midpoint/1" not in samples  # midpoint cannot spend an odd NFE
    for name in ("args.json", "trajectories.png", "samples.png", "w2_vs_nfe.png"):
        assert (out / name).stat().st_size > 0
    before = (out / "results.json").read_bytes()
    with pytest.raises(SystemExit):  # a second run into the same folder is refused, and writes nothing
        toy_2d.parse_args(["--out", str(out)])
    assert (out / "results.json").read_bytes() == before
    assert toy_2d.parse_args(["--out", str(out), "--overwrite"]).overwrite


def test_sigma_sweep_writes_one_row_per_sigma(tmp_path):
    toy_2d.main(toy_2d.parse_args(["--steps", "20", "--train-size", "300", "--test-size", "60",
                                   "--nfe", "1", "2", "--sigma-sweep", "0.1", "1.0", "--out", str(tmp_path),
                                   "--quiet", "--device", "cpu"]))
    sweep = json.loads((tmp_path / "sigma_sweep.json").read_text())
    assert sweep["sigma"] == [0.1, 1.0] and len(sweep["w2"]) == 2 and set(sweep["condot"]) == {"1", "2"}
    assert (tmp_path / "sigma_sweep.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--nfe", "0"], "--nfe values must be positive"),
    (["--steps", "0"], "--steps must be positive"),
    (["--prior-sigma", "-1"], "prior sigma must be positive"),
    (["--dataset", "swiss"], "invalid choice: 'swiss'"),
    (["--methods", "ddpm"], "invalid choice: 'ddpm'"),
    (["--out", "a_file"], "--out a_file: a_file is an existing file, not a folder"),
])
def test_bad_arguments_give_one_clear_line(argv, message, tmp_path):
    (tmp_path / "a_file").write_text("")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "toy_2d.py"), *argv], cwd=tmp_path,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr

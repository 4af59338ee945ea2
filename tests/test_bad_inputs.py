"""The bad-input contract in one place: every input that can be checked is checked before the long work, and
a bad one gives one line "error: ..." that names the option or file, never a traceback; a failed write leaves
no partial file. (Older checks of the same kind stay beside the tests of each script.)"""
import errno
import json
import os

import numpy as np
import pytest
import torch

import flow
import sample
import toy_2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tests_never_touch_the_repositorys_runs_folder():
    """conftest runs every test in a temporary folder: a default --out such as toy_2d's runs/toy_2d, which
    the README's first command fills, lies outside the repository."""
    out = os.path.abspath(toy_2d.parse_args([]).out)
    assert not out.startswith(ROOT + os.sep), out


# ----------------------------------------------------------------------------------------------
# A failed write (full disk, torch.save's RuntimeError) is one line naming the file, and leaves nothing.

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_then(error):
    """A writer that writes a few bytes and then fails, as one does on a full disk."""
    def write(*args, **kwargs):
        file = next(a for a in (*args, *kwargs.values()) if hasattr(a, "write"))
        file.write(b"half" if "b" in getattr(file, "mode", "b") else "half")
        raise error
    return write


def test_torch_save_runtime_error_on_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    torch_error = RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                               "writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", half_then(torch_error))
    path = tmp_path / "step_0000001.pt"
    with pytest.raises(SystemExit) as stop:
        flow.save_atomic({"weight": torch.zeros(3)}, str(path))
    assert str(stop.value) == (f"error: cannot write {path}: [enforce fail at inline_container.cc:778] . "
                               "PytorchStreamWriter failed writing file data/0: file write failed")
    assert os.listdir(tmp_path) == []


TOY = ["--steps", "2", "--train-size", "40", "--test-size", "8", "--methods", "condot", "--nfe", "1",
       "--solvers", "euler", "--quiet", "--device", "cpu"]


def test_toy_2d_full_disk_before_training_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(json, "dump", half_then(FULL))
    monkeypatch.setattr(toy_2d, "train", lambda *args: pytest.fail("trained before the first write"))
    with pytest.raises(SystemExit, match=f"^error: cannot write {tmp_path}/args.json: No space left on"):
        toy_2d.main(toy_2d.parse_args([*TOY, "--out", str(tmp_path)]))
    assert os.listdir(tmp_path) == []


def test_toy_2d_full_disk_leaves_no_cut_off_npz(tmp_path, monkeypatch):
    monkeypatch.setattr(np, "savez", half_then(FULL))
    with pytest.raises(SystemExit, match=f"^error: cannot write {tmp_path}/samples.npz: No space left"):
        toy_2d.main(toy_2d.parse_args([*TOY, "--out", str(tmp_path)]))
    assert sorted(os.listdir(tmp_path)) == ["args.json", "results.json"]  # nothing half-written


def test_toy_2d_full_disk_leaves_no_cut_off_png(tmp_path, monkeypatch):
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, file, **kw: half_then(FULL)(file))
    with pytest.raises(SystemExit, match=f"^error: cannot write {tmp_path}/trajectories.png: No space left"):
        toy_2d.main(toy_2d.parse_args([*TOY, "--out", str(tmp_path)]))
    assert sorted(os.listdir(tmp_path)) == ["args.json", "results.json", "samples.npz"]


def fake_class_sampler(image_size=8, num_classes=3):
    """A flow.Sampler whose velocity is zero and whose latents are its images: sample.py without training."""
    shape = (3, image_size, image_size)
    return flow.Sampler(
        kind="class", model=lambda x, t, cond: torch.zeros_like(x), prior=flow.GaussianPrior(shape),
        latent_shape=shape, make_condition=lambda labels: torch.as_tensor(labels),
        null_condition=lambda batch: torch.full((batch,), num_classes), decode=lambda x: x.clamp(-1, 1),
        options={}, trained_with_dropout=False, num_classes=num_classes)


@pytest.fixture
def fake_checkpoint(tmp_path, monkeypatch):
    """A checkpoint path that sample.py takes for a class checkpoint of fake_class_sampler."""
    monkeypatch.setattr(sample, "load_sampler", lambda *args: ("class", fake_class_sampler()))
    path = tmp_path / "step_0000001.pt"
    path.write_bytes(b"")
    return str(path)


@pytest.mark.parametrize("writer, name", [("grid", "euler_nfe001.png"), ("npz", "euler_nfe001.npz")])
def test_sample_full_disk_leaves_no_cut_off_png_or_npz(tmp_path, monkeypatch, fake_checkpoint, writer, name):
    from PIL import Image

    if writer == "grid":
        monkeypatch.setattr(Image.Image, "save", lambda self, file, **kw: half_then(FULL)(file))
    else:
        monkeypatch.setattr(np, "savez", half_then(FULL))
    out = tmp_path / "samples"
    with pytest.raises(SystemExit, match=f"^error: cannot write {out}/{name}: No space left on device$"):
        sample.main(sample.parse_args(["--ckpt", fake_checkpoint, "--out", str(out), "--nfe", "1",
                                       "--num-images", "4", "--quiet"]))
    assert name not in os.listdir(out) and not any(f.endswith(".tmp") for f in os.listdir(out))

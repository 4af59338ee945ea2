"""The bad-input contract in one place: every input that can be checked is checked before the long work, and
a bad one gives one line "error: ..." that names the option or file, never a traceback; a failed write leaves
no partial file. (Older checks of the same kind stay beside the tests of each script.)"""
import argparse
import errno
import importlib
import json
import os

import numpy as np
import pytest
import torch
from fakes import write_coco, write_taef2

import fid
import flow
import sample
import toy_2d
import train_text

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


# ----------------------------------------------------------------------------------------------
# Pretrained weights are checked on load: the published sha256, finite tensors, a finite test batch, and a
# --vae folder is recognised by what it holds.


def test_taef2_files_other_than_the_published_ones_load_with_a_one_line_warning_each(tmp_path, capsys,
                                                                                       monkeypatch):
    write_taef2(tmp_path)  # random weights: not the published files
    flow.load_autoencoder(str(tmp_path))
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [f"warning: {tmp_path / name} is not the published {name} (another sha256)"
                        for name in flow.TAEF2_FILES]
    monkeypatch.setattr(flow, "TAEF2_SHA256", {name: flow.file_sha256(tmp_path / name)
                                               for name in flow.TAEF2_FILES})
    flow.load_autoencoder(str(tmp_path))  # the expected files: no warning
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", flow.TAEF2_FILES)
def test_taef2_file_with_a_nan_weight_is_refused_in_one_line(tmp_path, name):
    write_taef2(tmp_path)
    state = torch.load(tmp_path / name, weights_only=True)
    key = sorted(state)[3]
    state[key].view(-1)[5] = float("nan")
    torch.save(state, tmp_path / name)
    with pytest.raises(SystemExit) as stop:
        flow.load_autoencoder(str(tmp_path))
    assert str(stop.value) == f"error: {tmp_path / name} holds NaN or inf values in state_dict[{key!r}]: " \
                              "refused"


@pytest.mark.parametrize("name", flow.TAEF2_FILES)
def test_taef2_weights_that_turn_a_test_batch_into_inf_are_refused(tmp_path, name):
    """Finite but absurd weights (as flipped bytes give: float16 values near its maximum) pass every
    per-tensor check; the test batch through encoder and decoder shows it."""
    write_taef2(tmp_path)
    state = torch.load(tmp_path / name, weights_only=True)
    torch.save({key: torch.full_like(value, 6e4) for key, value in state.items()}, tmp_path / name)
    with pytest.raises(SystemExit, match=f"^error: {tmp_path / name} turns a test batch into NaN or inf"):
        flow.load_autoencoder(str(tmp_path))


@pytest.mark.parametrize("present", flow.TAEF2_FILES)
def test_vae_folder_with_one_taef2_file_names_the_missing_one(tmp_path, present):
    write_taef2(tmp_path / "both")
    os.makedirs(tmp_path / "one")
    os.link(tmp_path / "both" / present, tmp_path / "one" / present)
    missing = tmp_path / "one" / next(name for name in flow.TAEF2_FILES if name != present)
    with pytest.raises(SystemExit) as stop:
        flow.load_autoencoder(str(tmp_path / "one"))
    folder = tmp_path / "one"
    assert str(stop.value) == f"error: {folder} holds {present} but not {missing}: a TAEF2 folder needs both"


# ----------------------------------------------------------------------------------------------
# Checks before the long work.


def parse_error(parse_args, argv, capsys):
    """The one line argparse prints for a bad option (after its usage line)."""
    with pytest.raises(SystemExit) as stop:
        parse_args(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpuu"], "--device cpuu: not a torch device name (cpu, cuda, cuda:1, mps...)"),
    (["--device", "cuda:99"], "--device cuda:99: not available on this machine"),
    (["--lr", "-0.001"], "--lr must be positive, got -0.001"),
    (["--lr", "nan"], "--lr must be positive, got nan"),
    (["--solvers", "euler", "midpoint", "--nfe", "1", "3"],
     "--solvers midpoint takes 2 evaluations per step: no --nfe in [1, 3] is a multiple of 2"),
])
def test_toy_2d_bad_options_are_one_line_before_training(argv, message, capsys, tmp_path):
    error = parse_error(toy_2d.parse_args, [*argv, "--out", str(tmp_path)], capsys)
    assert ": error: " in error and message in error


def test_toy_2d_train_size_that_leaves_a_class_empty_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --train-size 3 leaves classes \[.*\] of blobs without"):
        toy_2d.main(toy_2d.parse_args([*TOY, "--train-size", "3", "--out", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()  # so the next run needs no --overwrite


@pytest.mark.parametrize("options, message", [
    (["--grid", "0"], "--grid must be positive"),  # it divided by zero
    (["--out", ""], "--out : an empty path is no folder"),  # it fell back to the default folder
])
def test_sample_bad_options_are_one_line(options, message, capsys):
    error = parse_error(sample.parse_args, ["--ckpt", "run", *options], capsys)
    assert ": error: " in error and message in error


def test_sample_refuses_more_images_than_memory_holds_before_making_any(tmp_path, fake_checkpoint):
    with pytest.raises(SystemExit, match=r"^error: --num-images 1000000000000 needs about 357627.9 GiB for "
                                         r"its 8x8 images, more than the .* GiB of memory available"):
        sample.main(sample.parse_args(["--ckpt", fake_checkpoint, "--num-images", str(10**12),
                                       "--out", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, line, char", [("a red circle\n\x01\x02\x03\n", 2, "\\x01"),
                                              ("\x00", 1, "\\x00"), ("a blue\x1csquare\n", 1, "\\x1c")])
def test_sample_prompts_with_control_bytes_are_refused(tmp_path, text, line, char):
    (tmp_path / "prompts.txt").write_text(text)
    with pytest.raises(SystemExit) as stop:
        sample.parse_args(["--ckpt", "run", "--prompts", str(tmp_path / "prompts.txt")])
    assert str(stop.value) == (f"error: --prompts {tmp_path / 'prompts.txt'} line {line} holds the "
                               f"non-printable character '{char}': one plain-text caption per line")


def test_sample_prompts_keep_unicode_tabs_and_windows_line_ends(tmp_path):
    (tmp_path / "prompts.txt").write_bytes("\ufeffune robe \u00e9t\u00e9\r\na\tshirt\r\n".encode())
    args = sample.parse_args(["--ckpt", "run", "--prompts", str(tmp_path / "prompts.txt")])
    assert args.prompt_lines == ["une robe \u00e9t\u00e9", "a\tshirt"]


TRAIN_CLASS = ["--steps", "1", "--global-batch", "16", "--warmup-steps", "1", "--sample-every", "1000",
               "--sample-nfe", "1", "--ckpt-every", "1", "--log-every", "1", "--workers", "0", "--quiet"]
TRAIN_TEXT = ["--model", "tiny", "--steps", "1", "--mapper-steps", "1", "--global-batch", "8", "--sample-nfe",
              "1", "--ckpt-every", "1", "--sample-every", "1000", "--mapper-width", "32", "--workers", "0",
              "--quiet"]


@pytest.mark.parametrize("trainer, options, option, value", [
    ("train_class", TRAIN_CLASS, "model", "mini"), ("train_class", TRAIN_CLASS, "prior", "gaussian"),
    ("train_text", TRAIN_TEXT, "model", "small"), ("train_text", TRAIN_TEXT, "mapper_width", 64)])
def test_checkpoint_whose_options_do_not_fit_its_weights_is_one_line(tmp_path, trainer, options, option,
                                                                     value):
    """An edited or mixed-up checkpoint: its recorded options build another network than its weights."""
    module = importlib.import_module(trainer)
    module.main(module.parse_args([*options, "--out", str(tmp_path / "run")]))
    path = str(tmp_path / "run" / "checkpoints" / "step_0000001.pt")
    checkpoint = flow.load_checkpoint(path)
    checkpoint["args"][option] = value
    flow.save_atomic(checkpoint, path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    with pytest.raises(SystemExit, match=f"^error: {path}: its recorded options do not fit its weights "
                                         r"\((size mismatch|Missing key|Unexpected key)"):
        sample.main(sample.parse_args(["--ckpt", path, "--out", str(tmp_path / "samples")]
                                      + ["--prompts", str(prompts)] * (trainer == "train_text")))


@pytest.mark.parametrize("options, message", [
    (["--patch-size", "0"], "--patch-size must be positive"),  # it silently became 8
    (["--patch-size", "3"], "--patch-size 3 does not divide the 32x32 latents of --image-size 32"),
    (["--out", ""], "--out : an empty path is no folder"),  # it failed after the data were loaded
])
def test_train_text_bad_options_are_one_line_before_the_data(options, message, capsys):
    error = parse_error(train_text.parse_args, options, capsys)
    assert ": error: " in error and message in error


def test_train_text_missing_text_encoder_is_found_before_the_images_are_encoded(tmp_path, monkeypatch):
    for split in ("train2017", "val2017"):
        write_coco(tmp_path / "coco", split)
    write_taef2(tmp_path / "taef2")
    monkeypatch.setattr(train_text, "encode_to_cache", lambda *args: pytest.fail("images encoded first"))
    missing = str(tmp_path / "minilm")
    args = train_text.parse_args(["--data", "coco", "--data-root", str(tmp_path / "coco"),
                                  "--vae", str(tmp_path / "taef2"), "--text-encoder", missing,
                                  "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match=f"^error: cannot load the text encoder '{missing}'"):
        train_text.main(args)


TEXT_CACHE = argparse.Namespace(text_encoder="builtin", text_length=12, quiet=True)


@pytest.mark.parametrize("damage", ["pooled cut short", "tokens flipped", "tokens missing",
                                    "index cut short"])
def test_damaged_text_cache_is_refused_in_one_line_naming_the_file(tmp_path, damage):
    captions = ["", "a red circle", "a blue square"]
    made = train_text.cached_text(TEXT_CACHE, str(tmp_path), captions, 0, train_text.WordEncoder)
    folder = tmp_path / "text-builtin-12"
    again = train_text.cached_text(TEXT_CACHE, str(tmp_path), captions, 0, lambda: pytest.fail("encoded"))
    assert all(np.array_equal(a, b) for a, b in zip(made, again))  # read back, verified
    name = {"pooled": "pooled.npy", "tokens": "tokens.npy", "index": "info.json"}[damage.split()[0]]
    data = (folder / name).read_bytes()
    if damage.endswith("cut short"):
        (folder / name).write_bytes(data[:len(data) // 2])
    elif damage.endswith("flipped"):  # the values stay finite: only the checksum tells
        (folder / name).write_bytes(data[:-64] + bytes(b ^ 1 for b in data[-64:]))
    else:
        os.remove(folder / name)
    expected = (f"text cache index {folder / name} cannot be read" if name == "info.json" else
                f"text cache file {folder / name} is missing or damaged")
    with pytest.raises(SystemExit, match=f"^error: {expected}"):
        train_text.cached_text(TEXT_CACHE, str(tmp_path), captions, 0, lambda: pytest.fail("encoded"))


def test_text_cache_made_before_checksums_is_made_again(tmp_path):
    captions = ["", "a red circle"]
    train_text.cached_text(TEXT_CACHE, str(tmp_path), captions, 0, train_text.WordEncoder)
    index = tmp_path / "text-builtin-12" / "info.json"
    old = {key: value for key, value in json.loads(index.read_text()).items() if key != "sha256"}
    index.write_text(json.dumps(old))
    train_text.cached_text(TEXT_CACHE, str(tmp_path), captions, 0, train_text.WordEncoder)
    assert "sha256" in json.loads(index.read_text())


def test_train_text_resume_on_another_data_set_is_refused_whatever_its_path(tmp_path):
    """The same images with other captions, in another folder with its own latent cache: the latents, their
    statistics and every option match, so only the data fingerprint tells (it resumed on the new captions)."""
    write_taef2(tmp_path / "taef2")
    for root, words in (("coco", "a red circle"), ("copy", "a red circle"), ("other", "a blue square")):
        for split in ("train2017", "val2017"):
            write_coco(tmp_path / root, split, images=4, words=words)

    def run(root, *extra):
        options = ["--data", "coco", "--data-root", str(tmp_path / root), "--vae", str(tmp_path / "taef2"),
                   "--text-encoder", "builtin", "--image-size", "16", *TRAIN_TEXT,
                   "--out", str(tmp_path / "run"), "--latent-cache", str(tmp_path / root / "cache"), *extra]
        train_text.main(train_text.parse_args(options))

    run("coco")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000001.pt"
    with pytest.raises(SystemExit, match=f"^error: {checkpoint} was trained on another data set"):
        run("other", "--steps", "2", "--resume")
    run("copy", "--steps", "2", "--resume")  # the same data in another folder: resumed
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "step_0000002.pt")


REF = ["ref", "--images", "builtin-digits"]
CALC = ["calc", "--images", "x.npz", "--ref", "r.npz"]


@pytest.mark.parametrize("command, option, path, message", [
    (REF, "--out", "", "an empty path is no file"),
    (REF, "--out", "{tmp}", "a folder, not a file"),  # written only after the features were computed
    (REF, "--out", "{tmp}/file/ref.npz", "is an existing file, not a folder"),
    (CALC, "--json", "", "an empty path is no file"),  # silently not written
    (CALC, "--json", "{tmp}/file/out.json", "is an existing file, not a folder"),
])
def test_fid_output_files_are_checked_before_the_features(command, option, path, message, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    path = path.format(tmp=tmp_path)
    error = parse_error(fid.parse_args, [*command, option, path], capsys)
    assert f": error: {option} {path}: " in error and message in error

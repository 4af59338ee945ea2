"""sample.py on real tiny checkpoints of train_class.py (built-in digits, a few steps; Fashion-MNIST-shaped
idx files through random TAEF2 weights, written here) and of train_text.py."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from fakes import write_idx, write_taef2

import fid
import flow
import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--global-batch", "16", "--warmup-steps", "1", "--lr", "3e-3", "--sample-every", "1000",
         "--sample-nfe", "1", "--quiet"]


def folder_state(folder):
    """Every file under folder with its content hash: what a refused command must leave alone."""
    state = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(parent, name), "rb") as file:
                digest = hashlib.sha256(file.read()).hexdigest()
            state[os.path.relpath(os.path.join(parent, name), folder)] = digest
    return state


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import train_class

    out = tmp_path_factory.mktemp("train_class")
    train_class.main(train_class.parse_args(["--steps", "6", *TRAIN, "--ckpt-every", "6", "--log-every", "6",
                                             "--out", str(out)]))
    return str(out)


@pytest.fixture(scope="module")
def taef2_run(tmp_path_factory):
    """2 steps on 20 Fashion-MNIST-shaped images (64x64 RGB) in the latent space of random TAEF2 weights,
    with label dropout; returns (run folder, autoencoder folder)."""
    import train_class

    root = tmp_path_factory.mktemp("taef2_run")
    rng = np.random.default_rng(0)
    os.makedirs(root / "data")
    for split, count in (("train", 20), ("test", 10)):
        image_file, label_file = flow.FASHION_FILES[split]
        write_idx(root / "data" / image_file, rng.integers(0, 256, (count, 28, 28)))
        write_idx(root / "data" / label_file, np.arange(count) % 10)
    write_taef2(root / "taef2")
    argv = ["--data", "fashion-mnist", "--data-root", str(root / "data"), "--vae", str(root / "taef2"),
            "--steps", "2", "--ckpt-every", "2", "--log-every", "2", "--cfg-dropout", "0.2", *TRAIN,
            "--out", str(root / "run")]
    train_class.main(train_class.parse_args(argv))
    return root / "run", root / "taef2"


@pytest.fixture(scope="module")
def digits_ref(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ref") / "digits_ref.npz")
    fid.main(fid.parse_args(["ref", "--images", "builtin-digits", "--out", path]))
    return path


def run_sample(argv):
    sample.main(sample.parse_args(argv))


def error_of(argv):
    with pytest.raises(SystemExit) as error:
        run_sample(argv)
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_outputs_labels_and_measured_nfe(tmp_path, checkpoint, capsys):
    run_sample(["--ckpt", checkpoint, "--nfe", "1", "2", "4", "--num-images", "23", "--batch-size", "8",
                "--out", str(tmp_path / "euler"), "--quiet"])
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"wrote {tmp_path / 'euler'} (args.json, euler_nfe001.npz, .png, .json, euler_nfe002.npz, .png, "
        ".json, euler_nfe004.npz, .png, .json)")
    run_sample(["--ckpt", checkpoint, "--nfe", "2", "4", "--solver", "midpoint", "--num-images", "23",
                "--out", str(tmp_path / "midpoint"), "--quiet"])
    for solver, nfes in (("euler", (1, 2, 4)), ("midpoint", (2, 4))):
        for nfe in nfes:
            name = tmp_path / solver / f"{solver}_nfe{nfe:03d}"
            result = json.loads(name.with_suffix(".json").read_text())
            assert result["nfe"] == nfe and result["num_images"] == 23
            assert result["transport_cost"] > 0 and result["straightness"] >= 0
            with np.load(name.with_suffix(".npz")) as data:
                assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (23, 8, 8, 3)
                np.testing.assert_array_equal(data["arr_1"], np.arange(23) % 10)  # class-balanced
            assert name.with_suffix(".png").is_file()
    # One step is a straight line: zero straightness by definition.
    assert json.loads((tmp_path / "euler" / "euler_nfe001.json").read_text())["straightness"] == 0
    assert json.loads((tmp_path / "euler" / "args.json").read_text())["nfe"] == [1, 2, 4]


def test_transport_cost_of_sampled_trajectories(tmp_path, checkpoint):
    # Ground truth by hand for the first images: ||x1 - x0||^2 of the same seeded noise and labels.
    import train_class

    run_sample(["--ckpt", checkpoint, "--nfe", "2", "--num-images", "4", "--out", str(tmp_path)])
    sampler = train_class.load_for_sampling(flow.resolve_checkpoint(checkpoint), "cpu")
    labels = torch.arange(4)
    x0 = sampler.prior.sample(labels, sample.seeded_noise(np.arange(4), sampler.latent_shape, "cpu"))
    solution = flow.solve(lambda x, t: sampler.model(x, t, labels), x0, 2, "euler")
    expected = (solution.x - x0).pow(2).sum((1, 2, 3)).mean().item()
    measured = json.loads((tmp_path / "euler_nfe002.json").read_text())["transport_cost"]
    assert measured == pytest.approx(expected, rel=1e-5)


def test_images_do_not_depend_on_batch_size_or_processes(tmp_path, checkpoint):
    common = ["--ckpt", checkpoint, "--nfe", "2", "--num-images", "12", "--no-ema"]
    run_sample(common + ["--batch-size", "12", "--out", str(tmp_path / "one")])
    run_sample(common + ["--batch-size", "5", "--out", str(tmp_path / "small")])
    run_sample(common + ["--batch-size", "12", "--first-seed", "100", "--out", str(tmp_path / "other_seeds")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(ROOT, "sample.py"), *common, "--batch-size", "4",
                    "--out", str(tmp_path / "two")],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    load = lambda run: np.load(tmp_path / run / "euler_nfe002.npz")["arr_0"].astype(int)
    reference = load("one")
    for run in ("small", "two"):
        # Equal up to float round-off of differently sized matrix products: at most 1 in uint8.
        difference = np.abs(load(run) - reference)
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    assert np.abs(load("other_seeds") - reference).mean() > 5  # other seeds, other images
    two = json.loads((tmp_path / "two" / "euler_nfe002.json").read_text())
    one = json.loads((tmp_path / "one" / "euler_nfe002.json").read_text())
    assert two["world_size"] == 2 and two["transport_cost"] == pytest.approx(one["transport_cost"], rel=1e-5)


def test_fid_ref_equals_fid_calc_on_written_images(tmp_path, checkpoint, digits_ref):
    common = ["--ckpt", checkpoint, "--nfe", "4", "--num-images", "40"]
    run_sample(common + ["--out", str(tmp_path / "images")])
    run_sample(common + ["--out", str(tmp_path / "metrics"), "--fid-ref", digits_ref, "--kid",
                         "--kid-subset-size", "30"])
    assert not list((tmp_path / "metrics").glob("*.npz")) and not list((tmp_path / "metrics").glob("*.png"))
    measured = json.loads((tmp_path / "metrics" / "euler_nfe004.json").read_text())
    fid.main(fid.parse_args(["calc", "--images", str(tmp_path / "images" / "euler_nfe004.npz"),
                             "--ref", digits_ref,
                             "--kid", "--kid-subset-size", "30", "--json", str(tmp_path / "calc.json")]))
    calc = json.loads((tmp_path / "calc.json").read_text())
    assert measured["fd"] == pytest.approx(calc["fd"], rel=1e-9) and measured["fd"] > 0
    assert measured["kid_mean"] == pytest.approx(calc["kid_mean"], rel=1e-9)
    images = np.load(tmp_path / "images" / "euler_nfe004.npz")
    expected_accuracy = (fid.digits_predict(images["arr_0"]) == images["arr_1"]).mean()
    assert measured["class_accuracy"] == pytest.approx(expected_accuracy)


def test_vae_floor_is_the_fd_of_reconstructions(tmp_path, digits_ref):
    """--vae-floor: the Frechet distance of the autoencoder's reconstructions of real images, here through a
    tiny random SD VAE (one posterior sample per image); --vae replaces the checkpoint's autoencoder."""
    diffusers = pytest.importorskip("diffusers")
    vae_dir = str(tmp_path / "tiny_vae")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",)).save_pretrained(vae_dir)
    real, _ = fid.load_digits_split(test=False)
    np.savez(tmp_path / "real.npz", real[:50])
    reference = fid.load_reference(digits_ref)
    space = fid.load_feature_space("digits")
    real_npz = str(tmp_path / "real.npz")
    args = sample.parse_args(["--ckpt", "unused", "--fid-ref", digits_ref, "--vae-floor", real_npz,
                              "--batch-size", "20", "--vae", vae_dir])
    sampler = flow.Sampler(kind="class", model=None, prior=None, latent_shape=(4, 8, 8), make_condition=None,
                           null_condition=None, decode=None, options={"vae": str(tmp_path / "moved")},
                           trained_with_dropout=False)
    torch.manual_seed(1)  # the encoder draws one posterior sample per image
    floor = sample.vae_floor(fid, sampler, space, reference, args, torch.device("cpu"), rank=0, world=1)

    autoencoder = flow.load_autoencoder(vae_dir)
    torch.manual_seed(1)
    reconstructed = []
    for batch in np.array_split(np.arange(50), 3):  # the same batches, so the same posterior samples
        x = torch.as_tensor(real[batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        reconstructed.append(sample.to_uint8(autoencoder.decode(autoencoder.encode(x))))
    expected = fid.compare_to_reference(fid.digits_features(np.concatenate(reconstructed)), reference)
    assert floor["fd"] == pytest.approx(expected["fd"], rel=1e-9) and floor["num_images"] == 50
    assert floor["vae"] == vae_dir
    exact = fid.compare_to_reference(fid.digits_features(real[:50]), reference)
    assert floor["fd"] != pytest.approx(exact["fd"], rel=1e-3)  # the reconstructions differ from the images


def test_bad_inputs(tmp_path, checkpoint, digits_ref):
    out = ["--out", str(tmp_path)]
    assert "does not exist" in error_of(["--ckpt", str(tmp_path / "missing.pt")] + out)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert "--prompts is for text" in error_of(["--ckpt", checkpoint, "--prompts", str(prompts)] + out)
    assert "outside [0, 10)" in error_of(["--ckpt", checkpoint, "--classes", "3", "12"] + out)
    assert "need --fid-ref" in error_of(["--ckpt", checkpoint, "--kid"] + out)
    assert "lower --kid-subset-size" in error_of(["--ckpt", checkpoint, "--fid-ref", digits_ref, "--kid",
                                                  "--num-images", "50"] + out)
    not_a_reference = os.path.join(checkpoint, "args.json")
    assert "not an npz file of reference statistics" in error_of(["--ckpt", checkpoint, "--fid-ref",
                                                                 not_a_reference] + out)
    assert "trains on pixels" in error_of(["--ckpt", checkpoint, "--fid-ref", digits_ref,
                                           "--vae-floor", "builtin-digits"] + out)
    with pytest.raises(SystemExit):  # argparse: an odd NFE for the midpoint solver
        sample.parse_args(["--ckpt", checkpoint, "--solver", "midpoint", "--nfe", "3"])


def test_text_checkpoint_with_prompts_and_guidance(tmp_path):
    import train_text

    train_text.main(train_text.parse_args(["--model", "tiny", "--steps", "2", "--mapper-steps", "2",
                                           "--global-batch", "8", "--max-batch-per-gpu", "8",
                                           "--ckpt-every", "2", "--sample-every", "1000",
                                           "--out", str(tmp_path / "train"), "--quiet"]))
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\na red circle\n")
    common = ["--ckpt", str(tmp_path / "train"), "--prompts", str(tmp_path / "prompts.txt"), "--nfe", "2",
              "--num-images", "5", "--cfg-scale", "2", "--no-ema"]
    run_sample(common + ["--batch-size", "5", "--out", str(tmp_path / "one")])
    run_sample(common + ["--batch-size", "2", "--out", str(tmp_path / "small")])
    name = tmp_path / "one" / "euler_nfe002"
    captions = name.with_name("euler_nfe002_captions.txt").read_text().splitlines()
    assert captions == ["a red circle", "a blue square", "a red circle", "a red circle", "a blue square"]
    with np.load(name.with_suffix(".npz")) as data, np.load(tmp_path / "small" / "euler_nfe002.npz") as small:
        np.testing.assert_array_equal(data["arr_1"], [0, 1, 2, 0, 1])  # the prompt's line, repeats apart
        assert np.abs(data["arr_0"].astype(int) - small["arr_0"]).max() <= 1
    assert json.loads(name.with_suffix(".json").read_text())["nfe"] == 2
    assert "needs --prompts" in error_of(common[:2] + ["--out", str(tmp_path / "bad")])
    (tmp_path / "blank.txt").write_text("a red circle\n \na blue square\n")
    (tmp_path / "empty.txt").write_text("")
    for prompts, message in (("blank.txt", "line 2 is an empty caption"), ("empty.txt", "is empty"),
                             ("missing.txt", "cannot read --prompts")):
        options = common[:2] + ["--prompts", str(tmp_path / prompts), "--out", str(tmp_path / "bad")]
        assert message in error_of(options)
    assert not (tmp_path / "bad").exists()


def test_default_out_is_beside_the_run_and_results_are_never_replaced_silently(checkpoint):
    assert sample.default_out("/runs/a/checkpoints/step_0000300.pt") == "/runs/a/samples/step_0000300"
    run_sample(["--ckpt", checkpoint, "--nfe", "2", "--num-images", "4", "--quiet"])
    out = os.path.join(checkpoint, "samples", "step_0000006")  # the run's latest checkpoint is step 6
    with open(os.path.join(out, "euler_nfe002.json")) as file:
        first = json.load(file)
    assert first["num_images"] == 4
    assert first["checkpoint"].endswith(os.path.join("checkpoints", "step_0000006.pt"))
    before = folder_state(checkpoint)
    message = error_of(["--ckpt", checkpoint, "--nfe", "1", "2", "--num-images", "8", "--quiet"])
    assert f"{out} already holds euler_nfe002.json" in message and "--overwrite" in message
    assert folder_state(checkpoint) == before  # nothing written: no NFE-1 results, no new args.json
    step_file = os.path.join(checkpoint, "checkpoints", "step_0000006.pt")  # a file: the same default folder
    run_sample(["--ckpt", step_file, "--nfe", "1", "2", "--num-images", "8", "--overwrite", "--quiet"])
    with open(os.path.join(out, "euler_nfe002.json")) as file:
        assert json.load(file)["num_images"] == 8
    assert os.path.isfile(os.path.join(out, "euler_nfe001.npz"))


def test_default_out_of_a_checkpoint_outside_a_run_stays_beside_it():
    assert sample.default_out("/data/model.pt") == "/data/samples/model"


def test_vae_option_on_a_pixel_checkpoint_is_a_one_line_error(tmp_path, checkpoint):
    write_taef2(tmp_path / "taef2")
    assert "--vae" in error_of(["--ckpt", checkpoint, "--vae", str(tmp_path / "taef2"), "--nfe", "1",
                                "--num-images", "2", "--out", str(tmp_path / "out"), "--quiet"])


def test_metrics_module_is_imported_only_for_metrics(tmp_path, checkpoint, digits_ref, monkeypatch):
    monkeypatch.setitem(sys.modules, "fid", None)  # `import fid` now fails
    run_sample(["--ckpt", checkpoint, "--nfe", "1", "--num-images", "2", "--out", str(tmp_path / "a"),
                "--quiet"])
    assert (tmp_path / "a" / "euler_nfe001.npz").is_file()
    with pytest.raises(ImportError):  # the control: asking for metrics does import it
        run_sample(["--ckpt", checkpoint, "--nfe", "1", "--num-images", "2", "--out", str(tmp_path / "b"),
                    "--fid-ref", digits_ref])


def test_guidance_without_label_dropout_warns(tmp_path, checkpoint, capsys):
    common = ["--ckpt", checkpoint, "--nfe", "1", "--num-images", "2", "--quiet"]
    run_sample(common + ["--cfg-scale", "2", "--out", str(tmp_path / "guided")])
    assert "warning: --cfg-scale 2.0 on a model trained without label dropout" in capsys.readouterr().err
    run_sample(common + ["--out", str(tmp_path / "plain")])
    assert "warning" not in capsys.readouterr().out


def taef2_images_by_hand(run, autoencoder_folder, count, cfg_scale):
    """One Euler step (NFE 1) from the seeded class prior, guided, then un-normalise and TAEF2-decode."""
    import train_class

    sampler = train_class.load_for_sampling(str(run), "cpu")
    config = torch.load(flow.resolve_checkpoint(str(run)), map_location="cpu", weights_only=False)["config"]
    labels = torch.arange(count) % 10
    x0 = sampler.prior.sample(labels, sample.seeded_noise(np.arange(count), (32, 8, 8), "cpu"))
    t = torch.zeros(count)
    with torch.no_grad():
        v_cond, v_null = sampler.model(x0, t, labels), sampler.model(x0, t, torch.full_like(labels, 10))
    x1 = x0 + v_null + cfg_scale * (v_cond - v_null)
    mean, std = (torch.tensor(config[key]).reshape(-1, 1, 1) for key in ("latent_mean", "latent_std"))
    return sample.to_uint8(flow.load_autoencoder(str(autoencoder_folder)).decode(x1 * std + mean)).astype(int)


def test_taef2_checkpoint_samples_decode_through_the_autoencoder(tmp_path, taef2_run, capsys):
    run, autoencoder = taef2_run
    run_sample(["--ckpt", str(run), "--nfe", "1", "--num-images", "3", "--cfg-scale", "2",
                "--out", str(tmp_path), "--quiet"])
    assert "warning" not in capsys.readouterr().out  # trained with label dropout: guidance is fine
    with np.load(tmp_path / "euler_nfe001.npz") as data:
        images, labels = data["arr_0"].astype(int), data["arr_1"]
    assert images.shape == (3, 64, 64, 3) and labels.tolist() == [0, 1, 2]
    difference = np.abs(images - taef2_images_by_hand(run, autoencoder, 3, 2.0))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_vae_option_replaces_an_autoencoder_that_moved(tmp_path, taef2_run):
    run, autoencoder = taef2_run
    checkpoint = flow.load_checkpoint(flow.resolve_checkpoint(str(run)))
    checkpoint["args"]["vae"] = str(tmp_path / "old_place")  # as if the folder had moved since training
    os.makedirs(tmp_path / "run" / "checkpoints")
    flow.save_atomic(checkpoint, str(tmp_path / "run" / "checkpoints" / "step_0000002.pt"))
    shutil.copytree(autoencoder, tmp_path / "new_place")
    common = ["--ckpt", str(tmp_path / "run"), "--nfe", "1", "--num-images", "2", "--quiet"]
    assert "old_place" in error_of(common + ["--out", str(tmp_path / "without")])
    run_sample(common + ["--vae", str(tmp_path / "new_place"), "--out", str(tmp_path / "with")])
    with np.load(tmp_path / "with" / "euler_nfe001.npz") as data:
        difference = np.abs(data["arr_0"].astype(int) - taef2_images_by_hand(run, autoencoder, 2, 1.0))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


@pytest.mark.parametrize("options, message", [
    (["--kid-subset-size", "0"], "--kid-subset-size must be at least 2"),
    (["--cfg-scale", "nan"], "--cfg-scale must be finite"),
    (["--grid", "-1"], "--grid must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--nfe", "0"], "must be positive"),
    (["--solver", "midpoint", "--nfe", "3"], "multiple of 2"),
    (["--fid-ref", "ref.npz", "--num-images", "1"], "at least 2"),
])
def test_bad_options_are_one_line_errors(options, message, capsys):
    with pytest.raises(SystemExit) as stop:
        sample.parse_args(["--ckpt", "run", *options])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and ": error: " in error


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        sample.parse_args(["--ckpt", "run", "--out", str(tmp_path / "file")])
    assert "is an existing file, not a folder" in capsys.readouterr().err

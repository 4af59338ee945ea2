"""sample.py on a real tiny checkpoint of train_class.py (built-in digits, a few steps)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fid
import flow
import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import train_class

    out = tmp_path_factory.mktemp("train_class")
    train_class.main(train_class.parse_args(["--steps", "6", "--global-batch", "16", "--warmup-steps", "1", "--lr", "3e-3",
                                             "--ckpt-every", "6", "--sample-every", "1000", "--log-every", "6", "--out", str(out)]))
    return str(out)


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


def test_outputs_labels_and_measured_nfe(tmp_path, checkpoint):
    run_sample(["--ckpt", checkpoint, "--nfe", "1", "2", "4", "--num-images", "23", "--batch-size", "8", "--out", str(tmp_path / "euler")])
    run_sample(["--ckpt", checkpoint, "--nfe", "2", "4", "--solver", "midpoint", "--num-images", "23", "--out", str(tmp_path / "midpoint")])
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
    assert json.loads((tmp_path / "euler_nfe002.json").read_text())["transport_cost"] == pytest.approx(expected, rel=1e-5)


def test_images_do_not_depend_on_batch_size_or_processes(tmp_path, checkpoint):
    common = ["--ckpt", checkpoint, "--nfe", "2", "--num-images", "12", "--no-ema"]
    run_sample(common + ["--batch-size", "12", "--out", str(tmp_path / "one")])
    run_sample(common + ["--batch-size", "5", "--out", str(tmp_path / "small")])
    run_sample(common + ["--batch-size", "12", "--first-seed", "100", "--out", str(tmp_path / "other_seeds")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(ROOT, "sample.py"), *common, "--batch-size", "4", "--out", str(tmp_path / "two")],
                   check=True, env=env, cwd=ROOT, capture_output=True)
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
    run_sample(common + ["--out", str(tmp_path / "metrics"), "--fid-ref", digits_ref, "--kid", "--kid-subset-size", "30"])
    assert not list((tmp_path / "metrics").glob("*.npz")) and not list((tmp_path / "metrics").glob("*.png"))
    measured = json.loads((tmp_path / "metrics" / "euler_nfe004.json").read_text())
    fid.main(fid.parse_args(["calc", "--images", str(tmp_path / "images" / "euler_nfe004.npz"), "--ref", digits_ref,
                             "--kid", "--kid-subset-size", "30", "--json", str(tmp_path / "calc.json")]))
    calc = json.loads((tmp_path / "calc.json").read_text())
    assert measured["fid"] == pytest.approx(calc["fid"], rel=1e-9)
    assert measured["kid_mean"] == pytest.approx(calc["kid_mean"], rel=1e-9)
    images = np.load(tmp_path / "images" / "euler_nfe004.npz")
    expected_accuracy = (fid.digits_predict(images["arr_0"]) == images["arr_1"]).mean()
    assert measured["class_accuracy"] == pytest.approx(expected_accuracy)


def test_vae_floor_is_the_fid_of_reconstructions(tmp_path, digits_ref, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    vae_dir = str(tmp_path / "tiny_vae")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).save_pretrained(vae_dir)
    real, _ = fid.load_digits_split(test=False)
    np.savez(tmp_path / "real.npz", real[:50])
    reference = fid.load_reference(digits_ref)
    space = fid.load_feature_space("digits")
    args = sample.parse_args(["--ckpt", "unused", "--fid-ref", digits_ref, "--vae-floor", str(tmp_path / "real.npz"), "--batch-size", "20"])
    sampler = type("Sampler", (), {"args": {"vae": vae_dir}})
    torch.manual_seed(1)  # the encoder draws one posterior sample per image
    floor = sample.vae_floor(sampler, space, reference, args, torch.device("cpu"), rank=0, world=1)

    vae = flow.load_vae(vae_dir)
    torch.manual_seed(1)
    reconstructed = []
    for batch in np.array_split(np.arange(50), 3):
        x = torch.as_tensor(real[batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        reconstructed.append(sample.to_uint8(flow.vae_decode(vae, flow.vae_encode(vae, x))))
    features = fid.digits_features(np.concatenate(reconstructed))
    expected = flow.frechet_distance(*flow.gaussian_statistics(features), reference["mu"], reference["sigma"])
    assert floor["fid"] == pytest.approx(expected, rel=1e-9) and floor["num_images"] == 50


def test_bad_inputs(tmp_path, checkpoint, digits_ref):
    out = ["--out", str(tmp_path)]
    assert "does not exist" in error_of(["--ckpt", str(tmp_path / "missing.pt")] + out)
    assert "--prompts is for text" in error_of(["--ckpt", checkpoint, "--prompts", "p.txt"] + out)
    assert "outside [0, 10)" in error_of(["--ckpt", checkpoint, "--classes", "3", "12"] + out)
    assert "need --fid-ref" in error_of(["--ckpt", checkpoint, "--kid"] + out)
    assert "lower --kid-subset-size" in error_of(["--ckpt", checkpoint, "--fid-ref", digits_ref, "--kid", "--num-images", "50"] + out)
    assert "not a reference" in error_of(["--ckpt", checkpoint, "--fid-ref", os.path.join(checkpoint, "args.json")] + out)
    assert "trains on pixels" in error_of(["--ckpt", checkpoint, "--fid-ref", digits_ref, "--vae-floor", "builtin-digits"] + out)
    with pytest.raises(SystemExit):  # argparse: an odd NFE for the midpoint solver
        sample.parse_args(["--ckpt", checkpoint, "--solver", "midpoint", "--nfe", "3"])


def test_text_checkpoint_with_prompts_and_guidance(tmp_path):
    import train_text

    train_text.main(train_text.parse_args(["--model", "tiny", "--steps", "2", "--mapper-steps", "2", "--global-batch", "8",
                                           "--max-batch-per-gpu", "8", "--ckpt-every", "2", "--sample-every", "1000",
                                           "--out", str(tmp_path / "train"), "--quiet"]))
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    common = ["--ckpt", str(tmp_path / "train"), "--prompts", str(tmp_path / "prompts.txt"), "--nfe", "2",
              "--num-images", "5", "--cfg-scale", "2", "--no-ema"]
    run_sample(common + ["--batch-size", "5", "--out", str(tmp_path / "one")])
    run_sample(common + ["--batch-size", "2", "--out", str(tmp_path / "small")])
    name = tmp_path / "one" / "euler_nfe002"
    assert name.with_name("euler_nfe002_captions.txt").read_text().splitlines() == ["a red circle", "a blue square"] * 2 + ["a red circle"]
    with np.load(name.with_suffix(".npz")) as data, np.load(tmp_path / "small" / "euler_nfe002.npz") as small:
        np.testing.assert_array_equal(data["arr_1"], [0, 1, 0, 1, 0])  # index of the caption
        assert np.abs(data["arr_0"].astype(int) - small["arr_0"]).max() <= 1
    assert json.loads(name.with_suffix(".json").read_text())["nfe"] == 2
    assert "needs --prompts" in error_of(common[:2] + ["--out", str(tmp_path / "bad")])

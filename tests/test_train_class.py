"""train_class.py: training runs (one process and torchrun), exact resume, data readers (ImageNet npz,
ImageFolder, Fashion-MNIST idx), the latent cache and its per-channel normalisation (SD VAE and TAEF2,
random weights written here), bad input, and the load_for_sampling contract of sample.py. All on CPU
with tiny settings."""
import errno
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from fakes import flip_weight_bytes, whole_batch, write_fashion, write_idx, write_taef2
from scipy.optimize import linear_sum_assignment

import flow
import train_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--global-batch", "16", "--log-every", "1", "--sample-nfe", "1", "--warmup-steps", "2", "--quiet",
        "--workers", "0"]


def train(out, *options):
    train_class.main(train_class.parse_args(["--out", str(out), *TINY, *map(str, options)]))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def digest(path):
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def write_imagenet_batch(path, labels, side=8, seed=0):
    """A tiny file in the official Downsampled ImageNet layout: data uint8 (N, 3*S*S) CHW, labels 1..1000."""
    data = np.random.default_rng(seed).integers(0, 256, size=(len(labels), 3 * side * side), dtype=np.uint8)
    np.savez(path, data=data, labels=list(labels), mean=np.zeros(3 * side * side))
    return data


def argparse_error(capsys, argv):
    """The message of an argparse error (exit status 2): one line on stderr after the usage."""
    with pytest.raises(SystemExit) as error:
        train_class.parse_args(argv)
    assert error.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1
    return lines[0]


def one_line_error(match, *options):
    with pytest.raises(SystemExit, match=match) as error:
        train(*options)
    assert str(error.value).startswith("error: ") and "\n" not in str(error.value)
    return str(error.value)


def files_digest(folder):
    return {name: digest(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def write_image_folder(root, counts=(5, 3), size=(12, 10)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in zip(["cat", "dog"], counts):
        os.makedirs(root / name)
        for i in range(count):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    train(out, "--steps", 4, "--ckpt-every", 2, "--sample-every", 2, "--coupling", "ot", "--cfg-dropout", 0.3,
          "--sample-nfe", 1, 2)
    return out


def test_run_writes_everything(digits_run):
    args = json.loads((digits_run / "args.json").read_text())
    assert args["data"] == "builtin-digits" and args["steps"] == 4 and args["cfg_null_prior"] == "mixture"
    records = [json.loads(line) for line in (digits_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 and r["transport_cost"] > 0 for r in records)
    assert all(0 <= r["data_wait_ms"] < 1000 / r["images_per_s"] * 16 for r in records)  # part of the step
    assert records[0]["lr"] == pytest.approx(0.5e-3) and records[-1]["lr"] == pytest.approx(1e-3)  # warmup
    assert sorted(os.listdir(digits_run / "checkpoints")) == ["step_0000002.pt", "step_0000004.pt"]
    assert {"step_0000004_nfe_1.png", "step_0000004_nfe_2.png"} <= set(os.listdir(digits_run / "samples"))
    checkpoint = load(digits_run / "checkpoints" / "step_0000004.pt")
    assert checkpoint["kind"] == "class" and checkpoint["step"] == 4
    assert {"model", "ema", "opt", "args", "prior", "checksum"} <= checkpoint.keys()
    assert "rng" not in checkpoint  # nothing to restore: batches are a function of (seed, step)
    assert checkpoint["config"] == {"num_classes": 10, "latent_shape": [1, 8, 8]}  # pixels: no latent stats
    assert not torch.equal(checkpoint["model"]["out.weight"], checkpoint["ema"]["out.weight"])


def test_class_means_are_the_class_averages(digits_run):
    x, y, num_classes = train_class.load_digits_train()
    assert num_classes == 10 and x.shape == (1437, 1, 8, 8)  # 4 in 5 of the 1797 digits
    means = load(digits_run / "checkpoints" / "step_0000004.pt")["prior"]["means"]
    for c in range(10):
        torch.testing.assert_close(means[c], x[y == c].double().mean(0).float())


def test_resume_equals_uninterrupted(tmp_path, digits_run):
    """Stop after 2 steps, resume to 4: the same weights, EMA and optimizer state, bit for bit."""
    options = ["--ckpt-every", 2, "--sample-every", 2, "--coupling", "ot", "--cfg-dropout", 0.3]
    train(tmp_path, "--steps", 2, *options)
    with open(tmp_path / "log.jsonl", "a") as file:  # a line the interrupted run wrote after its checkpoint
        file.write(json.dumps({"step": 3, "loss": 0.0}) + "\n" + '{"step": 4, "lo')  # ... then cut mid-line
    train(tmp_path, "--steps", 4, "--resume", *options)
    resumed = load(tmp_path / "checkpoints" / "step_0000004.pt")
    straight = load(digits_run / "checkpoints" / "step_0000004.pt")
    for key in ("model", "ema"):
        assert_same_state(resumed[key], straight[key])
    for a, b in zip(resumed["opt"]["state"].values(), straight["opt"]["state"].values()):
        assert_same_state(a, b)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------
# A batch is a pure function of (seed, step): 1 or 2 processes, any micro-batch split, any number of
# DataLoader workers and a resume on another number of processes train on the same batches.

PURE = ["--steps", 10, "--ckpt-every", 5, "--sample-every", 10, "--coupling", "ot", "--cfg-dropout", 0.3]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    train(out, *PURE, "--max-batch-per-gpu", 4, "--workers", 2)  # 4 micro-batches of 4, 2 workers
    return out


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_processes") / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "train_class.py"), "--out", str(out), *TINY, *map(str, PURE),
               "--workers", "1"]  # 8 per process
    result = subprocess.run(command, cwd=out.parent, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_one_and_two_processes_train_on_the_same_batches(one_process_run, two_process_run):
    """The logged loss is the mean over the global batch, and both runs see the same x0, t and pairs."""
    assert len(losses(two_process_run)) == 10  # rank 0 alone writes the log
    np.testing.assert_allclose(losses(two_process_run), losses(one_process_run), rtol=0, atol=1e-4)
    one, two = (load(out / "checkpoints" / "step_0000010.pt") for out in (one_process_run, two_process_run))
    torch.testing.assert_close(two["prior"]["means"], one["prior"]["means"], rtol=0, atol=1e-6)
    assert torch.equal(two["prior"]["counts"], one["prior"]["counts"])  # every image counted once
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=0, atol=1e-4)


def test_resume_on_one_process_continues_a_two_process_run(tmp_path, one_process_run, two_process_run):
    shutil.copytree(two_process_run, tmp_path / "run")
    os.remove(tmp_path / "run" / "checkpoints" / "step_0000010.pt")
    train(tmp_path / "run", *PURE, "--resume")  # from step 5, on one process
    np.testing.assert_allclose(losses(tmp_path / "run"), losses(one_process_run), rtol=0, atol=1e-4)
    assert losses(tmp_path / "run")[:5] == losses(two_process_run)[:5]  # kept from the two-process run


def test_training_batches_are_the_same_for_any_processes_and_workers(digits_run):
    args = train_class.parse_args(["--coupling", "ot", "--cfg-dropout", "0.5", "--global-batch", "12"])
    x, y, num_classes = train_class.load_digits_train()
    prior = train_class.build_prior(args, {"num_classes": num_classes, "latent_shape": [1, 8, 8]})
    train_class.fit_class_prior(prior, x, y, 0, 1, torch.device("cpu"))
    whole, index = whole_batch(lambda rank, world_size: train_class.TrainingBatches(
        x, y, prior, args, num_classes, rank, world_size))
    assert torch.equal(whole[1], x[index])  # x1: the data of the batch, in order
    kept = whole[3] < num_classes
    assert torch.equal(whole[3][kept], y[index][kept]) and 0 < kept.sum() < 12


def test_batch_order_covers_each_epoch():
    order = train_class.BatchOrder(size=10, global_batch=4, seed=3)
    first_epochs = torch.cat([order.indices(step) for step in range(5)])  # 20 positions = 2 epochs
    assert sorted(first_epochs[:10].tolist()) == list(range(10)) == sorted(first_epochs[10:].tolist())


def test_dit_starts_at_zero_velocity_and_keeps_shape():
    model = train_class.DiT((4, 8, 8), num_classes=5, **{**train_class.MODELS["tiny"], "patch": 2})
    x = torch.randn(3, 4, 8, 8)
    v = model(x, torch.rand(3), torch.tensor([0, 4, 5]))  # 5 = the null class
    assert v.shape == x.shape and torch.count_nonzero(v) == 0  # adaLN-zero and zero output layer


def test_imagenet_npz_reader(tmp_path):
    data = write_imagenet_batch(tmp_path / "train_data_batch_1.npz", labels=[1, 1000, 7])
    images, labels = train_class.read_imagenet_npz(str(tmp_path / "train_data_batch_1.npz"))
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 999, 6]
    assert images[1, 2, 3, 5] == data[1, 2 * 64 + 3 * 8 + 5]  # CHW, flattened row-major


def test_imagenet_npz_training_reads_every_batch_file(tmp_path):
    for k in (1, 2, 10):  # sorted by number, not by name: 1, 2, 10
        write_imagenet_batch(tmp_path / f"train_data_batch_{k}.npz", labels=[k, k + 1], seed=k)
    assert [os.path.basename(p) for p in train_class.imagenet_npz_files(str(tmp_path))] == [
        "train_data_batch_1.npz", "train_data_batch_2.npz", "train_data_batch_10.npz"]
    args = train_class.parse_args(["--data", "imagenet64", "--data-root", str(tmp_path), "--no-mirror"])
    x, y, num_classes = train_class.load_pixels(args)
    assert x.shape == (6, 3, 8, 8) and y.tolist() == [0, 1, 1, 2, 9, 10] and num_classes == 1000
    args.mirror = True  # the default for ImageNet: every image, then every mirror image
    x_mirrored, y_mirrored, _ = train_class.load_pixels(args)
    assert torch.equal(x_mirrored, torch.cat([x, x.flip(-1)])) and torch.equal(y_mirrored, torch.cat([y, y]))
    train(tmp_path / "out", "--data", "imagenet64", "--data-root", tmp_path, "--prior", "gaussian",
          "--steps", 1)
    checkpoint = load(tmp_path / "out" / "checkpoints" / "step_0000001.pt")
    assert checkpoint["config"] == {"num_classes": 1000, "latent_shape": [3, 8, 8]}


def test_max_train_images_counts_images_over_all_npz_files(tmp_path):
    for k in (1, 2, 3):
        write_imagenet_batch(tmp_path / f"train_data_batch_{k}.npz", labels=[k, k], seed=k)
    args = train_class.parse_args(["--data", "imagenet64", "--data-root", str(tmp_path),
                                   "--max-train-images", "3", "--no-mirror"])
    _, y, _ = train_class.load_pixels(args)
    assert y.tolist() == [0, 0, 1]  # the first 3 images in data order


def test_max_train_images_limits_the_digits():
    x, y, _, _ = train_class.load_data(train_class.parse_args(["--max-train-images", "100"]), 0, 1,
                                       torch.device("cpu"))
    all_x, all_y, _ = train_class.load_digits_train()
    assert torch.equal(x, all_x[:100]) and torch.equal(y, all_y[:100])


def test_image_folder_training_with_class_prior(tmp_path):
    write_image_folder(tmp_path / "tree")
    train(tmp_path / "out", "--data", "image-folder", "--data-root", tmp_path / "tree", "--image-size", 8,
          "--steps", 2, "--workers", 0)
    checkpoint = load(tmp_path / "out" / "checkpoints" / "step_0000002.pt")
    assert checkpoint["config"] == {"num_classes": 2, "latent_shape": [3, 8, 8]}
    assert checkpoint["prior"]["counts"].tolist() == [10, 6]  # each image and its mirror image (default)
    sampler = train_class.load_for_sampling(str(tmp_path / "out"), "cpu")
    assert isinstance(sampler, flow.Sampler) and sampler.num_classes == 2 and sampler.kind == "class"
    latents = torch.rand(2, 3, 8, 8) * 4 - 2
    assert torch.equal(sampler.decode(latents), latents.clamp(-1, 1))  # pixels: decode only clamps


def test_fashion_pixels_are_the_resized_idx_images(tmp_path):
    write_fashion(tmp_path)
    args = train_class.parse_args(["--data", "fashion-mnist", "--data-root", str(tmp_path),
                                   "--max-train-images", "12", "--image-size", "16"])
    x, y, num_classes = train_class.load_pixels(args)
    images, labels = flow.load_fashion_mnist(str(tmp_path), "train")
    assert torch.equal(x, flow.fashion_to_rgb(images[:12], 16)) and num_classes == 10
    assert y.tolist() == labels[:12].tolist() == [i % 10 for i in range(12)]
    assert train_class.parse_args(["--data", "fashion-mnist", "--data-root", str(tmp_path)]).image_size == 64


def test_vae_latents_are_cached_with_flips(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="the SD VAE path needs diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2)
    vae.save_pretrained(tmp_path / "vae")
    write_image_folder(tmp_path / "tree")
    options = ["--data", "image-folder", "--data-root", tmp_path / "tree", "--image-size", 8,
               "--vae", tmp_path / "vae", "--latent-cache", tmp_path / "cache", "--steps", 2, "--workers", 0,
               "--quiet"]
    train(tmp_path / "out", *options)
    shards = read_shards(tmp_path / "cache")  # an image folder: mirror images by default
    latents, flipped, labels = shards["latents"], shards["flipped"], shards["labels"]
    assert latents.shape == flipped.shape == (8, 4, 4, 4) and sorted(labels.tolist()) == [0] * 5 + [1] * 3
    raw = np.concatenate([latents, flipped]).astype(np.float64)  # 8 images and their mirror images
    mean, std = raw.mean((0, 2, 3)), raw.transpose(1, 0, 2, 3).reshape(4, -1).std(1, ddof=1)
    checkpoint = load(tmp_path / "out" / "checkpoints" / "step_0000002.pt")
    np.testing.assert_allclose(checkpoint["config"]["latent_mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(checkpoint["config"]["latent_std"], std, rtol=1e-9)
    normalised = (raw - mean[:, None, None]) / std[:, None, None]
    both = np.concatenate([labels, labels])
    expected = torch.as_tensor(normalised[both == 1].mean(0))
    torch.testing.assert_close(checkpoint["prior"]["means"][1].double(), expected, rtol=0, atol=1e-5)
    cached = files_digest(tmp_path / "cache")
    args = train_class.parse_args([*map(str, options), "--out", str(tmp_path / "out2")])
    x, _, _, _ = train_class.load_data(args, 0, 1, torch.device("cpu"))  # reads the cache, no encoding
    assert files_digest(tmp_path / "cache") == cached
    np.testing.assert_allclose(x.double().numpy(), normalised, rtol=0, atol=1e-5)
    sampler = train_class.load_for_sampling(str(tmp_path / "out"), "cpu")
    images = sampler.decode(torch.randn(2, *sampler.latent_shape))
    assert images.shape == (2, 3, 8, 8) and images.abs().max() <= 1


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST through a TAEF2 latent cache (tiny idx files and random TAEF2 weights written here).


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    write_fashion(root / "data")
    write_taef2(root / "taef2")
    options = ["--data", "fashion-mnist", "--data-root", root / "data", "--vae", root / "taef2",
               "--latent-cache", root / "cache", "--mirror", "--quiet"]  # mirror: tested here, off by default
    train(root / "run", *options, "--steps", 2, "--ckpt-every", 2, "--sample-every", 2)
    return root, options


def read_shards(cache):
    info = json.loads((cache / "info.json").read_text())
    return flow.read_shards(str(cache), info["shards"])


def cached_raw_latents(cache):
    """The raw latents of the cache, originals then mirror images, float64, and their labels."""
    shards = read_shards(cache)
    return (np.concatenate([shards["latents"], shards["flipped"]]).astype(np.float64),
            np.concatenate([shards["labels"], shards["labels"]]))


def test_fashion_cache_holds_the_encoded_images_and_their_mirror_images(fashion):
    root, _ = fashion
    images, labels = flow.load_fashion_mnist(str(root / "data"), "train")
    x = flow.fashion_to_rgb(images).float() / 127.5 - 1  # 28 -> 64 px RGB in [-1, 1]
    autoencoder = flow.load_autoencoder(str(root / "taef2"))
    shards = read_shards(root / "cache")
    for name, expected in (("latents", autoencoder.encode(x)), ("flipped", autoencoder.encode(x.flip(-1)))):
        assert shards[name].shape == (30, 32, 8, 8)
        np.testing.assert_allclose(shards[name], expected.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(shards["labels"], labels)
    info = json.loads((root / "cache" / "info.json").read_text())
    assert info["num_images"] == 30 and info["num_classes"] == 10 and info["image_size"] == 64
    assert info["vae"] == str(root / "taef2") and info["data_root"] == str(root / "data")


def test_latent_statistics_are_per_channel_over_the_whole_cache(fashion):
    root, _ = fashion
    raw, _ = cached_raw_latents(root / "cache")
    mean = [raw[:, c].mean() for c in range(32)]  # brute force, one channel at a time
    std = [raw[:, c].std(ddof=1) for c in range(32)]
    info = json.loads((root / "cache" / "info.json").read_text())
    np.testing.assert_allclose(info["latent_mean"], mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(info["latent_std"], std, rtol=1e-9)
    assert np.ptp(std) > 0.1 * np.mean(std)  # channels differ, so the test can tell per channel from global
    config = load(root / "run" / "checkpoints" / "step_0000002.pt")["config"]
    assert config == {"num_classes": 10, "latent_shape": [32, 8, 8], "latent_mean": info["latent_mean"],
                      "latent_std": info["latent_std"]}


def test_training_data_is_normalised_and_class_means_live_there(fashion, tmp_path):
    root, options = fashion
    args = train_class.parse_args([*map(str, options), "--out", str(tmp_path)])
    x, y, num_classes, normalisation = train_class.load_data(args, 0, 1, torch.device("cpu"))
    raw, labels = cached_raw_latents(root / "cache")
    info = json.loads((root / "cache" / "info.json").read_text())
    mean, std = (np.array(info[key])[:, None, None] for key in ("latent_mean", "latent_std"))
    expected = (raw - mean) / std
    np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=1e-5)
    assert num_classes == 10 and y.tolist() == labels.tolist()
    assert normalisation == {"latent_mean": info["latent_mean"], "latent_std": info["latent_std"]}
    per_channel = x.double().transpose(0, 1).reshape(32, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(32, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(per_channel.std(1), torch.ones(32, dtype=torch.float64), rtol=0, atol=1e-6)
    prior = load(root / "run" / "checkpoints" / "step_0000002.pt")["prior"]
    assert prior["counts"].tolist() == [6] * 10  # 3 images and 3 mirror images per class
    for c in range(10):
        torch.testing.assert_close(prior["means"][c].double(), torch.as_tensor(expected[labels == c].mean(0)),
                                   rtol=0, atol=1e-5)


def test_decode_undoes_the_normalisation(fashion):
    root, _ = fashion
    sampler = train_class.load_for_sampling(str(root / "run"), "cpu")
    assert sampler.latent_shape == (32, 8, 8) and sampler.num_classes == 10
    config = load(root / "run" / "checkpoints" / "step_0000002.pt")["config"]
    mean, std = (torch.tensor(config[key]).reshape(-1, 1, 1) for key in ("latent_mean", "latent_std"))
    raw = torch.as_tensor(read_shards(root / "cache")["latents"][:4])
    images = sampler.decode((raw - mean) / std)
    autoencoder = flow.load_autoencoder(str(root / "taef2"))
    assert images.shape == (4, 3, 64, 64) and images.abs().max() <= 1
    torch.testing.assert_close(images, autoencoder.decode(raw), rtol=0, atol=1e-5)
    # Without the un-normalisation the images would differ: the check above can fail.
    assert (autoencoder.decode((raw - mean) / std) - images).abs().max() > 1e-3


def test_latent_cache_is_reused_for_fewer_images(fashion, tmp_path):
    root, options = fashion
    cached = files_digest(root / "cache")
    train(tmp_path / "ten", *options, "--steps", 1, "--max-train-images", 10)
    assert files_digest(root / "cache") == cached  # read, not encoded again
    checkpoint = load(tmp_path / "ten" / "checkpoints" / "step_0000001.pt")
    assert checkpoint["prior"]["counts"].tolist() == [2] * 10  # the first 10 images and their mirror images
    raw, labels = cached_raw_latents(root / "cache")
    first = np.r_[0:10, 30:40]  # originals 0..9, then their flips
    info = json.loads((root / "cache" / "info.json").read_text())
    mean, std = (np.array(info[key])[:, None, None] for key in ("latent_mean", "latent_std"))
    for c in range(10):  # the statistics stay those of the whole cache
        expected = ((raw[first] - mean) / std)[labels[first] == c].mean(0)
        torch.testing.assert_close(checkpoint["prior"]["means"][c].double(), torch.as_tensor(expected),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["data root", "autoencoder", "image size", "more images"])
def test_latent_cache_from_other_data_is_refused(fashion, tmp_path, case):
    root, options = fashion
    options = [str(option) for option in options]
    if case == "data root":  # the same files elsewhere: still another data set as far as the cache knows
        shutil.copytree(root / "data", tmp_path / "data")
        options[options.index("--data-root") + 1] = str(tmp_path / "data")
    elif case == "autoencoder":
        shutil.copytree(root / "taef2", tmp_path / "taef2")
        options[options.index("--vae") + 1] = str(tmp_path / "taef2")
    elif case == "image size":
        options += ["--image-size", "32"]
    else:
        options += ["--max-train-images", "31"]
    cached = files_digest(root / "cache")
    message = one_line_error(f"^error: latent cache {root / 'cache'} ", tmp_path / "out", *options,
                             "--steps", 1)
    assert ("fewer than --max-train-images 31" in message) == (case == "more images")
    assert files_digest(root / "cache") == cached
    assert not os.path.exists(tmp_path / "out" / "checkpoints")


def test_partial_latent_cache_is_not_taken_for_the_whole_data_set(fashion, tmp_path):
    """A cache of the first 10 images must not silently stand in for all 30."""
    _, options = fashion
    options = [str(option) for option in options]
    options[options.index("--latent-cache") + 1] = str(tmp_path / "cache")
    ten = train_class.parse_args([*options, "--out", str(tmp_path / "ten"), "--max-train-images", "10"])
    assert len(train_class.load_data(ten, 0, 1, torch.device("cpu"))[0]) == 20  # makes a cache of 10 images
    every = train_class.parse_args([*options, "--out", str(tmp_path / "all")])  # all 30 images asked for
    try:
        x = train_class.load_data(every, 0, 1, torch.device("cpu"))[0]
    except SystemExit as error:  # refusing is fine, if in one line
        assert str(error).startswith("error: latent cache") and "\n" not in str(error)
        return
    assert len(x) == 60


@pytest.mark.parametrize("case", ["no data root", "missing idx file", "cut gzip", "short idx data",
                                  "mismatched counts"])
def test_bad_fashion_data_is_a_one_line_error(tmp_path, capsys, case):
    data = tmp_path / "data"
    write_fashion(data)
    images_file, labels_file = (data / name for name in flow.FASHION_FILES["train"])
    argv = ["--data", "fashion-mnist", "--data-root", str(data), "--out", str(tmp_path / "out"), "--quiet"]
    if case == "no data root":
        assert "--data fashion-mnist needs --data-root" in argparse_error(capsys, argv[:2])
        return
    if case == "missing idx file":
        os.remove(data / flow.FASHION_FILES["test"][1])
        assert "t10k-labels-idx1-ubyte.gz" in argparse_error(capsys, argv)
        return
    if case == "cut gzip":
        images_file.write_bytes(images_file.read_bytes()[:-100])
    elif case == "short idx data":  # a complete gzip stream holding one byte too few
        images_file.write_bytes(gzip.compress(gzip.decompress(images_file.read_bytes())[:-1]))
    else:
        write_idx(labels_file, np.arange(29) % 10)
    with pytest.raises(SystemExit, match="^error: ") as error:
        train_class.main(train_class.parse_args(argv))
    message = str(error.value)
    assert "\n" not in message and str(labels_file if case == "mismatched counts" else images_file) in message
    assert not os.path.exists(tmp_path / "out" / "checkpoints")


def test_options_are_checked_before_the_data_is_read(tmp_path, capsys):
    data = tmp_path / "data"
    write_fashion(data)
    (data / flow.FASHION_FILES["train"][0]).write_bytes(b"broken")  # reading it would fail differently
    argv = ["--data", "fashion-mnist", "--data-root", str(data)]
    assert "--cfg-dropout" in argparse_error(capsys, argv + ["--cfg-dropout", "1.5"])
    assert "--vae" in argparse_error(capsys, argv + ["--vae", str(tmp_path / "no_such_autoencoder")])
    assert "--max-train-images" in argparse_error(capsys, argv + ["--max-train-images", "0"])
    assert "--patch-size" in argparse_error(capsys, argv + ["--patch-size", "0"])
    assert "no --vae, --data-root or --image-size" in argparse_error(capsys, ["--data-root", str(data)])
    with pytest.raises(SystemExit, match="^error: cannot read"):  # the options are fine: now the data fails
        train(tmp_path / "out", *argv)


def test_checkpoint_is_written_before_the_sample_grids(tmp_path, monkeypatch):
    def failing_grids(*args, **kwargs):
        raise RuntimeError("out of memory while sampling")

    monkeypatch.setattr(train_class, "save_sample_grids", failing_grids)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(tmp_path, "--steps", 1)
    assert os.listdir(tmp_path / "checkpoints") == ["step_0000001.pt"]


@pytest.mark.parametrize("schedule", ["uniform", "logit-normal"])
def test_time_schedule_reaches_the_loss(tmp_path, monkeypatch, schedule):
    seen, loss = [], flow.flow_matching_loss
    monkeypatch.setattr(flow, "flow_matching_loss", lambda *a, **k: seen.append(k["t"]) or loss(*a, **k))
    train(tmp_path, "--steps", 1, "--time-schedule", schedule, "--max-batch-per-gpu", 8)
    expected = flow.draw_examples(0, 0, 16, (1, 8, 8), schedule)[1]  # seed 0, step 0
    assert torch.equal(torch.cat(seen), expected)


def test_patch_size_sets_the_tokens(tmp_path):
    model = train_class.DiT((32, 8, 8), num_classes=3, **{**train_class.MODELS["tiny"], "patch": 4})
    assert model.grid == (2, 2) and model.embed_patches.in_features == 4 * 4 * 32
    x = torch.randn(2, 32, 8, 8)
    assert model(x, torch.rand(2), torch.tensor([0, 3])).shape == x.shape
    with pytest.raises(SystemExit, match="^error: latents of size 8x8 cannot be cut into 3x3 patches$"):
        train_class.DiT((32, 8, 8), num_classes=3, **{**train_class.MODELS["tiny"], "patch": 3})
    train(tmp_path, "--steps", 1, "--patch-size", 4)
    checkpoint = load(tmp_path / "checkpoints" / "step_0000001.pt")
    assert checkpoint["model"]["embed_patches.weight"].shape == (64, 4 * 4 * 1)
    assert checkpoint["model"]["position"].shape == (1, 4, 64)


def test_load_for_sampling_round_trip(digits_run):
    path = str(digits_run / "checkpoints" / "step_0000004.pt")
    checkpoint = load(path)
    sampler = train_class.load_for_sampling(path, "cpu")
    assert sampler.latent_shape == (1, 8, 8) and sampler.num_classes == 10 and sampler.options["steps"] == 4
    assert sampler.kind == "class" and sampler.trained_with_dropout  # --cfg-dropout 0.3
    assert not sampler.model.training
    for name, value in sampler.model.state_dict().items():
        assert torch.equal(value, checkpoint["ema"][name]), name
    raw = train_class.load_for_sampling(path, "cpu", use_ema=False)
    assert torch.equal(raw.model.out.weight, checkpoint["model"]["out.weight"])
    labels = sampler.make_condition(torch.tensor([0, 3, 9]))
    noise = torch.stack([torch.randn(sampler.latent_shape, generator=torch.Generator().manual_seed(s))
                         for s in range(3)])
    x0 = sampler.prior.sample(labels, noise)
    torch.testing.assert_close(x0, checkpoint["prior"]["means"][[0, 3, 9]] + 0.5 * noise)  # N(m(c), 0.5^2 I)
    velocity = flow.guided_velocity(sampler.model, labels, sampler.null_condition(3), 2.0)
    images = sampler.decode(flow.solve(velocity, x0, 4, "euler").x)
    assert images.shape == (3, 3, 8, 8) and images.abs().max() <= 1
    assert torch.equal(images[:, 0], images[:, 2])  # gray repeated to 3 channels
    assert sampler.null_condition(2).tolist() == [10, 10]
    with pytest.raises(SystemExit, match="labels must lie"):
        sampler.make_condition(torch.tensor([10]))


def test_load_for_sampling_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        train_class.load_for_sampling(str(tmp_path / "nope.pt"), "cpu")
    torch.save({"kind": "text"}, tmp_path / "text.pt")
    with pytest.raises(SystemExit, match="not a class-conditional checkpoint"):
        train_class.load_for_sampling(str(tmp_path / "text.pt"), "cpu")


@pytest.mark.parametrize("case", ["no labels", "label 0", "label 1001", "not npz", "no batch files",
                                  "empty file", "cut short", "NaN label", "inf label", "float labels"])
def test_bad_data_is_a_one_line_error(tmp_path, case):
    data = tmp_path / "data"
    os.makedirs(data)
    path = data / "train_data_batch_1.npz"
    if case == "no labels":
        np.savez(path, data=np.zeros((2, 192), np.uint8))
    elif case.startswith("label"):
        write_imagenet_batch(path, labels=[1, int(case.split()[1])])
    elif case == "not npz":
        (data / "train_data_batch_1").write_text("hello")
    elif case == "empty file":
        path.write_bytes(b"")
    elif case == "cut short":
        write_imagenet_batch(path, labels=[1, 2])
        path.write_bytes(path.read_bytes()[:300])
    elif case != "no batch files":
        label = {"NaN label": np.nan, "inf label": np.inf, "float labels": 2.0}[case]
        np.savez(path, data=np.zeros((2, 192), np.uint8), labels=np.array([1.0, label]))
    message = one_line_error("^error: ", tmp_path / "out", "--data", "imagenet64", "--data-root", data,
                             "--prior", "gaussian")
    assert not os.path.exists(tmp_path / "out" / "checkpoints")
    assert ("with NaN or inf, not integers" in message) == (case in ("NaN label", "inf label"))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_is_a_one_line_error(tmp_path, workers):
    write_image_folder(tmp_path / "tree")
    broken = tmp_path / "tree" / "dog" / "1.png"
    broken.write_bytes(broken.read_bytes()[:60])  # cut short, as by a failed copy
    message = one_line_error("^error: cannot read image ", tmp_path / "out", "--data", "image-folder",
                             "--data-root", tmp_path / "tree", "--image-size", 8, "--workers", workers)
    assert str(broken) in message
    assert not os.path.exists(tmp_path / "out" / "checkpoints")


def copy_of_cache(fashion, tmp_path):
    root, options = fashion
    shutil.copytree(root / "cache", tmp_path / "cache")
    options = [str(option) for option in options]
    options[options.index("--latent-cache") + 1] = str(tmp_path / "cache")
    return tmp_path / "cache", options


def test_a_latent_cache_with_nan_is_refused(fashion, tmp_path):
    """An autoencoder that wrote NaN (the shard's checksum is right: the values were wrong when written)."""
    cache, options = copy_of_cache(fashion, tmp_path)
    shards = read_shards(cache)
    shards["latents"][3, 1, 2, 2] = np.nan
    flow.write_shard(str(cache), 0, shards)
    info = json.loads((cache / "info.json").read_text())
    info["shards"] = flow.shard_checksums(str(cache), info["num_images"])
    (cache / "info.json").write_text(json.dumps(info))
    one_line_error(f"^error: latent cache {cache} holds NaN or inf values: delete it",
                   tmp_path / "out", *options, "--steps", 1)
    assert not os.path.exists(tmp_path / "out" / "checkpoints")


@pytest.mark.parametrize("damage", ["flipped bytes", "cut short", "missing", "index cut short"])
def test_a_damaged_latent_cache_is_refused_in_one_line(fashion, tmp_path, damage):
    """Finite garbage would train without a word (loss 58 -> 17,471): the index's sha256 tells."""
    cache, options = copy_of_cache(fashion, tmp_path)
    shard = cache / "shard_00000.npz"
    data = bytearray(shard.read_bytes())
    if damage == "flipped bytes":
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
        shard.write_bytes(bytes(data))
    elif damage == "cut short":
        shard.write_bytes(bytes(data[:len(data) // 2]))
    elif damage == "missing":
        shard.unlink()
    else:
        (cache / "info.json").write_text((cache / "info.json").read_text()[:50])
    expected = f"latent cache shard {shard} is missing"
    expected = "latent cache index" if damage == "index cut short" else expected
    one_line_error(f"^error: {expected}", tmp_path / "out", *options, "--steps", 1)
    assert not os.path.exists(tmp_path / "out" / "checkpoints")


def test_an_interrupted_encode_resumes_from_its_last_complete_shard(fashion, tmp_path, monkeypatch):
    """Shards of 8 images: the 30 images make 4; with two of them, no index and a cut-off write (a run
    killed while encoding), the next run encodes only the two missing shards and ends with the same
    cache, the cut-off file removed."""
    _, options = fashion
    monkeypatch.setattr(flow, "SHARD_IMAGES", 8)
    options = [str(option) for option in options]
    options[options.index("--latent-cache") + 1] = str(tmp_path / "cache")
    train(tmp_path / "whole", *options, "--steps", 1)
    whole = files_digest(tmp_path / "cache")
    assert sorted(whole) == ["info.json", *(f"shard_{k:05d}.npz" for k in range(4))]
    for name in ("info.json", "shard_00001.npz", "shard_00003.npz"):
        os.remove(tmp_path / "cache" / name)
    (tmp_path / "cache" / "shard_00002.npz").touch()  # mtime: a kept shard is not written again
    (tmp_path / "cache" / "shard_00003.npz.4242.tmp").write_bytes(b"PK")  # killed while writing shard 3
    kept = os.stat(tmp_path / "cache" / "shard_00002.npz").st_mtime_ns
    encoded = []
    encode = flow.Autoencoder.encode
    monkeypatch.setattr(flow.Autoencoder, "encode", lambda self, x: encoded.append(len(x)) or encode(self, x))
    train(tmp_path / "resumed", *options, "--steps", 1)
    # shards 1 (8 images) and 3 (6), each with its mirror images; the 2-image batches are the checks of
    # the autoencoder when it is loaded (flow.load_taef2)
    assert [count for count in encoded if count != 2] == [8, 8, 6, 6]
    assert os.stat(tmp_path / "cache" / "shard_00002.npz").st_mtime_ns == kept
    assert files_digest(tmp_path / "cache") == whole


def test_fashion_has_no_mirror_images_by_default(fashion, tmp_path):
    root, options = fashion  # root: an existing folder, as --data-root of the other data sets
    options = [str(option) for option in options if str(option) != "--mirror"]
    options[options.index("--latent-cache") + 1] = str(tmp_path / "cache")
    args = train_class.parse_args([*options, "--out", str(tmp_path / "out")])
    assert args.mirror is False
    x, y, _, _ = train_class.load_data(args, 0, 1, torch.device("cpu"))
    assert len(x) == len(y) == 30 and "flipped" not in read_shards(tmp_path / "cache")
    mirrored = train_class.parse_args([*options, "--out", str(tmp_path / "out"), "--mirror"])
    one_line_error("^error: latent cache .* was made from", tmp_path / "out2", *options, "--mirror",
                   "--steps", 1)
    assert mirrored.mirror is True
    for data in ("imagenet64", "image-folder"):
        assert train_class.parse_args(["--data", data, "--data-root", str(root)]).mirror is True


# ----------------------------------------------------------------------------------------------
# Checkpoints: corrupted ones are skipped on resume, temporary files of interrupted writes removed,
# and a failed write is one line that keeps the previous checkpoint.


def test_resume_skips_a_corrupted_checkpoint_and_removes_partial_writes(tmp_path, digits_run, capsys):
    shutil.copytree(digits_run, tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "step_0000004.pt"
    flip_weight_bytes(newest)  # loads silently: only the checksum tells
    partial = [newest.parent / "step_0000006.pt.4242.tmp", tmp_path / "run" / "args.json.7.tmp"]
    for path in partial:
        path.write_bytes(b"cut short by a crash")
    with pytest.raises(SystemExit, match=f"^error: {newest} is corrupted"):
        train_class.load_for_sampling(str(tmp_path / "run"), "cpu")
    capsys.readouterr()
    train(tmp_path / "run", "--steps", 4, "--ckpt-every", 2, "--sample-every", 2, "--coupling", "ot",
          "--cfg-dropout", 0.3, "--resume")
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert note == [(f"note: {newest} is corrupted (its contents do not match their checksum): refused: "
                     f"resuming from the previous valid checkpoint {newest.parent / 'step_0000002.pt'}")]
    assert not any(path.exists() for path in partial)
    resumed = load(newest)["model"]
    assert_same_state(resumed, load(digits_run / "checkpoints" / "step_0000004.pt")["model"])  # from step 2


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    train(tmp_path, "--steps", 2)
    before = digest(tmp_path / "checkpoints" / "step_0000002.pt")
    monkeypatch.setattr(torch, "save", disk_full)
    message = one_line_error("No space left", tmp_path, "--steps", 4, "--resume")
    path = tmp_path / "checkpoints" / "step_0000004.pt"
    assert message == f"error: cannot write {path}: No space left on device"
    assert os.listdir(tmp_path / "checkpoints") == ["step_0000002.pt"]
    assert digest(tmp_path / "checkpoints" / "step_0000002.pt") == before


@pytest.mark.parametrize("name", ["log.jsonl", "args.json"])
def test_a_failed_log_or_args_write_is_one_line(tmp_path, monkeypatch, name):
    def failing_open(path, mode="r", *args, **kwargs):
        if str(path).startswith(str(tmp_path / name)) and mode != "r":
            disk_full()
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(train_class, "open", failing_open, raising=False)
    monkeypatch.setattr(flow, "open", failing_open, raising=False)
    message = one_line_error("No space left", tmp_path, "--steps", 2)
    assert message == f"error: cannot write {tmp_path / name}: No space left on device"
    assert not os.path.exists(tmp_path / "checkpoints" / "step_0000002.pt")


def test_an_out_folder_that_cannot_be_made_is_refused_before_the_data_is_read(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    message = argparse_error(capsys, ["--out", str(tmp_path / "file" / "run")])
    assert f"{tmp_path / 'file'} is not a writable folder" in message


def test_missing_data_root_is_an_argparse_error(tmp_path, capsys):
    for data in ("imagenet64", "image-folder", "fashion-mnist"):
        message = argparse_error(capsys, ["--data", data, "--data-root", str(tmp_path / "absent")])
        assert f"--data {data} needs --data-root" in message and str(tmp_path / "absent") in message


def test_class_without_data_is_an_error(tmp_path):
    write_imagenet_batch(tmp_path / "train_data_batch_1.npz", labels=[1, 2])  # 998 classes have no images
    one_line_error("no training data", tmp_path / "out", "--data", "imagenet64", "--data-root", tmp_path,
                   "--prior", "class")


def test_resume_with_other_configuration_is_refused(tmp_path):
    out = tmp_path / "run"
    train(out, "--steps", 2)
    before = digest(out / "checkpoints" / "step_0000002.pt")
    with pytest.raises(SystemExit, match="--prior-sigma 0.5"):
        train(out, "--steps", 4, "--resume", "--prior-sigma", 0.25)
    assert digest(out / "checkpoints" / "step_0000002.pt") == before
    assert os.listdir(out / "checkpoints") == ["step_0000002.pt"]


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    train(tmp_path, "--steps", 2)
    before = digest(tmp_path / "checkpoints" / "step_0000002.pt")
    loss = flow.flow_matching_loss
    monkeypatch.setattr(flow, "flow_matching_loss", lambda *a, **k: loss(*a, **k) * float("nan"))
    with pytest.raises(SystemExit, match="non-finite loss nan .* at step 3"):
        train(tmp_path, "--steps", 4, "--resume")
    assert os.listdir(tmp_path / "checkpoints") == ["step_0000002.pt"]
    assert digest(tmp_path / "checkpoints" / "step_0000002.pt") == before


@pytest.mark.parametrize("null_prior", ["mixture", "own"])
def test_pairs_keep_each_conditioned_sample_on_its_class_prior(null_prior):
    """With a near-zero sigma, x0 reveals the class prior it came from: labelled samples (OT-coupled
    within classes) always start at their own class mean; dropped ones per --cfg-null-prior."""
    torch.manual_seed(0)
    args = train_class.parse_args(["--coupling", "ot", "--cfg-dropout", "0.5", "--cfg-null-prior", null_prior,
                                   "--prior-sigma", "1e-6"])
    prior = train_class.build_prior(args, {"num_classes": 4, "latent_shape": [1, 2, 2]})
    y = torch.arange(4).repeat(100)
    x1 = torch.randn(400, 1, 2, 2) + 3 * y[:, None, None, None]
    train_class.fit_class_prior(prior, x1, y, 0, 1, torch.device("cpu"))
    x0, _, _, labels = train_class.training_pairs(0, x1, y, prior, 4, args)
    source = torch.cdist(x0.flatten(1), prior.means.flatten(1)).argmin(1)  # which class mean x0 sits on
    kept = labels < 4
    assert 100 < kept.sum() < 300 and torch.equal(labels[kept], y[kept]) and (labels[~kept] == 4).all()
    assert torch.equal(source[kept], y[kept])
    if null_prior == "own":
        assert torch.equal(source[~kept], y[~kept])
    else:  # the mixture: about 3 in 4 dropped samples start from another class's prior
        assert 0.5 < (source[~kept] != y[~kept]).float().mean() < 0.95


def test_ot_pairs_optimally_within_each_class():
    """--coupling ot with the class prior: each class's prior samples are re-paired with that class's
    data by an optimal assignment (brute force: scipy's), never across classes."""
    torch.manual_seed(1)
    args = train_class.parse_args(["--coupling", "ot", "--prior-sigma", "1"])
    prior = train_class.build_prior(args, {"num_classes": 3, "latent_shape": [1, 2, 2]})
    y = torch.arange(3).repeat(20)
    x1 = torch.randn(60, 1, 2, 2) + 3 * y[:, None, None, None]
    train_class.fit_class_prior(prior, x1, y, 0, 1, torch.device("cpu"))
    x0, _, _, labels = train_class.training_pairs(0, x1, y, prior, 3, args)
    assert torch.equal(labels, y)
    independent = 0.0
    for c in range(3):
        mine = y == c
        cost = torch.cdist(x0[mine].flatten(1), x1[mine].flatten(1)).pow(2).double()
        rows, columns = linear_sum_assignment(cost.numpy())
        assert cost.diagonal().sum().item() == pytest.approx(cost[rows, columns].sum().item(), rel=1e-9)
        independent += cost.mean().item() * mine.sum().item()  # expected cost of a random pairing
    # Whole-batch OT may pair across classes (the means are only 3 apart): never the class-wise pairs.
    assert (x0 - x1).pow(2).sum().item() < 0.8 * independent


def test_old_null_prior_name_is_refused(capsys):
    assert "invalid choice: 'class'" in argparse_error(capsys, ["--cfg-null-prior", "class"])


def test_existing_checkpoints_are_not_overwritten_without_resume(tmp_path):
    train(tmp_path, "--steps", 2)
    before = digest(tmp_path / "checkpoints" / "step_0000002.pt")
    with pytest.raises(SystemExit, match="already holds checkpoints: add --resume"):
        train(tmp_path, "--steps", 2, "--seed", 1)
    assert os.listdir(tmp_path / "checkpoints") == ["step_0000002.pt"]
    assert digest(tmp_path / "checkpoints" / "step_0000002.pt") == before


def test_resume_with_nothing_to_continue_or_nothing_left_is_an_error_that_writes_nothing(tmp_path):
    with pytest.raises(SystemExit, match="--resume: .* holds no checkpoint to continue"):
        train(tmp_path / "typo", "--steps", 2, "--resume")
    assert not (tmp_path / "typo").exists()
    train(tmp_path / "run", "--steps", 2)
    before = {name: digest(tmp_path / "run" / name) for name in ("args.json", "log.jsonl")}
    for steps in (2, 1):
        with pytest.raises(SystemExit, match="already at step 2: --steps .* leaves nothing to train"):
            train(tmp_path / "run", "--steps", steps, "--resume")
    assert {name: digest(tmp_path / "run" / name) for name in before} == before
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["step_0000002.pt"]

"""train_class.py: training runs (one process and torchrun), exact resume, data readers, VAE cache,
bad input, and the load_for_sampling contract of sample.py. All on CPU with tiny settings."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import flow
import train_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--global-batch", "16", "--log-every", "1", "--sample-nfe", "1", "2", "--warmup-steps", "2"]


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


def write_image_folder(root, counts=(5, 3), size=(12, 10)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in zip(["cat", "dog"], counts):
        os.makedirs(root / name)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    train(out, "--steps", 4, "--ckpt-every", 2, "--sample-every", 2, "--coupling", "ot", "--cfg-dropout", 0.3)
    return out


def test_run_writes_everything(digits_run):
    args = json.loads((digits_run / "args.json").read_text())
    assert args["num_classes"] == 10 and args["latent_shape"] == [1, 8, 8] and args["steps"] == 4
    records = [json.loads(line) for line in (digits_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 and r["transport_cost"] > 0 for r in records)
    assert records[0]["lr"] == pytest.approx(0.5e-3) and records[-1]["lr"] == pytest.approx(1e-3)  # warmup
    assert sorted(os.listdir(digits_run / "checkpoints")) == ["step_0000002.pt", "step_0000004.pt"]
    assert {"step_0000004_nfe_1.png", "step_0000004_nfe_2.png"} <= set(os.listdir(digits_run / "samples"))
    checkpoint = load(digits_run / "checkpoints" / "step_0000004.pt")
    assert checkpoint["kind"] == "class" and checkpoint["step"] == 4
    assert {"model", "ema", "opt", "args", "prior", "rng"} <= checkpoint.keys()
    assert not torch.equal(checkpoint["model"]["out.weight"], checkpoint["ema"]["out.weight"])


def test_class_means_are_the_class_averages(digits_run):
    x, y, _ = train_class.load_digits_train()
    means = load(digits_run / "checkpoints" / "step_0000004.pt")["prior"]["means"]
    for c in range(10):
        torch.testing.assert_close(means[c], x[y == c].double().mean(0).float())


def test_resume_equals_uninterrupted(tmp_path, digits_run):
    """Stop after 2 steps, resume to 4: the same weights, EMA and optimizer state, bit for bit."""
    options = ["--ckpt-every", 2, "--sample-every", 2, "--coupling", "ot", "--cfg-dropout", 0.3]
    train(tmp_path, "--steps", 2, *options)
    with open(tmp_path / "log.jsonl", "a") as file:  # a line the interrupted run wrote after its checkpoint
        file.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    train(tmp_path, "--steps", 4, "--resume", *options)
    resumed, straight = load(tmp_path / "checkpoints" / "step_0000004.pt"), load(digits_run / "checkpoints" / "step_0000004.pt")
    for key in ("model", "ema"):
        assert_same_state(resumed[key], straight[key])
    for a, b in zip(resumed["opt"]["state"].values(), straight["opt"]["state"].values()):
        assert_same_state(a, b)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_torchrun_two_processes_match_single_process_means(tmp_path, digits_run):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "train_class.py", "--out", str(out), *TINY, "--steps", "2", "--sample-every", "2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = load(out / "checkpoints" / "step_0000002.pt")
    single = load(digits_run / "checkpoints" / "step_0000004.pt")["prior"]
    torch.testing.assert_close(checkpoint["prior"]["means"], single["means"], rtol=0, atol=1e-6)
    assert torch.equal(checkpoint["prior"]["counts"], single["counts"])  # every image counted once
    assert len(checkpoint["rng"]) == 2 and not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]  # rank 0 only


def test_batch_order_covers_each_epoch_and_does_not_depend_on_world_size():
    order = train_class.BatchOrder(size=10, global_batch=4, seed=3)
    first_epochs = torch.cat([order.indices(step, 0, 1) for step in range(5)])  # 20 positions = 2 epochs
    assert sorted(first_epochs[:10].tolist()) == list(range(10)) == sorted(first_epochs[10:].tolist())
    two_ranks = torch.cat([order.indices(7, rank, 2) for rank in range(2)])
    assert torch.equal(two_ranks, order.indices(7, 0, 1))


def test_dit_starts_at_zero_velocity_and_keeps_shape():
    model = train_class.DiT((4, 8, 8), num_classes=5, **train_class.MODELS["tiny"])
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
    x, y, num_classes = train_class.load_pixels(train_class.parse_args(["--data", str(tmp_path)]))
    assert x.shape == (6, 3, 8, 8) and y.tolist() == [0, 1, 1, 2, 9, 10] and num_classes == 1000
    train(tmp_path / "out", "--data", tmp_path, "--prior", "gaussian", "--steps", 1)
    assert os.path.isfile(tmp_path / "out" / "checkpoints" / "step_0000001.pt")


def test_image_folder_training_with_class_prior(tmp_path):
    write_image_folder(tmp_path / "tree")
    train(tmp_path / "out", "--data", tmp_path / "tree", "--image-size", 8, "--steps", 2)
    checkpoint = load(tmp_path / "out" / "checkpoints" / "step_0000002.pt")
    assert checkpoint["args"]["num_classes"] == 2 and checkpoint["args"]["latent_shape"] == [3, 8, 8]
    assert checkpoint["prior"]["counts"].tolist() == [5, 3]
    sampler = train_class.load_for_sampling(str(tmp_path / "out"), "cpu")
    assert sampler.decode(torch.zeros(2, 3, 8, 8)).shape == (2, 3, 8, 8)


def test_vae_latents_are_cached_with_flips(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="the VAE path needs diffusers (pip install diffusers)")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vae.save_pretrained(tmp_path / "vae")
    write_image_folder(tmp_path / "tree")
    options = ["--data", tmp_path / "tree", "--image-size", 8, "--vae", tmp_path / "vae",
               "--latent-cache", tmp_path / "cache", "--steps", 2]
    train(tmp_path / "out", *options)
    latents = np.load(tmp_path / "cache" / "latents_rank0.npy")
    labels = np.load(tmp_path / "cache" / "labels_rank0.npy")
    assert latents.shape == (16, 4, 4, 4) and sorted(labels.tolist()) == [0] * 10 + [1] * 6  # 8 images + flips
    checkpoint = load(tmp_path / "out" / "checkpoints" / "step_0000002.pt")
    torch.testing.assert_close(checkpoint["prior"]["means"][1], torch.as_tensor(latents[labels == 1].mean(0)))
    cached = digest(tmp_path / "cache" / "latents_rank0.npy")
    train(tmp_path / "out2", *options)  # a second run reads the cache instead of encoding again
    assert digest(tmp_path / "cache" / "latents_rank0.npy") == cached
    sampler = train_class.load_for_sampling(str(tmp_path / "out"), "cpu")
    images = sampler.decode(torch.randn(2, *sampler.latent_shape))
    assert images.shape == (2, 3, 8, 8) and images.abs().max() <= 1


def test_load_for_sampling_round_trip(digits_run):
    path = str(digits_run / "checkpoints" / "step_0000004.pt")
    checkpoint = load(path)
    sampler = train_class.load_for_sampling(path, "cpu")
    assert sampler.latent_shape == (1, 8, 8) and sampler.num_classes == 10 and sampler.args["steps"] == 4
    assert not sampler.model.training
    for name, value in sampler.model.state_dict().items():
        assert torch.equal(value, checkpoint["ema"][name]), name
    raw = train_class.load_for_sampling(path, "cpu", use_ema=False)
    assert torch.equal(raw.model.out.weight, checkpoint["model"]["out.weight"])
    labels = sampler.make_condition(torch.tensor([0, 3, 9]))
    noise = torch.stack([torch.randn(sampler.latent_shape, generator=torch.Generator().manual_seed(s)) for s in range(3)])
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


@pytest.mark.parametrize("case", ["missing", "no labels", "label 0", "label 1001", "not npz"])
def test_bad_data_is_a_one_line_error(tmp_path, case):
    data = tmp_path / "data"
    os.makedirs(data)
    if case == "no labels":
        np.savez(data / "train_data_batch_1.npz", data=np.zeros((2, 192), np.uint8))
    elif case.startswith("label"):
        write_imagenet_batch(data / "train_data_batch_1.npz", labels=[1, int(case.split()[1])])
    elif case == "not npz":
        (data / "train_data_batch_1").write_text("hello")
    with pytest.raises(SystemExit, match="^error: .*") as error:
        train(tmp_path / "out", "--data", tmp_path / "absent" if case == "missing" else data, "--prior", "gaussian")
    assert "\n" not in str(error.value)


def test_class_without_data_is_an_error(tmp_path):
    write_imagenet_batch(tmp_path / "train_data_batch_1.npz", labels=[1, 2])  # 998 classes have no images
    with pytest.raises(SystemExit, match="no training data"):
        train(tmp_path / "out", "--data", tmp_path, "--prior", "class")


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


@pytest.mark.parametrize("null_prior", ["mixture", "class"])
def test_pairs_keep_each_conditioned_sample_on_its_class_prior(null_prior):
    """With a near-zero sigma, x0 reveals the class prior it came from: labelled samples (OT-coupled
    within classes) always start at their own class mean; dropped ones per --cfg-null-prior."""
    torch.manual_seed(0)
    args = train_class.parse_args(["--coupling", "ot", "--cfg-dropout", "0.5", "--cfg-null-prior", null_prior,
                                   "--prior-sigma", "1e-6"])
    args.num_classes, args.latent_shape = 4, [1, 2, 2]
    prior = train_class.build_prior(args)
    x1, y = torch.randn(400, 1, 2, 2) + 3 * torch.arange(4).repeat(100)[:, None, None, None], torch.arange(4).repeat(100)
    train_class.fit_class_prior(prior, x1, y, 0, 1, torch.device("cpu"))
    x0, labels = train_class.sample_pairs(prior, x1, y, args)
    source = torch.cdist(x0.flatten(1), prior.means.flatten(1)).argmin(1)  # which class mean x0 sits on
    kept = labels < 4
    assert 100 < kept.sum() < 300 and torch.equal(labels[kept], y[kept]) and (labels[~kept] == 4).all()
    assert torch.equal(source[kept], y[kept])
    if null_prior == "class":
        assert torch.equal(source[~kept], y[~kept])
    else:  # the mixture: about 3 in 4 dropped samples start from another class's prior
        assert 0.5 < (source[~kept] != y[~kept]).float().mean() < 0.95


def test_existing_checkpoints_are_not_overwritten_without_resume(tmp_path):
    train(tmp_path, "--steps", 2)
    before = digest(tmp_path / "checkpoints" / "step_0000002.pt")
    with pytest.raises(SystemExit, match="already holds checkpoints: add --resume"):
        train(tmp_path, "--steps", 2, "--seed", 1)
    assert os.listdir(tmp_path / "checkpoints") == ["step_0000002.pt"]
    assert digest(tmp_path / "checkpoints" / "step_0000002.pt") == before

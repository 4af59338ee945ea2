"""fid.py against ground truth: closed forms, pytorch-fid and torch-fidelity with the same weights.

The real Inception weights cannot be downloaded here, so the parity tests load the same random
weights (one state dict, shaped like pt_inception-2015-12-05-6726825d.pth) into our network,
pytorch-fid's and torch-fidelity's.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import flow


def random_inception_state(seed=0):
    """Random weights that keep activations O(1) through the 90-odd layers (He-scaled convolutions,
    batch-norm statistics away from the identity), plus the 1008-way classifier the file holds."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in fid.FIDInceptionV3().state_dict().items():
        if name.endswith("conv.weight"):
            fan_in = tensor[0].numel()
            tensor = torch.randn(tensor.shape, generator=generator) * (2 / fan_in) ** 0.5
        elif name.endswith(("bn.weight", "bn.running_var")):
            tensor = 0.5 + torch.rand(tensor.shape, generator=generator)
        elif name.endswith(("bn.bias", "bn.running_mean")):
            tensor = 0.1 * torch.randn(tensor.shape, generator=generator)
        state[name] = tensor
    state["fc.weight"] = 0.01 * torch.randn(1008, 2048, generator=generator)
    state["fc.bias"] = torch.zeros(1008)
    return state


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(random_inception_state(), path)
    return str(path)


def random_images(count, size, seed):
    """Smooth random images (not white noise), so that features vary between images."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (count, 4, 4, 3)).astype(np.float32)
    images = torch.nn.functional.interpolate(torch.as_tensor(small).permute(0, 3, 1, 2), size=size, mode="bicubic")
    return images.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_pngs(images, folder):
    os.makedirs(folder, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{index:05d}.png"))
    return str(folder)


# ----------------------------------------------------------------------------------------------
# Frechet distance and KID.


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, 50)
    mu1, mu2 = rng.normal(size=50), rng.normal(size=50)
    rotation, _ = np.linalg.qr(rng.normal(size=(50, 50)))  # a common rotation keeps them commuting
    cov1, cov2 = (rotation * a) @ rotation.T, (rotation * b) @ rotation.T
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert flow.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_closed_form_non_commuting_2d():
    # For 2x2 PSD matrices, Tr (C1 C2)^(1/2) = sqrt(Tr(C1 C2) + 2 sqrt(det C1 det C2)).
    cov1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    cov2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    trace_root = np.sqrt(np.trace(cov1 @ cov2) + 2 * np.sqrt(np.linalg.det(cov1) * np.linalg.det(cov2)))
    expected = 1.0 + np.trace(cov1) + np.trace(cov2) - 2 * trace_root
    assert flow.frechet_distance([1.0, 0.0], cov1, [0.0, 0.0], cov2) == pytest.approx(expected, rel=1e-12)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytorch-fid passes scipy's deprecated `disp`
def test_frechet_distance_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(1)
    features_a, features_b = rng.normal(size=(2000, 128)), rng.normal(size=(2000, 128)) @ rng.normal(size=(128, 128)) * 0.2
    stats_a, stats_b = flow.gaussian_statistics(features_a), flow.gaussian_statistics(features_b)
    ours = flow.frechet_distance(*stats_a, *stats_b)
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
    draw = lambda shift: fid.kid(rng.normal(size=(20, 8)), rng.normal(shift, 1, size=(20, 8)), subsets=1, subset_size=20)[0]
    same = np.array([draw(0.0) for _ in range(400)])
    shifted = np.array([draw(0.5) for _ in range(400)])
    standard_error = same.std() / np.sqrt(len(same))
    assert abs(same.mean()) < 4 * standard_error
    assert shifted.mean() > 10 * standard_error


# ----------------------------------------------------------------------------------------------
# The Inception network: parity with pytorch-fid and torch-fidelity for the same weights.


@pytest.mark.filterwarnings("ignore:Matrix is singular", "ignore::DeprecationWarning")
def test_features_and_fid_match_pytorch_fid(tmp_path, inception_weights, monkeypatch):
    import pytorch_fid.inception
    from pytorch_fid.fid_score import calculate_frechet_distance, get_activations

    state = torch.load(inception_weights)
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    theirs_network = pytorch_fid.inception.InceptionV3([3]).eval()
    folders = [write_pngs(random_images(5, 40, seed), tmp_path / f"set{seed}") for seed in (0, 1)]

    theirs, ours = [], []
    space = fid.load_feature_space("inception", inception_weights=inception_weights)
    for folder in folders:
        files = sorted(os.path.join(folder, name) for name in os.listdir(folder))
        theirs.append(get_activations(files, theirs_network, batch_size=3, dims=2048, device="cpu", num_workers=0))
        ours.append(space.features(fid.load_images(folder), batch_size=2))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
        assert np.abs(a).max() > 1e-2  # the random network does not collapse to zero

    stats = [flow.gaussian_statistics(features) for features in ours]
    theirs_stats = [(features.mean(0), np.cov(features, rowvar=False)) for features in theirs]  # as pytorch-fid
    for (mu, cov), (their_mu, their_cov) in zip(stats, theirs_stats):
        np.testing.assert_allclose(mu, their_mu, rtol=1e-5, atol=1e-5 * np.abs(their_mu).max())
        np.testing.assert_allclose(cov, their_cov, rtol=1e-4, atol=1e-4 * np.abs(their_cov).max())
    # FID on the first 256 dimensions: scipy's sqrtm at 2048 takes minutes here on singular matrices
    # (5 images); docs/metrics.md compares the two at 2048 dimensions.
    first = lambda mu, cov: (mu[:256], cov[:256, :256])
    assert flow.frechet_distance(*first(*stats[0]), *first(*stats[1])) == pytest.approx(
        calculate_frechet_distance(*first(*theirs_stats[0]), *first(*theirs_stats[1])), rel=1e-4)


def test_network_matches_torch_fidelity(inception_weights):
    # torch-fidelity feeds (x - 128) / 128 and resizes TF1-style, where pytorch-fid feeds x / 127.5 - 1
    # after PyTorch's bilinear resize; at 299 x 299 the resize is the identity, so giving both
    # networks the same normalised input compares the networks themselves.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=inception_weights)
    ours = fid.load_inception(inception_weights)
    images = torch.as_tensor(random_images(2, 299, seed=5)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        (expected,) = theirs(images)
        got = ours.forward_normalized((images.float() - 128) / 128)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


# ----------------------------------------------------------------------------------------------
# The digits feature space.


def test_digits_classifier_is_accurate_and_features_separate_real_from_noise():
    test_images, test_labels = fid.load_digits_split(test=True)
    train_images, _ = fid.load_digits_split(test=False)
    assert (fid.digits_predict(test_images) == test_labels).mean() > 0.95
    features = fid.digits_features(test_images)
    assert features.shape == (360, 64) and features.dtype == np.float64
    noise = np.random.default_rng(0).integers(0, 256, test_images.shape).astype(np.uint8)
    real = flow.frechet_distance(*flow.gaussian_statistics(fid.digits_features(train_images)), *flow.gaussian_statistics(features))
    fake = flow.frechet_distance(*flow.gaussian_statistics(fid.digits_features(noise)), *flow.gaussian_statistics(features))
    assert 10 * real < fake


def test_ref_and_calc_cli_on_digits(tmp_path):
    ref = str(tmp_path / "ref.npz")
    fid.main(fid.parse_args(["ref", "--images", "builtin-digits", "--out", ref]))
    train_images, labels = fid.load_digits_split(test=False)
    np.savez(tmp_path / "train.npz", train_images, labels)
    out = tmp_path / "result.json"
    fid.main(fid.parse_args(["calc", "--images", str(tmp_path / "train.npz"), "--ref", ref, "--kid",
                             "--kid-subset-size", "100", "--json", str(out)]))
    result = json.loads(out.read_text())
    reference = fid.load_reference(ref)
    assert reference["feature_space"] == "digits" and len(reference["features"]) == 360
    expected = flow.frechet_distance(*flow.gaussian_statistics(fid.digits_features(train_images)),
                                     reference["mu"], reference["sigma"])
    assert result["fid"] == pytest.approx(expected, rel=1e-9)
    assert result["num_images"] == len(train_images) and result["kid_subset_size"] == 100


def test_ref_under_torchrun_equals_one_process(tmp_path):
    # Two processes (gloo) each take every other image; the gathered features come back in order.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(root, "fid.py"), "ref", "--images", "builtin-digits", "--out", str(tmp_path / "two.npz")],
                   check=True, env=env, cwd=root, capture_output=True)
    two = fid.load_reference(str(tmp_path / "two.npz"))
    expected = fid.digits_features(fid.load_digits_split(test=True)[0])
    np.testing.assert_allclose(two["features"], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# ----------------------------------------------------------------------------------------------
# Bad input: one line, naming the problem.


def run_cli(argv):
    with pytest.raises(SystemExit) as error:
        fid.main(fid.parse_args(argv))
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


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
    assert "not a reference" in run_cli(["calc", "--images", str(tmp_path / "other.npz"), "--ref", str(tmp_path / "other.npz")])

    np.savez(tmp_path / "big.npz", random_images(3, 16, seed=2))
    assert "takes 8x8 images" in run_cli(["calc", "--images", str(tmp_path / "big.npz"), "--ref", digits_ref])

    test_images, _ = fid.load_digits_split(test=True)
    np.savez(tmp_path / "digits.npz", test_images)
    assert "lower --kid-subset-size" in run_cli(["calc", "--images", str(tmp_path / "digits.npz"), "--ref", digits_ref, "--kid"])

    # A reference made with other weights: same feature-space name, different network.
    reference = dict(np.load(digits_ref))
    reference.update(feature_space="inception", fingerprint="0123456789abcdef")
    np.savez(tmp_path / "other_weights.npz", **reference)
    assert "remake the reference" in run_cli(["calc", "--images", str(tmp_path / "digits.npz"), "--ref",
                                              str(tmp_path / "other_weights.npz"), "--inception-weights", inception_weights])


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
    special = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, **special),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def test_clip_score_cli_matches_direct_computation(tmp_path, tiny_clip):
    images = random_images(6, 40, seed=3)
    captions = ["a photo of a cat", "a red dog", "blue", "a dog", "a cat", "photo of a blue cat"]
    np.savez(tmp_path / "images.npz", images)
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    fid.main(fid.parse_args(["clip", "--images", str(tmp_path / "images.npz"), "--captions", str(tmp_path / "captions.txt"),
                             "--clip-model", tiny_clip, "--batch-size", "4", "--json", str(tmp_path / "clip.json")]))
    result = json.loads((tmp_path / "clip.json").read_text())

    # Ground truth, one pair at a time through the towers and projections.
    model, processor = fid.load_clip(tiny_clip)
    expected = []
    with torch.no_grad():
        for image, caption in zip(images, captions):
            pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            tokens = processor.tokenizer([caption], return_tensors="pt")
            image_embedding = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)[0]
            text_embedding = model.text_projection(model.text_model(**tokens).pooler_output)[0]
            cosine = torch.dot(image_embedding, text_embedding) / (image_embedding.norm() * text_embedding.norm())
            expected.append(100 * max(cosine.item(), 0.0))
    assert result["num_images"] == 6
    assert result["clip_score"] == pytest.approx(np.mean(expected), rel=1e-4, abs=1e-4)


def test_clip_needs_one_caption_per_image(tmp_path, tiny_clip):
    np.savez(tmp_path / "images.npz", random_images(3, 16, seed=0))
    (tmp_path / "captions.txt").write_text("a cat\na dog\n")
    assert "3 images but 2 captions" in run_cli(["clip", "--images", str(tmp_path / "images.npz"), "--captions",
                                                 str(tmp_path / "captions.txt"), "--clip-model", tiny_clip])

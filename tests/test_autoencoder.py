"""flow.py's autoencoders and Fashion-MNIST reader: the TAEF2 module (layout, float16 files loaded with
weights_only, folder recognition, shapes, one-line errors, and with the real weights when they are
present, reconstruction quality) and the idx reader / 28 -> 64 px resize against brute force."""
import gzip
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import write_idx, write_taef2

import flow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAEF2_PLACES = ("/work/shared/weights/taef2", os.path.join(ROOT, "..", "shared", "weights", "taef2"))
REAL_TAEF2 = [path for path in TAEF2_PLACES if flow.is_taef2_folder(path)]
REAL_FASHION = "/usr/share/datasets/fashion-mnist"


def bilinear_reference(image, size):
    """Brute-force bilinear resize with half-pixel centres (align_corners=False), float64, one image."""
    height, width = image.shape
    out = np.empty((size, size))
    for i in range(size):
        for j in range(size):
            y = min(max((i + 0.5) * height / size - 0.5, 0), height - 1)
            x = min(max((j + 0.5) * width / size - 0.5, 0), width - 1)
            y0, x0 = int(y), int(x)
            y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = ((1 - dy) * ((1 - dx) * image[y0, x0] + dx * image[y0, x1])
                         + dy * ((1 - dx) * image[y1, x0] + dx * image[y1, x1]))
    return out


def psnr(a, b):
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), over all pixels."""
    return 10 * np.log10(4 / (a - b).pow(2).mean().item())


# ----------------------------------------------------------------------------------------------
# TAEF2.


def test_taef2_weights_round_trip_through_float16_files(tmp_path):
    encoder, decoder = write_taef2(tmp_path)
    for module, name in zip((encoder, decoder), flow.TAEF2_FILES):
        on_disk = torch.load(tmp_path / name, map_location="cpu", weights_only=True)
        assert on_disk.keys() == module.state_dict().keys()
        assert {value.dtype for value in on_disk.values()} == {torch.float16}
    autoencoder = flow.load_autoencoder(str(tmp_path))
    assert isinstance(autoencoder, flow.Autoencoder) and autoencoder.name == "taef2"
    assert autoencoder.vae is None
    for original, loaded in ((encoder, autoencoder.encoder), (decoder, autoencoder.decoder)):
        loaded_state = loaded.state_dict()
        assert loaded_state.keys() == original.state_dict().keys()
        for key, value in original.state_dict().items():  # float16 on disk, float32 in memory
            assert loaded_state[key].dtype == torch.float32
            assert torch.equal(loaded_state[key], value.half().float()), key
    assert not autoencoder.training and not any(p.requires_grad for p in autoencoder.parameters())


def test_taef2_layout_sizes():
    """The module shapes of the release: 3 -> 64 channels, three stride-2 stages, 64 -> 32 latent channels;
    the three deepest encoder stages and the three first decoder blocks carry the 1x1 'pool' branch."""
    encoder, decoder = flow.taef2_encoder(), flow.taef2_decoder()
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(convs) == 3 and encoder[0].in_channels == 3 and encoder[-1].out_channels == 32
    assert sum(block.pool is not None for block in encoder if isinstance(block, flow.TinyBlock)) == 3
    assert sum(isinstance(m, torch.nn.Upsample) for m in decoder) == 3 and decoder[1].in_channels == 32
    assert sum(block.pool is not None for block in decoder if isinstance(block, flow.TinyBlock)) == 3
    assert decoder[-1].out_channels == 3


def test_taef2_partial_state_dict_is_refused(tmp_path):
    write_taef2(tmp_path)
    state = torch.load(tmp_path / "taef2_decoder.pth", weights_only=True)
    del state[next(iter(state))]  # strict loading: one missing tensor is an error
    torch.save(state, tmp_path / "taef2_decoder.pth")
    with pytest.raises(SystemExit, match=r"^error: .*taef2_decoder.pth is not a TAEF2 state dict") as error:
        flow.load_autoencoder(str(tmp_path))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("case", ["foreign state dict", "pickled module", "truncated", "text"])
def test_foreign_pth_is_a_one_line_error(tmp_path, case):
    write_taef2(tmp_path)
    path = tmp_path / "taef2_encoder.pth"
    if case == "foreign state dict":
        torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    elif case == "pickled module":  # weights_only=True refuses arbitrary pickles
        torch.save(torch.nn.Linear(3, 4), path)
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.write_text("not a checkpoint")
    with pytest.raises(SystemExit, match=r"^error: .*taef2_encoder.pth is not a TAEF2 state dict") as error:
        flow.load_autoencoder(str(tmp_path))
    assert "\n" not in str(error.value)


def test_is_taef2_folder(tmp_path):
    write_taef2(tmp_path / "both")
    assert flow.is_taef2_folder(str(tmp_path / "both"))
    os.makedirs(tmp_path / "encoder_only")
    os.link(tmp_path / "both" / "taef2_encoder.pth", tmp_path / "encoder_only" / "taef2_encoder.pth")
    os.makedirs(tmp_path / "named_as_files" / "taef2_encoder.pth")  # folders with the names, not files
    os.makedirs(tmp_path / "named_as_files" / "taef2_decoder.pth")
    for path in ("encoder_only", "named_as_files", "absent", "both/taef2_encoder.pth"):
        assert not flow.is_taef2_folder(str(tmp_path / path)), path
    # Not TAEF2, so load_autoencoder reads it as a diffusers name and fails in one line (a folder with one of
    # the two files is an error naming the other: tests/test_bad_inputs.py).
    with pytest.raises(SystemExit, match="^error: ") as error:
        flow.load_autoencoder(str(tmp_path / "named_as_files"))
    assert "\n" not in str(error.value)


def test_encode_and_decode_shapes_and_ranges(tmp_path):
    write_taef2(tmp_path)
    autoencoder = flow.load_autoencoder(str(tmp_path))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = autoencoder.encode(images)
    assert latents.shape == (2, 32, 8, 8)
    with torch.no_grad():  # TAEF2 reads [0, 1] and writes [0, 1]; the Autoencoder speaks [-1, 1]
        expected = autoencoder.encoder((images + 1) / 2)
        torch.testing.assert_close(latents, expected, rtol=0, atol=0)
        decoded = autoencoder.decode(latents)
        assert decoded.shape == (2, 3, 64, 64) and decoded.abs().max() <= 1
        expected = (autoencoder.decoder(latents) * 2 - 1).clamp(-1, 1)
        torch.testing.assert_close(decoded, expected, rtol=0, atol=0)
        # The decoder's input clamp: 3 tanh(z / 3) bounds latents to (-3, 3).
        huge = torch.full((1, 32, 4, 4), 1e6)
        assert autoencoder.decoder[0](huge).max() == pytest.approx(3, abs=1e-6)
    assert autoencoder.encode(torch.zeros(1, 3, 32, 48)).shape == (1, 32, 4, 6)  # any multiple of 8
    assert autoencoder.decode(torch.zeros(1, 32, 4, 6)).shape == (1, 3, 32, 48)


@pytest.mark.skipif(not REAL_TAEF2, reason="the released TAEF2 weights are not in ../shared/weights/taef2")
def test_real_taef2_reconstructs_fashion_images(tmp_path):
    """The released weights load strictly into this layout and reconstruct clothing images well; the
    same images through random weights are far worse, so the bound measures the weights."""
    folder = REAL_TAEF2[0]
    for name in flow.TAEF2_FILES:
        state = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
        assert {value.dtype for value in state.values()} == {torch.float16}
    if os.path.isdir(REAL_FASHION):
        grey, _ = flow.load_fashion_mnist(REAL_FASHION, "test")
        grey, bound = grey[:32], 27.0  # measured: 29.5 dB on these 32, 29.7 dB on the first 64
    else:  # clothing-like stand-ins: smooth grey silhouettes with a texture, on black
        rows, columns = np.mgrid[0:28, 0:28]
        rng = np.random.default_rng(0)
        grey = []
        for _ in range(32):
            cy, cx, ry, rx = rng.uniform(11, 17), rng.uniform(11, 17), rng.uniform(6, 12), rng.uniform(4, 11)
            inside = ((rows - cy) / ry) ** 2 + ((columns - cx) / rx) ** 2 < 1
            texture = rng.uniform(80, 200) + 40 * np.sin(rows * rng.uniform(0.3, 1.5))
            grey.append(np.where(inside, texture, 0).clip(0, 255))
        grey, bound = np.stack(grey).astype(np.uint8), 29.0  # measured: 32.0 dB
    images = flow.fashion_to_rgb(grey).float() / 127.5 - 1
    autoencoder = flow.load_autoencoder(folder)
    real = psnr(autoencoder.decode(autoencoder.encode(images)), images)
    write_taef2(tmp_path)
    untrained = flow.load_autoencoder(str(tmp_path))
    assert real > bound and real > psnr(untrained.decode(untrained.encode(images)), images) + 10


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST idx files and the 28 -> 64 px RGB images.


def test_read_idx_returns_the_written_array(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7, dtype=np.uint8)
    write_idx(tmp_path / "images.gz", images)
    write_idx(tmp_path / "labels.gz", labels)
    read = flow.read_idx(str(tmp_path / "images.gz"), 3)
    assert read.dtype == np.uint8 and read.shape == (7, 28, 28)
    np.testing.assert_array_equal(read, images)
    np.testing.assert_array_equal(flow.read_idx(str(tmp_path / "labels.gz"), 1), labels)


@pytest.mark.parametrize("case", ["missing", "not gzip", "cut gzip", "short data", "long data", "wrong dims",
                                  "int32 data", "empty"])
def test_bad_idx_is_a_one_line_error(tmp_path, case):
    path = tmp_path / "file.gz"
    images = np.zeros((4, 5, 6), np.uint8)
    write_idx(path, images)
    raw = gzip.decompress(path.read_bytes())
    if case == "not gzip":
        path.write_bytes(raw)
    elif case == "cut gzip":
        path.write_bytes(path.read_bytes()[:-12])
    elif case == "short data":
        path.write_bytes(gzip.compress(raw[:-1]))
    elif case == "long data":
        path.write_bytes(gzip.compress(raw + b"\0"))
    elif case == "int32 data":  # type code 0x0c: not uint8
        path.write_bytes(gzip.compress(raw[:2] + bytes([0x0C]) + raw[3:]))
    elif case == "empty":
        path.write_bytes(gzip.compress(b""))
    elif case == "missing":
        path = tmp_path / "absent.gz"
    with pytest.raises(SystemExit, match="^error: ") as error:
        flow.read_idx(str(path), 2 if case == "wrong dims" else 3)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_load_fashion_mnist_reads_both_splits_and_checks_counts(tmp_path):
    rng = np.random.default_rng(1)
    written = {}
    for split, count in (("train", 9), ("test", 4)):
        images, labels = rng.integers(0, 256, (count, 28, 28)), rng.integers(0, 10, count)
        image_file, label_file = flow.FASHION_FILES[split]
        write_idx(tmp_path / image_file, images)
        write_idx(tmp_path / label_file, labels)
        written[split] = images, labels
    for split in ("train", "test"):
        images, labels = flow.load_fashion_mnist(str(tmp_path), split)
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        np.testing.assert_array_equal(images, written[split][0])
        np.testing.assert_array_equal(labels, written[split][1])
    write_idx(tmp_path / flow.FASHION_FILES["test"][1], written["test"][1][:3])  # one label short
    with pytest.raises(SystemExit, match="^error: .* holds 4 images but .* 3 labels$") as error:
        flow.load_fashion_mnist(str(tmp_path), "test")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("size", [64, 32, 28])
def test_fashion_to_rgb_is_a_bilinear_resize_to_grey_rgb(size):
    rng = np.random.default_rng(size)
    grey = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    rgb = flow.fashion_to_rgb(grey, size)
    assert rgb.dtype == torch.uint8 and rgb.shape == (3, 3, size, size)
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 0], rgb[:, 2])  # grey in every channel
    by_torch = F.interpolate(torch.from_numpy(grey).double()[:, None], size=(size, size), mode="bilinear",
                             align_corners=False)[:, 0]
    by_hand = np.stack([bilinear_reference(image.astype(np.float64), size) for image in grey])
    np.testing.assert_allclose(by_torch.numpy(), by_hand, rtol=0, atol=1e-9)  # the brute force is right
    difference = np.abs(rgb[:, 0].numpy().astype(int) - np.round(by_hand))
    # Equal after rounding, up to float32 round-off at exact .5 ties: off by at most 1, and rarely.
    assert difference.max() <= 1 and (difference > 0).mean() < 0.005
    if size == 28:
        np.testing.assert_array_equal(rgb[:, 0].numpy(), grey)  # same size: the identity


def test_fashion_to_rgb_of_constant_and_edge_images():
    flat = np.full((1, 28, 28), 173, np.uint8)
    assert (flow.fashion_to_rgb(flat) == 173).all()
    edge = np.zeros((1, 28, 28), np.uint8)
    edge[:, :, 14:] = 255  # a vertical step between source columns 13 and 14
    row = flow.fashion_to_rgb(edge)[0, 0, 0].numpy().astype(int)
    # Output column j samples source x = (j + 1/2) 28/64 - 1/2: 13.28 for j = 31, 13.72 for j = 32.
    assert (row[:31] == 0).all() and (row[33:] == 255).all()
    assert row[31] == round(0.28125 * 255) and row[32] == round(0.71875 * 255)

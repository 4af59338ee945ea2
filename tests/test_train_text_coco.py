"""train_text.py on folders in MS-COCO's captioned-image layout: pixels (--vae none) or latents in flow.py's
checksummed shards (an interrupted encode resumes, a damaged shard is one line), unreadable images, and the
preset chosen by the data. Tiny random images, TAEF2 weights and the built-in word encoder, written here."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from fakes import write_coco, write_taef2

import flow
import train_text

TINY = ["--model", "tiny", "--global-batch", "8", "--max-batch-per-gpu", "4", "--log-every", "1",
        "--ckpt-every", "1", "--sample-every", "1", "--sample-nfe", "1", "--warmup-steps", "1",
        "--mapper-width", "32", "--quiet", "--workers", "0", "--text-encoder", "builtin"]


def coco_folder(root, train=4, val=2):
    write_coco(root, "train", images=train)
    write_coco(root, "val", images=val)
    return ["--data", "coco", "--data-root", str(root), "--coco-split", "train", "--coco-val-split", "val"]


def run(out, *options):
    train_text.main(train_text.parse_args(["--out", str(out), *TINY, *map(str, options)]))


def digests(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())
            if path.is_file()}


def test_pixels_of_a_coco_layout_folder_train_and_sample(tmp_path):
    data = coco_folder(tmp_path / "data")
    run(tmp_path / "run", *data, "--vae", "none", "--image-size", 8, "--mapper-steps", 2, "--steps", 2)
    checkpoint = flow.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "step_0000002.pt"))
    assert checkpoint["config"]["latent_shape"] == [3, 8, 8] and "latent_mean" not in checkpoint["config"]
    assert not list((tmp_path / "run" / "latents" / "train").glob("shard_*"))  # pixels: no latent cache
    loaded = train_text.load_for_sampling(str(tmp_path / "run"), "cpu")
    cond = loaded.make_condition(["a red circle a 0"])
    images = loaded.decode(flow.solve(lambda x, t: loaded.model(x, t, cond), torch.randn(1, 3, 8, 8), 1).x)
    assert images.shape == (1, 3, 8, 8) and images.abs().max() <= 1
    # the training pixels are the images read as train_class.py reads image folders, in [-1, 1]
    args = train_text.parse_args(["--out", str(tmp_path / "run"), *TINY, *data, "--image-size", "8"])
    split, normalisation = train_text.disk_split(args, "train", 0, 1, torch.device("cpu"))
    assert normalisation == {} and split.images.dtype == np.uint8 and split.images.shape == (4, 3, 8, 8)
    x1, _ = split.batch([0], "cpu")
    assert torch.equal(x1, torch.from_numpy(split.images[:1].astype(np.float32) / 127.5 - 1))


def test_an_unreadable_image_is_one_line_naming_it(tmp_path):
    data = coco_folder(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "000000000001.png"
    bad.write_bytes(bad.read_bytes()[:60])  # cut short
    with pytest.raises(SystemExit, match=f"^error: cannot read image {bad} "):
        run(tmp_path / "run", *data, "--vae", "none", "--image-size", 8, "--steps", 1, "--mapper-steps", 1)


def test_missing_annotations_are_found_before_anything_is_read(tmp_path, capsys):
    coco_folder(tmp_path / "data")
    with pytest.raises(SystemExit):
        train_text.parse_args(["--data", "coco", "--data-root", str(tmp_path / "data")])  # train2017, val2017
    error = capsys.readouterr().err
    assert f"lacks {tmp_path / 'data' / 'annotations' / 'captions_train2017.json'}" in error


def test_an_interrupted_encode_resumes_from_its_last_complete_shard(tmp_path, monkeypatch):
    """Shards of 2 images: 5 training images make 3; with shard 1 and the index gone and a cut-off write of
    shard 2 (a run killed while encoding), the next run encodes shard 1 alone and ends with the same
    cache, the cut-off file removed; a shard damaged later is refused in one line."""
    monkeypatch.setattr(flow, "SHARD_IMAGES", 2)
    write_taef2(tmp_path / "taef2")
    options = [*coco_folder(tmp_path / "data", train=5), "--vae", tmp_path / "taef2", "--image-size", 16,
               "--latent-cache", tmp_path / "cache", "--mapper-steps", 1, "--steps", 1]
    run(tmp_path / "whole", *options)
    cache = tmp_path / "cache" / "train"
    whole = digests(cache)
    assert sorted(whole) == ["info.json", "shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    info = json.loads((cache / "info.json").read_text())
    assert info["shards"] == [whole[f"shard_{k:05d}.npz"] for k in range(3)]
    latents = train_text.flow.read_shards(str(cache), info["shards"])["latents"]
    assert latents.dtype == np.float32 and latents.shape == (5, 32, 2, 2)
    assert np.allclose(info["latent_mean"], latents.mean((0, 2, 3)), atol=1e-5)
    for name in ("info.json", "shard_00001.npz"):
        os.remove(cache / name)
    (cache / "shard_00002.npz.4242.tmp").write_bytes(b"PK")  # killed while writing shard 2 again
    encoded = []
    encode = flow.Autoencoder.encode

    def counted(self, images):
        if images.shape[-1] == 16:  # not the 64x64 check batch of load_taef2
            encoded.append(len(images))
        return encode(self, images)

    monkeypatch.setattr(flow.Autoencoder, "encode", counted)
    run(tmp_path / "resumed", *options)
    assert encoded == [2] and digests(cache) == whole  # shard 1 only
    data = bytearray((cache / "shard_00002.npz").read_bytes())
    data[-100:-40] = bytes(255 - b for b in data[-100:-40])
    (cache / "shard_00002.npz").write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=f"^error: latent cache shard {cache / 'shard_00002.npz'} is missing "
                                         "or damaged"):
        run(tmp_path / "damaged", *options)


def test_the_preset_follows_the_data_and_names_train_class_s_networks(tmp_path):
    assert train_text.MODELS is flow.DIT_PRESETS
    shapes = train_text.parse_args([])
    assert (shapes.model, shapes.patch_size) == ("mini", 8)  # 16 tokens of the 32x32 shapes
    write_taef2(tmp_path / "taef2")
    data = coco_folder(tmp_path / "data")
    for options, preset in ((["--vae", str(tmp_path / "taef2")], ("small-p8", 8)),  # 32x8x8 latents
                            (["--vae", str(tmp_path / "taef2"), "--image-size", "32"], ("mini", 2)),
                            (["--vae", "none"], ("mini", 2)),
                            (["--vae", "none", "--model", "small-p8", "--patch-size", "4"], ("small-p8", 4))):
        args = train_text.parse_args([*data, *options])
        assert (args.model, args.patch_size) == preset

"""Tests of benchmarks/captioned_fashion.py on a tiny fake Fashion-MNIST: the COCO layout it writes, the
same captions and pixels as the generator it replaces, fixed properties of its draws, and its refusals."""
import hashlib
import json
import os
import sys

import numpy as np
import pytest
from fakes import write_fashion
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import captioned_fashion

SPLITS = captioned_fashion.SPLITS


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(idx folder, COCO folder): 30 train and 60 test items, every split written at 32 px."""
    folder = tmp_path_factory.mktemp("captioned")
    root, out = str(folder / "fashion"), str(folder / "coco")
    write_fashion(root, train=30, test=60)
    captioned_fashion.main(captioned_fashion.parse_args(["--data-root", root, "--out", out, "--image-size",
                                                         "32", "--max-train-images", "25", "--quiet"]))
    return root, out


def test_the_layout_is_cocos_with_the_ground_truth_beside(written):
    _, out = written
    for split in SPLITS:
        with open(os.path.join(out, "annotations", f"captions_{split}.json")) as file:
            coco = json.load(file)
        ids = {image["id"] for image in coco["images"]}
        for image in coco["images"]:
            assert {"id", "file_name", "width", "height", "label", "size", "tone"} <= set(image)
            with Image.open(os.path.join(out, split, image["file_name"])) as png:
                assert png.mode == "RGB" and png.size == (image["width"], image["height"]) == (32, 32)
        for annotation in coco["annotations"]:
            assert {"id", "image_id", "caption", "template", "split"} <= set(annotation)
            assert annotation["image_id"] in ids and annotation["split"] == split
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
        assert sorted(os.listdir(os.path.join(out, split))) == sorted(i["file_name"] for i in coco["images"])
    assert sorted(os.listdir(out)) == sorted(["annotations", *SPLITS])  # no temporary folder left


def test_the_same_captions_and_pixels_as_train_texts_generator(written):
    """While train_text.py still holds the generator this script replaced, both must agree exactly."""
    import train_text

    if not hasattr(train_text, "fashion_split"):
        pytest.skip("train_text.py no longer holds the generator: test_fixed_properties_of_the_draws holds")
    root, out = written
    for split in SPLITS:
        canvases, texts, image_of_pair = train_text.fashion_split(root, split, 32, 25)
        images, captions, image_of_caption = captioned_fashion.read_split(out, split)
        assert [c.text for c in captions] == texts
        assert np.array_equal(image_of_caption, image_of_pair)
        expected = np.stack([((canvases[i] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
                             for i in range(len(canvases))])
        assert np.array_equal(images, expected)


# Fixed properties of the draws on write_fashion(train=30, test=60) at 32 px, 25 train items, taken when the
# script was checked equal to train_text.fashion_split: sha256 of the caption texts and mean grey level.
FIXED = {"train": ("e3ace85867309a0a", 32.49), "val": ("dea33fc5fee7f2cd", 29.24),
         "heldout-word": ("62e9c25d9bbc2232", 25.63), "heldout-template": ("2622d573eff34605", 44.41),
         "heldout-combination": ("f4b13ad0fb526d26", 34.03)}


def test_fixed_properties_of_the_draws(written):
    _, out = written
    every_caption = set(captioned_fashion.fashion_captions())
    for split in SPLITS:
        images, captions, image_of_caption = captioned_fashion.read_split(out, split)
        assert set(captions) <= every_caption  # attributes and template agree with the caption's words
        kind = captioned_fashion.held_out_kind(split)
        assert all(c.held_out == kind for c in captions)
        per_image = 2 if split == "train" else 1
        assert np.array_equal(image_of_caption, np.repeat(np.arange(len(images)), per_image))
        texts = "\n".join(c.text for c in captions)
        assert hashlib.sha256(texts.encode()).hexdigest()[:16] == FIXED[split][0]
        assert images.mean() == pytest.approx(FIXED[split][1], abs=0.01)
    assert len(captioned_fashion.read_split(out, "train")[0]) == 25
    # 60 test items: val 24, each held-out split 12; the combination split has no pullover or sneaker
    assert [len(captioned_fashion.read_split(out, s)[0]) for s in SPLITS[1:]] == [24, 12, 12, 10]
    labels = {c.label for c in captioned_fashion.read_split(out, "heldout-combination")[1]}
    assert not labels & {2, 7}


def test_read_split_limit_and_a_standard_coco_reader(written):
    _, out = written
    images, captions, image_of_caption = captioned_fashion.read_split(out, "train", limit=5)
    assert len(captions) == 5 and len(images) == 3 and list(image_of_caption) == [0, 0, 1, 1, 2]
    import train_text

    if hasattr(train_text, "read_coco"):  # the trainer's reader of any COCO-layout folder
        paths, texts, image_of_pair = train_text.read_coco(out, "val")
        assert texts == [c.text for c in captioned_fashion.read_split(out, "val")[1]]
        assert len(paths) == len(set(image_of_pair))


def test_refusals_are_one_line(written, tmp_path, capsys):
    root, out = written
    for argv, message in ((["--data-root", str(tmp_path), "--out", "new"], "lacks the Fashion-MNIST"),
                          (["--data-root", root, "--out", out], "is not empty: pass --overwrite"),
                          (["--data-root", root, "--image-size", "4"], "at least 8")):
        with pytest.raises(SystemExit):
            captioned_fashion.parse_args(argv)
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in error
    # write_missing adds what a folder lacks and refuses a split made with other settings
    other = str(tmp_path / "other")
    captioned_fashion.write_missing(root, other, ["val"], image_size=32, progress=False)
    assert os.path.isfile(os.path.join(other, "annotations", "captions_val.json"))
    captioned_fashion.write_missing(root, other, ["val"], image_size=32, progress=False)  # reused
    with pytest.raises(SystemExit, match="was made with .* not"):
        captioned_fashion.write_missing(root, other, ["val"], image_size=64, progress=False)


def test_overwrite_replaces_the_splits_and_ends_with_one_line(tmp_path, capsys):
    root, out = str(tmp_path / "fashion"), str(tmp_path / "coco")
    write_fashion(root, train=12, test=30)
    options = ["--data-root", root, "--out", out, "--image-size", "16", "--quiet"]
    captioned_fashion.main(captioned_fashion.parse_args(options))
    captioned_fashion.main(captioned_fashion.parse_args([*options, "--overwrite", "--max-train-images", "4"]))
    assert len(os.listdir(os.path.join(out, "train"))) == 4  # no stale image of the first write
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith(f"wrote {out} (")

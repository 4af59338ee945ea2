"""Tests of benchmarks/caption_judge.py: size and tone read off canvases drawn by captioned_fashion with
known attributes, the score on a hand-made example, and the classifier's train-cache-reload path on
a tiny fake Fashion-MNIST."""
import os
import sys

import numpy as np
import pytest
import torch
from fakes import write_fashion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import caption_judge
import captioned_fashion


def fake_items(count, seed=0):
    """28x28 items shaped like Fashion-MNIST's: a blob filling 26 of the 28 rows, a body of grey
    (many real items are dim) and a seam of the item's brightest grey, 255 (every real item has one)."""
    rng = np.random.default_rng(seed)
    items = np.zeros((count, 28, 28), np.uint8)
    for item in items:
        width = rng.integers(10, 27)
        left = (28 - width) // 2
        item[1:27, left: left + width] = rng.integers(120, 200)
        item[rng.integers(1, 26), left: left + width] = 255
    return items


def canvases(sizes, tones, seed=0):
    rng = np.random.RandomState(seed)
    attributes = captioned_fashion.draw_attributes(sizes, tones, 64, rng)
    dataset = captioned_fashion.FashionCanvases(fake_items(len(sizes), seed), *attributes, 64)
    return torch.stack([dataset[i] for i in range(len(dataset))])


def untrained_judge():
    return caption_judge.CaptionJudge(caption_judge.classifier(), {})


def test_size_and_tone_of_drawn_canvases_match_their_attributes():
    combinations = [(size, tone) for size in captioned_fashion.ITEM_SIDE
                    for tone in captioned_fashion.TONE_GAIN] * 10
    sizes, tones = zip(*combinations)
    images = canvases(sizes, tones)
    judgement = untrained_judge()(images)
    assert list(judgement["size"]) == list(sizes)
    assert list(judgement["tone"]) == list(tones)
    small = judgement["extent"][np.array(sizes) == "small"]
    assert small.min() >= 20 and small.max() <= 29  # the 26-row blob in a 24-28 px frame
    # uint8 NHWC (what sample.py writes) reads the same as [-1, 1] NCHW
    as_uint8 = ((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    assert list(untrained_judge()(as_uint8)["size"]) == list(sizes)


def test_a_stray_pixel_does_not_make_a_small_item_large():
    images = canvases(["small"] * 4, ["light"] * 4, seed=1)
    images[:, :, 0, 0] = images[:, :, 63, 63] = 1.0  # two corners lit: the box would span the canvas
    judgement = untrained_judge()(images)
    assert list(judgement["size"]) == ["small"] * 4


def test_black_image_and_bad_shapes():
    judgement = untrained_judge()(-torch.ones(2, 3, 64, 64))
    assert list(judgement["extent"]) == [0, 0] and list(judgement["tone"]) == ["dark", "dark"]
    for bad in (torch.zeros(2, 3, 64, 32), torch.zeros(2, 64, 64), torch.zeros(2, 1, 64, 64)):
        with pytest.raises(SystemExit, match="square RGB images"):
            untrained_judge()(bad)


def test_score_on_a_hand_made_example():
    first = {}
    for caption in captioned_fashion.fashion_captions():
        first.setdefault((caption.label, caption.size, caption.tone), caption)
    truth = [first[0, "small", "dark"], first[3, "large", "light"], first[9, "large", "dark"],
             first[5, "small", "light"]]
    judgement = {"label": np.array([0, 3, 8, 5]),  # image 2: wrong item
                 "size": np.array(["small", "small", "large", "small"]),  # image 1: wrong size
                 "tone": np.array(["dark", "light", "dark", "dark"])}  # image 3: wrong tone
    expected = {"item": 0.75, "size": 0.75, "tone": 0.75, "all": 0.25, "count": 4}
    assert caption_judge.score(judgement, truth) == expected
    assert caption_judge.score(judgement, [c.text for c in truth]) == expected  # texts are looked up
    with pytest.raises(SystemExit, match="not captioned-Fashion captions"):
        caption_judge.score(judgement, ["a small dark hat"] * 4)
    with pytest.raises(SystemExit, match="4 judged images but 3 captions"):
        caption_judge.score(judgement, truth[:3])


def test_classifier_trains_caches_and_reloads(tmp_path):
    root, path = str(tmp_path / "fashion"), str(tmp_path / "judge" / "classifier.pt")
    write_fashion(root, train=60, test=20)
    judge = caption_judge.CaptionJudge.load_or_train(path, root, epochs=1, progress=False)
    assert judge.info["train_images"] == 60 and judge.info["test_images"] == 20
    assert 0 <= judge.info["test_accuracy"] <= 1
    saved = torch.load(path, weights_only=True)  # tensors and numbers only
    assert saved["info"]["version"] == caption_judge.JUDGE_VERSION
    images = canvases(["small", "large"], ["dark", "light"])
    # Reloaded from the cache, not retrained: no data needed, the same readings.
    again = caption_judge.CaptionJudge.load_or_train(path, str(tmp_path / "absent"), progress=False)
    assert np.array_equal(again(images)["label"], judge(images)["label"])
    changed = {name: value.clone() for name, value in saved["state_dict"].items()}
    next(iter(changed.values())).view(-1)[0] += 1  # a flipped weight under the saved checksum
    torch.save({**saved, "state_dict": changed}, path)
    with pytest.raises(SystemExit, match="is corrupted"):
        caption_judge.CaptionJudge.load_or_train(path, root)
    torch.save({"state_dict": saved["state_dict"], "info": {**saved["info"], "version": 0}}, path)
    with pytest.raises(SystemExit, match="judge version 0"):  # no checksum (older caches): still read
        caption_judge.CaptionJudge.load_or_train(path, root)
    torch.save({"weights": saved["state_dict"]}, path)
    with pytest.raises(SystemExit, match="is not a caption judge classifier"):
        caption_judge.CaptionJudge.load_or_train(path, root)
    with open(path, "w") as file:
        file.write("not a checkpoint")
    with pytest.raises(SystemExit, match="cannot be read as a checkpoint"):
        caption_judge.CaptionJudge.load_or_train(path, root)


def test_split_canvases_are_the_folders_images_one_per_caption(tmp_path):
    root, folder = str(tmp_path / "fashion"), str(tmp_path / "captioned")
    write_fashion(root, train=10, test=50)
    captioned_fashion.write_missing(root, folder, ["val"], progress=False)
    images, captions = caption_judge.split_canvases(folder, "val", limit=7)
    assert images.shape == (7, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert caption_judge.score(untrained_judge()(images), captions)["count"] == 7
    pixels = captioned_fashion.read_split(folder, "val", limit=7)[0]
    assert torch.equal(((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1), torch.from_numpy(pixels))

"""Captioned Fashion-MNIST in MS-COCO's captions layout: the data set of the text experiment, written once
as files that `train_text.py --data coco` reads like any user's captioned images.

Each Fashion-MNIST item (28x28) is drawn on a black canvas with two attributes chosen when the image is
made: its size (the item's frame scaled to about 26 or 50 of 64 pixels) and its tone (dark: 40% intensity,
light: 90-100%), at a random position, and captioned "a {size} {tone} {item}" in words from five
templates with three words per class and two per attribute value. Held out of training, to test
generalisation in words: the last word of every class, the last template, and 8 of the 40 (class, size,
tone) combinations. Splits: train (the train items, 2 seen captions per image), val (1000 test items,
seen captions), heldout-word, heldout-template, heldout-combination (500 other test items each, captions
held out in that one part). The data set is fixed (FASHION_SEED): the same files on every machine.

Layout (COCO's; the extra fields, which COCO readers ignore, are the ground truth of the caption judge):
    OUT/annotations/captions_SPLIT.json   {"info": {how it was made},
                                           "images": [{"id", "file_name", "width", "height",
                                                       "label", "size", "tone"}],
                                           "annotations": [{"id", "image_id", "caption",
                                                            "template", "split"}]}
    OUT/SPLIT/ID.png                      RGB canvases (the grey item in all three channels)
A split is written into a temporary folder, synced, renamed into place, and its annotation file is written
last (atomically): a split whose annotation file exists is complete.

Run:
    python benchmarks/captioned_fashion.py --data-root /usr/share/datasets/fashion-mnist \\
        --out runs/captioned-fashion      # 62k PNGs (260 MB), 100 s on 2 shared cores
    python train_text.py --data coco --data-root runs/captioned-fashion --coco-split train \\
        --coco-val-split val --vae TAEF2_DIR --text-encoder MINILM_DIR --out runs/text-fashion
    python benchmarks/captioned_fashion.py --smoke       # tiny fake Fashion-MNIST, under a temporary folder
Read back (the benchmarks): read_split(OUT, split) -> (uint8 images, Caption of each annotation, image of
each annotation); write_missing(...) writes the splits a folder lacks.
"""
import argparse
import collections
import itertools
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import flow

# ----------------------------------------------------------------------------------------------
# The data set: words, templates, attributes and what is held out.

FASHION_SEED = 0
VERSION = 1  # bump when the drawing or the captions change: folders made before are refused
ITEM_WORDS = (("t-shirt", "top", "tee"), ("pair of trousers", "pair of pants", "pair of jeans"),
              ("pullover", "sweater", "jumper"), ("dress", "sundress", "gown"),
              ("coat", "jacket", "overcoat"), ("sandal", "open-toed shoe", "flip-flop"),
              ("shirt", "button-up shirt", "blouse"), ("sneaker", "trainer", "running shoe"),
              ("bag", "handbag", "purse"), ("ankle boot", "boot", "bootie"))  # Fashion-MNIST's order
SIZE_WORDS = {"small": ("small", "tiny"), "large": ("large", "big")}
TONE_WORDS = {"dark": ("dark", "dim"), "light": ("light", "bright")}
TEMPLATES = ("a {size} {tone} {item}", "a photo of a {tone} {item}, {size}",
             "a {item} that is {size} and {tone}", "an image of a {size}, {tone} {item}",
             "one {item}, {tone} and {size}")
ITEM_SIDE = {"small": (24, 28), "large": (46, 52)}  # range of the 28x28 frame's side, in 64-px units
TONE_GAIN = {"dark": (0.35, 0.45), "light": (0.9, 1.0)}  # range of the intensity factor
SPLITS = ("train", "val", "heldout-word", "heldout-template", "heldout-combination")
TEST_SHARES = (1000, 500, 500, 500)  # test items of val and the held-out splits, in that order

# held_out: "" or its kind ("word", "template", "combination"); template: index into TEMPLATES
Caption = collections.namedtuple("Caption", "text label size tone template held_out")


def is_held_out_combination(label, size, tone):
    """8 of the 40 (class, size, tone): every class keeps both sizes and both tones in training."""
    return (3 * label + 2 * list(SIZE_WORDS).index(size) + list(TONE_WORDS).index(tone)) % 5 == 0


def fashion_captions():
    """Every Caption with at most one held-out part, in a fixed order."""
    captions = []
    for label, size, tone, word, template in itertools.product(range(10), SIZE_WORDS, TONE_WORDS, range(3),
                                                               range(len(TEMPLATES))):
        held_out = [kind for kind, held in (("word", word == 2), ("template", template == len(TEMPLATES) - 1),
                                            ("combination", is_held_out_combination(label, size, tone)))
                    if held]
        if len(held_out) > 1:
            continue
        for size_word, tone_word in itertools.product(SIZE_WORDS[size], TONE_WORDS[tone]):
            text = TEMPLATES[template].format(size=size_word, tone=tone_word, item=ITEM_WORDS[label][word])
            captions.append(Caption(with_articles(text), label, size, tone, template, "".join(held_out)))
    return captions


def with_articles(text):
    """'a' before a vowel, 'an' before a consonant: "a overcoat" -> "an overcoat"."""
    return re.sub(r"\ban (?=[^aeiou])", "a ", re.sub(r"\ba (?=[aeiou])", "an ", text))


def held_out_kind(split):
    """The held-out part of a split's captions: "word" for heldout-word, "" for train and val."""
    return split.split("-")[1] if split.startswith("heldout") else ""


# ----------------------------------------------------------------------------------------------
# Drawing: an item on a black canvas, at its size, tone and position.


class FashionCanvases(torch.utils.data.Dataset):
    """Item i of `items` (uint8 (N, 28, 28)) drawn with side sides[i] at corner corners[i] and
    intensity gains[i] on a black image_size canvas -> (3, H, W) in [-1, 1]."""

    def __init__(self, items, sides, corners, gains, image_size):
        self.items, self.sides, self.corners, self.gains = items, sides, corners, gains
        self.image_size = image_size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = torch.from_numpy(self.items[i].astype(np.float32) / 255)[None, None]
        side, (top, left) = int(self.sides[i]), self.corners[i]
        item = F.interpolate(item, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        canvas = torch.zeros(3, self.image_size, self.image_size)
        canvas[:, top: top + side, left: left + side] = item[0].clamp(0, 1) * float(self.gains[i])
        return canvas * 2 - 1


def draw_attributes(sizes, tones, image_size, rng):
    """Per image: side, top-left corner (anywhere on the canvas) and gain for its size and tone."""
    scale = image_size / 64
    sides = np.array([round(rng.uniform(*ITEM_SIDE[s]) * scale) for s in sizes])
    corners = np.stack([rng.randint(0, image_size - sides + 1) for _ in range(2)], 1)
    gains = np.array([rng.uniform(*TONE_GAIN[t]) for t in tones])
    return sides, corners, gains


def fashion_split(root, name, image_size, max_train_images=None):
    """(FashionCanvases, Caption of each pair, image of each pair) of a split: 'train' (the first
    max_train_images train items, 2 seen captions per image), 'val' (1000 test items, seen captions), or
    'heldout-word', 'heldout-template', 'heldout-combination' (500 other test items each, captions held
    out in that one part; the combination split skips the 2 classes that have no held-out combination).
    A test set smaller than 2500 items is shared out in the same proportions."""
    items, labels = flow.load_fashion_mnist(root, "train" if name == "train" else "test")
    if name == "train":
        start, stop = 0, max_train_images or len(items)
    else:
        bounds = np.round(np.cumsum([0, *TEST_SHARES]) * min(1, len(items) / sum(TEST_SHARES))).astype(int)
        start, stop = bounds[SPLITS.index(name) - 1: SPLITS.index(name) + 1]
    pools = collections.defaultdict(list)  # (label, size, tone) -> its captions of this kind
    for caption in fashion_captions():
        if caption.held_out == held_out_kind(name):
            pools[caption.label, caption.size, caption.tone].append(caption)
    items, labels = items[start:stop], labels[start:stop]
    keep = np.isin(labels, [label for label, _, _ in pools])
    items, labels = items[keep], labels[keep]
    rng = np.random.RandomState([FASHION_SEED, SPLITS.index(name)])
    per_image = 2 if name == "train" else 1
    combinations = [sorted(key for key in pools if key[0] == label) for label in labels]
    drawn = [options[rng.randint(len(options))] for options in combinations]  # (label, size, tone)
    captions = [pools[key][k] for key in drawn for k in rng.randint(len(pools[key]), size=per_image)]
    sides, corners, gains = draw_attributes([size for _, size, _ in drawn], [tone for _, _, tone in drawn],
                                            image_size, rng)
    return (FashionCanvases(items, sides, corners, gains, image_size), captions,
            np.repeat(np.arange(len(items)), per_image))


# ----------------------------------------------------------------------------------------------
# Writing and reading the COCO layout.


def annotation_file(folder, split):
    return os.path.join(folder, "annotations", f"captions_{split}.json")


def made_with(split, image_size, max_train_images):
    """The "info" of a split's annotation file: what its images and captions depend on."""
    info = {"description": "captioned Fashion-MNIST (benchmarks/captioned_fashion.py)", "version": VERSION,
            "seed": FASHION_SEED, "image_size": image_size}
    return dict(info, max_train_images=max_train_images) if split == "train" else info


def write_split(data_root, folder, split, image_size, max_train_images=None, progress=True):
    """Draw one split and write it: PNGs into a temporary folder, synced and renamed to FOLDER/SPLIT
    (replacing that folder), then its annotation file, atomically. Returns (images, captions) written."""
    from PIL import Image

    canvases, captions, image_of_caption = fashion_split(data_root, split, image_size, max_train_images)
    images, annotations = [], []
    for k, (caption, image) in enumerate(zip(captions, image_of_caption)):
        annotations.append({"id": k, "image_id": int(image), "caption": caption.text,
                            "template": caption.template, "split": split})
        if not images or images[-1]["id"] != image:
            images.append({"id": int(image), "file_name": f"{image:06d}.png", "width": image_size,
                           "height": image_size, "label": caption.label, "size": caption.size,
                           "tone": caption.tone})
    target, temporary = os.path.join(folder, split), os.path.join(folder, f".{split}.{os.getpid()}.tmp")
    with flow.write_errors(temporary):
        os.makedirs(os.path.join(folder, "annotations"), exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
        for entry in tqdm(images, desc=split, disable=not progress):
            pixels = ((canvases[entry["id"]] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (3, H, W)
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(os.path.join(temporary, entry["file_name"]))
        os.sync()  # the PNGs on disk before the folder takes its name: never a split of empty files
        shutil.rmtree(target, ignore_errors=True)
        os.replace(temporary, target)
    coco = {"info": made_with(split, image_size, max_train_images), "images": images,
            "annotations": annotations}
    with flow.atomic_file(annotation_file(folder, split), "w") as file:
        json.dump(coco, file)
    return len(images), len(annotations)


def read_annotations(folder, split):
    """A split's annotation file as (info, {image id: image entry}, Caption of each annotation, image id
    of each annotation); one line for a missing or unreadable file or one this script did not write."""
    path = annotation_file(folder, split)
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} is missing: write it with benchmarks/captioned_fashion.py")
    coco = flow.read_json(path, "annotation file")
    images = {image["id"]: image for image in coco.get("images", [])}
    try:
        captions = [Caption(a["caption"], images[a["image_id"]]["label"], images[a["image_id"]]["size"],
                            images[a["image_id"]]["tone"], a["template"], held_out_kind(a["split"]))
                    for a in coco["annotations"]]
    except (KeyError, TypeError) as error:
        raise SystemExit(f"error: {path} lacks the captioned-Fashion fields (no {error}): not written by "
                         "benchmarks/captioned_fashion.py") from None
    return coco.get("info", {}), images, captions, np.array([a["image_id"] for a in coco["annotations"]])


def read_split(folder, split, limit=None):
    """(uint8 images (N, H, W, 3), Caption of each annotation (M,), image of each annotation (M,) indexing
    the images) of a split, only the first `limit` annotations and the images they show if given."""
    from PIL import Image

    _, images, captions, image_ids = read_annotations(folder, split)
    captions, image_ids = captions[:limit], image_ids[:limit]
    shown = sorted(set(image_ids.tolist()))
    pixels = []
    for image_id in shown:
        path = os.path.join(folder, split, images[image_id]["file_name"])
        try:
            with Image.open(path) as image:
                pixels.append(np.array(image.convert("RGB")))
        except OSError as error:
            raise SystemExit(f"error: cannot read {path} ({type(error).__name__}): write {folder} again")
    index = {image_id: k for k, image_id in enumerate(shown)}
    return np.stack(pixels), captions, np.array([index[i] for i in image_ids.tolist()])


def write_missing(data_root, folder, splits=SPLITS, image_size=64, max_train_images=None, progress=True):
    """Write the splits that `folder` lacks (the benchmarks make their data once this way); a split made
    with other settings is one line, not silently reused."""
    for split in splits:
        if os.path.isfile(annotation_file(folder, split)):
            info = read_annotations(folder, split)[0]
            wanted = made_with(split, image_size, max_train_images)
            if info != wanted:
                raise SystemExit(f"error: {annotation_file(folder, split)} was made with {info}, not "
                                 f"{wanted}: remove {folder} or write it again with --overwrite")
        else:
            write_split(data_root, folder, split, image_size, max_train_images, progress)


# ----------------------------------------------------------------------------------------------
# Entry point.


def main(args):
    if args.overwrite:  # only what this layout names: the split folders and their annotation files
        for split in SPLITS:
            with flow.write_errors(args.out):
                shutil.rmtree(os.path.join(args.out, split), ignore_errors=True)
                if os.path.isfile(annotation_file(args.out, split)):
                    os.remove(annotation_file(args.out, split))
    counts = [write_split(args.data_root, args.out, split, args.image_size, args.max_train_images,
                          not args.quiet) for split in SPLITS]
    if args.smoke:  # read back what was written
        images, captions, image_of_caption = read_split(args.out, "train")
        assert len(images) == counts[0][0] and len(captions) == counts[0][1] == 2 * len(images)
        assert np.array_equal(image_of_caption, np.repeat(np.arange(len(images)), 2))
        assert images.dtype == np.uint8 and images.shape[1:] == (args.image_size, args.image_size, 3)
    images, captions = (sum(c[k] for c in counts) for k in (0, 1))
    print(f"wrote {args.out} ({images} images, {captions} captions in {len(SPLITS)} splits)")


def smoke(args):
    """Tiny fake Fashion-MNIST idx files (tests/fakes.py) and the output, under a temporary folder."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from fakes import write_fashion

    folder = tempfile.mkdtemp(prefix="captioned_fashion_smoke_")
    args.data_root, args.out, args.quiet = os.path.join(folder, "fashion"), os.path.join(folder, "out"), True
    write_fashion(args.data_root, train=20, test=50)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: an option whose default is None says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--data-root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST idx files")
    add("--out", default="runs/captioned-fashion", help="folder to write the COCO layout into")
    add("--max-train-images", type=int, default=None, help="first N train items (default: all 60k)")
    add("--image-size", type=int, default=64, help="canvas side in pixels")
    add("--overwrite", action="store_true",
        help="write into a non-empty --out, replacing its split folders and annotation files")
    add("--quiet", action="store_true", help="no progress bars")
    add("--smoke", action="store_true", help="tiny fake Fashion-MNIST, written under a temporary folder")
    args = parser.parse_args(argv)
    if args.smoke:
        smoke(args)
    missing = [name for pair in flow.FASHION_FILES.values() for name in pair
               if not os.path.isfile(os.path.join(args.data_root, name))]
    if missing:
        parser.error(f"--data-root {args.data_root} lacks the Fashion-MNIST files {missing} "
                     "(apt-get install dataset-fashion-mnist)")
    if args.max_train_images is not None and args.max_train_images < 1:
        parser.error("--max-train-images must be positive")
    if args.image_size < 8:
        parser.error("--image-size must be at least 8")
    problem = flow.out_folder_problem(args.out)
    if problem:
        parser.error(f"--out {args.out}: {problem}")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        parser.error(f"--out {args.out} is not empty: pass --overwrite to replace its splits")
    return args


if __name__ == "__main__":
    main(parse_args())

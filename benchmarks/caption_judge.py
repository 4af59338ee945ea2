"""A caption judge with ground truth for captioned Fashion-MNIST (benchmarks/captioned_fashion.py):
the offline stand-in for a CLIP score. It reads what an image shows and checks it against the caption.

An image (64x64 RGB, uint8 or in [-1, 1]; other square sizes are scaled) is read by measurement:
    tone    the 99.5th percentile of the item's pixels (grey level above FLOOR): light above TONE_SPLIT.
            The renderer multiplies an item whose brightest pixel is 255 (every Fashion-MNIST item is
            scaled so) by 0.35-0.45 (dark) or 0.9-1.0 (light); the percentile, unlike the maximum,
            ignores a few stray pixels, and 0.6 leaves room below for light items that are dim overall
            (real canvases: dark <= 0.45, light >= 0.59) and above for TAEF2, which brightens dark
            items (reconstructions: dark up to 0.61).
    size    the larger side of the item's box: the rows and columns holding its pixels brighter than
            BOX_FRACTION of its tone, less TRIM of those pixels at each end (stray pixels of a
            generated image do not stretch it). The renderer draws the 28-px item frame at 24-28 px
            (small) or 46-52 px (large) of 64, and items fill 25-28 px of their frame: measured boxes
            are <= 29 px (small) and >= 42 px (large) on real canvases, so large above SIZE_SPLIT.
    item    the box, padded to a square, resized to 28x28 and divided by its maximum, is classified
            by a small CNN trained on the real Fashion-MNIST train items drawn through the same
            pipeline (random size, tone and position on the canvas, as the renderer draws them).
Its accuracy on real canvases of every split is the ceiling of any generator; on TAEF2
reconstructions (decode(encode(x))), the ceiling of one in the TAEF2 latent space.

API:
    judge = CaptionJudge.load_or_train("runs/judge/classifier.pt", "/usr/share/datasets/fashion-mnist")
    judgement = judge(images)        # {"label", "size", "tone", "extent", "brightness"}: arrays (N,)
    score(judgement, captions)       # {"item", "size", "tone", "all", "count"}; captions: text or Caption
    images, captions = split_canvases("runs/captioned-fashion", "val")  # a split's real canvases
The classifier is trained once (2 epochs: 90% on the test items, minutes on 2 CPU cores) and cached
at the path given.

Run (the judge on the real canvases of every split and on their TAEF2 reconstructions; the canvases are
read from --captioned, a folder written by benchmarks/captioned_fashion.py, whose missing eval splits are
written there first):
    python benchmarks/caption_judge.py --data-root /usr/share/datasets/fashion-mnist \\
        --vae ../shared/weights/taef2 --captioned runs/captioned-fashion --out runs/judge
    python benchmarks/caption_judge.py --smoke     # tiny budget, random TAEF2, under a temporary folder
Writes OUT/classifier.pt, OUT/judge_accuracy.json (every number) and OUT/judge_accuracy.md.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import captioned_fashion

import flow

FLOOR = 0.05  # grey level above which a pixel belongs to the item (real backgrounds are 0)
TONE_QUANTILE, TONE_SPLIT = 0.995, 0.6
BOX_FRACTION = 0.1  # relative to the tone, so that a dark item's box is as wide as a light one's
TRIM = 0.005
SIZE_SPLIT = 36  # px of a 64-px canvas
CROP = 28
JUDGE_VERSION = 1  # bump when the pipeline or the network changes: cached classifiers are refused
EVAL_SPLITS = [name for name in captioned_fashion.SPLITS if name != "train"]
ATTRIBUTES = ("item", "size", "tone")

# ----------------------------------------------------------------------------------------------
# Measurement: grey levels, tone, box, and the square crop the classifier reads.


def grey_levels(images):
    """uint8 (N, H, W, 3) or float in [-1, 1] (N, 3, H, W) or (N, H, W, 3), numpy or torch ->
    float (N, H, W) in [0, 1], the mean of the channels."""
    x = (images if torch.is_tensor(images) else torch.as_tensor(np.asarray(images))).cpu()
    if x.ndim == 4 and x.shape[3] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
        raise SystemExit(f"error: the judge takes square RGB images (N, H, W, 3) or (N, 3, H, W), "
                         f"got shape {tuple(x.shape)}")
    x = x.float() / 255 if x.dtype == torch.uint8 else (x.float() + 1) / 2
    return x.mean(1).clamp(0, 1)


def trimmed_span(counts):
    """counts (N, L) of box pixels per row (or column) -> first and last index, TRIM cut at each end."""
    cumulative = counts.cumsum(1)
    total = cumulative[:, -1:]
    first = (cumulative <= TRIM * total).sum(1)
    last = (cumulative < (1 - TRIM) * total).sum(1)
    return first, torch.maximum(last, first)


def measure(grey):
    """grey (N, H, W) -> brightness (N,), extent (N,) in px of 64, boxes (N, 4) top, left, bottom, right."""
    item = grey > FLOOR
    brightness = torch.where(item, grey, torch.nan).flatten(1).nanquantile(TONE_QUANTILE, dim=1).nan_to_num(0)
    box = grey > torch.clamp(BOX_FRACTION * brightness, min=FLOOR)[:, None, None]
    (top, bottom), (left, right) = trimmed_span(box.sum(2)), trimmed_span(box.sum(1))
    extent = torch.maximum(bottom - top + 1, right - left + 1).float() * 64 / grey.shape[-1]
    boxes = torch.stack([top, left, bottom, right], 1)
    empty = ~item.flatten(1).any(1)  # a black image: no extent, and the classifier sees all of it
    extent[empty] = 0
    boxes[empty] = torch.tensor([0, 0, grey.shape[1] - 1, grey.shape[2] - 1])
    return brightness, extent, boxes


def square_crops(grey, boxes):
    """The box of each image, padded to a centred square, resized to 28x28 and divided by its
    maximum: (N, 1, 28, 28), as the classifier reads it, whatever the item's size and tone."""
    crops = []
    for image, (top, left, bottom, right) in zip(grey, boxes.tolist()):
        item = image[top: bottom + 1, left: right + 1]
        pad_h, pad_w = max(item.shape) - item.shape[0], max(item.shape) - item.shape[1]
        item = F.pad(item, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        crops.append(F.interpolate(item[None, None], size=(CROP, CROP), mode="bilinear", antialias=True,
                                   align_corners=False)[0])
    crops = torch.stack(crops)
    return crops / crops.amax((1, 2, 3), keepdim=True).clamp(min=1e-6)


# ----------------------------------------------------------------------------------------------
# The item classifier: trained on real Fashion-MNIST train items, drawn on canvases and cropped back.


def classifier():
    """(N, 1, 28, 28) -> 10 logits: two conv blocks and a small head (about 0.4M parameters, 4M
    multiply-adds per image: fast enough to train on a CPU in minutes)."""
    block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                               nn.MaxPool2d(2)]
    return nn.Sequential(*block(1, 32), *block(32, 64), nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
                         nn.Dropout(0.3), nn.Linear(128, 10))


def render_items(items, rng, image_size=64):
    """Items (N, 28, 28) uint8 on canvases as captioned_fashion draws them, each with a random size and
    tone: float (N, 3, H, W) in [-1, 1]."""
    sizes = rng.choice(list(captioned_fashion.ITEM_SIDE), len(items))
    tones = rng.choice(list(captioned_fashion.TONE_GAIN), len(items))
    attributes = captioned_fashion.draw_attributes(sizes, tones, image_size, rng)
    canvases = captioned_fashion.FashionCanvases(items, *attributes, image_size)
    return torch.stack([canvases[i] for i in range(len(canvases))])


def crops_of_items(items, rng, chunk=2000, progress=False, desc="render"):
    """The classifier's inputs for items drawn at random sizes, tones and positions (chunked: the
    canvases are 5x larger than the crops)."""
    out = []
    for start in tqdm(range(0, len(items), chunk), desc=desc, disable=not progress):
        grey = grey_levels(render_items(items[start: start + chunk], rng))
        out.append(square_crops(grey, measure(grey)[2]))
    return torch.cat(out)


def train_classifier(data_root, train_images=None, epochs=2, test_images=None, batch=128, seed=0,
                     progress=True):
    """(state_dict, info): fresh random canvases every epoch (position, size and tone augment for
    free); accuracy measured on all test items, drawn the same way with a fixed seed."""
    items, labels = flow.load_fashion_mnist(data_root, "train")
    items, labels = items[:train_images], torch.from_numpy(labels[:train_images])
    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    network, start = classifier(), time.perf_counter()
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * -(-len(items) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for epoch in range(epochs):
        crops = crops_of_items(items, rng, progress=progress, desc=f"render epoch {epoch + 1}")
        network.train()
        order = torch.randperm(len(items))
        for index in tqdm(order.split(batch), desc=f"train epoch {epoch + 1}", disable=not progress):
            loss = F.cross_entropy(network(crops[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    test_items, test_labels = (a[:test_images] for a in flow.load_fashion_mnist(data_root, "test"))
    test_crops = crops_of_items(test_items, np.random.RandomState(seed + 1), progress=progress, desc="test")
    accuracy = float((predict(network, test_crops) == torch.from_numpy(test_labels)).float().mean())
    info = {"version": JUDGE_VERSION, "train_images": len(items), "epochs": epochs,
            "test_images": len(test_items), "test_accuracy": accuracy,
            "train_seconds": time.perf_counter() - start}
    return network.state_dict(), info


@torch.no_grad()
def predict(network, crops, batch=1000):
    network.eval()
    return torch.cat([network(crops[start: start + batch]).argmax(1)
                      for start in range(0, len(crops), batch)])


def load_classifier(path):
    """(network, info) from a cache written by CaptionJudge.load_or_train (tensors and numbers only,
    checked against the checksum they were saved with)."""
    network = classifier()
    saved, problem = flow.read_checkpoint(path)
    if problem:
        raise SystemExit(f"error: {path} {problem}: remove it to retrain")
    try:
        network.load_state_dict(saved["state_dict"])
    except Exception as error:  # noqa: BLE001 - a foreign file raises several types
        raise SystemExit(f"error: {path} is not a caption judge classifier ({type(error).__name__}): "
                         "remove it to retrain") from None
    version = saved.get("info", {}).get("version")
    if version != JUDGE_VERSION:
        raise SystemExit(f"error: {path} holds a classifier of judge version {version}, this is version "
                         f"{JUDGE_VERSION}: remove it to retrain")
    return network, saved["info"]


# ----------------------------------------------------------------------------------------------
# The judge and its score.


class CaptionJudge:
    """judge(images) -> {"label": class (N,), "size": "small"/"large" (N,), "tone": "dark"/"light"
    (N,), "extent": box side in px of 64 (N,), "brightness": tone measure in [0, 1] (N,)}."""

    def __init__(self, network, info):
        self.network, self.info = network.eval().requires_grad_(False), info

    @classmethod
    def load_or_train(cls, path, data_root, train_images=None, epochs=2, test_images=None, progress=True):
        """The classifier cached at `path`, trained on the Fashion-MNIST in data_root if absent."""
        if os.path.isfile(path):
            return cls(*load_classifier(path))
        state, info = train_classifier(data_root, train_images, epochs, test_images, progress=progress)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        flow.save_atomic({"state_dict": state, "info": info}, path)  # never a half-written cache
        network = classifier()
        network.load_state_dict(state)
        return cls(network, info)

    @torch.no_grad()
    def __call__(self, images):
        grey = grey_levels(images)
        if len(grey) == 0:
            raise SystemExit("error: the judge got no images")
        brightness, extent, boxes = measure(grey)
        labels = predict(self.network, square_crops(grey, boxes))
        return {"label": labels.numpy(), "size": np.where(extent.numpy() > SIZE_SPLIT, "large", "small"),
                "tone": np.where(brightness.numpy() > TONE_SPLIT, "light", "dark"),
                "extent": extent.numpy(), "brightness": brightness.numpy()}


CAPTIONS = {caption.text: caption for caption in captioned_fashion.fashion_captions()}


def ground_truth(captions):
    """Caption texts (or Captions) -> Captions, looked up in captioned_fashion.fashion_captions()."""
    unknown = [c for c in captions if isinstance(c, str) and c not in CAPTIONS]
    if unknown:
        raise SystemExit(f"error: {len(unknown)} captions are not captioned-Fashion captions, "
                         f"e.g. {unknown[0]!r}")
    return [CAPTIONS[c] if isinstance(c, str) else c for c in captions]


def correct(judgement, captions):
    """Per image: does the judge read the caption's item, size and tone ({attribute: bool (N,)})."""
    truth = ground_truth(captions)
    if len(truth) != len(judgement["label"]):
        raise SystemExit(f"error: {len(judgement['label'])} judged images but {len(truth)} captions")
    right = {"item": judgement["label"] == np.array([c.label for c in truth]),
             "size": judgement["size"] == np.array([c.size for c in truth]),
             "tone": judgement["tone"] == np.array([c.tone for c in truth])}
    right["all"] = right["item"] & right["size"] & right["tone"]
    return right


def score(judgement, captions):
    """Per-attribute and all-correct accuracy: {"item", "size", "tone", "all": float, "count": int}."""
    right = correct(judgement, captions)
    return {**{key: float(value.mean()) for key, value in right.items()}, "count": len(captions)}


def concatenate(judgements):
    return {key: np.concatenate([j[key] for j in judgements]) for key in judgements[0]}


# ----------------------------------------------------------------------------------------------
# The judge on real canvases and on their autoencoder reconstructions.


def split_canvases(folder, name, limit=None):
    """Real canvases of a split of a captioned_fashion.py folder, one per caption (the first `limit`),
    float (N, 3, H, W) in [-1, 1], and the Caption of each."""
    images, captions, image_of_caption = captioned_fashion.read_split(folder, name, limit)
    pixels = torch.from_numpy(images[image_of_caption]).permute(0, 3, 1, 2)
    return pixels.float() / 127.5 - 1, captions


@torch.no_grad()
def reconstruct(autoencoder, images, batch=100, progress=False):
    """decode(encode(x)) in [-1, 1]: what the best generator in that latent space could give."""
    starts = tqdm(range(0, len(images), batch), desc="autoencoder", disable=not progress)
    return torch.cat([autoencoder.decode(autoencoder.encode(images[k: k + batch])) for k in starts])


def judge_splits(judge, autoencoder, folder, limit=None, progress=True):
    """{"real" | "autoencoder": {split | "heldout": score}} and seconds per image of each step, on the
    splits of a captioned_fashion.py folder."""
    results, judged, seconds = {"real": {}, "autoencoder": {}}, {"real": [], "autoencoder": []}, {}
    for name in EVAL_SPLITS:
        images, texts = split_canvases(folder, name, limit)
        start = time.perf_counter()
        rows = {"real": images, "autoencoder": reconstruct(autoencoder, images, progress=progress)}
        seconds["autoencoder_per_image"] = (time.perf_counter() - start) / len(images)
        for row, pixels in rows.items():
            start = time.perf_counter()
            judgement = judge(pixels)
            seconds["judge_per_image"] = (time.perf_counter() - start) / len(images)
            results[row][name] = score(judgement, texts)
            if name != "val":
                judged[row].append((judgement, texts))
    for row, parts in judged.items():
        results[row]["heldout"] = score(concatenate([j for j, _ in parts]), [t for _, t in parts for t in t])
    return results, seconds


def markdown(results):
    header = "| images | split | item | size | tone | all correct | N |\n|---|---|---|---|---|---|---|\n"
    lines = [f"| {row} | {name} | " + " | ".join(f"{100 * scores[k]:.1f}%" for k in (*ATTRIBUTES, "all"))
             + f" | {scores['count']} |"
             for row in ("real", "autoencoder") for name, scores in results[row].items()]
    return header + "\n".join(lines) + "\n"


def main(args):
    os.makedirs(args.out, exist_ok=True)
    judge = CaptionJudge.load_or_train(args.weights, args.data_root, args.train_images, args.epochs,
                                       args.test_images, progress=not args.quiet)
    autoencoder = flow.load_autoencoder(args.vae)
    captioned_fashion.write_missing(args.data_root, args.captioned, EVAL_SPLITS, progress=not args.quiet)
    results, seconds = judge_splits(judge, autoencoder, args.captioned, args.max_images, not args.quiet)
    summary = {"classifier": judge.info, **results, "seconds": seconds, "threads": torch.get_num_threads(),
               "thresholds": {"floor": FLOOR, "tone_quantile": TONE_QUANTILE, "tone_split": TONE_SPLIT,
                              "box_fraction": BOX_FRACTION, "trim": TRIM, "size_split": SIZE_SPLIT}}
    with flow.atomic_file(os.path.join(args.out, "judge_accuracy.json"), "w") as file:
        json.dump(summary, file, indent=2)
    table = (f"Classifier: {100 * judge.info['test_accuracy']:.1f}% on all {judge.info['test_images']} "
             f"Fashion-MNIST test items drawn on canvases ({judge.info['train_images']} train items, "
             f"{judge.info['epochs']} epochs).\n\n" + markdown(results))
    with flow.atomic_file(os.path.join(args.out, "judge_accuracy.md"), "w") as file:
        file.write(table)
    print(table)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: an option whose default is None says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist",
                        help="Fashion-MNIST idx files")
    parser.add_argument("--vae", default=os.path.join(ROOT, "..", "shared", "weights", "taef2"),
                        help="TAEF2 folder, for the autoencoder row")
    parser.add_argument("--captioned", default=None,
                        help="the canvases: a folder written by benchmarks/captioned_fashion.py (64 px), "
                             "its missing eval splits written there first (default: OUT/captioned-fashion)")
    parser.add_argument("--out", default="runs/judge", help="output folder")
    parser.add_argument("--weights", default=None, help="classifier cache (default: OUT/classifier.pt)")
    parser.add_argument("--train-images", type=int, default=None, help="first N train items (all 60k)")
    parser.add_argument("--epochs", type=int, default=2, help="classifier epochs")
    parser.add_argument("--test-images", type=int, default=None,
                        help="first N test items for the classifier's accuracy (all 10k)")
    parser.add_argument("--max-images", type=int, default=None, help="first N canvases of each split (all)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny budget with random TAEF2 weights, under a temporary folder")
    args = parser.parse_args(argv)
    if args.smoke:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from fakes import write_taef2

        args.out = tempfile.mkdtemp(prefix="caption_judge_smoke_")
        args.vae, args.weights = os.path.join(args.out, "taef2"), None
        write_taef2(args.vae)
        args.train_images, args.test_images, args.epochs, args.max_images, args.quiet = 500, 500, 1, 16, True
    args.weights = args.weights or os.path.join(args.out, "classifier.pt")
    args.captioned = args.captioned or os.path.join(args.out, "captioned-fashion")
    missing = [f for pair in flow.FASHION_FILES.values() for f in pair
               if not os.path.isfile(os.path.join(args.data_root, f))]
    if missing:
        parser.error(f"--data-root {args.data_root} lacks the Fashion-MNIST files {missing} "
                     "(apt-get install dataset-fashion-mnist)")
    for name in ("train_images", "test_images", "epochs", "max_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


if __name__ == "__main__":
    main(parse_args())

"""Evaluate train_text.py runs on the built-in captioned shapes: caption match and Frechet distance
against NFE, transport cost, straightness, and the mapper against the best possible mapper.

For every run (its latest checkpoint, EMA weights) and every NFE, generates `--per-seen` images for
each of the 120 seen captions and `--per-heldout` for each of the 24 held-out ones (image i always
from seed i, so all runs start from the same noise), then reports
  match      fraction of images that check_caption reads as their caption (all four
             attributes right), and per attribute (size, colour, shape, position);
  fd_shape   Frechet distance on the checker's 9 measurements (colour, centroid, box, fill, drop);
  fd_pixels  Frechet distance on 8x8 average-pooled pixels (192 numbers);
both against as many fresh renders of the same captions; and, to see why shape is missed,
  shape_confusion  counts of (caption's shape, shape read), rows and columns in SHAPES order, a
                   last column for "no shape found";
  shape_features   per caption shape, the 10th / 50th / 90th percentiles of the checker's fill and
                   drop (real renders: circle fill pi/4, square 1, triangle drop 1/6).
NFE 0 is the prior sample itself (no network): for the text prior that is P(tau(y)) + sigma * noise.
transport_cost is the mean of the logged training values ||x1 - x0||^2 (summed over dimensions);
straightness is flow.straightness of the Euler trajectories at the largest NFE.

    python benchmarks/train_text_eval.py runs/text_cmp/text_independent \
        --out runs/text_cmp/eval/text_independent.json --grids runs/text_cmp/grids
    python benchmarks/train_text_eval.py --out runs/text_cmp/eval/floors.json   # the floors only (no runs)
    python benchmarks/train_text_eval.py --smoke   # a tiny run, evaluated, in a temporary folder
Also written: "mapper_floor" (MSE of the per-caption mean of the training images, the best any
mapper can do) and "real_floor" (the scores of fresh real renders against the reference).
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid
import flow
import train_text

ATTRIBUTES = ("size", "colour", "shape", "position")


def read_shape(image):
    """What an image (H, W, 3) uint8 shows, by measurement: (combination, features).

    Foreground = the largest connected blob of pixels whose brightest channel is above mid-grey
    (generated images may hold stray bright pixels). colour: nearest palette colour of the mean
    foreground colour; position: the larger offset of the centroid from the centre; size: the
    longer side of the bounding box; shape: a triangle's mass sits below the centre of its box, and
    a circle fills pi/4 of its box, a square all of it. features: those measurements (9 numbers),
    for a Frechet distance.
    """
    scale = image.shape[0] / 32
    pixels = image.astype(np.float64) / 255
    blobs, count = scipy.ndimage.label(pixels.max(2) > 0.5)
    if count == 0:
        return None, np.zeros(9)
    mask = blobs == 1 + np.argmax(np.bincount(blobs.ravel())[1:])
    ys, xs = np.nonzero(mask)
    mean_rgb = pixels[mask].mean(0)
    palette = train_text.COLOURS
    colour = min(palette, key=lambda c: np.abs(mean_rgb / mean_rgb.max() - palette[c]).sum())
    dx, dy = (xs.mean() + 0.5) / scale - 16, (ys.mean() + 0.5) / scale - 16
    if abs(dx) > abs(dy):
        position = "on the left" if dx < 0 else "on the right"
    else:
        position = "at the top" if dy < 0 else "at the bottom"
    width, height = (xs.max() - xs.min() + 1) / scale, (ys.max() - ys.min() + 1) / scale
    size = "small" if max(width, height) < 11 else "large"
    fill = mask.sum() / ((width * scale) * (height * scale))
    drop = (ys.mean() - (ys.min() + ys.max()) / 2) / (height * scale)  # triangle: 1/6 below the box centre
    shape = "triangle" if drop > 0.08 else ("circle" if fill < 0.97 else "square")
    return (size, colour, shape, position), np.array([*mean_rgb, dx, dy, width, height, fill, drop])


def check_caption(image, caption):
    """True when the image (H, W, 3) uint8 shows what its built-in caption says."""
    combination, _ = read_shape(image)
    return combination is not None and train_text.caption_of(combination) == caption


def caption_sets(per_seen, per_heldout, seed):
    """{name: (captions, reference uint8 images)} for the seen and the held-out captions."""
    sets = {}
    for name, held, per in (("seen", False, per_seen), ("heldout", True, per_heldout)):
        combinations = [c for c in train_text.shape_combinations() if train_text.is_held_out(c) == held]
        images, captions, index = train_text.make_shapes(combinations, per, 32, seed)
        sets[name] = ([captions[i] for i in index], to_uint8(torch.from_numpy(images)))
    return sets


def to_uint8(images):
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def pooled_pixels(images_uint8):
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).double() / 255
    return F.avg_pool2d(x, 4).flatten(1).numpy()


def frechet(a, b):
    return fid.frechet_distance(*fid.gaussian_statistics(a), *fid.gaussian_statistics(b))


def score(images, captions, reference):
    readings = [read_shape(image) for image in images]
    combination_of = {train_text.caption_of(c): c for c in train_text.shape_combinations()}
    truth = [combination_of[caption] for caption in captions]
    result = {"match": float(np.mean([check_caption(i, c) for i, c in zip(images, captions)]))}
    for k, name in enumerate(ATTRIBUTES):
        result[name] = float(np.mean([r[0] is not None and r[0][k] == t[k] for r, t in zip(readings, truth)]))
    features = np.stack([r[1] for r in readings])
    reference_features = np.stack([read_shape(image)[1] for image in reference])
    result["fd_shape"] = frechet(features, reference_features)
    result["fd_pixels"] = frechet(pooled_pixels(images), pooled_pixels(reference))
    shapes = train_text.SHAPES
    read = [shapes.index(r[0][2]) if r[0] is not None else len(shapes) for r in readings]
    said = [shapes.index(t[2]) for t in truth]
    confusion = np.zeros((len(shapes), len(shapes) + 1), int)
    np.add.at(confusion, (said, read), 1)
    result["shape_confusion"] = confusion.tolist()
    result["shape_features"] = {
        shape: {name: np.percentile(features[np.equal(said, k), column], [10, 50, 90]).round(3).tolist()
                for name, column in (("fill", 7), ("drop", 8))}
        for k, shape in enumerate(shapes) if k in said}
    return result


@torch.no_grad()
def generate(loaded, captions, nfe, cfg, batch=256, trajectory=False):
    """Images (uint8 NHWC) for the captions, image i from seed i; and the trajectories' straightness."""
    images, straight = [], []
    for start in range(0, len(captions), batch):
        chunk = captions[start: start + batch]
        cond = loaded.make_condition(chunk)
        noise = torch.stack([torch.randn(loaded.latent_shape, generator=torch.Generator().manual_seed(seed))
                             for seed in range(start, start + len(chunk))])
        x = loaded.prior.sample(cond, noise)
        if nfe:
            velocity = flow.guided_velocity(loaded.model, cond, loaded.null_condition(len(chunk)), cfg)
            solution = flow.solve(velocity, x, nfe, "euler", trajectory=trajectory)
            x = solution.x
            if trajectory:
                straight.append(flow.straightness(solution.trajectory) * len(chunk))
        images.append(to_uint8(loaded.decode(x)))
    return np.concatenate(images), (sum(straight) / len(captions) if straight else None)


def mapper_floor(seed):
    """MSE of the best mapper there is (the per-caption mean of the training images) on val and held-out."""
    splits = train_text.shape_splits(train_text.parse_args(["--seed", str(seed)]), train_text.WordEncoder())
    result = {}
    for name in ("val", "heldout"):
        split = splits[name]
        source = splits["train"] if name == "val" else split  # held-out captions: their own mean (an oracle)
        source_texts, texts = np.array(source.texts(range(len(source)))), split.texts(range(len(split)))
        means = {c: source.images[source_texts == c].mean(0) for c in set(texts)}
        errors = [((x - means[c]) ** 2).mean() for x, c in zip(split.images, texts)]
        result[f"oracle_mse_{name}"] = float(np.mean(errors))
    return result


def real_floor(sets, args):
    """The scores of fresh real renders (another seed) of the same captions: 100% match, the FD floor."""
    floor = {}
    for set_name, (captions, reference) in sets.items():
        again = caption_sets(args.per_seen, args.per_heldout, seed=54321)[set_name][1]
        floor[set_name] = score(again, captions, reference)
    return floor


def evaluate(run, sets, grid_captions, args):
    """The scores of one run's latest checkpoint at every --nfe; writes its grids to --grids."""
    loaded = train_text.load_for_sampling(run, "cpu")  # a run folder: its latest checkpoint
    name = os.path.basename(run.rstrip("/"))
    with open(os.path.join(run, "log.jsonl")) as file:
        records = [json.loads(line) for line in file]
    entry = {"checkpoint": flow.resolve_checkpoint(run),
             "transport_cost": float(np.mean([r["transport_cost"] for r in records if r["stage"] == "flow"])),
             "mapper": next((r for r in records if "val_loss_val" in r), None), "nfe": {}}
    for nfe in args.nfe:
        entry["nfe"][nfe] = {}
        for set_name, (captions, reference) in sets.items():
            images, straight = generate(loaded, captions, nfe, args.cfg, trajectory=nfe == max(args.nfe))
            entry["nfe"][nfe][set_name] = score(images, captions, reference)
            if straight is not None:
                entry[f"straightness_{set_name}"] = straight
        rounded = {k: {m: round(v, 3) for m, v in r.items() if isinstance(v, float)}
                   for k, r in entry["nfe"][nfe].items()}
        print(name, nfe, rounded, flush=True)
    for nfe in args.grid_nfe if args.grids else []:
        images, _ = generate(loaded, grid_captions, nfe, args.cfg)
        images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        path = os.path.join(args.grids, f"train_text_{name}_nfe{nfe}.png")
        train_text.save_image_grid(images, grid_captions, path)
    return name, entry


def smoke_run(folder):
    """--smoke: a tiny two-stage train_text.py run to evaluate, in `folder`."""
    out = os.path.join(folder, "smoke_run")
    train_text.main(train_text.parse_args(["--out", out, "--model", "tiny", "--mapper-width", "32", "--quiet",
                                           "--mapper-steps", "2", "--steps", "2", "--global-batch", "8",
                                           "--sample-nfe", "1"]))
    return out


def main(args):
    if args.smoke:
        folder = tempfile.mkdtemp()
        args.runs, args.out, args.grids = [smoke_run(folder)], os.path.join(folder, "eval.json"), folder
        args.nfe, args.grid_nfe, args.per_seen, args.per_heldout = [0, 1], [1], 1, 1
    torch.set_grad_enabled(False)
    if args.grids:
        os.makedirs(args.grids, exist_ok=True)
    sets = caption_sets(args.per_seen, args.per_heldout, seed=12345)
    results = {"mapper_floor": mapper_floor(0), "real_floor": real_floor(sets, args), "runs": {}}
    grid_captions = [captions[:: len(captions) // 8][:8] for captions, _ in sets.values()]
    for run in args.runs:
        name, results["runs"][name] = evaluate(run, sets, grid_captions[0] + grid_captions[1], args)
    with flow.atomic_file(args.out, "w") as file:
        json.dump({"args": vars(args), **results}, file, indent=2)
    print_table(results, args.nfe)


def print_table(results, nfes):
    print("\n| run | transport cost | NFE | match seen | match held-out | FD shape seen / held-out | "
          "FD pixels seen / held-out |")
    print("|---|---|---|---|---|---|---|")
    for name, entry in results["runs"].items():
        for nfe in nfes:
            s, h = entry["nfe"][nfe]["seen"], entry["nfe"][nfe]["heldout"]
            print(f"| {name} | {entry['transport_cost']:.0f} | {nfe} | {s['match']:.3f} | {h['match']:.3f} | "
                  f"{s['fd_shape']:.2f} / {h['fd_shape']:.2f} | "
                  f"{s['fd_pixels']:.2f} / {h['fd_pixels']:.2f} |")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: an option whose default is None says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add = parser.add_argument
    add("runs", nargs="*",
        help="output folders of train_text.py runs on the built-in shapes (none: only the floors)")
    add("--nfe", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16],
        help="Euler NFE budgets (0: the prior sample)")
    add("--cfg", type=float, default=1.0, help="classifier-free guidance scale")
    add("--per-seen", type=int, default=4, help="images per seen caption (120 captions)")
    add("--per-heldout", type=int, default=16, help="images per held-out caption (24 captions)")
    add("--out", default="runs/text_cmp/eval.json", help="results JSON")
    add("--grids", default=None, help="folder for sample grids (16 captions: 8 seen, 8 held-out)")
    add("--grid-nfe", type=int, nargs="+", default=[2, 16], help="NFE of the sample grids")
    add("--smoke", action="store_true",
        help="train a tiny run and evaluate it on a tiny budget, all in a temporary folder (a quick check)")
    args = parser.parse_args(argv)
    if min(args.nfe) < 0 or args.per_seen < 1 or args.per_heldout < 1 or min(args.grid_nfe) < 1:
        parser.error("--nfe must be >= 0; --per-seen, --per-heldout and --grid-nfe positive")
    return args


if __name__ == "__main__":
    main(parse_args())

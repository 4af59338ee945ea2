"""Evaluate train_text.py runs on the built-in captioned shapes: caption match and Frechet distance
against NFE, transport cost, straightness, and the mapper against the best possible mapper.

For every run (its latest checkpoint, EMA weights) and every NFE, generates `--per-seen` images for
each of the 120 seen captions and `--per-heldout` for each of the 24 held-out ones (image i always
from seed i, so all runs start from the same noise), then reports
  match      fraction of images that train_text.check_caption reads as their caption (all four
             attributes right), and per attribute (size, colour, shape, position);
  fd_shape   Frechet distance on the checker's 9 measurements (colour, centroid, box, fill, drop);
  fd_pixels  Frechet distance on 8x8 average-pooled pixels (192 numbers);
both against as many fresh renders of the same captions. NFE 0 is the prior sample itself (no
network): for the text prior that is P(tau(y)) + sigma * noise.
transport_cost is the mean of the logged training values ||x1 - x0||^2 (summed over dimensions);
straightness is flow.straightness of the Euler trajectories at the largest NFE.

    python benchmarks/train_text_eval.py runs/text_cmp/text_independent --out runs/text_cmp/eval/text_independent.json \
        --grids runs/text_cmp/grids
    python benchmarks/train_text_eval.py --out runs/text_cmp/eval/floors.json   # the floors only (no runs)
Also written: "mapper_floor" (MSE of the per-caption mean of the training images, the best any
mapper can do) and "real_floor" (the scores of fresh real renders against the reference).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flow  # noqa: E402
import train_text  # noqa: E402

ATTRIBUTES = ("size", "colour", "shape", "position")


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
    return flow.frechet_distance(*flow.gaussian_statistics(a), *flow.gaussian_statistics(b))


def score(images, captions, reference):
    readings = [train_text.read_shape(image) for image in images]
    combination_of = {train_text.caption_of(c): c for c in train_text.shape_combinations()}
    truth = [combination_of[caption] for caption in captions]
    result = {"match": float(np.mean([train_text.check_caption(i, c) for i, c in zip(images, captions)]))}
    for k, name in enumerate(ATTRIBUTES):
        result[name] = float(np.mean([r[0] is not None and r[0][k] == t[k] for r, t in zip(readings, truth)]))
    features = np.stack([r[1] for r in readings])
    reference_features = np.stack([train_text.read_shape(image)[1] for image in reference])
    result["fd_shape"] = frechet(features, reference_features)
    result["fd_pixels"] = frechet(pooled_pixels(images), pooled_pixels(reference))
    return result


@torch.no_grad()
def generate(loaded, captions, nfe, cfg, batch=256, trajectory=False):
    """Images (uint8 NHWC) for the captions, image i from seed i; and the trajectories' straightness."""
    images, straight = [], []
    for start in range(0, len(captions), batch):
        chunk = captions[start: start + batch]
        cond = loaded.make_condition(chunk)
        noise = torch.stack([torch.randn(loaded.latent_shape, generator=torch.Generator().manual_seed(start + i)) for i in range(len(chunk))])
        x0 = loaded.prior.sample(cond, noise)
        if nfe == 0:
            x = x0
        else:
            velocity = flow.guided_velocity(loaded.model, cond, loaded.null_condition(len(chunk)), cfg)
            solution = flow.solve(velocity, x0, nfe, "euler", trajectory=trajectory)
            x = solution.x
            if trajectory:
                straight.append(flow.straightness(solution.trajectory) * len(chunk))
        images.append(to_uint8(loaded.decode(x)))
    return np.concatenate(images), (sum(straight) / len(captions) if straight else None)


def mapper_floor(seed):
    """MSE of the best mapper there is (the per-caption mean of the training images) on val and held-out."""
    args = train_text.parse_args(["--seed", str(seed)])
    splits = train_text.shape_splits(train_text.resolve_defaults(args), train_text.WordEncoder())
    result = {}
    for name in ("val", "heldout"):
        split = splits[name]
        source = splits["train"] if name == "val" else split  # held-out captions: their own mean (an oracle)
        means = {c: source.latents[[i for i, s in enumerate(source.captions) if s == c]].mean(0) for c in set(split.captions)}
        result[f"oracle_mse_{name}"] = float(np.mean([((x - means[c]) ** 2).mean() for x, c in zip(split.latents, split.captions)]))
    return result


def real_floor(sets, args):
    """The scores of fresh real renders (another seed) of the same captions: 100% match, the FD noise floor."""
    floor = {}
    for set_name, (captions, reference) in sets.items():
        again = caption_sets(args.per_seen, args.per_heldout, seed=54321)[set_name][1]
        floor[set_name] = score(again, captions, reference)
    return floor


def main(args):
    torch.set_grad_enabled(False)
    if args.grids:
        os.makedirs(args.grids, exist_ok=True)
    sets = caption_sets(args.per_seen, args.per_heldout, seed=12345)
    results = {"mapper_floor": mapper_floor(0), "real_floor": real_floor(sets, args), "runs": {}}
    grid_captions = sets["seen"][0][:: len(sets["seen"][0]) // 8][:8] + sets["heldout"][0][:: len(sets["heldout"][0]) // 8][:8]
    for run in args.runs:
        checkpoint = train_text.latest_checkpoint(os.path.join(run, "checkpoints"))
        if checkpoint is None:
            raise SystemExit(f"error: no checkpoint in {run}/checkpoints")
        loaded = train_text.load_for_sampling(checkpoint, "cpu")
        name = os.path.basename(run.rstrip("/"))
        records = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
        entry = {"checkpoint": checkpoint,
                 "transport_cost": float(np.mean([r["transport_cost"] for r in records if "transport_cost" in r])),
                 "mapper": next((r for r in records if "val_loss_val" in r), None), "nfe": {}}
        for nfe in args.nfe:
            entry["nfe"][nfe] = {}
            for set_name, (captions, reference) in sets.items():
                images, straight = generate(loaded, captions, nfe, args.cfg, trajectory=nfe == max(args.nfe))
                entry["nfe"][nfe][set_name] = score(images, captions, reference)
                if straight is not None:
                    entry[f"straightness_{set_name}"] = straight
            print(name, nfe, {k: {m: round(v, 3) for m, v in r.items()} for k, r in entry["nfe"][nfe].items()}, flush=True)
        results["runs"][name] = entry
        if args.grids:
            for nfe in args.grid_nfe:
                images, _ = generate(loaded, grid_captions, nfe, args.cfg)
                train_text.save_image_grid(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, grid_captions,
                                           os.path.join(args.grids, f"train_text_{name}_nfe{nfe}.png"))
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), **results}, f, indent=2)
    print_table(results, args.nfe)


def print_table(results, nfes):
    print("\n| run | transport cost | NFE | match seen | match held-out | FD shape seen / held-out | FD pixels seen / held-out |")
    print("|---|---|---|---|---|---|---|")
    for name, entry in results["runs"].items():
        for nfe in nfes:
            s, h = entry["nfe"][nfe]["seen"], entry["nfe"][nfe]["heldout"]
            print(f"| {name} | {entry['transport_cost']:.0f} | {nfe} | {s['match']:.3f} | {h['match']:.3f} | "
                  f"{s['fd_shape']:.2f} / {h['fd_shape']:.2f} | {s['fd_pixels']:.2f} / {h['fd_pixels']:.2f} |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", help="output folders of train_text.py runs on the built-in shapes (none: only the floors)")
    parser.add_argument("--nfe", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16], help="Euler NFE budgets (0: the prior sample)")
    parser.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--per-seen", type=int, default=4, help="images per seen caption (120 captions)")
    parser.add_argument("--per-heldout", type=int, default=16, help="images per held-out caption (24 captions)")
    parser.add_argument("--out", default="runs/text_cmp/eval.json", help="results JSON")
    parser.add_argument("--grids", default=None, help="folder for sample grids (16 captions: 8 seen, 8 held-out)")
    parser.add_argument("--grid-nfe", type=int, nargs="+", default=[2, 16], help="NFE of the sample grids")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())

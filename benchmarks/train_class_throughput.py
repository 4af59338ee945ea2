"""Training throughput of train_class.py for the four prior x coupling combinations, in one run.

Same model, batch and data for every combination; the combinations take turns (round-robin,
--rounds rounds of --steps-per-round steps each), so that a change in machine load hits all of
them alike. Prints images/s (median over rounds) and the overhead relative to CondOT
(gaussian prior, independent pairs), plus the time of the coupling alone per batch.

Run:
    python benchmarks/train_class_throughput.py                       # tiny DiT, digits, batch 64
    python benchmarks/train_class_throughput.py --global-batch 256 --json docs/train_class_throughput.json
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_class  # noqa: E402

COMBINATIONS = [("gaussian", "independent"), ("gaussian", "ot"), ("class", "independent"), ("class", "ot")]


def setup(prior_name, coupling, x, y, options):
    args = train_class.parse_args(["--prior", prior_name, "--coupling", coupling, *options])
    args.num_classes, args.latent_shape = 10, list(x.shape[1:])
    prior = train_class.build_prior(args)
    if prior_name == "class":
        train_class.fit_class_prior(prior, x, y, 0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    model = train_class.build_model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    return args, model, optimizer, prior


def coupling_seconds(prior, args, x, y, repeats=20):
    """Time of sampling the prior and coupling one batch (the part that differs between methods)."""
    index = torch.arange(args.global_batch) % len(x)
    start = time.perf_counter()
    for _ in range(repeats):
        train_class.sample_pairs(prior, x[index], y[index], args)
    return (time.perf_counter() - start) / repeats


def main(options):
    torch.set_num_threads(options.threads)
    x, y, _ = train_class.load_digits_train()
    cli = ["--model", options.model, "--global-batch", str(options.global_batch)]
    runs = {f"{p}-{c}": setup(p, c, x, y, cli) for p, c in COMBINATIONS}
    rates = {name: [] for name in runs}
    device = torch.device("cpu")
    for round_index in range(options.rounds + 1):  # round 0 warms up and is not counted
        for name, (args, model, optimizer, prior) in runs.items():
            order = train_class.BatchOrder(len(x), args.global_batch, args.seed)
            start = time.perf_counter()
            for step in range(options.steps_per_round):
                train_class.train_step(step, model, model, optimizer, prior, x, y, order, args, 0, 1, device)
            if round_index:
                rates[name].append(args.global_batch * options.steps_per_round / (time.perf_counter() - start))
    baseline = statistics.median(rates["gaussian-independent"])
    results = {}
    for name, (args, _, _, prior) in runs.items():
        rate = statistics.median(rates[name])
        results[name] = {"images_per_s": rate, "overhead_vs_condot_percent": 100 * (baseline / rate - 1),
                         "coupling_ms_per_batch": 1000 * coupling_seconds(prior, args, x, y)}
        print(f"{name:22s} {rate:8.1f} images/s  overhead {results[name]['overhead_vs_condot_percent']:+6.1f}%  "
              f"prior+coupling {results[name]['coupling_ms_per_batch']:.2f} ms/batch")
    if options.json:
        with open(options.json, "w") as file:
            json.dump({"options": vars(options), "results": results, "rates_per_round": rates}, file, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", choices=list(train_class.MODELS), help="DiT preset")
    parser.add_argument("--global-batch", type=int, default=64, help="images per step")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each combination once per round)")
    parser.add_argument("--steps-per-round", type=int, default=20, help="training steps per combination and round")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="where to write the results")
    main(parser.parse_args())

"""Training throughput of train_class.py for the four prior x coupling combinations.

Every combination is trained the way a user runs it (python train_class.py ...), with the same
model, batch, data and seed; the combinations take turns (round-robin, --rounds rounds of one
fresh run each), so that a change in machine load hits all of them alike. A round's rate comes
from the run's log.jsonl and leaves out its first --untimed-steps (process start-up, first calls).
Prints images/s (median over rounds) and the overhead relative to CondOT (gaussian prior,
independent pairs), plus the time of prior sampling and coupling alone per batch, the only work
in which the combinations differ.

Run:
    python benchmarks/train_class_throughput.py                       # tiny DiT, digits, batch 64
    python benchmarks/train_class_throughput.py --json docs/train_class_throughput.json
    python benchmarks/train_class_throughput.py --data fashion-mnist \\
        --data-root /usr/share/datasets/fashion-mnist
    python benchmarks/train_class_throughput.py --smoke              # seconds; writes only to a temp folder
Options that --help does not list (--data, --data-root, ...) are passed on to train_class.py.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import flow
import train_class

COMBINATIONS = [("gaussian", "independent"), ("gaussian", "ot"), ("class", "independent"), ("class", "ot")]


def train(prior, coupling, out, options, train_options):
    """One fresh train_class.py run; its images/s over the steps after the untimed ones."""
    steps = options.untimed_steps + options.steps_per_round
    # Logging every --untimed-steps puts the untimed steps in the first log line alone; checkpoints
    # and sample grids come only after the last line, so no timed interval includes them.
    command = [sys.executable, os.path.join(ROOT, "train_class.py"), "--prior", prior, "--coupling", coupling,
               "--model", options.model, "--global-batch", str(options.global_batch), "--steps", str(steps),
               "--log-every", str(options.untimed_steps), "--ckpt-every", str(steps),
               "--sample-every", str(steps), "--quiet", "--out", out, *train_options]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(options.threads)})
    with open(os.path.join(out, "log.jsonl")) as file:
        rates = [json.loads(line)["images_per_s"] for line in file][1:]
    return statistics.harmonic_mean(rates)  # equal steps per line: total images / total time


def coupling_ms(run, repeats=20):
    """Milliseconds to sample the prior and couple one batch, with the run's fitted prior. A second
    prior draw stands in for the data batch: its values barely change the cost of the assignment."""
    sampler = train_class.load_for_sampling(run, "cpu")
    with open(os.path.join(run, "args.json")) as file:
        args = json.load(file)
    labels = torch.arange(args["global_batch"]) % sampler.num_classes
    x1 = sampler.prior.sample(labels)
    groups = labels if args["prior"] == "class" else None  # as train_class: OT only within a class
    start = time.perf_counter()
    for _ in range(repeats):
        flow.couple(sampler.prior.sample(labels), x1, args["coupling"], groups=groups)
    return 1000 * (time.perf_counter() - start) / repeats


def main(options, train_options):
    torch.set_num_threads(options.threads)
    rates = {f"{p}-{c}": [] for p, c in COMBINATIONS}
    with tempfile.TemporaryDirectory() as work:  # the runs themselves are of no further use
        for round_index in range(options.rounds):
            for prior, coupling in COMBINATIONS:
                out = os.path.join(work, f"round{round_index}", f"{prior}-{coupling}")
                rates[f"{prior}-{coupling}"].append(train(prior, coupling, out, options, train_options))
        baseline = statistics.median(rates["gaussian-independent"])
        results = {}
        for prior, coupling in COMBINATIONS:
            name = f"{prior}-{coupling}"
            rate = statistics.median(rates[name])
            overhead = 100 * (baseline / rate - 1)
            milliseconds = coupling_ms(os.path.join(work, "round0", name))
            results[name] = {"images_per_s": rate, "overhead_vs_condot_percent": overhead,
                             "coupling_ms_per_batch": milliseconds}
            print(f"{name:22s} {rate:8.1f} images/s  overhead {overhead:+6.1f}%  "
                  f"prior+coupling {milliseconds:.2f} ms/batch")
        json_path = os.path.join(work, "throughput.json") if options.smoke else options.json
        if json_path:
            with open(json_path, "w") as file:
                json.dump({"options": vars(options), "train_class_options": train_options, "results": results,
                           "rates_per_round": rates}, file, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--model", default="tiny", choices=list(train_class.MODELS), help="DiT preset")
    parser.add_argument("--global-batch", type=int, default=64, help="images per step")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds (one run of each combination per round)")
    parser.add_argument("--steps-per-round", type=int, default=20, help="timed steps of every run")
    parser.add_argument("--untimed-steps", type=int, default=5,
                        help="untimed first steps of every run; --steps-per-round must be a multiple")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (OMP_NUM_THREADS)")
    parser.add_argument("--json", default=None, help="where to write the results")
    parser.add_argument("--smoke", action="store_true",
                        help="check that the benchmark runs: 1 round of 1 + 2 steps, batch 16, nothing kept")
    options, train_options = parser.parse_known_args()
    if options.smoke:
        options.rounds, options.steps_per_round, options.untimed_steps, options.global_batch = 1, 2, 1, 16
    if min(options.rounds, options.steps_per_round, options.untimed_steps, options.global_batch) < 1:
        parser.error("--rounds, --steps-per-round, --untimed-steps and --global-batch must be positive")
    if options.steps_per_round % options.untimed_steps:
        parser.error("--steps-per-round must be a multiple of --untimed-steps (one log line each)")
    main(options, train_options)

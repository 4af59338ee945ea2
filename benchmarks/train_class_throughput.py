"""Training throughput of train_class.py for the four prior x coupling combinations, with the batches
prepared in the training process (--workers 0) and in DataLoader workers (--workers 1 or more).

Every combination is trained the way a user runs it (python train_class.py ...), with the same
model, batch, data and seed; the configurations take turns (round-robin, --rounds rounds of one
fresh run each), so that a change in machine load hits all of them alike. A round's rate comes
from the run's log.jsonl and leaves out its first --untimed-steps (process start-up, first calls).
Prints, per worker count, images/s and the time per training step (median over rounds), the
overhead relative to CondOT (gaussian prior, independent pairs), the time a step waited for its batch
(log.jsonl's data_wait_ms: the batch preparation on the step's critical path), and the time to
prepare one global batch alone (train_class.TrainingBatches: per-example noise, time and dropout,
prior samples and coupling), the only work in which the combinations differ. With workers, that
preparation runs beside the training step, so OT costs the step nothing while the workers keep up;
the wait shows it directly, where images/s on a shared machine also carries the machine's noise.

Run:
    python benchmarks/train_class_throughput.py                       # tiny DiT, digits, batch 64
    python benchmarks/train_class_throughput.py --json docs/train_class_throughput.json
    python benchmarks/train_class_throughput.py --data fashion-mnist \\
        --data-root /usr/share/datasets/fashion-mnist
    python benchmarks/train_class_throughput.py --smoke              # seconds; writes only to a temp folder
Options that --help does not list (--data, --data-root, ...) are passed on to train_class.py.
"""
import argparse
import itertools
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


def train(prior, coupling, workers, out, options, train_options):
    """One fresh train_class.py run; its images/s and batch wait (ms per step) after the untimed steps."""
    steps = options.untimed_steps + options.steps_per_round
    # Logging every --untimed-steps puts the untimed steps in the first log line alone; checkpoints
    # and sample grids come only after the last line, so no timed interval includes them.
    command = [sys.executable, os.path.join(ROOT, "train_class.py"), "--prior", prior, "--coupling", coupling,
               "--model", options.model, "--global-batch", str(options.global_batch), "--steps", str(steps),
               "--log-every", str(options.untimed_steps), "--ckpt-every", str(steps),
               "--sample-every", str(steps), "--workers", str(workers), "--quiet", "--out", out,
               *train_options]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(options.threads)})
    with open(os.path.join(out, "log.jsonl")) as file:
        records = [json.loads(line) for line in file][1:]
    # Equal steps per line: the harmonic mean is total images / total time, the mean the wait per step.
    return (statistics.harmonic_mean([r["images_per_s"] for r in records]),
            statistics.mean([r["data_wait_ms"] for r in records]))


def preparation_ms(run, repeats=20):
    """Milliseconds to prepare one global batch in one process (TrainingBatches, as a DataLoader worker
    runs it), with the run's data and fitted prior."""
    with open(os.path.join(run, "args.json")) as file:
        args = argparse.Namespace(**json.load(file))
    x, y, num_classes, _ = train_class.load_data(args, 0, 1, torch.device("cpu"))
    batches = train_class.TrainingBatches(x, y, train_class.load_for_sampling(run, "cpu").prior, args,
                                          num_classes, 0, 1)
    start = time.perf_counter()
    for step in range(repeats):
        batches[step]
    return 1000 * (time.perf_counter() - start) / repeats


def network_step_ms(run, repeats=20):
    """Milliseconds of one optimizer step of the network alone (forward, backward, clip, AdamW) on a batch
    already in memory: what the step would cost without the script around it."""
    with open(os.path.join(run, "args.json")) as file:
        args = argparse.Namespace(**json.load(file))
    sampler = train_class.load_for_sampling(run, "cpu")
    model = train_class.build_model(args, {"latent_shape": list(sampler.latent_shape),
                                           "num_classes": sampler.num_classes}).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    x0, x1 = (torch.randn(args.global_batch, *sampler.latent_shape) for _ in range(2))
    labels, t = torch.randint(0, sampler.num_classes, (args.global_batch,)), torch.rand(args.global_batch)
    times = []
    for _ in range(repeats + 3):  # the first 3: warm-up
        start = time.perf_counter()
        flow.flow_matching_loss(model, x0, x1, labels, t=t).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[3:])


def summarise(rates, waits, work, options):
    """Medians over rounds per (workers, combination), printed and returned; batch preparation timed
    on round 0's runs."""
    results = {}
    for workers, name in rates:
        rate, wait = statistics.median(rates[workers, name]), statistics.median(waits[workers, name])
        overhead = 100 * (statistics.median(rates[workers, "gaussian-independent"]) / rate - 1)
        run = os.path.join(work, "round0", f"workers{workers}-{name}")
        milliseconds, network_ms = preparation_ms(run), network_step_ms(run)
        step_ms = 1000 * options.global_batch / rate
        results.setdefault(f"workers={workers}", {})[name] = {
            "images_per_s": rate, "step_ms": step_ms, "overhead_vs_condot_percent": overhead,
            "data_wait_ms": wait, "batch_preparation_ms": milliseconds, "network_step_ms": network_ms,
            "script_overhead_percent": 100 * (step_ms / network_ms - 1)}
        print(f"workers {workers}  {name:22s} {rate:8.1f} images/s  step {step_ms:7.1f} ms  "
              f"overhead {overhead:+6.1f}%  waiting for the batch {wait:6.2f} ms  "
              f"batch preparation {milliseconds:.2f} ms  network alone {network_ms:.1f} ms "
              f"(script +{100 * (step_ms / network_ms - 1):.1f}%)")
    return results


def main(options, train_options):
    torch.set_num_threads(options.threads)
    configurations = list(itertools.product(options.workers, COMBINATIONS))
    rates, waits = ({(workers, f"{p}-{c}"): [] for workers, (p, c) in configurations} for _ in range(2))
    with tempfile.TemporaryDirectory() as work:  # the runs themselves are of no further use
        for round_index in range(options.rounds):
            for workers, (prior, coupling) in configurations:
                out = os.path.join(work, f"round{round_index}", f"workers{workers}-{prior}-{coupling}")
                rate, wait = train(prior, coupling, workers, out, options, train_options)
                rates[workers, f"{prior}-{coupling}"].append(rate)
                waits[workers, f"{prior}-{coupling}"].append(wait)
        results = summarise(rates, waits, work, options)
        per_round = {f"workers={workers} {name}": {"images_per_s": rates[workers, name],
                                                    "data_wait_ms": waits[workers, name]}
                     for workers, name in rates}
        json_path = os.path.join(work, "throughput.json") if options.smoke else options.json
        if json_path:
            with flow.atomic_file(json_path, "w") as file:
                json.dump({"options": vars(options), "train_class_options": train_options, "results": results,
                           "per_round": per_round}, file, indent=1)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: an option whose default is None says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", default="tiny", choices=list(train_class.MODELS), help="DiT preset")
    parser.add_argument("--global-batch", type=int, default=64, help="images per step")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds (one run of each combination per round)")
    parser.add_argument("--steps-per-round", type=int, default=20, help="timed steps of every run")
    parser.add_argument("--untimed-steps", type=int, default=5,
                        help="untimed first steps of every run; --steps-per-round must be a multiple")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (OMP_NUM_THREADS)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1],
                        help="train_class.py --workers values to compare (0: in the training process)")
    parser.add_argument("--json", default=None, help="where to write the results")
    parser.add_argument("--smoke", action="store_true",
                        help="check that the benchmark runs: 1 round of 1 + 2 steps, batch 16, workers 1, "
                             "nothing kept")
    options, train_options = parser.parse_known_args()
    if options.smoke:
        options.rounds, options.steps_per_round, options.untimed_steps, options.global_batch = 1, 2, 1, 16
        options.workers = [1]
    if min(options.rounds, options.steps_per_round, options.untimed_steps, options.global_batch) < 1:
        parser.error("--rounds, --steps-per-round, --untimed-steps and --global-batch must be positive")
    if min(options.workers) < 0:
        parser.error("--workers must be 0 or more")
    if options.steps_per_round % options.untimed_steps:
        parser.error("--steps-per-round must be a multiple of --untimed-steps (one log line each)")
    main(options, train_options)

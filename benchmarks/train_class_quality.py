"""Sample quality of train_class.py runs on the built-in digits, against NFE and training steps.

For every run folder, sample.py generates --per-class samples of each digit (image i has seed i
and digit i mod 10, the same for every run) with Euler at each NFE and measures them in fid.py's
offline "digits" feature space: the Frechet distance (FD) to the held-out digits (index % 5 == 0),
the accuracy of the digits classifier on the generated samples (does a sample show the digit it
was asked for?), and the straightness of the sampled paths. The final checkpoint is measured at
every --nfe and --cfg-scales, every checkpoint at --step-nfe. The FD of the training split to the
held-out split is printed as the floor that real data reaches. Everything goes through the command
lines of fid.py and sample.py (and train_class.py for --smoke), as a user would run them.

Run (after training the runs, see docs/train_class.md):
    python benchmarks/train_class_quality.py --runs runs/bench_tc/gaussian-independent ... \\
        --json docs/train_class_quality.json --plot docs/train_class_quality.png \\
        --grid docs/train_class_samples.png
    python benchmarks/train_class_quality.py --runs runs/bench_tc/cfg-class runs/bench_tc/cfg-mixture \\
        --cfg-scales 1 1.5 2 3 --nfe 4 16 --json docs/train_class_cfg.json
    python benchmarks/train_class_quality.py --smoke   # trains a 4-step run and measures it, in a temp folder
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fid
import flow

DIGITS = 10


def run_script(script, *argv, threads=1):
    """python SCRIPT ARGV from the repository, as a user runs it; stops the benchmark if it fails."""
    command = [sys.executable, os.path.join(ROOT, script), *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)


def reference_statistics(work, threads):
    """`fid.py ref` of the held-out digits, and the FD of the training split to it (the floor)."""
    reference, train_images = os.path.join(work, "digits_ref.npz"), os.path.join(work, "digits_train.npz")
    run_script("fid.py", "ref", "--images", "builtin-digits", "--out", reference, threads=threads)
    with flow.atomic_file(train_images) as file:
        np.savez(file, fid.load_digits_split(test=False)[0])
    run_script("fid.py", "calc", "--images", train_images, "--ref", reference,
               "--json", os.path.join(work, "floor.json"), threads=threads)
    with open(os.path.join(work, "floor.json")) as file:
        return reference, json.load(file)["fd"]


def sample(checkpoint, nfes, cfg_scale, out, args, fid_ref=None, num_images=None):
    """sample.py on one checkpoint; returns its per-NFE result files' prefix."""
    run_script("sample.py", "--ckpt", checkpoint, "--nfe", *nfes, "--cfg-scale", cfg_scale, "--out", out,
               "--quiet", "--num-images", num_images or DIGITS * args.per_class,
               *(["--fid-ref", fid_ref] if fid_ref else []), *(["--no-ema"] if args.weights == "raw" else []),
               threads=args.threads)
    return os.path.join(out, "euler_nfe")


def measure(checkpoint, nfes, cfg_scale, reference, out, args):
    """{nfe: FD, class accuracy and straightness} of one checkpoint at one guidance scale."""
    prefix = sample(checkpoint, nfes, cfg_scale, out, args, fid_ref=reference)
    measures = {}
    for nfe in nfes:
        with open(f"{prefix}{nfe:03d}.json") as file:
            result = json.load(file)
        measures[nfe] = {"fd": result["fd"], "accuracy": result["class_accuracy"],
                         "straightness": result["straightness"]}
    return measures


def evaluate_run(run, reference, work, args):
    with open(os.path.join(run, "args.json")) as file:
        options = json.load(file)
    if options["data"] != "builtin-digits":
        raise SystemExit(f"error: {run} was trained on {options['data']!r}; this benchmark measures "
                         "the built-in digits")
    checkpoints = sorted(glob.glob(os.path.join(run, "checkpoints", "step_*.pt")))
    if not checkpoints:
        raise SystemExit(f"error: no checkpoints/step_*.pt in {run}")
    result = {"by_nfe": {}, "by_step": {}}
    for scale in args.cfg_scales:
        out = os.path.join(work, f"cfg{scale}")
        measures = measure(checkpoints[-1], args.nfe, scale, reference, out, args)
        result["by_nfe"].update({f"cfg{scale}/nfe{nfe}": value for nfe, value in measures.items()})
    for checkpoint in checkpoints:
        step = int(os.path.basename(checkpoint)[len("step_"):-len(".pt")])  # step_0000200.pt
        measures = measure(checkpoint, args.step_nfe, 1.0, reference, os.path.join(work, f"step{step}"), args)
        result["by_step"][str(step)] = {f"nfe{nfe}": value for nfe, value in measures.items()}
    with open(os.path.join(run, "log.jsonl")) as file:
        records = [json.loads(line) for line in file]
    result["transport_cost"] = float(np.mean([r["transport_cost"] for r in records]))
    result["args"] = options
    return checkpoints[-1], result


def save_plot(results, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    first, scale = args.step_nfe[0], args.cfg_scales[0]
    for name, result in results.items():
        by_nfe = [result["by_nfe"][f"cfg{scale}/nfe{n}"] for n in args.nfe]
        axes[0].plot(args.nfe, [m["fd"] for m in by_nfe], "o-", label=name)
        axes[1].plot(args.nfe, [m["accuracy"] for m in by_nfe], "o-", label=name)
        steps = sorted(result["by_step"], key=int)
        axes[2].plot([int(s) for s in steps], [result["by_step"][s][f"nfe{first}"]["fd"] for s in steps],
                     "o-", label=name)
    titles = [f"digits FD vs NFE (Euler, CFG {scale})", f"class accuracy vs NFE (CFG {scale})",
              f"digits FD vs step (NFE {first})"]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.legend()
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE")
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("training step")
    fig.tight_layout()
    with flow.atomic_file(args.plot) as file:
        fig.savefig(file, dpi=80, format="png")


def save_grid(finals, work, args):
    """One panel per run: rows = digits 0..9, columns = 4 samples at NFE 1, then 4 at NFE 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(1, len(finals), figsize=(3 * len(finals), 4.6))
    for ax, (name, checkpoint) in zip(np.atleast_1d(axes), finals.items()):
        out = os.path.join(work, "grid", name)
        prefix = sample(checkpoint, [1, 4], 1.0, out, args, num_images=4 * DIGITS)
        columns = []
        for nfe in (1, 4):
            with np.load(f"{prefix}{nfe:03d}.npz") as data:
                images = data["arr_0"]  # (40, H, W, 3); image i shows digit i mod 10
            columns.append(images.reshape(4, DIGITS, *images.shape[1:]).swapaxes(0, 1))
        panel = np.concatenate(columns, axis=1).reshape(-1, *images.shape[1:])  # digit-major, 8 per digit
        grid = make_grid(torch.from_numpy(panel).permute(0, 3, 1, 2) / 255, nrow=8, padding=1, pad_value=0.5)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"{name}\nNFE 1 | NFE 4", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    with flow.atomic_file(args.grid) as file:
        fig.savefig(file, dpi=80, format="png")


def train_smoke_run(work, threads):
    """A 4-step digits run with a checkpoint every 2 steps and CFG dropout, for --smoke."""
    out = os.path.join(work, "smoke-run")
    run_script("train_class.py", "--data", "builtin-digits", "--steps", 4, "--global-batch", 16,
               "--warmup-steps", 1, "--log-every", 2, "--ckpt-every", 2, "--sample-every", 4,
               "--cfg-dropout", 0.2, "--quiet", "--out", out, threads=threads)
    return out


def main(args):
    with tempfile.TemporaryDirectory() as work:  # samples and reference statistics are not kept
        if args.smoke:
            args.runs = [train_smoke_run(work, args.threads)]
            outputs = ("quality.json", "quality.png", "samples.png")
            args.json, args.plot, args.grid = (os.path.join(work, name) for name in outputs)
        reference, floor = reference_statistics(work, args.threads)
        print(f"floor: FD of the train split to the held-out split = {floor:.3f}")
        results, finals = {"floor_fd_train_vs_test": floor}, {}
        for run in args.runs:
            name = os.path.basename(os.path.normpath(run))
            out = os.path.join(work, "samples", name)
            finals[name], results[name] = evaluate_run(run, reference, out, args)
            print(name, json.dumps({k: v for k, v in results[name].items() if k != "args"}))
        with flow.atomic_file(args.json, "w") as file:
            json.dump(results, file, indent=1)
        if args.plot:
            save_plot({k: v for k, v in results.items() if k != "floor_fd_train_vs_test"}, args)
        if args.grid:
            save_grid(finals, work, args)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: an option whose default is None says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--runs", nargs="+", help="train_class.py output folders (built-in digits)")
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32],
                        help="Euler NFEs for the final checkpoint")
    parser.add_argument("--step-nfe", type=int, nargs="+", default=[4],
                        help="NFEs measured at every checkpoint")
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0],
                        help="guidance scales for the final checkpoint (the plot shows the first)")
    parser.add_argument("--per-class", type=int, default=50, help="generated samples per digit")
    parser.add_argument("--weights", default="ema", choices=["ema", "raw"],
                        help="EMA weights, or the raw trained weights (shows the EMA's lag)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (OMP_NUM_THREADS)")
    parser.add_argument("--json", help="where to write the results")
    parser.add_argument("--plot", default=None, help="PNG: FD and accuracy vs NFE, FD vs steps")
    parser.add_argument("--grid", default=None, help="PNG: samples of every run at NFE 1 and 4")
    parser.add_argument("--smoke", action="store_true",
                        help="check that the benchmark runs: train a 4-step run, 100 samples, nothing kept")
    args = parser.parse_args()
    if args.smoke:
        args.nfe, args.step_nfe, args.cfg_scales, args.per_class = [1, 2], [1], [1.0, 2.0], 10
    elif not (args.runs and args.json):
        parser.error("--runs and --json are required (or --smoke)")
    main(args)

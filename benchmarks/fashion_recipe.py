"""Which DiT trains best on the 32x8x8 TAEF2 latents of Fashion-MNIST in a fixed CPU budget?

Every configuration below gets the same wall-clock budget of training (--budget-minutes): a short
calibration run of train_class.py measures its steps per second on this machine, then it trains for
as many steps as fit, and the EMA weights are judged by sample.py at Euler NFE 8 in the FD-EffNet
feature space (fid.py), with the linear probe's class accuracy. Configurations vary the patch (2, 4
and 8 give 16, 4 and 1 tokens of 128, 512 and 2048 values), the width and depth, the batch, the
learning rate and mirror images (CondOT gets the winner in the experiment of fashion_experiment.py).
The table goes to --out/recipe.md and recipe.json (docs/fashion_mnist.md, "The CPU recipe").

Run (one thread per process, so that a second process or a neighbour does not oversubscribe the cores;
about 5 min of training + 1.5 min of evaluation per configuration; two processes with disjoint --configs
use both cores of a 2-core machine):
    python fid.py ref --images /usr/share/datasets/fashion-mnist --split test --feature-space effnet \\
        --probe-train /usr/share/datasets/fashion-mnist --probe-max-images 20000 --out runs/fashion_ref.npz
    OMP_NUM_THREADS=1 python benchmarks/fashion_recipe.py --budget-minutes 5 --reference runs/fashion_ref.npz
    python benchmarks/fashion_recipe.py --smoke   # tiny data, random weights, seconds, in a temporary folder
"""
import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import flow
import sample
import train_class

BASE = {"width": 64, "depth": 4, "heads": 4, "patch": 2, "batch": 256, "lr": 1e-3, "ema": 0.999,
        "mirror": False, "prior": "class"}
# name: what differs from BASE. The DiT presets are registered under these names for the run.
CONFIGS = {
    "p2-w64-d4 (tiny)": {},
    "p2-w128-d6": {"width": 128, "depth": 6},
    "p4-w256-d4": {"width": 256, "patch": 4},
    "p4-w512-d3": {"width": 512, "depth": 3, "heads": 8, "patch": 4},
    "p8-w256-d6 (small-p8)": {"width": 256, "depth": 6, "patch": 8},
    "p8-w512-d4": {"width": 512, "depth": 4, "heads": 8, "patch": 8},
    "p8-w1024-d2": {"width": 1024, "depth": 2, "heads": 16, "patch": 8},
}


# Tried on the best architecture. "no ema" judges the raw weights: in a run of ~900 steps the EMA's warmup
# (train_class.ema_decay) keeps its decay below 0.99, so a larger --ema-decay would change nothing.
VARIANTS = {"batch 128": {"batch": 128}, "batch 512": {"batch": 512}, "lr 2e-3": {"lr": 2e-3},
            "no ema": {"ema": 0.0}, "mirror": {"mirror": True}}


def finished_rows(args):
    """The rows of every configuration already judged in --out (this process's and others')."""
    rows = []
    for path in sorted(glob.glob(os.path.join(args.out, "runs", "*", "result.json"))):
        with open(path) as file:
            rows.append(json.load(file))
    return rows


def train_options(args, name, config, steps, out):
    config = {**BASE, **config}
    train_class.MODELS[name] = {key: config[key] for key in ("width", "depth", "heads", "patch")}
    cache = os.path.join(args.out, "latents-mirror" if config["mirror"] else "latents")
    return [str(option) for option in [
        "--data", "fashion-mnist", "--data-root", args.data_root, "--vae", args.vae, "--latent-cache", cache,
        "--max-train-images", args.max_train_images, "--model", name, "--patch-size", config["patch"],
        "--global-batch", config["batch"], "--lr", config["lr"], "--ema-decay", config["ema"],
        "--mirror" if config["mirror"] else "--no-mirror", "--prior", config["prior"],
        "--workers", args.workers,
        "--steps", steps, "--log-every", max(1, min(50, steps // 4)), "--ckpt-every", steps,
        "--sample-every", steps, "--warmup-steps", min(100, steps), "--quiet", "--out", out]]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as file:
        return [json.loads(line) for line in file]


def seconds_per_step(args, name, config):
    """The trainer's own step time (data included): the fastest of six 10-step log intervals of a short
    run, so that a moment of load from another process on the machine does not shrink a budget."""
    config = {**BASE, **config}
    key = "-".join(str(config[k]) for k in ("width", "depth", "heads", "patch", "batch"))  # sets the pace
    out = os.path.join(args.out, "calibration", key)
    steps = 4 if args.smoke else 60
    if not os.path.isfile(os.path.join(out, "checkpoints", f"step_{steps:07d}.pt")):  # not done: again
        shutil.rmtree(out, ignore_errors=True)
        options = train_options(args, name, config, steps, out)
        options[options.index("--log-every") + 1] = "2" if args.smoke else "10"
        train_class.main(train_class.parse_args(options))
    fastest = max(record["images_per_s"] for record in read_log(out)[1:])  # the first holds the start-up
    return config["batch"] / fastest


def run(args, name, config):
    """Train `name` for the budget and judge it; returns its row of the table."""
    folder = os.path.join(args.out, "runs", name.replace(" ", "_").replace("/", "-"))
    result_path = os.path.join(folder, "result.json")
    if os.path.isfile(result_path):
        with open(result_path) as file:
            return json.load(file)
    step_seconds = seconds_per_step(args, name, config)
    steps = max(2, int(args.budget_minutes * 60 / step_seconds))
    print(f"{name}: {step_seconds:.3f} s/step -> {steps} steps", flush=True)
    start = time.perf_counter()
    options = train_class.parse_args(train_options(args, name, config, steps, folder))
    train_class.main(options)
    train_seconds = time.perf_counter() - start
    log = read_log(folder)
    sample.main(sample.parse_args([
        "--ckpt", folder, "--nfe", str(args.nfe), "--num-images", str(args.num_images), "--fid-ref",
        args.reference, "--quiet", "--batch-size", "250", "--out", os.path.join(folder, "eval"),
        "--overwrite"]))
    with open(os.path.join(folder, "eval", f"euler_nfe{args.nfe:03d}.json")) as file:
        judged = json.load(file)
    model = train_class.build_model(options, {"latent_shape": [32, 8, 8], "num_classes": 10})
    row = {"name": name, **BASE, **config, "steps": steps,
           "parameters": sum(p.numel() for p in model.parameters()),
           "s_per_step": sum(options.global_batch / r["images_per_s"] for r in log) / len(log),
           "calibrated_s_per_step": step_seconds,
           "train_minutes": train_seconds / 60, "final_loss": log[-1]["loss"],
           "data_wait_ms": sum(r["data_wait_ms"] for r in log) / len(log),
           "fd_effnet": judged["fd"], "class_accuracy": judged["class_accuracy"], "nfe": args.nfe,
           "num_images": args.num_images}
    with flow.atomic_file(result_path, "w") as file:
        json.dump(row, file, indent=2)
    return row


def table(rows):
    lines = [("| config | parameters | batch | lr | s/step (calibrated) | steps in budget | loss "
              "| FD-EffNet | probe accuracy |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['parameters'] / 1e6:.2f}M | {r['batch']} | {r['lr']:g} | "
                     f"{r['calibrated_s_per_step']:.3f} | {r['steps']} | {r['final_loss']:.3f} | "
                     f"{r['fd_effnet']:.1f} | {100 * r['class_accuracy']:.1f}% |")
    return "\n".join(lines) + "\n"


def main(args):
    names = args.configs or list(CONFIGS)
    configs = {name: CONFIGS[name] for name in names}
    for name, config in configs.items():  # every calibration first, back to back, before any long run
        seconds_per_step(args, name, config)
    for name, config in configs.items():
        run(args, name, config)
    if args.variants:  # around the best of every architecture judged so far (also by other processes)
        architectures = [r for r in finished_rows(args) if r["name"] in CONFIGS]
        best = min(architectures, key=lambda r: r["fd_effnet"])["name"]
        for kind in args.variants:
            run(args, f"{best} {kind}", {**CONFIGS[best], **VARIANTS[kind]})
    rows = sorted(finished_rows(args), key=lambda r: (r["name"] not in CONFIGS, r["fd_effnet"]))
    with flow.atomic_file(os.path.join(args.out, "recipe.json"), "w") as file:
        json.dump(rows, file, indent=2)
    with flow.atomic_file(os.path.join(args.out, "recipe.md"), "w") as file:
        file.write(table(rows))
    print(table(rows))
    print(f"wrote {args.out}/recipe.md and {args.out}/recipe.json")


def smoke(args):
    """Two configurations for a few steps on tiny random data and weights, in a temporary folder."""
    from fashion_experiment import write_smoke_inputs

    import fid

    folder = tempfile.mkdtemp(prefix="fashion_recipe_smoke_")
    args.data_root, args.vae = write_smoke_inputs(folder)
    args.reference = os.path.join(folder, "reference.npz")
    fid.main(fid.parse_args(["ref", "--images", args.data_root, "--split", "test",
                             "--feature-space", "effnet",
                             "--probe-train", args.data_root, "--probe-max-images", "100",
                             "--out", args.reference]))
    args.out, args.max_train_images, args.num_images, args.budget_minutes = folder, 64, 20, 0.02
    args.configs, args.variants = ["p2-w64-d4 (tiny)", "p8-w256-d6 (small-p8)"], ["mirror"]
    main(args)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist",
                        help="Fashion-MNIST idx files")
    parser.add_argument("--vae", default=os.path.join(ROOT, "..", "shared", "weights", "taef2"),
                        help="TAEF2 folder (taef2_encoder.pth, taef2_decoder.pth)")
    parser.add_argument("--reference", default=None, help="fid.py ref file (effnet, with a probe); required")
    parser.add_argument("--out", default="runs/fashion-recipe", help="folder for caches, runs and the table")
    parser.add_argument("--max-train-images", type=int, default=10000, help="training images (default 10000)")
    parser.add_argument("--budget-minutes", type=float, default=5.0,
                        help="training wall-clock per configuration (default 5)")
    parser.add_argument("--num-images", type=int, default=1000, help="generated images judged (default 1000)")
    parser.add_argument("--nfe", type=int, default=8, help="Euler NFE of the judgement (default 8)")
    parser.add_argument("--workers", type=int, default=1, help="train_class.py --workers (default 1)")
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                        help="architectures to run (default: all)")
    parser.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS),
                        help="then these variants of the best architecture (no names: all)")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps on tiny fake data, in a temp folder")
    args = parser.parse_args(argv)
    if args.variants == []:
        args.variants = list(VARIANTS)
    if not args.smoke and not (args.reference and os.path.isfile(args.reference)):
        parser.error("--reference must name a fid.py ref file (effnet feature space, with --probe-train)")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    smoke(arguments) if arguments.smoke else main(arguments)

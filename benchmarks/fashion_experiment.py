"""The Fashion-MNIST experiment on real pretrained parts (docs/fashion_mnist.md), end to end.

Fashion-MNIST (28 -> 64 px, RGB) is encoded once into the FLUX.2 latent space by TAEF2
(32x8x8 latents, normalised per channel), every configuration below is trained by train_class.py
with one model, schedule and budget, and every checkpoint is judged by sample.py in the
EfficientNet-Lite0 feature space of fid.py (FD-EffNet, never "FID") against the Fashion-MNIST test
set, with a linear probe trained on real training images for the class accuracy. Stages:

    prepare  the latent cache, the reference statistics + probe, the real-vs-real floor
    train    every configuration once per --seeds seed, --parallel runs at once (on a GPU they share it;
             on a CPU each gets a share of the cores); with --budget-minutes, the steps are planned so
             that training and evaluation end inside the budget (see plan)
    eval     FD-EffNet and class accuracy at the NFEs the tables compare (every seed), and for the first
             seed FD at NFE 8 against training steps; for the prior x coupling grid also NFE 32,
             midpoint and sample grids; CFG scales, the autoencoder floor, decoded class means
    report   the tables (mean and spread over the seeds; markdown + JSON) and plots: regenerates the docs

Run (2 CPU cores: the command of docs/fashion_mnist.md, about 65 minutes; one GPU: 15 minutes):
    python benchmarks/fashion_experiment.py --device cpu --max-train-images 10000 --seeds 0 1 2 \
        --configs condot batchot class class-ot class-spread --num-images 1000 --budget-minutes 62 \
        --parallel 2 --out runs/fashion-experiment --docs docs/fashion-recipe
    python benchmarks/fashion_experiment.py --seeds 0 1 2 --budget-minutes 15     # one GPU
    python benchmarks/fashion_experiment.py --smoke       # a tiny budget on a CPU, under a temporary folder
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import flow

# name: the options that differ from the common ones. The first four are the prior x coupling grid.
CONFIGS = {
    "condot": ["--prior", "gaussian"],
    "batchot": ["--prior", "gaussian", "--coupling", "ot"],
    "class": ["--prior", "class"],
    "class-ot": ["--prior", "class", "--coupling", "ot"],
    "class-sigma0.25": ["--prior", "class", "--prior-sigma", "0.25"],
    "class-sigma1": ["--prior", "class", "--prior-sigma", "1.0"],
    # sigma_c = 1.0 x the class's own std per dimension
    "class-spread": ["--prior", "class", "--prior-spread", "class", "--prior-sigma", "1.0"],
    "condot-logitnormal": ["--prior", "gaussian", "--time-schedule", "logit-normal"],
    "class-logitnormal": ["--prior", "class", "--time-schedule", "logit-normal"],
    "class-cfg": ["--prior", "class", "--cfg-dropout", "0.1"],
}
# The prior x coupling grid: sample grids, midpoint, all Euler NFEs, and FD at NFE 4 at every checkpoint.
GRID_CONFIGS = ("condot", "batchot", "class", "class-ot")
EULER_NFE, MIDPOINT_NFE, CURVE_NFE, GRID_NFE = (1, 2, 4, 8, 16, 32), (2, 4, 8), (8,), (1, 2, 4, 16)
SEED_NFE = (2, 8)  # the grid's further seeds: the spread where the claims are read
EXTRA_NFE = (1, 2, 8)  # the sigma, spread, schedule and CFG variants, every seed
CFG_SCALES, CFG_NFE = (1.5, 2.5), EXTRA_NFE
CALIBRATION_IMAGES = 100  # generated images of the planner's evaluation timing


def python(script, *options):
    return [sys.executable, os.path.join(ROOT, script), *map(str, options)]


def thread_environment(parallel):
    """One share of the cores per process: oversubscribed OpenMP threads slow a CPU run tenfold."""
    threads = str(max(1, os.cpu_count() // parallel))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def run_all(commands, parallel):
    """Run (command, log file) pairs, at most `parallel` at once, with a line as each starts and ends.
    Returns the log files of the commands that failed."""
    waiting, running, failed, total = list(commands), [], [], len(commands)
    environment = thread_environment(parallel)
    while waiting or running:
        while waiting and len(running) < parallel:
            command, log = waiting.pop(0)
            os.makedirs(os.path.dirname(log), exist_ok=True)
            with open(log, "w") as file:
                running.append((subprocess.Popen(command, stdout=file, stderr=subprocess.STDOUT, cwd=ROOT,
                                                 env=environment), command, log, time.perf_counter()))
            print(f"[{total - len(waiting)}/{total}] started, log {log}", flush=True)
        time.sleep(1)
        for entry in list(running):
            process, command, log, start = entry
            if process.poll() is not None:
                running.remove(entry)
                if process.returncode:
                    failed.append(log)
                    print(f"failed ({process.returncode}): {' '.join(command)} (log {log})", flush=True)
                else:
                    print(f"done in {time.perf_counter() - start:.0f} s: {log}", flush=True)
    return failed


def run_names(args):
    """Every trained run: each configuration once per seed."""
    return [f"{name}-seed{seed}" for name in CONFIGS for seed in args.seeds]


def config_of(run):
    return run.rsplit("-seed", 1)[0]


def train_options(args, run, steps=None):
    steps = steps or args.steps
    budget = ["--steps", steps, "--ckpt-every", -(-steps // 4), "--sample-every", steps,  # 3 before the last
              "--log-every", max(1, steps // 40)]
    model = ["--model", args.model] if args.model else []  # default: train_class.py's Fashion-MNIST recipe
    return [str(option) for option in [
        "--data", "fashion-mnist", "--data-root", args.data_root, "--vae", args.vae,
        "--latent-cache", os.path.join(args.out, "latents"), *model, "--seed", run.rsplit("-seed", 1)[1],
        "--global-batch", args.batch, "--lr", args.lr, "--warmup-steps", min(100, steps // 10 + 1),
        "--ema-decay", 0.999, "--max-train-images", args.max_train_images or 60000, "--workers", 1, *budget,
        "--quiet", "--out", os.path.join(args.out, "runs", run), *CONFIGS[config_of(run)]]]


# ----------------------------------------------------------------------------------------------
# Stages.


def prepare(args):
    """Latent cache (encoding throughput measured), reference + probe, real-vs-real floor."""
    import torch

    import train_class

    start = time.perf_counter()
    run = f"{next(iter(CONFIGS))}-seed{args.seeds[0]}"
    options = train_class.parse_args([o for o in train_options(args, run) if o != "--quiet"])  # encode bar
    device = torch.device(args.device)
    print(f"prepare: latent cache of {args.max_train_images or 60000} images in {args.out}/latents",
          flush=True)
    x, _, _, normalisation = train_class.load_data(options, 0, 1, device)
    seconds = time.perf_counter() - start
    summary = {"latent_examples": len(x), "latent_shape": list(x.shape[1:]), "cache_seconds": seconds,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", **normalisation}
    reference = os.path.join(args.out, "reference.npz")
    if not os.path.exists(reference):
        command = python("fid.py", "ref", "--images", args.data_root, "--split", "test",
                         "--feature-space", "effnet", "--probe-train", args.data_root,
                         "--probe-max-images", args.probe_images, "--out", reference,
                         "--max-images", args.reference_images)
        subprocess.run(command, check=True, cwd=ROOT)
    # Real training images (not the reference's): the real-vs-real and the autoencoder floors.
    images, labels = flow.load_fashion_mnist(args.data_root, "train")
    picked = np.random.default_rng(0).choice(len(images), args.num_images, replace=False)
    real = flow.fashion_to_rgb(images[picked]).permute(0, 2, 3, 1).numpy()
    with flow.atomic_file(os.path.join(args.out, "real_train.npz")) as file:
        np.savez(file, real, labels[picked])
    subprocess.run(python("fid.py", "calc", "--images", os.path.join(args.out, "real_train.npz"),
                          "--ref", reference, "--json", os.path.join(args.out, "floor_real.json")),
                   check=True, cwd=ROOT)
    save_json(summary, os.path.join(args.out, "prepare.json"))


def train(args):
    if not os.path.isfile(os.path.join(args.out, "latents", "info.json")):
        raise SystemExit(f"error: no latent cache in {args.out}/latents: run the prepare stage first")
    steps = plan(args) if args.budget_minutes else args.steps
    commands = [(python("train_class.py", *train_options(args, run, steps)),
                 os.path.join(args.out, "logs", f"{run}.log"))
                for run in run_names(args)]
    return run_all(commands, args.parallel)


def plan(args):
    """Steps per run such that training and evaluation end inside --budget-minutes: a calibration run
    measures seconds per training step, a calibration evaluation the seconds per judged image; the
    evaluation is planned first (it is fixed by --num-images and the NFEs), training gets the rest.
    On a CPU, --parallel processes of one thread each (run_all) share the cores; on a GPU, processes that
    share it are assumed to gain nothing from it (a plan that errs on the safe side)."""
    folder = os.path.join(args.out, "calibration")
    if not os.path.isfile(os.path.join(folder, "plan.json")):
        run = f"{next(iter(CONFIGS))}-seed{args.seeds[0]}"
        options = train_options(args, run, steps=30)
        options[options.index("--out") + 1] = os.path.join(folder, "run")
        options[options.index("--log-every") + 1] = "10"
        environment = thread_environment(args.parallel)  # the threads each run will have
        subprocess.run(python("train_class.py", *options), check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                       env=environment)
        with open(os.path.join(folder, "run", "log.jsonl")) as file:
            last = [json.loads(line) for line in file][-1]
        step_seconds = args.batch / last["images_per_s"]
        walls = []  # one NFE, then the same twice: the difference is one judged setting, the rest start-up
        for nfes in ((1,), (1, 1)):
            start = time.perf_counter()
            command = sample_command(args, os.path.join(folder, "run"), os.path.join(folder, "eval"), nfes,
                                     num_images=CALIBRATION_IMAGES)
            subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=environment)
            walls.append(time.perf_counter() - start)
        save_json({"step_seconds": step_seconds, "start_seconds": max(0.0, 2 * walls[0] - walls[1]),
                   "image_seconds": max(0.0, walls[1] - walls[0]) / CALIBRATION_IMAGES},
                  os.path.join(folder, "plan.json"))
    with open(os.path.join(folder, "plan.json")) as file:
        measured = json.load(file)
    evaluations = evaluation_plan(args)
    judged = sum(len(nfes) * count for *_, nfes, _, count in evaluations) * args.num_images
    commands = sum(count for *_, count in evaluations)
    at_once = min(args.parallel, os.cpu_count()) if args.device == "cpu" else 1
    eval_seconds = (judged * measured["image_seconds"] + commands * measured["start_seconds"]) / at_once
    train_seconds = 60 * args.budget_minutes - eval_seconds
    steps = int(train_seconds * at_once / (len(run_names(args)) * measured["step_seconds"]))
    print(f"plan for {args.budget_minutes:g} min: evaluation {eval_seconds / 60:.1f} min "
          f"({judged} judged images), "
          f"training {len(run_names(args))} runs x {steps} steps ({measured['step_seconds']:.3f} s/step)",
          flush=True)
    if steps < 10:
        raise SystemExit(f"error: --budget-minutes {args.budget_minutes:g} leaves {max(steps, 0)} training "
                         f"steps per run after {eval_seconds / 60:.1f} min of evaluation: give more minutes, "
                         "fewer --configs, --seeds or --num-images")
    return steps


def sample_command(args, checkpoint, out, nfe, *extra, num_images=None):
    return python("sample.py", "--ckpt", checkpoint, "--fid-ref", os.path.join(args.out, "reference.npz"),
                  "--num-images", num_images or args.num_images, "--batch-size", 500, "--nfe", *nfe,
                  "--out", out, "--overwrite", "--quiet", *extra)


def evaluation_plan(args):
    """(run, checkpoints, folder, NFEs, extra sample.py options, count) of every evaluation. Every run:
    Euler at the NFEs the tables compare; the first seed of every configuration also FD against training
    steps (the 3 checkpoints before the last: 'intermediate', count 3), and of the prior x coupling grid
    NFE 32 and midpoint."""
    plan = []
    for run in run_names(args):
        name, first = config_of(run), run.endswith(f"-seed{args.seeds[0]}")
        grid = name in GRID_CONFIGS
        euler = EULER_NFE if grid and first else SEED_NFE if grid else EXTRA_NFE
        plan.append((run, "final", "euler", euler, []))
        if first:
            plan.append((run, "intermediate", None, CURVE_NFE, []))
        if grid and first:
            plan.append((run, "final", "midpoint", MIDPOINT_NFE, ["--solver", "midpoint"]))
        if name == "class-ot" and first:  # the autoencoder floor: any checkpoint of this latent space will do
            real = os.path.join(args.out, "real_train.npz")
            plan.append((run, "final", "floor", (1,), ["--vae-floor", real]))
        if name == "class-cfg":
            plan += [(run, "final", f"cfg{scale}", CFG_NFE, ["--cfg-scale", scale]) for scale in CFG_SCALES]
    return [(run, which, folder, nfes, extra, 3 if which == "intermediate" else 1)
            for run, which, folder, nfes, extra in plan]


def evaluation_commands(args):
    commands, logs = [], os.path.join(args.out, "logs")
    for run, which, folder, nfes, extra, _ in evaluation_plan(args):
        checkpoints = sorted(glob.glob(os.path.join(args.out, "runs", run, "checkpoints", "step_*.pt")))
        if not checkpoints:
            continue
        for checkpoint in checkpoints[:-1] if which == "intermediate" else checkpoints[-1:]:
            name = folder or os.path.basename(checkpoint)[:-3]
            out = os.path.join(args.out, "runs", run, "eval", name)
            commands.append((sample_command(args, checkpoint, out, nfes, *extra),
                             os.path.join(logs, f"{run}-{name}.log")))
        if folder == "midpoint":  # the first seed of the grid: sample grids for the docs
            grid = python("sample.py", "--ckpt", checkpoints[-1], "--num-images", 80, "--nfe", *GRID_NFE,
                          "--out", os.path.join(args.out, "runs", run, "eval", "grids"), "--overwrite",
                          "--quiet")
            commands.append((grid, os.path.join(logs, f"{run}-grids.log")))
    return commands


def evaluate(args):
    failed = run_all(evaluation_commands(args), args.parallel)
    save_class_means(args)
    return failed


def save_class_means(args):
    """Decoded class means m(c) of the class prior: what every class's flow starts from."""
    import torch
    from torchvision.utils import save_image

    import train_class

    run = f"class-seed{args.seeds[0]}"
    checkpoints = sorted(glob.glob(os.path.join(args.out, "runs", run, "checkpoints", "step_*.pt")))
    if checkpoints:
        sampler = train_class.load_for_sampling(checkpoints[-1], args.device)
        with torch.no_grad():
            images = sampler.decode(sampler.prior.means)
        with flow.atomic_file(os.path.join(args.out, "class_means.png")) as file:
            save_image((images + 1) / 2, file, nrow=10, format="png")


def save_json(obj, path):
    with flow.atomic_file(path, "w") as file:
        json.dump(obj, file, indent=2)


def run_stages(args, stages):
    """Run args.stages in order, each a function of args returning the commands that failed (this
    experiment's and text_fashion_experiment.py's); one line at the end if any failed."""
    os.makedirs(args.out, exist_ok=True)
    save_json(vars(args), os.path.join(args.out, "experiment_args.json"))
    failed = []
    for stage in args.stages:
        start = time.perf_counter()
        failed += stages[stage](args)
        print(f"stage {stage}: {time.perf_counter() - start:.0f} s", flush=True)
    if failed:
        raise SystemExit(f"error: {len(failed)} commands failed, see {failed}")


def report(args):
    import fashion_report

    fashion_report.main(fashion_report.parse_args(["--out", args.out, "--docs", args.docs]))
    return []


def main(args):
    run_stages(args, {"prepare": lambda a: prepare(a) or [], "train": train, "eval": evaluate,
                      "report": report})


def cuda_available():
    import torch

    return torch.cuda.is_available()


def write_smoke_inputs(folder):
    """Tiny Fashion-MNIST idx files and random TAEF2 weights, so that --smoke needs nothing else."""
    import gzip

    import torch

    data, vae = os.path.join(folder, "fashion"), os.path.join(folder, "taef2")
    os.makedirs(data), os.makedirs(vae)
    rng = np.random.default_rng(0)
    for split, count in (("train", 120), ("test", 60)):
        images, labels = flow.FASHION_FILES[split]
        header = lambda dims: bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
        with gzip.open(os.path.join(data, images), "wb") as file:
            file.write(header((count, 28, 28))
                       + rng.integers(0, 256, (count, 28, 28), dtype=np.uint8).tobytes())
        with gzip.open(os.path.join(data, labels), "wb") as file:
            file.write(header((count,)) + (np.arange(count) % 10).astype(np.uint8).tobytes())
    torch.manual_seed(0)
    for build, name in zip((flow.taef2_encoder, flow.taef2_decoder), flow.TAEF2_FILES):
        torch.save(build().half().state_dict(), os.path.join(vae, name))
    return data, vae


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: an option whose default is None says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("stages", nargs="*",
                        help="what to run, in order: prepare, train, eval, report (default: all)")
    parser.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist",
                        help="Fashion-MNIST idx files")
    parser.add_argument("--vae", default=os.path.join(ROOT, "..", "shared", "weights", "taef2"),
                        help="TAEF2 folder")
    parser.add_argument("--out", default="runs/fashion-experiment", help="experiment folder")
    parser.add_argument("--docs", default=None,
                        help="where the report writes tables and figures (default OUT/report)")
    parser.add_argument("--device", default="cuda" if cuda_available() else "cpu",
                        help="device of the prepare stage (the scripts pick their own); default: CUDA if "
                             "present")
    parser.add_argument("--model", default=None,
                        help="train_class.py --model (default: its Fashion-MNIST recipe)")
    parser.add_argument("--steps", type=int, default=4000,
                        help="optimizer steps of every run (without --budget-minutes)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="plan the steps so that training and evaluation end inside this many minutes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds of every configuration")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--max-train-images", type=int, default=None,
                        help="first N training images (default: all 60k)")
    parser.add_argument("--num-images", type=int, default=2000,
                        help="generated (and real floor) images per FD")
    parser.add_argument("--probe-images", type=int, default=20000,
                        help="real training images for the linear probe")
    parser.add_argument("--reference-images", type=int, default=10000,
                        help="Fashion-MNIST test images of the reference")
    parser.add_argument("--parallel", type=int, default=None,
                        help="processes at once (default: every run on a GPU, which they share; 1 on a CPU)")
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                        help="train and evaluate only these configurations (default: all)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny budget on the CPU under a temporary folder")
    args = parser.parse_args(argv)
    args.stages = args.stages or ["prepare", "train", "eval", "report"]
    if set(args.stages) - {"prepare", "train", "eval", "report"}:
        parser.error(f"unknown stages {args.stages}: choose from prepare, train, eval, report")
    if args.smoke:
        args.out = tempfile.mkdtemp(prefix="fashion_smoke_")
        args.device, args.model, args.steps, args.batch, args.seeds = "cpu", "tiny", 4, 16, [0, 1]
        args.max_train_images, args.num_images, args.probe_images, args.parallel = 64, 20, 100, 2
        args.reference_images = 20
        for name in set(CONFIGS) - {"condot", "class-ot"}:  # enough to run every stage
            CONFIGS.pop(name)
        global EULER_NFE, MIDPOINT_NFE, CFG_NFE
        EULER_NFE, MIDPOINT_NFE, CFG_NFE = (1, 2), (2,), (1,)
        args.data_root, args.vae = write_smoke_inputs(args.out)
    for name in set(CONFIGS) - set(args.configs or CONFIGS):
        CONFIGS.pop(name)
    args.docs = args.docs or os.path.join(args.out, "report")
    args.parallel = args.parallel or (len(CONFIGS) * len(args.seeds) if args.device == "cuda" else 1)
    if not os.path.isdir(args.data_root):  # checked after --smoke has written its own
        parser.error(f"--data-root {args.data_root} does not exist (apt-get install dataset-fashion-mnist)")
    return args


if __name__ == "__main__":
    main(parse_args())

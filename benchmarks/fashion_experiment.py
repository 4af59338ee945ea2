"""The Fashion-MNIST experiment on real pretrained parts (docs/fashion_mnist.md), end to end.

Fashion-MNIST (28 -> 64 px, RGB) is encoded once into the FLUX.2 latent space by TAEF2
(32x8x8 latents, normalised per channel), every configuration below is trained by train_class.py
with one model, schedule and budget, and every checkpoint is judged by sample.py in the
EfficientNet-Lite0 feature space of fid.py (FD-EffNet, never "FID") against the Fashion-MNIST test
set, with a linear probe trained on real training images for the class accuracy. Stages:

    prepare  the latent cache, the reference statistics + probe, the real-vs-real floor
    train    all configurations at once (they share one GPU; --parallel caps how many)
    eval     FD-EffNet, class accuracy, transport cost and straightness at every NFE (Euler and
             midpoint), FD at NFE 4 and 16 against training steps, CFG scales, the autoencoder
             floor, sample grids and decoded class means
    report   the tables (markdown + JSON) and plots from the run folders: regenerates the docs

Run (one GPU, about 8 minutes on an H200; the stages can also run one at a time):
    python benchmarks/fashion_experiment.py --data-root /usr/share/datasets/fashion-mnist \\
        --vae ../shared/weights/taef2 --out runs/fashion prepare train eval report
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
EULER_NFE, MIDPOINT_NFE, CURVE_NFE, GRID_NFE = (1, 2, 4, 8, 16, 32), (2, 4, 8, 16), (4,), (1, 2, 4, 16)
EXTRA_NFE = (1, 2, 4, 16)  # the sigma, schedule and CFG variants
CFG_SCALES, CFG_NFE = (1.5, 2.5), EXTRA_NFE


def python(script, *options):
    return [sys.executable, os.path.join(ROOT, script), *map(str, options)]


def run_all(commands, parallel, deadline=None):
    """Run (command, log file) pairs, at most `parallel` at once; past `deadline` (time.time()) the
    ones still running are stopped. Returns the commands that failed or were stopped."""
    waiting, running, failed = list(commands), [], []
    threads = str(max(1, os.cpu_count() // parallel))  # no oversubscription of the cores
    environment = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    while waiting or running:
        while waiting and len(running) < parallel:
            command, log = waiting.pop(0)
            os.makedirs(os.path.dirname(log), exist_ok=True)
            with open(log, "w") as file:
                running.append((subprocess.Popen(command, stdout=file, stderr=subprocess.STDOUT, cwd=ROOT,
                                                 env=environment),
                                command, log))
        time.sleep(1)
        for entry in list(running):
            process, command, log = entry
            if deadline and time.time() > deadline and process.poll() is None:
                process.terminate()
                process.wait()
                print(f"stopped at the deadline: {log}", flush=True)
            if process.poll() is not None:
                running.remove(entry)
                if process.returncode:
                    failed.append(log)
                    print(f"failed ({process.returncode}): {' '.join(command)} (log {log})", flush=True)
    return failed


def train_options(args, name):
    budget = ["--steps", args.steps, "--ckpt-every", args.steps // 4, "--sample-every", args.steps,
              "--log-every", max(1, args.steps // 40)]
    return [str(option) for option in [
        "--data", "fashion-mnist", "--data-root", args.data_root, "--vae", args.vae,
        "--latent-cache", os.path.join(args.out, "latents"), "--model", args.model,
        "--global-batch", args.batch, "--lr", args.lr, "--warmup-steps", min(500, args.steps // 10 + 1),
        "--ema-decay", 0.999, "--max-train-images", args.max_train_images or 60000, *budget,
        "--quiet", "--out", os.path.join(args.out, "runs", name), *CONFIGS[name]]]


# ----------------------------------------------------------------------------------------------
# Stages.


def prepare(args):
    """Latent cache (encoding throughput measured), reference + probe, real-vs-real floor."""
    import torch

    import flow
    import train_class

    start = time.perf_counter()
    options = train_class.parse_args(train_options(args, "condot"))
    device = torch.device(args.device)
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
    np.savez(os.path.join(args.out, "real_train.npz"), real, labels[picked])
    subprocess.run(python("fid.py", "calc", "--images", os.path.join(args.out, "real_train.npz"),
                          "--ref", reference, "--json", os.path.join(args.out, "floor_real.json")),
                   check=True, cwd=ROOT)
    save_json(summary, os.path.join(args.out, "prepare.json"))


def train(args):
    if not os.path.isfile(os.path.join(args.out, "latents", "info.json")):
        raise SystemExit(f"error: no latent cache in {args.out}/latents: run the prepare stage first")
    commands = [(python("train_class.py", *train_options(args, name)),
                 os.path.join(args.out, "logs", f"{name}.log"))
                for name in CONFIGS]
    deadline = time.time() + 60 * args.train_minutes if args.train_minutes else None
    return run_all(commands, args.parallel, deadline)


def sample_command(args, checkpoint, out, nfe, *extra):
    return python("sample.py", "--ckpt", checkpoint, "--fid-ref", os.path.join(args.out, "reference.npz"),
                  "--num-images", args.num_images, "--batch-size", 500, "--nfe", *nfe, "--out", out,
                  "--overwrite", "--quiet", *extra)


def evaluation_commands(args):
    commands = []
    for name in CONFIGS:
        run = os.path.join(args.out, "runs", name)
        checkpoints = sorted(glob.glob(os.path.join(run, "checkpoints", "step_*.pt")))
        if not checkpoints:
            continue
        final, logs = checkpoints[-1], os.path.join(args.out, "logs")
        euler_nfe = EULER_NFE if name in GRID_CONFIGS else EXTRA_NFE
        commands.append((sample_command(args, final, os.path.join(run, "eval", "euler"), euler_nfe),
                         os.path.join(logs, f"{name}-euler.log")))
        if name in GRID_CONFIGS:
            commands.append((sample_command(args, final, os.path.join(run, "eval", "midpoint"),
                                            MIDPOINT_NFE, "--solver", "midpoint"),
                             os.path.join(logs, f"{name}-midpoint.log")))
        if name == "class-ot":  # the autoencoder floor: any checkpoint of this latent space will do
            commands.append((sample_command(args, final, os.path.join(run, "eval", "floor"), (1,),
                                            "--vae-floor", os.path.join(args.out, "real_train.npz")),
                             os.path.join(logs, "floor-autoencoder.log")))
        if name in GRID_CONFIGS:
            for checkpoint in checkpoints[:-1]:
                step = os.path.basename(checkpoint)[:-3]
                commands.append((sample_command(args, checkpoint, os.path.join(run, "eval", step), CURVE_NFE),
                                 os.path.join(logs, f"{name}-{step}.log")))
        if name in GRID_CONFIGS:
            grid = python("sample.py", "--ckpt", final, "--num-images", 80, "--nfe", *GRID_NFE, "--out",
                          os.path.join(run, "eval", "grids"), "--overwrite", "--quiet")
            commands.append((grid, os.path.join(logs, f"{name}-grids.log")))
        if name == "class-cfg":
            for scale in CFG_SCALES:
                commands.append((sample_command(args, final, os.path.join(run, "eval", f"cfg{scale}"),
                                                CFG_NFE, "--cfg-scale", scale),
                                 os.path.join(logs, f"{name}-cfg{scale}.log")))
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

    checkpoints = sorted(glob.glob(os.path.join(args.out, "runs", "class", "checkpoints", "step_*.pt")))
    if checkpoints:
        sampler = train_class.load_for_sampling(checkpoints[-1], args.device)
        with torch.no_grad():
            images = sampler.decode(sampler.prior.means)
        save_image((images + 1) / 2, os.path.join(args.out, "class_means.png"), nrow=10)


def save_json(obj, path):
    with open(path, "w") as file:
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


def write_smoke_inputs(folder):
    """Tiny Fashion-MNIST idx files and random TAEF2 weights, so that --smoke needs nothing else."""
    import gzip

    import torch

    import flow

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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("stages", nargs="*",
                        help="what to run, in order: prepare, train, eval, report (default: all)")
    parser.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist",
                        help="Fashion-MNIST idx files")
    parser.add_argument("--vae", default=os.path.join(ROOT, "..", "shared", "weights", "taef2"),
                        help="TAEF2 folder")
    parser.add_argument("--out", default="runs/fashion", help="experiment folder")
    parser.add_argument("--docs", default=None,
                        help="where the report writes tables and figures (default OUT/report)")
    parser.add_argument("--device", default="cuda",
                        help="device of the prepare stage (the scripts pick their own)")
    parser.add_argument("--model", default="small", help="train_class.py --model")
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps of every configuration")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate")
    parser.add_argument("--max-train-images", type=int, default=None,
                        help="first N training images (all 60k)")
    parser.add_argument("--num-images", type=int, default=5000,
                        help="generated (and real floor) images per FD")
    parser.add_argument("--probe-images", type=int, default=20000,
                        help="real training images for the linear probe")
    parser.add_argument("--reference-images", type=int, default=10000,
                        help="Fashion-MNIST test images of the reference")
    parser.add_argument("--parallel", type=int, default=len(CONFIGS),
                        help="processes at once (they share the GPU)")
    parser.add_argument("--train-minutes", type=float, default=None,
                        help="stop training after this wall time")
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
        args.device, args.model, args.steps, args.batch = "cpu", "tiny", 4, 16
        args.max_train_images, args.num_images, args.probe_images, args.parallel = 64, 20, 100, 2
        args.reference_images = 20
        for name in set(CONFIGS) - {"condot", "class-ot", "class-cfg"}:  # enough to run every stage
            CONFIGS.pop(name)
        global EULER_NFE, MIDPOINT_NFE, CFG_NFE
        EULER_NFE, MIDPOINT_NFE, CFG_NFE = (1, 2), (2,), (1,)
        args.data_root, args.vae = write_smoke_inputs(args.out)
    for name in set(CONFIGS) - set(args.configs or CONFIGS):
        CONFIGS.pop(name)
    args.docs = args.docs or os.path.join(args.out, "report")
    if not os.path.isdir(args.data_root):  # checked after --smoke has written its own
        parser.error(f"--data-root {args.data_root} does not exist (apt-get install dataset-fashion-mnist)")
    return args


if __name__ == "__main__":
    main(parse_args())

"""Few-step sampling from a train_class.py or train_text.py checkpoint, with the measures that matter.

For every NFE budget (--nfe 1 2 4 8 16) it integrates dx/dt = v_theta(x, t, c) from the prior
sample x0 (t = 0) to the data (t = 1) with fixed-step Euler or midpoint (flow.solve), and writes

    OUT/{solver}_nfe{NFE:03d}.png    a grid of the first --grid images
    OUT/{solver}_nfe{NFE:03d}.npz    arr_0 = uint8 NHWC RGB images, arr_1 = labels (class) or
                                     the line of --prompts each image came from (text, from 0):
                                     the layout the ADM evaluator reads
    OUT/{solver}_nfe{NFE:03d}.json   measured NFE, seconds per image, transport cost
                                     E||x1 - x0||^2 and straightness E int ||v - (x1 - x0)||^2 dt
                                     of the sampled trajectories (and FD/KID with --fid-ref)
    OUT/{solver}_nfe{NFE:03d}_captions.txt   text checkpoints: the caption of every image, in order
    OUT/args.json
(OUT defaults to RUN/samples/step_N beside the checkpoint; existing results need --overwrite.)

Image i uses seed --first-seed + i for its noise, and its label (class i mod the classes) or
caption (line i mod the prompt lines) also follows from i alone, so the same seeds give the same
images whatever the batch size or the number of processes (as in EDM).

Run:
    python sample.py --ckpt runs/train_class --nfe 1 2 4 8 16 --num-images 1000   # -> RUN/samples/step_N/
    python sample.py --ckpt runs/train_class --nfe 2 4 8 --solver midpoint --cfg-scale 1.5 --classes 3 7
    python sample.py --ckpt runs/train_text --prompts prompts.txt --nfe 4 16 --num-images 64
    python sample.py --ckpt CKPT --num-images 50000 --fid-ref REF.npz --kid  # FD/KID, no images written
    python sample.py --ckpt CKPT --num-images 10000 --fid-ref REF.npz --vae-floor REAL.npz  # + VAE floor
    torchrun --standalone --nproc_per_node=8 sample.py --ckpt CKPT --num-images 50000 --fid-ref REF.npz
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --master_addr=HOST --master_port=29500 sample.py ...
--ckpt takes a checkpoint file or a run folder (its latest checkpoints/step_*.pt). EMA weights are
used unless --no-ema. Make REF.npz with `python fid.py ref` (see docs/metrics.md for the protocol).
"""
import argparse
import importlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import flow

TRAINERS = {"class": "train_class", "text": "train_text"}  # ckpt["kind"] -> module with load_for_sampling


# ----------------------------------------------------------------------------------------------
# Checkpoint and conditions.


def load_sampler(path, device, use_ema, vae=None, text_encoder=None):
    """Ask the trainer that wrote the checkpoint to rebuild it: its load_for_sampling returns the
    flow.Sampler that is all this script uses (see flow.Sampler)."""
    checkpoint = flow.load_checkpoint(path)
    kind = checkpoint.get("kind") if isinstance(checkpoint, dict) else None
    if kind not in TRAINERS:
        raise SystemExit(f"error: {path} has kind {kind!r}, expected one of {sorted(TRAINERS)}")
    if text_encoder and kind != "text":
        raise SystemExit(f"error: --text-encoder is for text checkpoints; {path} is class-conditional")
    trainer = importlib.import_module(TRAINERS[kind])
    extra = {"text_encoder": text_encoder} if text_encoder else {}
    return kind, trainer.load_for_sampling(path, device, use_ema=use_ema, vae=vae, **extra)


def refuse_too_many_images(sampler, args, device):
    """One line, before any image is made, if the images cannot fit in memory: they are held as uint8 until
    written, twice over while they are gathered and concatenated."""
    height, width = sampler.decode(torch.zeros(1, *sampler.latent_shape, device=device)).shape[2:]
    need, available = 2 * args.num_images * 3 * height * width, available_memory()
    if available is not None and need > available:
        raise SystemExit(f"error: --num-images {args.num_images} needs about {need / 2**30:.1f} GiB for its "
                         f"{height}x{width} images, more than the {available / 2**30:.1f} GiB of memory "
                         "available: sample fewer per run")


def available_memory():
    """Bytes of memory available for new allocations (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as file:
            return next(int(line.split()[1]) * 1024 for line in file if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def image_conditions(kind, sampler, args):
    """(what image i is conditioned on, its arr_1 entry) for every i: (a label, the label), or (a
    caption, its line in --prompts). Depends on i only."""
    if kind == "class":
        if args.prompts:
            raise SystemExit("error: --prompts is for text checkpoints; "
                             "this one is class-conditional (use --classes)")
        classes = args.classes if args.classes is not None else list(range(sampler.num_classes))
        bad = [c for c in classes if not 0 <= c < sampler.num_classes]
        if bad:
            raise SystemExit(f"error: --classes {bad} outside [0, {sampler.num_classes})")
        labels = [classes[i % len(classes)] for i in range(args.num_images)]  # class-balanced
        return labels, np.asarray(labels, dtype=np.int64)
    if args.classes is not None:
        raise SystemExit("error: --classes is for class checkpoints; "
                         "this one is text-conditional (use --prompts)")
    if not args.prompts:
        raise SystemExit("error: a text checkpoint needs --prompts FILE (one prompt per line)")
    lines = np.arange(args.num_images) % len(args.prompt_lines)
    return [args.prompt_lines[k] for k in lines], lines


def read_prompts(path):
    """The lines of a prompts file; one line for a missing or unreadable file, no prompts, or an
    empty line (a blank caption would silently sample the unconditional model)."""
    try:
        with open(path, encoding="utf-8-sig") as file:  # -sig: a byte-order mark is not part of a caption
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"error: cannot read --prompts {path} ({type(error).__name__}: {error})") from None
    control = next((k for k, char in enumerate(text) if not (char.isprintable() or char in "\t\r\n")), None)
    if control is not None:  # a caption of control bytes would sample a near-unconditional model
        raise SystemExit(f"error: --prompts {path} line {text.count(chr(10), 0, control) + 1} holds the "
                         f"non-printable character {text[control]!r}: one plain-text caption per line")
    lines = text.splitlines()
    blank = [k + 1 for k, line in enumerate(lines) if not line.strip()]
    if not lines or blank:
        raise SystemExit(f"error: --prompts {path} " + (f"line {blank[0]} is an empty caption: one caption "
                                                        "per line, no blank lines" if blank else "is empty"))
    return [line.strip() for line in lines]


# ----------------------------------------------------------------------------------------------
# Sampling.


def seeded_noise(seeds, shape, device):
    """One generator per image (EDM): image i's noise does not depend on its batch."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.stack(noise).to(device)


def to_uint8(images):
    """Images in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), as written to PNG and npz."""
    return (((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            .permute(0, 2, 3, 1).cpu().numpy())


def sample_images(sampler, indices, conditions, nfe, args, device, progress):
    """Images of the given indices, plus the sums of per-image measures and the time taken."""
    images, transport, straightness, measured_nfe = [], 0.0, 0.0, set()
    start = time.perf_counter()
    for batch in tqdm(np.array_split(indices, max(1, math.ceil(len(indices) / args.batch_size))),
                      desc=f"{args.solver} NFE {nfe}", disable=not progress):
        cond = sampler.make_condition(torch.as_tensor([conditions[i] for i in batch])
                                      if isinstance(conditions[0], int)
                                      else [conditions[i] for i in batch])
        x0 = sampler.prior.sample(cond, seeded_noise(args.first_seed + batch, sampler.latent_shape, device))
        velocity = flow.guided_velocity(sampler.model, cond, sampler.null_condition(len(batch)),
                                        args.cfg_scale)
        solution = flow.solve(velocity, x0, nfe, args.solver, trajectory=True)
        images.append(to_uint8(sampler.decode(solution.x)))
        # Measures of the sampled trajectories, as sums so that batches and processes add up.
        transport += flow.transport_cost(x0, solution.x) * len(batch)
        straightness += flow.straightness(solution.trajectory) * len(batch)
        measured_nfe.add(solution.nfe)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return np.concatenate(images), transport, straightness, measured_nfe, time.perf_counter() - start


def all_reduce_sum(values, device):
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(tensor)
    return tuple(tensor.tolist())


# ----------------------------------------------------------------------------------------------
# Outputs and metrics.


def save_grid(images, path):
    """uint8 (N, H, W, 3) -> one square-ish PNG, small images enlarged (nearest) to at least 32 pixels."""
    count = len(images)
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    height, width = images.shape[1:3]
    grid = np.full((rows * (height + 2) + 2, columns * (width + 2) + 2, 3), 255, dtype=np.uint8)
    for k, image in enumerate(images):
        row, column = divmod(k, columns)
        grid[2 + row * (height + 2):2 + row * (height + 2) + height,
             2 + column * (width + 2):2 + column * (width + 2) + width] = image
    scale = max(1, 32 // min(height, width))
    grid = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    with flow.atomic_file(path) as file:  # a full disk leaves no cut-off PNG
        grid.save(file, format="PNG")


def class_accuracy(fid, images, features, labels, reference, options):
    """How often a classifier of real images agrees with the requested class: the reference's
    linear probe (e.g. Fashion-MNIST in the EffNet space), or the digits classifier for the digits."""
    if reference.get("probe_weight") is not None:
        return fid.class_accuracy(features, labels, reference)
    if reference["feature_space"] == "digits" and options.get("data") == "builtin-digits":
        correct = fid.digits_predict(images) == labels
        per_class = {int(c): float(correct[labels == c].mean()) for c in np.unique(labels)}
        return {"class_accuracy": float(correct.mean()), "class_accuracy_per_class": per_class}
    return {}


def vae_floor(fid, sampler, space, reference, args, device, rank, world):
    """Frechet distance of autoencoder reconstructions of real images (no normalisation involved:
    it is invertible): no model in this latent space can do better."""
    vae_name = args.vae or sampler.options["vae"]
    autoencoder = flow.load_autoencoder(vae_name, device)
    images = fid.load_images(args.vae_floor)
    indices = np.arange(rank, len(images), world)
    reconstructions = []
    for batch in np.array_split(indices, max(1, math.ceil(len(indices) / args.batch_size))):
        x = torch.as_tensor(images[batch]).permute(0, 3, 1, 2).to(device).float() / 127.5 - 1
        reconstructions.append(to_uint8(autoencoder.decode(autoencoder.encode(x))))
    features = fid.gather_in_order(space.features(np.concatenate(reconstructions)), indices, len(images))
    return {"vae": vae_name, "real_images": args.vae_floor,
            **fid.compare_to_reference(features, reference, args.kid, args.kid_subset_size)}


def write_json(data, path):
    with flow.atomic_file(path, "w") as file:
        json.dump(data, file, indent=2)


def default_out(checkpoint):
    """RUN/samples/step_N beside the checkpoint RUN/checkpoints/step_N.pt: every checkpoint gets
    its own folder, so sampling another checkpoint never replaces these results."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    run = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder
    return os.path.join(run, "samples", os.path.splitext(os.path.basename(checkpoint))[0])


def refuse_existing(args):
    names = ([f"{args.solver}_nfe{nfe:03d}.json" for nfe in args.nfe]
             + ["vae_floor.json"] * bool(args.vae_floor))
    existing = [name for name in names if os.path.exists(os.path.join(args.out, name))]
    if existing and not args.overwrite:
        raise SystemExit(f"error: {args.out} already holds {existing[0]}: pass --overwrite or another --out")


def load_metrics(args, sampler, device):
    """fid.py (imported only when metrics are asked for), the reference and its feature space,
    all checked before the long sampling run rather than after it."""
    import fid

    reference = fid.load_reference(args.fid_ref)
    space = fid.load_feature_space(reference["feature_space"], device, args.inception_weights)
    fid.check_reference(reference, space)
    if args.kid and min(args.num_images, len(reference["features"])) < args.kid_subset_size:
        raise SystemExit(f"error: KID subsets of {args.kid_subset_size} need --num-images and the reference "
                         f"to hold at least that many images (got {args.num_images} and "
                         f"{len(reference['features'])}): lower --kid-subset-size")
    if args.vae_floor and sampler.options.get("vae", "none") in (None, "none"):
        raise SystemExit("error: --vae-floor needs a latent (autoencoder) checkpoint; "
                         "this one trains on pixels")
    return fid, reference, space


def gather(local, indices, total):
    """Every process's images in index order (torchrun); one process already has them all."""
    if not (dist.is_available() and dist.is_initialized()):
        return local
    import fid

    return fid.gather_in_order(local, indices, total)


def main(args):
    rank, world, device = flow.setup_distributed()
    if args.num_images < world:
        raise SystemExit(f"error: --num-images {args.num_images} is smaller than the {world} processes")
    checkpoint = flow.resolve_checkpoint(args.ckpt)
    kind, sampler = load_sampler(checkpoint, device, not args.no_ema, args.vae, args.text_encoder)
    refuse_too_many_images(sampler, args, device)
    conditions, labels = image_conditions(kind, sampler, args)
    args.out = args.out or default_out(checkpoint)
    refuse_existing(args)
    if args.cfg_scale != 1 and not sampler.trained_with_dropout and rank == 0:
        print(f"warning: --cfg-scale {args.cfg_scale} on a model trained without label dropout: "
              "its null branch was never trained, so guidance extrapolates towards an untrained output",
              file=sys.stderr)
    if (args.vae_floor or args.kid) and not args.fid_ref:
        raise SystemExit("error: --vae-floor and --kid need --fid-ref REF.npz")
    fid, reference, space = load_metrics(args, sampler, device) if args.fid_ref else (None, None, None)
    if rank == 0:
        with flow.write_errors(args.out):
            os.makedirs(args.out, exist_ok=True)
        write_json({**vars(args), "checkpoint": checkpoint, "kind": kind, "world_size": world},
                   os.path.join(args.out, "args.json"))

    indices = np.arange(rank, args.num_images, world)  # process r makes images r, r + world, ...
    for nfe in args.nfe:
        local, transport, straight, measured, seconds = sample_images(sampler, indices, conditions, nfe, args,
                                                                      device, rank == 0 and not args.quiet)
        transport, straight, seconds = all_reduce_sum((transport, straight, seconds), device)
        name = os.path.join(args.out, f"{args.solver}_nfe{nfe:03d}")
        result = {"kind": kind, "checkpoint": checkpoint, "ema": not args.no_ema, "solver": args.solver,
                  "nfe_requested": nfe, "nfe": max(measured), "cfg_scale": args.cfg_scale,
                  "num_images": args.num_images, "first_seed": args.first_seed, "world_size": world,
                  # process-seconds: comparable across world sizes
                  "seconds_per_image": seconds / args.num_images,
                  "transport_cost": transport / args.num_images, "straightness": straight / args.num_images}
        if reference is not None:  # metrics straight from memory, no image written
            features = gather(space.features(local), indices, args.num_images)
            images = gather(local, indices, args.num_images)
            if rank == 0:
                result.update(fid.compare_to_reference(features, reference, args.kid, args.kid_subset_size))
                if kind == "class":
                    result.update(class_accuracy(fid, images, features, labels, reference, sampler.options))
        else:
            images = gather(local, indices, args.num_images)
            if rank == 0:
                save_grid(images[:args.grid], name + ".png")
                with flow.atomic_file(name + ".npz") as file:
                    np.savez(file, images, labels)
                if kind == "text":
                    with flow.atomic_file(name + "_captions.txt", "w") as file:
                        file.write("".join(caption + "\n" for caption in conditions))
        if rank == 0:
            write_json(result, name + ".json")
            print(json.dumps(result))
    if args.vae_floor:
        floor = vae_floor(fid, sampler, space, reference, args, device, rank, world)
        if rank == 0:
            write_json(floor, os.path.join(args.out, "vae_floor.json"))
            print(json.dumps(floor))
    if rank == 0:  # the last line: what this run wrote where
        suffixes = [".json"] if reference is not None else [".npz", ".png", ".json"]
        suffixes += ["_captions.txt"] if kind == "text" and reference is None else []
        files = ["args.json"] + [f"{args.solver}_nfe{nfe:03d}" + ", ".join(suffixes) for nfe in args.nfe]
        print(f"wrote {args.out} ({', '.join(files + ['vae_floor.json'] * bool(args.vae_floor))})")
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: an option whose default is None says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint file, or a run folder (its latest checkpoint)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: RUN/samples/step_N of the checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    parser.add_argument("--vae", default=None,
                        help="autoencoder to decode with instead of the checkpoint's (e.g. its folder moved)")
    parser.add_argument("--text-encoder", default=None, help="text checkpoints: the text encoder to use "
                        "instead of the checkpoint's (the same model, in a folder that moved)")
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                        help="NFE budgets to sample at")
    parser.add_argument("--solver", default="euler", choices=list(flow.SOLVERS),
                        help="fixed-step ODE solver (midpoint: 2 NFE per step)")
    parser.add_argument("--num-images", type=int, default=64,
                        help="number of images (not --num: torchrun would take that for its --numa-binding)")
    parser.add_argument("--first-seed", type=int, default=0, help="image i uses seed FIRST_SEED + i")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass, per process")
    parser.add_argument("--cfg-scale", type=float, default=1.0,
                        help="classifier-free guidance scale (1: no guidance)")
    parser.add_argument("--classes", type=int, nargs="+", default=None,
                        help="class checkpoints: cycle over these classes (default: all)")
    parser.add_argument("--prompts", default=None,
                        help="text checkpoints: file with one prompt per line, cycled over")
    parser.add_argument("--no-ema", action="store_true",
                        help="use the raw weights instead of the EMA weights")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--grid", type=int, default=64, help="images in the PNG grid")
    parser.add_argument("--fid-ref", default=None,
                        help="REF.npz from `fid.py ref`: right after sampling, compute the Frechet "
                             "distance in its feature space (FID, FD-EffNet or FD-digits); write no images")
    parser.add_argument("--kid", action="store_true", help="with --fid-ref: also compute KID")
    parser.add_argument("--kid-subset-size", type=int, default=1000,
                        help="images per KID subset (torch-fidelity's default)")
    parser.add_argument("--inception-weights", default=None,
                        help="FID Inception state dict (default: pytorch-fid's, via the torch hub cache)")
    parser.add_argument("--vae-floor", default=None,
                        help="real images (folder, npz): "
                             "also report the Frechet distance of their VAE reconstructions")
    args = parser.parse_args(argv)
    for name in ("nfe", "num_images", "batch_size", "grid"):  # --grid 0 would divide by zero
        if min(np.atleast_1d(getattr(args, name))) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    per_step = flow.NFE_PER_STEP[args.solver]
    if any(nfe % per_step for nfe in args.nfe):
        parser.error(f"{args.solver} takes {per_step} evaluations per step: "
                     f"every --nfe must be a multiple of {per_step}")
    for wrong, problem in ((args.kid_subset_size < 2, "--kid-subset-size must be at least 2"),
                           (not math.isfinite(args.cfg_scale), "--cfg-scale must be finite")):
        if wrong:
            parser.error(problem)
    if args.fid_ref and args.num_images < 2:  # a covariance needs two images; the floors need far more
        parser.error("--fid-ref needs --num-images of at least 2 (thousands for a meaningful FD)")
    problem = args.out is not None and flow.out_folder_problem(args.out)
    if problem:
        parser.error(f"--out {args.out}: {problem}")
    args.prompt_lines = read_prompts(args.prompts) if args.prompts else None
    return args


if __name__ == "__main__":
    main(parse_args())

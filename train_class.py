"""Class-conditional flow matching with the class prior, in one file: the ImageNet-64 experiment.

Trains a velocity network v_theta(x_t, t, c) by flow matching from a prior to the data (t = 0 is
the prior sample x0, t = 1 the data x1). The prior is either N(0, I) (CondOT) or the class prior
of Issachar et al. (TMLR 2025), x0 | c ~ N(m(c), sigma^2 I) with m(c) the mean of the training
latents of class c; prior samples are paired with the data as drawn or by minibatch optimal
transport (within a class when the prior is conditional). Real images are encoded once by the
Stable Diffusion VAE and training runs on the cached 4x8x8 latents (Dao et al., "Flow Matching in
Latent Space"); the built-in scikit-learn digits train on pixels, offline, on a CPU in minutes.

Run (single process, CPU or one GPU; with no arguments: the built-in digits, class prior):
    python train_class.py
    python train_class.py --prior gaussian --coupling ot --out runs/digits-batchot
One node, 8 GPUs (ImageNet-64 from the official npz release in DATA_DIR; DiT-B/2 with DiT's optimiser
settings, since the paper's own training configuration is not public):
    torchrun --standalone --nproc_per_node=8 train_class.py --data DATA_DIR --vae sd-ema \\
        --latent-cache runs/in64-latents --model B --prior class --prior-sigma 0.5 \\
        --global-batch 256 --lr 1e-4 --warmup-steps 5000 --ema-decay 0.9999 --steps 400000 \\
        --cfg-dropout 0.1 --log-every 100 --sample-every 10000 --ckpt-every 50000 --out runs/in64-class
Two nodes (run on each node with its rank):
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\
        train_class.py ...same options...
Resume an interrupted run from the latest checkpoint in --out: the same command plus --resume.

Outputs in --out: args.json (resolved arguments), log.jsonl (step, loss, lr, images/s, transport
cost, gradient norm, time waiting for the batch), checkpoints/step_XXXXXXX.pt,
samples/step_XXXXXXX_nfe_N.png (EMA weights, one row per class). sample.py loads the checkpoints
through load_for_sampling() below.

Why a DiT (Peebles & Xie, 2023) rather than an ADM UNet: on 8x8 latents a patch-2 transformer sees
16 tokens, so it is small and fast; adaLN-zero conditioning on (time + class) starts every block
as the identity, which trains stably; and its size presets (S, B, L) are the ones latent
flow-matching papers report, so results compare. It is also short enough to read in one screen.
"""
import argparse
import copy
import glob
import json
import math
import os
import time
import zipfile
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm import tqdm

import flow

BUILTIN_DIGITS = "builtin-digits"
# Arguments that define the model, the method and the data: a checkpoint made with other values
# cannot be resumed. Everything else (steps, logging, batch cap, compile) may change on resume.
CONFIG_KEYS = ("data", "max_train_images", "image_size", "vae", "model", "patch_size", "prior", "prior_sigma",
               "prior_spread", "coupling", "time_schedule", "cfg_dropout", "cfg_null_prior", "global_batch",
               "lr", "weight_decay", "warmup_steps", "grad_clip", "ema_decay", "precision", "seed")

# ----------------------------------------------------------------------------------------------
# The method: the prior, the training pairs, the loss. The training loop (main) reads them by name:
# x0, x1, t, labels = training_pairs(step, ...) (made a few steps ahead by DataLoader workers), then
# backward_loss, optimizer_step and the EMA.


def build_prior(args, config):
    if args.prior == "gaussian":
        return flow.GaussianPrior(config["latent_shape"])
    return flow.ClassPrior(config["num_classes"], config["latent_shape"], sigma=args.prior_sigma,
                           spread=args.prior_spread)


@torch.no_grad()
def fit_class_prior(prior, x, y, rank, world_size, device, chunk=4096):
    """m(c) = mean of the training latents of class c: one streamed pass, each rank over its
    share of the data, all-reduced inside finalize() so every rank ends with the same means."""
    mine = torch.arange(rank, len(x), world_size)
    for index in mine.split(chunk):
        prior.accumulate(to_model_space(x[index]).to(device), y[index].to(device))
    try:
        return prior.finalize()
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def training_pairs(step, x1, y, prior, num_classes, args):
    """Global batch `step` ready to train on: (x0, x1, t, labels), a pure function of (seed, step).

    x0 ~ the prior of each example's class (from its own noise, flow.draw_examples), paired with the data
    x1 as drawn or by minibatch OT; t ~ --time-schedule. Classifier-free guidance: each label is dropped
    to the null class (num_classes) with probability --cfg-dropout. A dropped sample's x0 comes from the
    prior of a random class drawn by class frequency (--cfg-null-prior mixture: the marginal prior, so
    v_null is the unconditional flow) or from its own class prior (own). With `own` the null branch can
    read the class off where x_t lies, so v_null ~ v_c and guidance has little to amplify: on the digits
    guidance then barely changes the samples, while with `mixture` it improves FD at NFE 4
    (docs/train_class.md)."""
    noise, t, uniforms = flow.draw_examples(args.seed, step, len(x1), x1.shape[1:], args.time_schedule,
                                            uniforms=2)  # per example: dropout, and the dropped one's class
    dropped = uniforms[:, 0] < args.cfg_dropout
    prior_labels = y
    if args.prior == "class" and args.cfg_null_prior == "mixture" and args.cfg_dropout > 0:
        # A class drawn by frequency: the uniform inverted through the cumulative class frequencies.
        frequencies = prior.counts.cpu().cumsum(0) / prior.counts.sum().cpu()
        random_classes = torch.searchsorted(frequencies, uniforms[:, 1].double(), right=True)
        prior_labels = torch.where(dropped, random_classes.clamp_max(num_classes - 1), y)
    x0 = prior.sample(prior_labels, noise)
    # With the class prior each x0 belongs to its class: OT may only re-pair within a class.
    x0 = flow.couple(x0, x1, args.coupling, groups=prior_labels if args.prior == "class" else None)
    labels = torch.where(dropped, torch.full_like(y, num_classes), y)
    return x0, x1, t, labels


def autocast(args, device):
    """bf16 autocast on CUDA with --precision bf16; CPUs run float32."""
    if device.type == "cuda" and args.precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def backward_loss(forward, x0, x1, t, labels, args, world_size, device):
    """Gradients of the flow matching loss E_t || v_theta(x_t, t, c) - (x1 - x0) ||^2 with
    x_t = (1 - t) x0 + t x1, over this process's share of the batch, in micro-batches of at most
    --max-batch-per-gpu; returns the loss and the transport cost ||x1 - x0||^2 of the share."""
    micro_batches = list(zip(*(part.split(args.max_batch_per_gpu) for part in (x0, x1, t, labels))))
    total_loss = total_cost = 0.0
    for i, micro in enumerate(micro_batches):
        mx0, mx1, mt, mlabels = (part.to(device, non_blocking=True) for part in micro)
        # DDP all-reduces gradients only on the last micro-batch.
        sync = nullcontext() if i == len(micro_batches) - 1 or world_size == 1 else forward.no_sync()
        with sync:
            with autocast(args, device):
                loss = flow.flow_matching_loss(forward, mx0, mx1, mlabels, t=mt)
            (loss * len(mx1) / len(x1)).backward()  # the mean over this process's whole share
        total_loss += loss.item() * len(mx1) / len(x1)
        total_cost += flow.transport_cost(mx0, mx1) * len(mx1) / len(x1)
    return total_loss, total_cost


def optimizer_step(step, loss, model, optimizer, args):
    """Warm-up learning rate, gradient clipping (before the step), AdamW; returns the gradient norm. A
    non-finite loss stops the run before the step, so the last checkpoint is a good one."""
    for group in optimizer.param_groups:
        group["lr"] = flow.warmup_lr(args.lr, step, args.warmup_steps)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
        raise SystemExit(f"error: non-finite loss {loss} or gradient norm at step {step + 1}; nothing "
                         f"saved for this step, the last checkpoint in {args.out}/checkpoints is intact")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item()


def ema_decay(step, args):
    """--ema-decay, warmed up as (1 + step) / (10 + step): without it the EMA of a short run is
    mostly the zero-initialised network (0.999^1000 = 37% of it after 1000 steps)."""
    return min(args.ema_decay, (1 + step) / (10 + step))


# ----------------------------------------------------------------------------------------------
# Model: DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers"), velocity output.


MODELS = flow.DIT_PRESETS  # tiny, mini, small, small-p8, S, B, L: width, depth, heads, patch


DEFAULT_MODEL = {"fashion-mnist": "small-p8"}  # the others: tiny


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def time_embedding(t, dim, max_period=10_000):
    """Sinusoidal features of t in [0, 1], scaled by 1000 so the frequencies match DiT's steps."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = 1000 * t.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class DiTBlock(nn.Module):
    """Self-attention and MLP, each modulated and gated by the conditioning (adaLN-zero)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def attention(self, x):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))

    def forward(self, x, c):  # x (B, N, D), c (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """v_theta(x_t, t, y): x_t (B, C, H, W), t (B,) in [0, 1], y (B,) labels; y = num_classes is the
    null label of classifier-free guidance."""

    def __init__(self, latent_shape, num_classes, width, depth, heads, patch):
        super().__init__()
        channels, height, width_pixels = latent_shape
        if height % patch or width_pixels % patch:
            raise SystemExit(f"error: latents of size {height}x{width_pixels} cannot be cut into "
                             f"{patch}x{patch} patches")
        self.patch, self.grid = patch, (height // patch, width_pixels // patch)
        self.embed_patches = nn.Linear(patch * patch * channels, width)
        self.position = nn.Parameter(0.02 * torch.randn(1, self.grid[0] * self.grid[1], width))
        self.embed_time = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.embed_class = nn.Embedding(num_classes + 1, width)  # + 1: the null class
        self.blocks = nn.ModuleList(DiTBlock(width, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, patch * patch * channels)
        self.initialize_weights()

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.embed_class.weight, std=0.02)
        for layer in self.embed_time:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        # adaLN-zero: every block's gates and the output layer start at zero, so the network starts
        # as the identity on the residual stream and predicts v = 0.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.adaLN_out[-1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y):
        h, w = self.grid
        tokens = rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=self.patch, q=self.patch)
        tokens = self.embed_patches(tokens) + self.position  # (B, N, D)
        c = self.embed_time(time_embedding(t, 256)) + self.embed_class(y)  # (B, D)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.adaLN_out(c).chunk(2, dim=1)
        tokens = self.out(modulate(self.norm_out(tokens), shift, scale))
        return rearrange(tokens, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=self.patch, q=self.patch)


def build_model(args, config):
    preset = {**MODELS[args.model], "patch": args.patch_size}  # --patch-size, else the preset's
    return DiT(tuple(config["latent_shape"]), config["num_classes"], **preset)


# ----------------------------------------------------------------------------------------------
# Training.


def main(args):
    rank, world_size, device = flow.setup_distributed()
    if args.global_batch % world_size:
        raise SystemExit(f"error: --global-batch {args.global_batch} is not divisible by "
                         f"{world_size} processes")
    latest, checkpoint = checkpoint_to_resume(args, rank)  # before any data is read
    if device.type == "cuda":  # TF32 for the float32 matmuls left outside bf16 autocast (Ampere and newer)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    x, y, num_classes, normalisation = load_data(args, rank, world_size, device)
    if len(y) == 0 or y.min() < 0 or y.max() >= num_classes:
        raise SystemExit(f"error: labels must lie in [0, {num_classes}) and data must not be empty")
    config = {"num_classes": num_classes, "latent_shape": list(x.shape[1:]), **normalisation}

    prior = build_prior(args, config).to(device)
    if args.prior == "class":
        fit_class_prior(prior, x, y, rank, world_size, device)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(args, config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step = resume(latest, checkpoint, args, config, model, ema, optimizer) if checkpoint else 0
    forward = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    forward = torch.compile(forward) if args.compile else forward
    # Batches are prepared on the CPU, in --workers processes (0: this one), a few steps ahead.
    batches = TrainingBatches(x, y, copy.deepcopy(prior).cpu(), args, num_classes, rank, world_size)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(step, args.steps),
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    decode = make_decoder(args.vae, config, device)
    if rank == 0:
        start_outputs(args, step)
        print(f"{len(x)} training examples of shape {config['latent_shape']}, {num_classes} classes, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{world_size} process(es) on {device}")

    sums, start = torch.zeros(4, dtype=torch.float64), time.perf_counter()
    progress = tqdm(range(step, args.steps), initial=step, total=args.steps, disable=rank != 0 or args.quiet)
    batches_ahead = iter(loader)
    for step in progress:
        waited = time.perf_counter()
        # This process's share of training_pairs(step, ...), made by a worker; waits only if they fall behind.
        x0, x1, t, labels = next(batches_ahead)
        waited = time.perf_counter() - waited
        loss, cost = backward_loss(forward, x0, x1, t, labels, args, world_size, device)
        grad_norm = optimizer_step(step, loss, model, optimizer, args)
        flow.update_ema(ema, model, ema_decay(step, args))
        sums += torch.tensor([loss, cost, waited, 1.0], dtype=torch.float64)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            loss = write_log(args, done, sums, start, grad_norm, rank, world_size, device)
            progress.set_postfix(loss=f"{loss:.4f}")
            sums, start = torch.zeros(4, dtype=torch.float64), time.perf_counter()
        # The checkpoint first: a failing sample grid must not lose the training since the last one.
        if done % args.ckpt_every == 0 or done == args.steps:
            save_checkpoint(args, config, done, model, ema, optimizer, prior, rank)
        if rank == 0 and (done % args.sample_every == 0 or done == args.steps):
            save_sample_grids(args, config, done, ema.eval(), prior, decode, device)
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Data. Everything becomes (x, y): x (N, C, H, W), either uint8 pixels (0..255) or float model
# inputs (normalised latents, or digits already in [-1, 1]), and y (N,) int64 labels in
# [0, num_classes).


DATA_SETS = ("builtin-digits", "fashion-mnist", "imagenet64", "image-folder")


NATURAL_SIZE = {"builtin-digits": 8, "fashion-mnist": 64, "imagenet64": 64, "image-folder": 64}


def load_digits_train():
    """scikit-learn digits, 1x8x8 in [-1, 1] (x / 8 - 1); index % 5 == 0 is held out for tests."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.arange(len(digits.target)) % 5 != 0
    x = torch.as_tensor(digits.images[keep], dtype=torch.float32)[:, None] / 8 - 1  # (N, 1, 8, 8)
    return x, torch.as_tensor(digits.target[keep], dtype=torch.int64), 10


def imagenet_npz_files(path):
    """The official Downsampled ImageNet release: train_data_batch_1..10 (with or without .npz)."""
    if os.path.isfile(path):
        return [path]
    return sorted(glob.glob(os.path.join(path, "train_data_batch_*")),
                  key=lambda name: int("".join(filter(str.isdigit, os.path.basename(name))) or 0))


def read_imagenet_npz(path):
    """One npz batch -> uint8 (N, 3, S, S) images and labels 0..999 (the files store 1..1000)."""
    try:
        with np.load(path) as batch:
            data, labels = batch["data"], np.asarray(batch["labels"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:  # empty, text, cut short
        raise SystemExit(f"error: {path} is not a Downsampled ImageNet npz batch with 'data' and 'labels' "
                         f"({type(error).__name__}: {error})") from None
    if labels.dtype.kind not in "iu":  # float labels may hold NaN, which would cast to nonsense classes
        nan = labels.dtype.kind == "f" and not np.isfinite(labels).all()
        raise SystemExit(f"error: {path}: 'labels' are {labels.dtype}{' with NaN or inf' * nan}, "
                         "not integers")
    side = round(math.sqrt(data.shape[-1] / 3)) if data.ndim == 2 else 0
    if (data.dtype != np.uint8 or data.ndim != 2 or 3 * side * side != data.shape[1]
            or len(labels) != len(data)):
        raise SystemExit(f"error: {path}: 'data' is {data.dtype} {data.shape} with {len(labels)} labels, "
                         "expected uint8 (N, 3*S*S) and N labels")
    if labels.min() < 1 or labels.max() > 1000:
        raise SystemExit(f"error: {path}: labels must lie in 1..1000, got {labels.min()}..{labels.max()}")
    images = torch.from_numpy(data).reshape(-1, 3, side, side)  # the release stores CHW, flattened
    return images, torch.from_numpy(labels.astype(np.int64) - 1)


def image_folder(path, image_size):
    """torchvision ImageFolder (one folder per class), resized and centre-cropped to image_size."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.PILToTensor()])
    try:
        return datasets.ImageFolder(path, transform=transform, loader=flow.read_image)
    except (FileNotFoundError, RuntimeError) as error:
        raise SystemExit(f"error: {path} is not an image folder with one subfolder per class "
                         f"({error})") from None


def image_source(args):
    """(number of training images, num_classes, batches) in data order, the first --max-train-images.
    batches(ranges, batch_size) yields (uint8 images (B, 3, S, S), labels) for each (start, stop) in
    `ranges` in turn, no batch crossing a range's end: the latent cache encodes one range per shard."""
    if args.data == "fashion-mnist":  # 28x28 grey -> 64x64 RGB, bilinear (flow.fashion_to_rgb)
        images, labels = flow.load_fashion_mnist(args.data_root, "train")
        images, labels = images[:args.max_train_images], torch.from_numpy(labels[:args.max_train_images])

        def batches(ranges, batch_size):
            for start, stop in ranges:
                for first in range(start, stop, batch_size):
                    last = min(stop, first + batch_size)
                    yield flow.fashion_to_rgb(images[first:last], args.image_size), labels[first:last]
        return len(images), 10, batches
    if args.data == "imagenet64":
        files = imagenet_npz_files(args.data_root)
        if not files:
            raise SystemExit(f"error: no train_data_batch_* files in {args.data_root}")
        release = NpzRelease(files)
        return min(len(release), args.max_train_images or len(release)), 1000, release.batches
    dataset = image_folder(args.data_root, args.image_size)
    count = min(len(dataset), args.max_train_images or len(dataset))

    def batches(ranges, batch_size):
        for start, stop in ranges:
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(start, stop)),
                                                 batch_size=batch_size, num_workers=args.workers)
            yield from flow.stop_on_unreadable_images(loader)
    return count, len(dataset.classes), batches


class NpzRelease:
    """The Downsampled ImageNet npz files as one data set in file order, one file in memory at a time."""

    def __init__(self, files):
        self.files, self.loaded = files, (None, None)
        counts = []
        for path in files:  # the labels alone give each file's size, without reading its images
            try:
                with np.load(path) as batch:
                    counts.append(len(batch["labels"]))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                counts.append(len(read_imagenet_npz(path)[1]))  # the reader's one-line error
        self.starts = np.concatenate([[0], np.cumsum(counts)])

    def __len__(self):
        return int(self.starts[-1])

    def file(self, index):
        if self.loaded[0] != index:
            self.loaded = index, read_imagenet_npz(self.files[index])
        return self.loaded[1]

    def batches(self, ranges, batch_size):
        for start, stop in ranges:
            for first in range(start, stop, batch_size):
                last = min(stop, first + batch_size)
                parts = []
                for index in range(np.searchsorted(self.starts, first, "right") - 1, len(self.files)):
                    if self.starts[index] >= last:
                        break
                    images, labels = self.file(index)
                    begin, end = max(first, self.starts[index]), min(last, self.starts[index + 1])
                    begin, end = begin - self.starts[index], end - self.starts[index]
                    parts.append((images[begin:end], labels[begin:end]))
                yield torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def mirrored(x, y, args):
    """With --mirror, every example and then its mirror image (left-right flip) as an extra example."""
    return (torch.cat([x, x.flip(-1)]), torch.cat([y, y])) if args.mirror else (x, y)


def load_pixels(args):
    """All images in memory as uint8 (for --vae none), with their mirror images if --mirror."""
    count, num_classes, batches = image_source(args)
    images, labels = zip(*batches([(0, count)], 256))
    return *mirrored(torch.cat(images), torch.cat(labels), args), num_classes


ENCODE_BATCH = 16  # TAEF2 on 2 CPU cores: 73 images/s at 16 per batch, 48 at 256 (docs/fashion_mnist.md)


def encode_to_cache(args, cache, rank, world_size, device):
    """Encode every image (and its mirror image with --mirror) into the cache's shards; each rank makes
    shards rank, rank + world_size, ... Shards already written (by an interrupted run) are kept."""
    count, num_classes, batches = image_source(args)
    todo = flow.missing_shards(cache, count, rank, world_size)
    if not todo:
        return count, num_classes
    autoencoder = flow.load_autoencoder(args.vae, device)
    total = sum(stop - start for _, start, stop in todo)
    progress = tqdm(total=total * (1 + args.mirror), desc="encode", unit="img",
                    disable=rank != 0 or args.quiet)
    parts = {}
    for images, labels in batches([(start, stop) for _, start, stop in todo], ENCODE_BATCH):
        images = images.to(device).float() / 127.5 - 1
        parts.setdefault("latents", []).append(autoencoder.encode(images).float().cpu())
        if args.mirror:
            parts.setdefault("flipped", []).append(autoencoder.encode(images.flip(-1)).float().cpu())
        parts.setdefault("labels", []).append(labels)
        progress.update(len(labels) * (1 + args.mirror))
        shard, start, stop = todo[0]
        if sum(map(len, parts["labels"])) == stop - start:  # a shard is complete: write it, atomically
            flow.write_shard(cache, shard, {name: torch.cat(p).numpy() for name, p in parts.items()})
            todo, parts = todo[1:], {}
    progress.close()
    return count, num_classes


def read_cache(cache, info):
    """(raw latents with the mirror images after the originals, labels) from a complete cache."""
    shards = flow.read_shards(cache, info["shards"])
    latents = np.concatenate([shards["latents"], *([shards["flipped"]] if info["mirror"] else [])])
    return latents, np.concatenate([shards["labels"]] * (1 + info["mirror"]))


def load_latents(args, rank, world_size, device):
    """Normalised latents from the cache, encoding them first if the cache is not complete.

    The raw latents of an autoencoder are far from unit variance per channel (TAEF2 on
    Fashion-MNIST: channel means -0.76..0.60, stds 0.30..1.42), which would make N(0, I) and
    sigma mean different things in every channel. So x = (z - mean_c) / std_c, with the
    per-channel statistics of the whole cache (mirror images included), kept with the cache and in
    every checkpoint; decoding undoes it (make_decoder)."""
    cache = args.latent_cache or os.path.join(args.out, "latents")
    info_path = os.path.join(cache, "info.json")
    wanted = {"data": args.data, "data_root": os.path.realpath(args.data_root), "vae": args.vae,
              "image_size": args.image_size, "mirror": args.mirror}
    raw = None
    if not os.path.isfile(info_path):
        with flow.write_errors(cache):
            os.makedirs(cache, exist_ok=True)
        if rank == 0:
            flow.remove_partial_saves(cache)  # the cut-off shard of a run that was killed while writing it
        barrier()
        count, num_classes = encode_to_cache(args, cache, rank, world_size, device)
        barrier()
        if rank == 0:
            info = dict(wanted, num_images=count, num_classes=num_classes,
                        shards=flow.shard_checksums(cache, count),
                        max_train_images=args.max_train_images if args.max_train_images == count else None)
            raw, labels = read_cache(cache, info)  # kept: read (and hashed) once
            info["latent_mean"], info["latent_std"] = flow.channel_statistics(raw)
            save_json(info, info_path)  # written last: its presence marks a complete cache
        barrier()
    info = flow.read_json(info_path, "latent cache index")
    if any(info.get(key) != value for key, value in wanted.items()):
        made = {key: info.get(key) for key in wanted}
        raise SystemExit(f"error: latent cache {cache} was made from {made}, not {wanted}: "
                         "pass another --latent-cache")
    if args.max_train_images and info["num_images"] < args.max_train_images:
        raise SystemExit(f"error: latent cache {cache} holds {info['num_images']} images, fewer than "
                         f"--max-train-images {args.max_train_images}: pass another --latent-cache")
    if args.max_train_images is None and info.get("max_train_images"):
        raise SystemExit(f"error: latent cache {cache} holds only the first {info['num_images']} training "
                         f"images: pass --max-train-images {info['num_images']} or another --latent-cache")
    if raw is None:
        raw, labels = read_cache(cache, info)
    count = args.max_train_images or info["num_images"]
    keep = np.concatenate([np.arange(count) + copy * info["num_images"] for copy in range(1 + args.mirror)])
    mean, std = (torch.tensor(info[key]).reshape(-1, 1, 1) for key in ("latent_mean", "latent_std"))
    x = (torch.from_numpy(raw[keep]) - mean) / std
    if not torch.isfinite(x).all():  # an autoencoder that diverged
        raise SystemExit(f"error: latent cache {cache} holds NaN or inf values: delete it to encode again")
    return x, torch.from_numpy(labels[keep]), info["num_classes"], {"latent_mean": info["latent_mean"],
                                                                    "latent_std": info["latent_std"]}


def load_data(args, rank, world_size, device):
    """(x, y, num_classes, normalisation) for --data and --vae; x as described at the top of this
    section; normalisation holds the latent statistics (empty for pixels)."""
    if args.data == "builtin-digits":
        x, y, num_classes = load_digits_train()
        x, y = x[:args.max_train_images], y[:args.max_train_images]
        return *mirrored(x, y, args), num_classes, {}
    if args.vae == "none":
        return (*load_pixels(args), {})
    return load_latents(args, rank, world_size, device)


def to_model_space(x):
    """uint8 pixels -> [-1, 1]; float data (latents, digits) is already what the model sees."""
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()


class BatchOrder:
    """Which data indices form global batch `step`: one random permutation per epoch (seeded by
    the seed and the epoch), read in order. A function of the step alone, so a resumed run reads
    exactly the batches the uninterrupted run would have read, for any number of processes."""

    def __init__(self, size, global_batch, seed):
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.cached_epoch, self.cached_permutation = None, None

    def permutation(self, epoch):
        if epoch != self.cached_epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.cached_epoch, self.cached_permutation = epoch, torch.randperm(self.size, generator=generator)
        return self.cached_permutation

    def indices(self, step):
        positions = range(step * self.global_batch, (step + 1) * self.global_batch)
        return torch.stack([self.permutation(p // self.size)[p % self.size] for p in positions])


class TrainingBatches(torch.utils.data.Dataset):
    """Item `step`: this process's share of training_pairs(step): x0 (B, C, H, W), x1 (B, C, H, W), t (B,)
    and the labels the network sees (B,).

    A pure function of (seed, step): the data come from BatchOrder; each example's prior noise, time and
    dropout decisions from its own generator (flow.draw_examples); OT pairs over the whole global batch,
    which every process computes alike before taking its slice. So 1 or N processes, any micro-batch
    split and a resume on another number of processes train on the same pairs. Read by a DataLoader
    with --workers workers, the scipy assignment runs off the training step's critical path."""

    def __init__(self, x, y, prior, args, num_classes, rank, world_size):
        self.x, self.y, self.prior, self.args, self.num_classes = x, y, prior, args, num_classes
        self.order = BatchOrder(len(x), args.global_batch, args.seed)
        share = args.global_batch // world_size
        self.share = slice(rank * share, (rank + 1) * share)  # contiguous, as DistributedSampler

    def __len__(self):
        return self.args.steps

    def __getitem__(self, step):
        index = self.order.indices(step)
        x1, y = to_model_space(self.x[index]), self.y[index]
        pairs = training_pairs(step, x1, y, self.prior, self.num_classes, self.args)
        return tuple(part[self.share] for part in pairs)


# ----------------------------------------------------------------------------------------------
# Checkpoints, logs and sample grids.


def barrier():
    if dist.is_initialized():
        dist.barrier()


def save_json(obj, path):
    with flow.atomic_file(path, "w") as file:
        json.dump(obj, file, indent=2)


def save_checkpoint(args, config, step, model, ema, optimizer, prior, rank):
    """No random generator states: every batch is a pure function of (seed, step) (TrainingBatches)."""
    if rank == 0:
        checkpoint = {"kind": "class", "args": vars(args), "config": config, "model": model.state_dict(),
                      "ema": ema.state_dict(), "opt": optimizer.state_dict(), "step": step,
                      "prior": prior.state_dict()}
        flow.save_atomic(checkpoint, os.path.join(args.out, "checkpoints", f"step_{step:07d}.pt"))


def checkpoint_to_resume(args, rank):
    """(path, checkpoint) that --resume continues, else (None, None). The newest checkpoint that loads
    and passes its checks: a newer, corrupted one is skipped, with one line. Temporary files of writes
    that a crash interrupted are removed first."""
    folder = os.path.join(args.out, "checkpoints")
    if rank == 0:
        flow.remove_partial_saves(args.out, folder)
    flow.refuse_overwrite(args.out, [flow.latest_checkpoint(folder)], args.resume)
    if not args.resume:
        return None, None
    latest, checkpoint = flow.latest_valid_checkpoint(folder)
    if checkpoint["step"] >= args.steps:
        raise SystemExit(f"error: --resume: {latest} is already at step {checkpoint['step']}: "
                         f"--steps {args.steps} leaves nothing to train")
    return latest, checkpoint


def start_outputs(args, step):
    """The output folders, args.json, and a log holding only the lines up to `step` (a resumed run
    writes the later ones again; a fresh run starts an empty log)."""
    for folder in (args.out, os.path.join(args.out, "checkpoints"), os.path.join(args.out, "samples")):
        with flow.write_errors(folder):
            os.makedirs(folder, exist_ok=True)
    save_json(vars(args), os.path.join(args.out, "args.json"))
    flow.trim_log(os.path.join(args.out, "log.jsonl"), lambda record: record["step"] <= step)


def write_log(args, done, sums, start, grad_norm, rank, world_size, device):
    """One log.jsonl line (rank 0) with the means over the global batches since the last line (at time
    `start`): `sums` (loss, transport cost, seconds waiting for batches, steps) is all-reduced over the
    processes. Returns the loss."""
    if world_size > 1:
        dist.all_reduce(sums)
    loss_sum, cost_sum, wait_sum, count = sums.tolist()
    lr, elapsed = flow.warmup_lr(args.lr, done - 1, args.warmup_steps), time.perf_counter() - start
    record = {"step": done, "loss": loss_sum / count, "lr": lr,
              "images_per_s": args.global_batch * count / world_size / elapsed,
              "transport_cost": cost_sum / count, "grad_norm": grad_norm,
              "data_wait_ms": 1000 * wait_sum / count}  # > 0 when the --workers fall behind
    if device.type == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    log_path = os.path.join(args.out, "log.jsonl")
    if rank == 0:
        with flow.write_errors(log_path), open(log_path, "a") as file:
            file.write(json.dumps(record) + "\n")
    return record["loss"]


def resume(latest, checkpoint, args, config, model, ema, optimizer):
    """Continue from `checkpoint` (read from file `latest`) if it matches this run; return its step.
    Exact on any number of processes: the batches after it depend on (seed, step) alone."""
    saved = checkpoint.get("args", {})
    for key in CONFIG_KEYS:
        if saved.get(key) != getattr(args, key):
            raise SystemExit(f"error: {latest} was trained with --{key.replace('_', '-')} "
                             f"{saved.get(key)!r}, not {getattr(args, key)!r}: "
                             "use another --out or the same options")
    if checkpoint.get("config") != config:
        raise SystemExit(f"error: {latest} was trained on other data ({checkpoint.get('config')}): "
                         "use another --out")
    model.load_state_dict(checkpoint["model"])
    ema.load_state_dict(checkpoint["ema"])
    optimizer.load_state_dict(checkpoint["opt"])
    return checkpoint["step"]


@torch.no_grad()
def save_sample_grids(args, config, step, ema, prior, decode, device):
    """EMA samples, one row per class (at most 10 classes, evenly spaced), at every --sample-nfe."""
    from torchvision.utils import save_image

    num_classes = config["num_classes"]
    classes = torch.linspace(0, num_classes - 1, min(10, num_classes)).round().long()
    labels = classes.repeat_interleave(8).to(device)
    generator = torch.Generator().manual_seed(args.seed)  # a fixed generator: grids compare across steps
    x0 = prior.sample(labels,
                      torch.randn(len(labels), *config["latent_shape"], generator=generator).to(device))
    velocity = flow.guided_velocity(ema, labels, torch.full_like(labels, num_classes), args.sample_cfg)
    for nfe in args.sample_nfe:
        images = decode(flow.solve(velocity, x0, nfe, "euler").x)
        if images.shape[-1] < 32:  # 8x8 digits: enlarge (nearest) so the grid is readable
            images = F.interpolate(images, scale_factor=32 // images.shape[-1], mode="nearest")
        path = os.path.join(args.out, "samples", f"step_{step:07d}_nfe_{nfe}.png")
        with flow.write_errors(path):
            save_image((images + 1) / 2, path, nrow=8)


def make_decoder(vae, config, device):
    """Model-space latents -> images in [-1, 1] with 3 channels: undo the latent normalisation,
    then decode with the autoencoder, loaded on first use."""
    autoencoder = None

    def decode(latents):
        nonlocal autoencoder
        if vae == "none":
            images = latents.float().clamp(-1, 1)
            return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images
        autoencoder = autoencoder or flow.load_autoencoder(vae, device)
        mean, std = (torch.tensor(config[key], device=latents.device).reshape(-1, 1, 1)
                     for key in ("latent_mean", "latent_std"))
        return autoencoder.decode(latents.float() * std + mean)

    return decode


# ----------------------------------------------------------------------------------------------
# Loading for sampling (sample.py).


def load_for_sampling(path, device, use_ema=True, vae=None):
    """A checkpoint file (or a run folder: its latest checkpoint) -> the flow.Sampler sample.py
    uses. `vae` overrides the autoencoder recorded in the checkpoint (a folder that moved)."""
    path = flow.resolve_checkpoint(path)
    checkpoint = flow.load_checkpoint(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != "class":
        raise SystemExit(f"error: {path} is not a class-conditional checkpoint of train_class.py")
    args, config = argparse.Namespace(**checkpoint["args"]), checkpoint["config"]
    if vae and args.vae == "none":
        raise SystemExit(f"error: {path} was trained on pixels (--vae none): --vae {vae} has no latents "
                         "to decode")
    device = torch.device(device)
    model = flow.load_weights(build_model(args, config), checkpoint["ema" if use_ema else "model"], path)
    prior = flow.load_weights(build_prior(args, config), checkpoint["prior"], path)
    num_classes = config["num_classes"]

    def make_condition(labels):
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise SystemExit(f"error: class labels must lie in [0, {num_classes})")
        return labels.to(device)

    return flow.Sampler(
        kind="class", model=model.to(device).eval().requires_grad_(False), prior=prior.to(device).eval(),
        latent_shape=tuple(config["latent_shape"]), make_condition=make_condition,
        null_condition=lambda batch: torch.full((batch,), num_classes, dtype=torch.int64, device=device),
        decode=make_decoder(vae or args.vae, config, device), options=checkpoint["args"],
        trained_with_dropout=args.cfg_dropout > 0, num_classes=num_classes)


# ----------------------------------------------------------------------------------------------
# Command line.


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: an option whose default is None says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    add = parser.add_argument
    # Data.
    add("--data", default="builtin-digits", choices=DATA_SETS,
        help="built-in scikit-learn digits (offline), Fashion-MNIST idx files, the Downsampled ImageNet npz "
             "release, or an ImageFolder tree")
    add("--data-root", default=None, help="folder of the data set (not for builtin-digits)")
    add("--max-train-images", type=int, default=None,
        help="use only the first N training images (quick runs)")
    add("--image-size", type=int, default=None,
        help="image side in pixels (default: the data set's, 64 for Fashion-MNIST and ImageFolder)")
    add("--vae", default="none",
        help="'none' (train on pixels), 'sd-ema', 'sd-mse', a local diffusers AutoencoderKL folder, "
             "or a folder with taef2_encoder.pth and taef2_decoder.pth")
    add("--mirror", action=argparse.BooleanOptionalAction, default=None,
        help="also train on every image's mirror image (default: on for ImageNet and image folders, off for "
             "Fashion-MNIST and the digits, whose items face one way)")
    add("--latent-cache", default=None,
        help="folder for the encoded latents (default OUT/latents); share it between runs")
    add("--workers", type=int, default=2,
        help="DataLoader workers that prepare the training batches (prior samples, t, dropout, OT pairs) "
             "and read ImageFolder images for the latent cache; 0: in the main process")
    # Model and method.
    add("--model", default=None, choices=list(MODELS),
        help="DiT preset (default: small-p8 for fashion-mnist, tiny otherwise)")
    add("--patch-size", type=int, default=None,
        help="DiT patch side in latent pixels (default: the preset's)")
    add("--prior", default="class", choices=["gaussian", "class"],
        help="N(0, I) (CondOT) or N(m(c), sigma^2 I)")
    add("--prior-sigma", type=float, default=0.5, help="sigma of the class prior")
    add("--prior-spread", default="fixed", choices=["fixed", "class"],
        help="sigma for every class, or sigma times the class's own std")
    add("--coupling", default="independent", choices=["independent", "ot"],
        help="pairs as drawn, or minibatch OT (within a class for the class prior)")
    add("--time-schedule", default="uniform", choices=["uniform", "logit-normal"], help="distribution of t")
    add("--cfg-dropout", type=float, default=0.0,
        help="probability of dropping a label to the null class (CFG training)")
    add("--cfg-null-prior", default="mixture", choices=["mixture", "own"],
        help="class prior: dropped-label samples start from a random class's prior (the mixture) "
             "or their own")
    # Optimisation.
    add("--steps", type=int, default=1200, help="total optimizer steps")
    add("--global-batch", type=int, default=64, help="images per optimizer step, over all processes")
    add("--max-batch-per-gpu", type=int, default=512,
        help="micro-batch cap per process; larger batches accumulate gradients")
    add("--lr", type=float, default=1e-3, help="AdamW learning rate after warmup")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    add("--warmup-steps", type=int, default=100, help="linear learning-rate warmup")
    add("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    add("--ema-decay", type=float, default=0.999, help="EMA decay per step (after a warmup, see ema_decay)")
    add("--precision", default="bf16", choices=["bf16", "fp32"],
        help="autocast precision on CUDA (CPU runs fp32)")
    add("--compile", action="store_true", help="torch.compile the network")
    add("--seed", type=int, default=0,
        help="seed for weights, data order and every example's noise (the same on every rank)")
    # Logging, samples, checkpoints.
    add("--log-every", type=int, default=50, help="steps between log.jsonl lines")
    add("--sample-every", type=int, default=600, help="steps between EMA sample grids")
    add("--sample-nfe", type=int, nargs="+", default=[1, 4, 16], help="NFEs (Euler) of the sample grids")
    add("--sample-cfg", type=float, default=1.0, help="guidance scale of the sample grids")
    add("--ckpt-every", type=int, default=600, help="steps between checkpoints")
    add("--out", default="runs/train_class", help="output folder")
    add("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    add("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args):
    """Every option checked before any data is read; fills in the data set's default image size."""
    if args.data == "builtin-digits":
        if args.vae != "none" or args.data_root or args.image_size not in (None, 8):
            parser.error("the built-in digits are 8x8 gray pixels: no --vae, --data-root or --image-size")
    elif not args.data_root or not os.path.exists(args.data_root):
        parser.error(f"--data {args.data} needs --data-root pointing to the data (got {args.data_root!r})")
    args.image_size = args.image_size or NATURAL_SIZE[args.data]
    args.model = args.model or DEFAULT_MODEL.get(args.data, "tiny")
    if args.patch_size is None:  # not `or`: --patch-size 0 must reach its check below
        args.patch_size = MODELS[args.model]["patch"]
    if args.mirror is None:  # 99% of Fashion-MNIST's sneakers and ankle boots face left: no mirror images
        args.mirror = args.data in ("imagenet64", "image-folder")
    if os.path.isdir(args.vae):  # recorded in the checkpoint: absolute, so sample.py finds it from anywhere
        args.vae = os.path.abspath(args.vae)
    if args.data == "fashion-mnist":
        missing = [name for names in flow.FASHION_FILES.values() for name in names[:2]
                   if not os.path.isfile(os.path.join(args.data_root, name))]
        if missing:
            parser.error(f"--data-root {args.data_root} lacks the Fashion-MNIST files {missing}")
    if args.vae not in ("none", *flow.VAE_NAMES) and not os.path.isdir(args.vae):
        parser.error(f"--vae {args.vae}: not 'none', 'sd-ema', 'sd-mse' or an existing folder")
    for name in ("cfg_dropout", "ema_decay"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must lie in [0, 1)")
    for name in ("steps", "global_batch", "max_batch_per_gpu", "log_every", "sample_every", "ckpt_every",
                 "patch_size", "warmup_steps", "max_train_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("lr", "grad_clip", "prior_sigma"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    if min(args.sample_nfe) < 1:
        parser.error("--sample-nfe must be positive")
    problem = flow.out_folder_problem(args.out)
    if problem:
        parser.error(f"--out {args.out}: {problem}")


if __name__ == "__main__":
    main(parse_args())

"""Text-conditional flow matching with the text prior, in one file: built-in shapes or captioned images.

Two stages (Issachar et al., TMLR 2025; t = 0 is the prior sample x0, t = 1 the data x1):
  1. the mapper P, an MLP from the pooled text embedding tau(y) to latent space, regressed onto the
     paired image latents, so that P(tau(y)) estimates the conditional mean E[x1 | y];
  2. the flow v_theta(x_t, t, y), train_class.py's DiT plus cross-attention to the caption's token
     states, trained from N(0, I) (CondOT) or from the text prior x0 | y ~ N(P(tau(y)), sigma^2 I),
     paired with the data as drawn or by minibatch optimal transport of the prior noise.
--data shapes (the default) generates 32x32 shapes captioned like "a small red circle on the left",
holds 24 of the 144 captions out of training and trains on pixels with a built-in word encoder,
offline, on a CPU in minutes (benchmarks/train_text_eval.py reads the samples back). --data coco reads
any folder in MS-COCO's captioned-image layout (DIR/annotations/captions_SPLIT.json, DIR/SPLIT/ images):
MS-COCO itself, your own captioned images, or captioned Fashion-MNIST written by
benchmarks/captioned_fashion.py. It trains on pixels (--vae none) or on latents that an autoencoder
encodes once into a cache (Dao et al., "Flow Matching in Latent Space"); captions are embedded once by
a text encoder (CLIP, or a sentence-embedding model such as all-MiniLM-L6-v2).

Run (single process, CPU or one GPU; with no arguments: the built-in shapes, text prior):
    python train_text.py
    python train_text.py --prior gaussian --coupling ot --out runs/text-batchot
    python benchmarks/captioned_fashion.py --data-root /usr/share/datasets/fashion-mnist \
        --out runs/captioned-fashion
    python train_text.py --data coco --data-root runs/captioned-fashion --coco-split train \\
        --coco-val-split val --vae TAEF2_DIR --text-encoder MINILM_DIR --out runs/text-fashion
One node, 8 GPUs (DATA_DIR holds annotations/captions_train2017.json, train2017/ and val2017/):
    torchrun --standalone --nproc_per_node=8 train_text.py --data coco --data-root DATA_DIR --vae sd-ema \\
        --text-encoder openai/clip-vit-base-patch32 --latent-cache runs/coco-latents --image-size 256 \\
        --model B --prior-sigma 0.7 --mapper-noise-dim 32 --global-batch 256 --lr 1e-4 \\
        --warmup-steps 5000 --ema-decay 0.9999 --steps 400000 --sample-every 10000 --ckpt-every 10000 \\
        --out runs/coco-text
Two nodes (run on each node with its rank):
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\
        train_text.py ...same options...
Resume an interrupted run (in either stage) from the latest checkpoint in --out: the same command plus
--resume.

Outputs in --out: args.json (resolved arguments), log.jsonl (stage, step, loss, lr, images/s, transport
cost, gradient norm, time waiting for the batch; the mapper's validation losses), mapper/step_XXXXXXX.pt
(stage 1), checkpoints/step_XXXXXXX.pt (the flow, with the mapper inside its prior), mapper_means.png
(real images above P's decoded means), samples/step_XXXXXXX_nfe_N.png (EMA samples titled by caption).
sample.py loads the checkpoints through load_for_sampling() below.
"""
import argparse
import copy
import functools
import hashlib
import json
import math
import os
import re
import textwrap
import time
import zlib
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm import tqdm

import flow

CLIP_DEFAULT = "openai/clip-vit-base-patch32"
# Arguments that define the model, the method and the data: a checkpoint made with other values
# cannot be resumed. Everything else (steps, logging, batch cap, compile) may change on resume.
CONFIG_KEYS = ("data", "coco_split", "max_train_images", "image_size", "vae", "text_encoder", "text_length",
               "model", "patch_size", "prior", "prior_sigma", "coupling", "time_schedule", "cfg_dropout",
               "cfg_null_prior", "mapper_width", "mapper_noise_dim", "mapper_lr", "global_batch", "lr",
               "weight_decay", "warmup_steps", "grad_clip", "ema_decay", "precision", "seed")

# ----------------------------------------------------------------------------------------------
# The method: the prior, the training pairs, the losses, the sampler. The two training loops (main and
# train_mapper) read them by name: stage 1 x1, pooled, z = mapper_examples(step, ...) and mapper_loss;
# stage 2 x0, x1, t, cond = training_pairs(step, ...) and flow_loss (both made a few steps ahead by
# DataLoader workers), then backward_loss, optimizer_step and the EMA.


def build_prior(args, config):
    if args.prior == "gaussian":
        return flow.GaussianPrior(config["latent_shape"])
    mapper = Mapper(config["pooled_dim"], config["latent_shape"], args.mapper_width, args.mapper_noise_dim)
    return TextPrior(mapper, args.prior_sigma)


class Mapper(nn.Module):
    """P: pooled text embedding (and an optional noise vector z) -> a point in latent space."""

    def __init__(self, text_dim, latent_shape, width=512, noise_dim=0):
        super().__init__()
        self.latent_shape, self.noise_dim = tuple(latent_shape), noise_dim
        self.net = nn.Sequential(nn.Linear(text_dim + noise_dim, width), nn.SiLU(), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, int(np.prod(latent_shape))))

    def forward(self, pooled, z=None):
        if self.noise_dim:
            pooled = torch.cat([pooled, z], 1)
        return self.net(pooled).reshape(-1, *self.latent_shape)


class TextPrior(nn.Module):
    """x0 | y = P(tau(y), z) + sigma * noise, noise ~ N(0, I) of latent shape. The mapper's z (the
    authors' code: --mapper-noise-dim 32) is read off the same noise by a fixed orthonormal
    projection, so z ~ N(0, I) and one noise tensor per image still fixes the sample."""

    def __init__(self, mapper, sigma):
        super().__init__()
        self.mapper = mapper
        self.register_buffer("sigma", torch.tensor(float(sigma)))
        dim, generator = int(np.prod(mapper.latent_shape)), torch.Generator().manual_seed(0)
        projection = torch.linalg.qr(torch.randn(dim, max(mapper.noise_dim, 1), generator=generator))[0]
        self.register_buffer("z_projection", projection[:, : mapper.noise_dim].contiguous())

    def centre(self, y, noise):
        """P(tau(y), z): the point the prior of caption y is centred on."""
        return self.mapper(y[0], noise.flatten(1) @ self.z_projection)

    def sample(self, y, noise):
        return self.centre(y, noise) + self.sigma * noise


def mapper_examples(step, x1, pooled, args):
    """Stage 1's global batch `step`: (x1, pooled tau(y), z), z ~ N(0, I) of --mapper-noise-dim per example
    (~seed: other generators than stage 2's at the same step)."""
    z = flow.draw_examples(~args.seed, step, len(x1), (args.mapper_noise_dim,))[0]
    return x1, pooled, z


def mapper_loss(mapper, x1, pooled, z):
    """|| P(tau(y), z) - x1 ||^2: minimised by the conditional mean E[x1 | y] (z is ignored there)."""
    return (mapper(pooled, z).float() - x1).pow(2).mean()


@torch.no_grad()
def training_pairs(step, x1, y, prior, train, args):
    """Stage 2's global batch `step` ready to train on: (x0, x1, t, cond), a pure function of (seed, step);
    y = (pooled (B, Dp), tokens (B, L, Dt)) of the pairs' captions, `train` the training Split.

    x0 = centre + sigma * noise, from each example's own noise (flow.draw_examples): centre = 0 for the
    Gaussian prior, P(tau(y), z) for the text prior. With --coupling ot the noise parts are re-paired by
    exact minibatch OT against the residuals x1 - centre, and every x0 keeps its own caption's centre:
    re-pairing across captions would turn the conditional prior back into a mixture, and OT among
    identical captions only (as train_class.py does within a class) would do nothing, since captions
    almost never repeat within a batch. For the Gaussian prior this is plain BatchOT. t ~ --time-schedule.

    Classifier-free guidance: each caption is dropped to the empty caption "" (cond = the null condition)
    with probability --cfg-dropout. The dropped sample's x0 comes from the prior of a random training
    caption (--cfg-null-prior mixture: the marginal prior, so v_null is the unconditional flow) or from its
    own caption's (own)."""
    noise, t, uniforms = flow.draw_examples(args.seed, step, len(x1), x1.shape[1:], args.time_schedule,
                                            uniforms=2)  # per example: dropout, and the dropped one's caption
    dropped = uniforms[:, 0] < args.cfg_dropout
    prior_y = y
    if args.prior == "text" and args.cfg_null_prior == "mixture" and dropped.any():
        # A random training pair, so captions by frequency (float64: u * N stays below N).
        pairs = (uniforms[dropped, 1].double() * len(train)).long().numpy()
        prior_y = (y[0].clone(), y[1])
        prior_y[0][dropped] = torch.from_numpy(np.asarray(train.pooled[train.caption_of_pair[pairs]],
                                                          np.float32))
    centre = prior.centre(prior_y, noise) if args.prior == "text" else torch.zeros_like(x1)
    x0 = centre + flow.couple(prior.sample(prior_y, noise) - centre, x1 - centre, args.coupling)
    null_pooled, null_tokens = expand(train.null("cpu"), len(x1))
    cond = (torch.where(dropped[:, None], null_pooled, y[0]),  # (B, Dp)
            torch.where(dropped[:, None, None], null_tokens, y[1]))  # (B, L, Dt)
    return x0, x1, t, cond


def flow_loss(model, x0, x1, t, pooled, tokens):
    """E_t || v_theta(x_t, t, y) - (x1 - x0) ||^2, x_t = (1 - t) x0 + t x1."""
    return flow.flow_matching_loss(model, x0, x1, (pooled, tokens), t=t)


def autocast(args, device):
    """bf16 autocast on CUDA with --precision bf16; CPUs run float32."""
    if device.type == "cuda" and args.precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def backward_loss(loss, forward, parts, args, world_size, device):
    """Gradients of loss(forward, *parts) over this process's share `parts` of the batch (tensors of the
    same length), in micro-batches of at most --max-batch-per-gpu; returns the loss of the share."""
    micro_batches = list(zip(*(part.split(args.max_batch_per_gpu) for part in parts)))
    total = 0.0
    for i, micro in enumerate(micro_batches):
        micro = [part.to(device, non_blocking=True) for part in micro]
        share = len(micro[0]) / len(parts[0])
        # DDP all-reduces gradients only on the last micro-batch.
        sync = nullcontext() if i == len(micro_batches) - 1 or world_size == 1 else forward.no_sync()
        with sync:
            with autocast(args, device):
                value = loss(forward, *micro)
            (value * share).backward()  # the mean over this process's whole share
        total += value.item() * share
    return total


def optimizer_step(step, loss, model, optimizer, lr, args):
    """Warm-up learning rate, gradient clipping (before the step), AdamW; returns the gradient norm. A
    non-finite loss stops the run before the step, so the last checkpoint is a good one."""
    for group in optimizer.param_groups:
        group["lr"] = flow.warmup_lr(lr, step, args.warmup_steps)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
        raise SystemExit(f"error: non-finite loss {loss} or gradient norm at step {step + 1}; nothing "
                         f"saved for this step, the last checkpoint in {args.out} is intact")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item()


def ema_decay(step, args):
    """--ema-decay, warmed up as (1 + step) / (10 + step): without it the EMA of a short run is
    mostly the zero-initialised network (0.995^500 = 8% of it after 500 steps)."""
    return min(args.ema_decay, (1 + step) / (10 + step))


def expand(null, batch):
    """The null condition (pooled (1, Dp), tokens (1, L, Dt)) for a batch."""
    return null[0].expand(batch, -1), null[1].expand(batch, -1, -1)


@torch.no_grad()
def sample(model, prior, y, null, noise, nfe, cfg_scale):
    """Euler with `nfe` steps from x0 ~ the prior of captions y (from `noise`) to t = 1, with classifier-free
    guidance v = v_null + s (v_y - v_null) on all channels."""
    velocity = flow.guided_velocity(model, y, expand(null, len(noise)), cfg_scale)
    return flow.solve(velocity, prior.sample(y, noise), nfe, "euler").x


# ----------------------------------------------------------------------------------------------
# Model: DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers"), velocity output, with
# cross-attention to the caption's token states in every block (as PixArt-alpha).

MODELS = flow.DIT_PRESETS  # tiny, mini, small, small-p8, S, B, L: width, depth, heads, patch (as train_class)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def time_embedding(t, dim, max_period=10_000):
    """Sinusoidal features of t in [0, 1], scaled by 1000 so the frequencies match DiT's steps."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = 1000 * t.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class DiTBlock(nn.Module):
    """Self-attention and MLP, each modulated and gated by the conditioning (adaLN-zero), with
    cross-attention to the text between them."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm_cross = nn.LayerNorm(width, eps=1e-6)
        self.cross_q, self.cross_kv = nn.Linear(width, width), nn.Linear(width, 2 * width)
        self.cross_proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def attention(self, x):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))

    def cross_attention(self, x, text):
        q = rearrange(self.cross_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.cross_kv(text), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        return self.cross_proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))

    def forward(self, x, c, text):  # x (B, N, D), c (B, D), text (B, L, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attention(self.norm_cross(x), text)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """v_theta(x_t, t, y): x_t (B, C, H, W), t (B,) in [0, 1], y = (pooled (B, Dp), tokens (B, L, Dt));
    the empty caption's embeddings are the null condition of classifier-free guidance."""

    def __init__(self, latent_shape, pooled_dim, token_dim, width, depth, heads, patch):
        super().__init__()
        channels, height, width_pixels = latent_shape
        if height % patch or width_pixels % patch:
            raise SystemExit(f"error: latents of size {height}x{width_pixels} cannot be cut into "
                             f"{patch}x{patch} patches")
        self.patch, self.grid = patch, (height // patch, width_pixels // patch)
        self.embed_patches = nn.Linear(patch * patch * channels, width)
        self.position = nn.Parameter(0.02 * torch.randn(1, self.grid[0] * self.grid[1], width))
        self.embed_time = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.embed_pooled = nn.Sequential(nn.Linear(pooled_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.embed_tokens = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, width))
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
        for layer in [*self.embed_time, *self.embed_pooled]:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        # adaLN-zero: every block's gates and cross-attention output, and the output layer, start at
        # zero, so the network starts as the identity on the residual stream and predicts v = 0.
        for block in self.blocks:
            for layer in (block.adaLN_modulation[-1], block.cross_proj):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        for layer in (self.adaLN_out[-1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y):
        h, w = self.grid
        tokens = rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=self.patch, q=self.patch)
        tokens = self.embed_patches(tokens) + self.position  # (B, N, D)
        c = self.embed_time(time_embedding(t, 256)) + self.embed_pooled(y[0])  # (B, D)
        text = self.embed_tokens(y[1])  # (B, L, D)
        for block in self.blocks:
            tokens = block(tokens, c, text)
        shift, scale = self.adaLN_out(c).chunk(2, dim=1)
        tokens = self.out(modulate(self.norm_out(tokens), shift, scale))
        return rearrange(tokens, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=self.patch, q=self.patch)


# The presets of train_text.py checkpoints made before flow.DIT_PRESETS (no "shared_presets" in their config).
PRESETS_BEFORE = {**MODELS, "tiny": {"width": 64, "depth": 2, "heads": 2}, "small": {"width": 128, "depth": 4,
                                                                                     "heads": 4}}


def build_model(args, config):
    presets = MODELS if config.get("shared_presets") else PRESETS_BEFORE
    preset = {**presets[args.model], "patch": args.patch_size}  # --patch-size, else the preset's
    return DiT(tuple(config["latent_shape"]), config["pooled_dim"], config["token_dim"], **preset)


def initial_networks(args, config, device):
    """(model, its EMA, prior): the DiT comes first, from the seed, so that --prior gaussian and --prior text
    start from the same network (the mapper's draws come after it); the same weights on every rank."""
    torch.manual_seed(args.seed)
    model = build_model(args, config).to(device)
    return model, copy.deepcopy(model).requires_grad_(False), build_prior(args, config).to(device)


# ----------------------------------------------------------------------------------------------
# Training: stage 1, the mapper (text prior only); stage 2, the flow.


def main(args):
    rank, world_size, device = flow.setup_distributed()
    if args.global_batch % world_size:
        raise SystemExit(f"error: --global-batch {args.global_batch} is not divisible by "
                         f"{world_size} processes")
    latest, checkpoint = checkpoint_to_resume(args, rank)  # before any data is read
    if device.type == "cuda":  # TF32 for the float32 matmuls left outside bf16 autocast (Ampere and newer)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    splits, normalisation = load_data(args, rank, world_size, device)
    train = splits["train"]
    null = train.null(device)  # the empty caption: the null condition of classifier-free guidance
    config = {"latent_shape": list(train.images.shape[1:]), "pooled_dim": null[0].shape[1],
              "token_dim": null[1].shape[2], **normalisation, "data_sha256": data_fingerprint(train),
              "shared_presets": True}
    model, ema, prior = initial_networks(args, config, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    mapper_optimizer = None
    if args.prior == "text":
        mapper_optimizer = torch.optim.AdamW(prior.parameters(), lr=args.mapper_lr,
                                             weight_decay=args.weight_decay)
    mapper_start = flow_start = 0  # the steps done before, by the run that --resume continues
    resumed_flow = checkpoint is not None and checkpoint["kind"] == "text"  # stage 1 is then done
    if checkpoint:
        check_resumable(latest, checkpoint, args, config)
    if checkpoint and resumed_flow:
        for name, part in (("model", model), ("ema", ema), ("opt", optimizer), ("prior", prior)):
            part.load_state_dict(checkpoint[name])
        flow_start = checkpoint["step"]
    elif checkpoint:  # stopped in stage 1
        prior.mapper.load_state_dict(checkpoint["mapper"])
        mapper_optimizer.load_state_dict(checkpoint["opt"])
        mapper_start = checkpoint["step"]
    decode = make_decoder(args.vae, config, device)
    grid = grid_batch(splits, device)
    if rank == 0:
        start_outputs(args, checkpoint)
        print(f"{len(train)} training pairs of shape {config['latent_shape']}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{world_size} process(es) on {device}")

    # Stage 1 (text prior): the mapper P, trained here or taken from --mapper-from.
    if args.prior == "text" and not resumed_flow:
        if args.mapper_from:
            load_mapper(prior, args.mapper_from, config)
        else:
            train_mapper(args, config, prior, mapper_optimizer, train, mapper_start, rank, world_size, device)
        if rank == 0:
            report_mapper(prior.mapper, splits, grid, decode, args, device)
    prior.requires_grad_(False).eval()

    # Stage 2: the flow, from the prior that is now fixed.
    forward = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    forward = torch.compile(forward) if args.compile else forward
    # The batches' prior is a CPU copy of the trained mapper's, so it is made only now, after stage 1.
    batches = TrainingBatches("flow", train, copy.deepcopy(prior).cpu(), args, rank, world_size)
    batches_ahead = iter(batch_loader(batches, flow_start, args.steps, args, device))
    sums, start = torch.zeros(4, dtype=torch.float64), time.perf_counter()
    progress = tqdm(range(flow_start, args.steps), initial=flow_start, total=args.steps, desc="flow",
                    disable=rank != 0 or args.quiet)
    for step in progress:
        waited = time.perf_counter()
        # This process's share of training_pairs(step, ...), made by a worker; waits only if they fall behind.
        x0, x1, t, cond = next(batches_ahead)
        waited = time.perf_counter() - waited
        loss = backward_loss(flow_loss, forward, (x0, x1, t, *cond), args, world_size, device)
        grad_norm = optimizer_step(step, loss, model, optimizer, args.lr, args)
        flow.update_ema(ema, model, ema_decay(step, args))
        sums += torch.tensor([loss, flow.transport_cost(x0, x1), waited, 1.0], dtype=torch.float64)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            loss = write_log(args, "flow", done, sums, start, grad_norm, rank, world_size, device)
            progress.set_postfix(loss=f"{loss:.4f}")
            sums, start = torch.zeros(4, dtype=torch.float64), time.perf_counter()
        # The checkpoint first: a failing sample grid must not lose the training since the last one.
        if done % args.ckpt_every == 0 or done == args.steps:
            save_checkpoint(args, config, done, rank, model=model, ema=ema, opt=optimizer, prior=prior)
        if rank == 0 and (done % args.sample_every == 0 or done == args.steps):
            save_sample_grids(args, done, ema.eval(), prior, grid, null, decode)
    barrier()
    if rank == 0:  # the last line: what this run wrote where
        print(f"wrote {args.out} ({', '.join(written_files(args))})")
    if dist.is_initialized():
        dist.destroy_process_group()


def train_mapper(args, config, prior, optimizer, train, first_step, rank, world_size, device):
    """Stage 1: P by regression onto the paired latents, from `first_step` to --mapper-steps."""
    forward = nn.parallel.DistributedDataParallel(prior.mapper) if world_size > 1 else prior.mapper
    batches = TrainingBatches("mapper", train, None, args, rank, world_size)
    batches_ahead = iter(batch_loader(batches, first_step, args.mapper_steps, args, device))
    sums, start = torch.zeros(4, dtype=torch.float64), time.perf_counter()
    progress = tqdm(range(first_step, args.mapper_steps), initial=first_step, total=args.mapper_steps,
                    desc="mapper", disable=rank != 0 or args.quiet)
    for step in progress:
        waited = time.perf_counter()
        x1, pooled, z = next(batches_ahead)  # this process's share of mapper_examples(step, ...)
        waited = time.perf_counter() - waited
        loss = backward_loss(mapper_loss, forward, (x1, pooled, z), args, world_size, device)
        grad_norm = optimizer_step(step, loss, prior.mapper, optimizer, args.mapper_lr, args)
        sums += torch.tensor([loss, 0.0, waited, 1.0], dtype=torch.float64)  # no prior samples: no cost
        done = step + 1
        if done % args.log_every == 0 or done == args.mapper_steps:
            loss = write_log(args, "mapper", done, sums, start, grad_norm, rank, world_size, device)
            progress.set_postfix(loss=f"{loss:.4f}")
            sums, start = torch.zeros(4, dtype=torch.float64), time.perf_counter()
        if done % args.ckpt_every == 0 or done == args.mapper_steps:
            save_checkpoint(args, config, done, rank, "mapper", mapper=prior.mapper, opt=optimizer)


# ----------------------------------------------------------------------------------------------
# Data: the built-in captioned shapes, "a {size} {colour} {shape} {position}". Some combinations
# are held out of training, so the generator has to compose attributes it has only seen apart.
# Geometry is in units of a 32-pixel image, scaled to --image-size.

COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1),
           "yellow": (1, 1, 0), "magenta": (1, 0, 1), "cyan": (0, 1, 1)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 4.0, "large": 7.0}  # half-width of the shape
POSITIONS = {"on the left": (-7, 0), "on the right": (7, 0), "at the top": (0, -7), "at the bottom": (0, 7)}


def shape_combinations():
    """All (size, colour, shape, position) tuples, in a fixed order."""
    return [(s, c, k, p) for s in SIZES for c in COLOURS for k in SHAPES for p in POSITIONS]


def is_held_out(combination):
    """One combination in six (24 of 144) never appears in training; every single attribute does."""
    size, colour, shape, position = combination
    index = list(SIZES).index(size) + list(COLOURS).index(colour) + SHAPES.index(shape)
    return (index + list(POSITIONS).index(position)) % 6 == 0


def caption_of(combination):
    return "a {} {} {} {}".format(*combination)


def render_shapes(combination, count, image_size, rng):
    """(count, 3, H, W) in [-1, 1]: the shape on black, jittered in centre, size and brightness."""
    size, colour, shape, position = combination
    scale = image_size / 32
    radius = ((SIZES[size] + rng.uniform(-0.5, 0.5, count)) * scale)[:, None, None]
    centres = (16 + np.array(POSITIONS[position]) + rng.uniform(-1.5, 1.5, (count, 2))) * scale
    cx, cy = centres.T[:, :, None, None]
    y, x = np.mgrid[:image_size, :image_size] + 0.5  # pixel centres
    if shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    elif shape == "square":
        mask = (abs(x - cx) <= radius) & (abs(y - cy) <= radius)
    else:  # triangle pointing up, apex at the top of its box
        mask = (y <= cy + radius) & (abs(x - cx) <= (y - cy + radius) / 2)
    rgb = (np.array(COLOURS[colour]) * rng.uniform(0.8, 1.0, (count, 1))).astype(np.float32)  # (count, 3)
    return (mask[:, None] * rgb[:, :, None, None]) * 2 - 1


def make_shapes(combinations, per_caption, image_size, seed):
    """(images (N, 3, H, W) float32 in [-1, 1], captions list[str], caption index of each image)."""
    rng = np.random.RandomState(seed)
    images = np.concatenate([render_shapes(c, per_caption, image_size, rng) for c in combinations])
    return images, [caption_of(c) for c in combinations], np.repeat(np.arange(len(combinations)), per_caption)


# ----------------------------------------------------------------------------------------------
# Data: MS-COCO's captioned-image layout (ROOT/annotations/captions_{split}.json and ROOT/{split}/ images):
# MS-COCO itself, or any captioned images written that way (benchmarks/captioned_fashion.py).


def read_coco(root, split):
    """(image paths, captions, image index of each caption); one line for a missing file, a caption
    of an image that is not listed or not on disk, or an empty caption."""
    annotation_file = os.path.join(root, "annotations", f"captions_{split}.json")
    if not os.path.isfile(annotation_file):
        raise SystemExit(f"error: missing annotation file {annotation_file}")
    with open(annotation_file) as file:
        annotations = json.load(file)
    files = {image["id"]: os.path.join(root, split, image["file_name"]) for image in annotations["images"]}
    captions = annotations["annotations"]
    unlisted = [a["image_id"] for a in captions if a["image_id"] not in files]
    empty = [a.get("id") for a in captions if not a["caption"].strip()]
    image_ids = sorted({a["image_id"] for a in captions} - set(unlisted))
    missing = [files[i] for i in image_ids if not os.path.isfile(files[i])]
    for bad, what in ((unlisted, f"captions in {annotation_file} refer to images it does not list (e.g. id"),
                      (empty, f"empty captions in {annotation_file} (e.g. annotation id"),
                      (missing, "captioned images are missing on disk (e.g.")):
        if bad:
            raise SystemExit(f"error: {len(bad)} {what} {bad[0]})")
    index_of = {image_id: k for k, image_id in enumerate(image_ids)}
    texts = [" ".join(a["caption"].split()) for a in captions]
    return [files[i] for i in image_ids], texts, np.array([index_of[a["image_id"]] for a in captions])


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> uint8 (3, S, S): the short side resized to S (antialiased bilinear), then the centre
    S x S, as train_class.py reads image folders; an unreadable file is one line naming it."""

    def __init__(self, paths, size):
        from torchvision import transforms

        self.paths = paths
        self.transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                                             transforms.PILToTensor()])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(flow.read_image(self.paths[index]))


# ----------------------------------------------------------------------------------------------
# Data: frozen text encoders, encoder(captions) -> (pooled (B, D) for the mapper and adaLN, tokens
# (B, L, D) for cross-attention). As in Stable Diffusion, cross-attention sees every position,
# padding included, and the empty caption "" is the null condition of classifier-free guidance.


class WordEncoder(nn.Module):
    """The built-in encoder: a fixed random vector per word (seeded by the word itself, so any word
    has one); tokens = the word vectors, zero-padded to 12, pooled = their mean (zero for "").
    Being linear in the words, it lets the mapper compose attributes for held-out combinations, but
    a word never seen in training is noise to it: it knows no synonyms."""

    length, dim = 12, 64

    @torch.no_grad()
    def forward(self, captions):
        tokens = torch.zeros(len(captions), self.length, self.dim)
        for row, caption in enumerate(captions):
            for k, word in enumerate(re.findall(r"[\w'-]+", caption.lower())[: self.length]):
                generator = torch.Generator().manual_seed(zlib.crc32(word.encode()))
                tokens[row, k] = torch.randn(self.dim, generator=generator) / math.sqrt(self.dim)
        counts = (tokens.abs().sum(2) > 0).sum(1).clamp(min=1)
        return tokens.sum(1) / counts[:, None], tokens


class TransformersEncoder(nn.Module):
    """A pretrained text model from a transformers folder or hub name, its kind read off its config.
    CLIP: pooled = the EOS state (pooler_output). A sentence-embedding model (BERT-style, e.g.
    all-MiniLM-L6-v2): pooled = the attention-masked mean of the last hidden states, L2-normalised,
    as sentence-transformers computes it. tokens = the last hidden states, --text-length of them."""

    def __init__(self, name, length):
        super().__init__()
        transformers = flow.require("transformers")
        try:
            self.clip = transformers.AutoConfig.from_pretrained(name).model_type.startswith("clip")
            model = transformers.CLIPTextModel if self.clip else transformers.AutoModel
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(name)
            self.model = model.from_pretrained(name).eval().requires_grad_(False)
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: cannot load the text encoder {name!r} ({type(error).__name__}); "
                             "download it once with network access or pass a local folder") from None
        self.length = length

    @torch.no_grad()
    def forward(self, captions):
        batch = self.tokenizer(list(captions), padding="max_length", max_length=self.length, truncation=True,
                               return_tensors="pt").to(self.model.device)
        if self.clip:
            out = self.model(input_ids=batch.input_ids)
            return out.pooler_output.float(), out.last_hidden_state.float()
        tokens = self.model(**batch).last_hidden_state.float()
        mask = batch.attention_mask[..., None].float()
        return F.normalize((tokens * mask).sum(1) / mask.sum(1).clamp(min=1), dim=1), tokens


def load_text_encoder(name, length, device):
    encoder = WordEncoder() if name == "builtin" else TransformersEncoder(name, length)
    return encoder.to(device)


def encode_captions(encoder, captions, batch=256, progress=False):
    """pooled (N, D) and tokens (N, L, D) as float16 numpy arrays, once per caption."""
    parts = [encoder(captions[start: start + batch]) for start in
             tqdm(range(0, len(captions), batch), desc="text encode", disable=not progress)]
    return tuple(torch.cat(part).half().cpu().numpy() for part in zip(*parts))


# ----------------------------------------------------------------------------------------------
# Data: splits of (image, caption) pairs in model space (pixels, or normalised latents).


def to_model_space(x):
    """uint8 pixels -> [-1, 1]; float data (latents, rendered canvases) is already what the model sees."""
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()


class Split:
    """images (N, C, H, W) (uint8 pixels, or float); per distinct caption its text and its pooled (Dp,) and
    token (L, Dt) embeddings (memory-mapped when cached); pair k = image image_of_pair[k] with caption
    caption_of_pair[k]. Row 0 is the empty caption "", the null condition."""

    def __init__(self, images, captions, pooled, tokens, image_of_pair, caption_of_pair):
        self.images, self.captions, self.pooled, self.tokens = images, captions, pooled, tokens
        self.image_of_pair, self.caption_of_pair = np.asarray(image_of_pair), np.asarray(caption_of_pair)

    def __len__(self):
        return len(self.image_of_pair)

    def batch(self, index, device):
        """Pairs `index` -> (x1 (B, C, H, W), y = (pooled (B, Dp), tokens (B, L, Dt)))."""
        index = np.asarray(index)
        rows = self.caption_of_pair[index]
        x1 = to_model_space(torch.from_numpy(np.asarray(self.images[self.image_of_pair[index]])))
        y = (torch.from_numpy(np.asarray(a[rows], np.float32)).to(device) for a in (self.pooled, self.tokens))
        return x1.to(device), tuple(y)

    def null(self, device):
        """The empty caption's (pooled (1, Dp), tokens (1, L, Dt))."""
        return tuple(torch.from_numpy(np.asarray(a[:1], dtype=np.float32)).to(device)
                     for a in (self.pooled, self.tokens))

    def texts(self, index):
        return [self.captions[row] for row in self.caption_of_pair[np.asarray(index)]]


def make_split(images, texts_of_pairs, image_of_pair, pooled_and_tokens):
    """A Split from the caption text of every pair; pooled_and_tokens(distinct captions) embeds the
    distinct captions, "" first."""
    distinct = ["", *sorted(set(texts_of_pairs) - {""})]
    row = {caption: k for k, caption in enumerate(distinct)}
    caption_of_pair = [row[c] for c in texts_of_pairs]
    return Split(images, distinct, *pooled_and_tokens(distinct), image_of_pair, caption_of_pair)


def shape_splits(args, encoder):
    """train: 40 images per seen caption; val: 8 fresh images per seen caption; heldout: 8 per
    held-out caption; one pair per image."""
    seen = [c for c in shape_combinations() if not is_held_out(c)]
    held = [c for c in shape_combinations() if is_held_out(c)]
    splits = {}
    for name, combinations, per_caption, seed in (("train", seen, 40, args.seed),
                                                  ("val", seen, 8, args.seed + 1),
                                                  ("heldout", held, 8, args.seed + 2)):
        images, captions, caption_of_image = make_shapes(combinations, per_caption, args.image_size, seed)
        if name == "train":
            images, caption_of_image = (a[:args.max_train_images] for a in (images, caption_of_image))
        splits[name] = make_split(images, [captions[k] for k in caption_of_image], np.arange(len(images)),
                                  lambda distinct: encode_captions(encoder, distinct))
    return splits


def read_split(args, name):
    """(images as a Dataset, caption text of each pair, image of each pair) of a split on disk."""
    paths, texts, image_of_pair = read_coco(args.data_root, name)
    if name == args.coco_split and args.max_train_images:
        keep = image_of_pair < args.max_train_images
        texts = [caption for caption, kept in zip(texts, keep) if kept]
        paths, image_of_pair = paths[:args.max_train_images], image_of_pair[keep]
    return ImageFiles(paths, args.image_size), texts, image_of_pair


def text_cache_folder(args, cache):
    slug = re.sub(r"\W+", "-", os.path.basename(args.text_encoder.rstrip("/")))
    return os.path.join(cache, f"text-{slug}-{args.text_length}")


def lazy_text_encoder(args, device):
    """A function that loads --text-encoder on its first call and returns that one afterwards: the
    splits' text caches share one load, and none happens when every cache exists."""
    return functools.cache(lambda: load_text_encoder(args.text_encoder, args.text_length, device))


def cached_text(args, cache, captions, rank, text_encoder):
    """(pooled, tokens) of `captions`, memory-mapped from CACHE/text-{encoder}, made once by rank 0
    with text_encoder() (see lazy_text_encoder): one cache per encoder, beside the latents they share.
    Its info.json, written last, holds the sha256 of both files, verified when they are read: a file cut
    short or damaged is one line naming it, never trained on."""
    folder = text_cache_folder(args, cache)
    info_path = os.path.join(folder, "info.json")
    files = {name: os.path.join(folder, f"{name}.npy") for name in ("pooled", "tokens")}
    wanted = {"text_encoder": args.text_encoder, "text_length": args.text_length, "captions": len(captions),
              "captions_sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest()}
    # Made once; again if it was made before caches had checksums.
    if rank == 0 and "sha256" not in (flow.read_json(info_path, "text cache index")
                                      if os.path.isfile(info_path) else {}):
        with flow.write_errors(folder):
            os.makedirs(folder, exist_ok=True)
        for name, array in zip(files, encode_captions(text_encoder(), captions, progress=not args.quiet)):
            with flow.atomic_file(files[name]) as file:
                np.save(file, array)
        checksums = {name: flow.file_sha256(path) for name, path in files.items()}
        save_json(dict(wanted, sha256=checksums), info_path)  # written last: marks a complete cache
    barrier()
    info = flow.read_json(info_path, "text cache index")
    if {key: info.get(key) for key in wanted} != wanted:
        raise SystemExit(f"error: text cache {folder} holds other captions or another encoder: "
                         "remove it or pass another --latent-cache")
    for name, path in files.items():
        if not os.path.isfile(path) or flow.file_sha256(path) != info["sha256"][name]:
            raise SystemExit(f"error: text cache file {path} is missing or damaged (its sha256 is not the "
                             f"one in {info_path}): delete {folder} to encode the captions again")
    return tuple(np.load(path, mmap_mode="r") for path in files.values())


def latent_cache(args, name):
    return os.path.join(args.latent_cache or os.path.join(args.out, "latents"), name)


ENCODE_BATCH = 16  # TAEF2 on 2 CPU cores: 73 images/s at 16 per batch, 48 at 256 (docs/fashion_mnist.md)


def encode_to_cache(args, images, cache, rank, world_size, device):
    """Encode `images` (a Dataset of (3, S, S) images) into the cache's shards (flow.py's protocol); each
    rank makes shards rank, rank + world_size, ... Shards already written (by an interrupted run) are kept."""
    todo = flow.missing_shards(cache, len(images), rank, world_size)
    if not todo:
        return
    autoencoder = flow.load_autoencoder(args.vae, device)
    progress = tqdm(total=sum(stop - start for _, start, stop in todo), desc="encode", unit="img",
                    disable=rank != 0 or args.quiet)
    for shard, start, stop in todo:
        torch.manual_seed(shard)  # an SD VAE latent is a posterior sample: the same whichever run makes it
        part = torch.utils.data.Subset(images, range(start, stop))
        latents = []
        for pixels in flow.stop_on_unreadable_images(torch.utils.data.DataLoader(
                part, batch_size=ENCODE_BATCH, num_workers=args.workers)):
            latents.append(autoencoder.encode(to_model_space(pixels).to(device)).float().cpu())
            progress.update(len(pixels))
        flow.write_shard(cache, shard, {"latents": torch.cat(latents).numpy()})
    progress.close()


def latent_images(args, images, cache, rank, world_size, device, normalisation):
    """(normalised latents of `images`, normalisation) from the cache folder, encoded first if the cache is
    not complete; its index info.json, written last, holds every shard's sha256, verified on reading.

    The raw latents of an autoencoder are far from unit variance per channel, which would make N(0, I) and
    sigma mean different things in every channel. So x = (z - mean_c) / std_c, with the per-channel
    statistics of the training cache (normalisation=None: this cache's own), kept with the cache and in
    every checkpoint; decoding undoes it (make_decoder)."""
    info_path = os.path.join(cache, "info.json")
    wanted = {"data": args.data, "data_root": os.path.realpath(args.data_root), "images": len(images),
              "image_size": args.image_size, "vae": args.vae}
    # Made once; again if it was made before caches had shards and checksums.
    if "shards" not in (flow.read_json(info_path, "latent cache index") if os.path.isfile(info_path) else {}):
        with flow.write_errors(cache):
            os.makedirs(cache, exist_ok=True)
        if rank == 0:
            flow.remove_partial_saves(cache)  # the cut-off shard of a run that was killed while writing it
        barrier()
        encode_to_cache(args, images, cache, rank, world_size, device)
        barrier()
        if rank == 0:
            info = dict(wanted, shards=flow.shard_checksums(cache, len(images)))
            latents = flow.read_shards(cache, info["shards"])["latents"]
            info["latent_mean"], info["latent_std"] = flow.channel_statistics(latents)
            save_json(info, info_path)  # written last: its presence marks a complete cache
        barrier()
    info = flow.read_json(info_path, "latent cache index")
    if any(info.get(key) != value for key, value in wanted.items()):
        made = {key: info.get(key) for key in wanted}
        raise SystemExit(f"error: latent cache {cache} was made from {made}, not {wanted}: "
                         "pass another --latent-cache")
    normalisation = normalisation or {key: info[key] for key in ("latent_mean", "latent_std")}
    mean, std = (np.array(normalisation[key], np.float32).reshape(-1, 1, 1)
                 for key in ("latent_mean", "latent_std"))
    latents = (flow.read_shards(cache, info["shards"])["latents"] - mean) / std
    if not np.isfinite(latents).all():  # an autoencoder that diverged
        raise SystemExit(f"error: latent cache {cache} holds NaN or inf values: delete it to encode again")
    return latents, normalisation


def disk_split(args, name, rank, world_size, device, normalisation=None, text_encoder=None):
    """(Split, normalisation) of split `name` on disk: uint8 pixels in memory (--vae none), or normalised
    latents from the cache --latent-cache/{name} (see latent_images); the captions' embeddings from the text
    cache beside them (text_encoder: see cached_text)."""
    images, texts, image_of_pair = read_split(args, name)
    cache = latent_cache(args, name)
    if args.vae == "none":
        loader = torch.utils.data.DataLoader(images, batch_size=256, num_workers=args.workers)
        array, normalisation = torch.cat(list(flow.stop_on_unreadable_images(loader))).numpy(), {}
    else:
        array, normalisation = latent_images(args, images, cache, rank, world_size, device, normalisation)
    split = make_split(array, texts, image_of_pair,
                       lambda distinct: cached_text(args, cache, distinct, rank,
                                                    text_encoder or lazy_text_encoder(args, device)))
    return split, normalisation


def data_fingerprint(split):
    """sha256 of the training pairs (images or latents, the caption texts, which caption goes with which
    image): --resume and --mapper-from compare it, so another data set, under any path, is refused."""
    digest = hashlib.sha256()
    for array in (split.images, split.image_of_pair, split.caption_of_pair):
        digest.update(np.ascontiguousarray(array).data)
    digest.update("\n".join(split.captions).encode())
    return digest.hexdigest()


def load_data(args, rank, world_size, device):
    """({split name: Split}, normalisation): the latent statistics, empty for pixels."""
    if args.data == "shapes":
        return shape_splits(args, load_text_encoder(args.text_encoder, args.text_length, device)), {}
    names = [args.coco_split, args.coco_val_split]
    text_encoder = lazy_text_encoder(args, device)  # loaded once, if a text cache must be built
    if rank == 0 and not all(os.path.isfile(os.path.join(text_cache_folder(args, latent_cache(args, name)),
                                                         "info.json")) for name in names):
        text_encoder()  # it will be needed: a missing encoder is found now, not after the images are encoded
    train, normalisation = disk_split(args, names[0], rank, world_size, device, text_encoder=text_encoder)
    splits = {"train": train}
    for name in names[1:]:
        splits["val" if name == args.coco_val_split else name] = disk_split(
            args, name, rank, world_size, device, normalisation, text_encoder)[0]
    return splits, normalisation


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
    """Item `step`: this process's share of global batch `step` of a stage, ready to train on: stage 1
    ("mapper") mapper_examples(step, ...) = (x1, pooled, z); stage 2 ("flow") training_pairs(step, ...) =
    (x0, x1, t, cond).

    A pure function of (seed, step): the pairs come from BatchOrder, the rest from mapper_examples or
    training_pairs, which draw every example's randomness from its own generator and compute the text
    prior's centres and the OT pairs over the whole global batch, alike in every process, before this
    process takes its slice. So 1 or N processes, any micro-batch split and a resume on another number of
    processes train on the same pairs. Read by a DataLoader with --workers workers, the frozen mapper and
    the scipy assignment run off the training step's critical path."""

    def __init__(self, stage, train, prior, args, rank, world_size):
        self.stage, self.train, self.prior, self.args = stage, train, prior, args
        self.order = BatchOrder(len(train), args.global_batch, args.seed)
        share = args.global_batch // world_size
        self.share = slice(rank * share, (rank + 1) * share)  # contiguous, as DistributedSampler

    def __len__(self):
        return self.args.mapper_steps if self.stage == "mapper" else self.args.steps

    def __getitem__(self, step):
        x1, y = self.train.batch(self.order.indices(step), "cpu")
        if self.stage == "mapper":
            return tuple(part[self.share] for part in mapper_examples(step, x1, y[0], self.args))
        x0, x1, t, cond = training_pairs(step, x1, y, self.prior, self.train, self.args)
        return x0[self.share], x1[self.share], t[self.share], tuple(part[self.share] for part in cond)


def batch_loader(batches, first_step, last_step, args, device):
    """Global batches first_step .. last_step - 1 of `batches` (TrainingBatches), prepared on the CPU in
    --workers processes (0: this one), a few steps ahead of the training step."""
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(first_step, last_step),
                                       num_workers=args.workers, pin_memory=device.type == "cuda")


# ----------------------------------------------------------------------------------------------
# Checkpoints, logs and pictures.


def barrier():
    if dist.is_initialized():
        dist.barrier()


def save_json(obj, path):
    with flow.atomic_file(path, "w") as file:
        json.dump(obj, file, indent=2)


def save_checkpoint(args, config, step, rank, folder="checkpoints", **parts):
    """checkpoints/: the flow (model, ema, opt, prior); mapper/: stage 1 (mapper, opt). No random
    generator states: every batch is a pure function of (seed, step) (TrainingBatches)."""
    if rank == 0:
        checkpoint = {"kind": "text" if folder == "checkpoints" else "text-mapper", "args": vars(args),
                      "config": config, "step": step,
                      **{name: part.state_dict() for name, part in parts.items()}}
        flow.save_atomic(checkpoint, os.path.join(args.out, folder, f"step_{step:07d}.pt"))


def checkpoint_to_resume(args, rank):
    """(path, checkpoint) that --resume continues, else (None, None): the newest flow checkpoint that
    loads and passes its checks, or, before stage 2 has saved one, the newest such mapper checkpoint. A
    newer, corrupted one is skipped, with one line. Temporary files of writes that a crash interrupted
    are removed first."""
    folders = [os.path.join(args.out, name) for name in ("checkpoints", "mapper")]
    if rank == 0:
        flow.remove_partial_saves(args.out, *folders)
    newest = [flow.latest_checkpoint(folder) for folder in folders]
    flow.refuse_overwrite(args.out, newest, args.resume)
    if not args.resume:
        return None, None
    latest, checkpoint = flow.latest_valid_checkpoint(folders[0] if newest[0] else folders[1])
    if checkpoint.get("kind") == "text" and checkpoint["step"] >= args.steps:
        options = f"--steps {args.steps} leaves"
    elif checkpoint["step"] >= args.mapper_steps and args.steps == 0:  # a mapper checkpoint
        options = f"--mapper-steps {args.mapper_steps} and --steps 0 leave"
    else:
        return latest, checkpoint
    raise SystemExit(f"error: --resume: {latest} is already at step {checkpoint['step']}: {options} "
                     "nothing to train")


def check_resumable(latest, checkpoint, args, config):
    """Stop with one line unless `checkpoint` (read from file `latest`) was trained with this run's options
    and data. The resume is then exact on any number of processes: later batches depend on (seed, step)."""
    saved = checkpoint.get("args", {})
    for key in CONFIG_KEYS:
        if saved.get(key) != getattr(args, key):
            raise SystemExit(f"error: {latest} was trained with --{key.replace('_', '-')} "
                             f"{saved.get(key)!r}, not {getattr(args, key)!r}: "
                             "use another --out or the same options")
    problem = other_data(checkpoint, config)
    if problem:
        raise SystemExit(f"error: {latest} was trained on {problem}: use another --out or the same data")


def other_data(checkpoint, config):
    """How the data a checkpoint was trained on differs from this run's, or None. Checkpoints older than
    the data fingerprint are compared on shapes and latent statistics only."""
    saved = {"data_sha256": config["data_sha256"], **checkpoint.get("config", {})}
    if saved["data_sha256"] != config["data_sha256"]:
        return "another data set (other images or captions: its data fingerprint differs)"
    return None if saved == config else f"other data ({checkpoint.get('config')})"


def mapper_state(checkpoint, path):
    """The mapper weights inside a stage-1 or a text-prior flow checkpoint."""
    state = checkpoint.get("mapper") or {k[len("mapper."):]: v for k, v in checkpoint.get("prior", {}).items()
                                         if k.startswith("mapper.")}
    if not state:
        raise SystemExit(f"error: the checkpoint {path} has no mapper (trained with --prior gaussian?)")
    return state


def load_mapper(prior, path, config):
    """--mapper-from: the trained mapper of another run on the same data."""
    checkpoint = flow.load_checkpoint(path)
    state = mapper_state(checkpoint, path)
    problem = other_data(checkpoint, config)
    if problem:
        raise SystemExit(f"error: the mapper in {path} was trained on {problem}")
    try:
        prior.mapper.load_state_dict(state)
    except RuntimeError:
        raise SystemExit(f"error: the mapper in {path} does not fit this run (another --mapper-width or "
                         "--mapper-noise-dim?)") from None


def start_outputs(args, checkpoint):
    """The output folders, args.json, and a log holding only the lines up to the checkpoint resumed (a
    resumed run writes the later ones again; a fresh run, checkpoint None, starts an empty log)."""
    for folder in [args.out] + [os.path.join(args.out, sub) for sub in ("checkpoints", "mapper", "samples")]:
        with flow.write_errors(folder):
            os.makedirs(folder, exist_ok=True)
    save_json(vars(args), os.path.join(args.out, "args.json"))
    flow.trim_log(os.path.join(args.out, "log.jsonl"), functools.partial(kept_in_log, checkpoint=checkpoint))


def kept_in_log(record, checkpoint):
    """Whether a line of the log stays when the run continues from `checkpoint`."""
    if checkpoint is None:
        return False
    if checkpoint["kind"] == "text":  # in stage 2: every stage-1 line, and the flow's up to the checkpoint
        return record["stage"] == "mapper" or record["step"] <= checkpoint["step"]
    # in stage 1: its loss lines up to the checkpoint (the validation losses come when it ends)
    return record["stage"] == "mapper" and "loss" in record and record["step"] <= checkpoint["step"]


def write_log(args, stage, done, sums, start, grad_norm, rank, world_size, device):
    """One log.jsonl line (rank 0) with the means over the global batches of `stage` since the last line (at
    time `start`): `sums` (loss, transport cost, seconds waiting for batches, steps) is all-reduced over the
    processes. Returns the loss."""
    if world_size > 1:
        dist.all_reduce(sums)
    loss_sum, cost_sum, wait_sum, count = sums.tolist()
    lr, elapsed = args.lr if stage == "flow" else args.mapper_lr, time.perf_counter() - start
    record = {"stage": stage, "step": done, "loss": loss_sum / count,
              "lr": flow.warmup_lr(lr, done - 1, args.warmup_steps),
              "images_per_s": args.global_batch * count / world_size / elapsed, "grad_norm": grad_norm,
              "data_wait_ms": 1000 * wait_sum / count}  # > 0 when the --workers fall behind
    if stage == "flow":  # the mapper's batches have no prior samples
        record["transport_cost"] = cost_sum / count
    if device.type == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if rank == 0:
        append_log(args, record)
    return record["loss"]


def append_log(args, record):
    log_path = os.path.join(args.out, "log.jsonl")
    with flow.write_errors(log_path), open(log_path, "a") as file:
        file.write(json.dumps(record) + "\n")


def written_files(args):
    """What a finished run wrote in --out."""
    files = ["args.json", "log.jsonl"]
    if args.prior == "text" and not args.mapper_from:  # stage 1 trained here
        files.append(f"mapper/step_{args.mapper_steps:07d}.pt")
    files += ["mapper_means.png"] if args.prior == "text" else []
    if args.steps:
        files += [f"checkpoints/step_{args.steps:07d}.pt", f"samples/step_{args.steps:07d}_nfe_*.png"]
    return files


@torch.no_grad()
def mapper_validation_loss(mapper, split, device, batch=512):
    """Mean squared error of P on a whole split (z from a fixed generator: no global RNG is used)."""
    total, generator = 0.0, torch.Generator().manual_seed(0)
    for start in range(0, len(split), batch):
        x1, y = split.batch(np.arange(start, min(start + batch, len(split))), device)
        z = torch.randn(len(x1), mapper.noise_dim, generator=generator).to(device)
        total += mapper_loss(mapper, x1, y[0], z).item() * len(x1)
    return total / len(split)


def grid_batch(splits, device):
    """(x1, y, captions) of the sample grids: 16 pairs spread evenly over the validation and held-out
    splits (8 + 8 for the shapes, 16 of --coco-val-split)."""
    names = [name for name in splits if name != "train"]
    parts = []
    for name in names:
        index = np.linspace(0, len(splits[name]) - 1, 16 // len(names)).astype(int)
        parts.append((*splits[name].batch(index, device), splits[name].texts(index)))
    x1, y, captions = zip(*parts)
    return torch.cat(x1), tuple(map(torch.cat, zip(*y))), [c for texts in captions for c in texts]


def save_image_grid(images, titles, path, columns=8):
    """images (B, 3, H, W) in [-1, 1] -> one PNG with each image titled by its caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(images) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False)
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, pixels, titles):
        ax.imshow(image, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(title, 24)), fontsize=5)
    fig.tight_layout()
    fig.savefig(f"{path}.tmp.png", dpi=150)
    plt.close(fig)
    os.replace(f"{path}.tmp.png", path)


@torch.no_grad()
def report_mapper(mapper, splits, grid, decode, args, device):
    """P's validation losses into log.jsonl, and mapper_means.png: rows of 8 real images, each with
    P's decoded means for the same captions right below it."""
    losses = {f"val_loss_{name}": mapper_validation_loss(mapper, split, device)
              for name, split in splits.items() if name != "train"}
    append_log(args, {"stage": "mapper", "step": args.mapper_steps, **losses})
    print("mapper " + ", ".join(f"{name} {value:.4f}" for name, value in losses.items()))
    x1, y, captions = grid
    means = mapper(y[0], torch.zeros(len(x1), mapper.noise_dim, device=device))
    images, titles = [], []
    for k in range(0, len(x1), 8):
        images += [decode(x1[k: k + 8]), decode(means[k: k + 8])]
        titles += [f"real: {c}" for c in captions[k: k + 8]] + [f"P mean: {c}" for c in captions[k: k + 8]]
    save_image_grid(torch.cat(images), titles, os.path.join(args.out, "mapper_means.png"))


@torch.no_grad()
def save_sample_grids(args, step, ema, prior, grid, null, decode):
    """EMA samples of the grid captions at every --sample-nfe, each titled by its caption."""
    x1, y, captions = grid
    generator = torch.Generator().manual_seed(args.seed)  # a fixed generator: grids compare across steps
    noise = torch.randn(x1.shape, generator=generator).to(x1.device)
    for nfe in args.sample_nfe:
        images = decode(sample(ema, prior, y, null, noise, nfe, args.sample_cfg))
        save_image_grid(images, captions, os.path.join(args.out, "samples", f"step_{step:07d}_nfe_{nfe}.png"))


def make_decoder(vae, config, device):
    """Model-space latents -> images in [-1, 1]: undo the latent normalisation, then decode with the
    autoencoder, loaded on first use."""
    autoencoder = None

    def decode(latents):
        nonlocal autoencoder
        if vae == "none":
            return latents.float().clamp(-1, 1)
        autoencoder = autoencoder or flow.load_autoencoder(vae, device)
        mean, std = (torch.tensor(config[key], device=latents.device).reshape(-1, 1, 1)
                     for key in ("latent_mean", "latent_std"))
        return autoencoder.decode(latents.float() * std + mean)

    return decode


# ----------------------------------------------------------------------------------------------
# Loading for sampling (sample.py).


def load_for_sampling(path, device, use_ema=True, vae=None, text_encoder=None):
    """A checkpoint file (or a run folder: its latest checkpoint) -> the flow.Sampler sample.py
    uses. `vae` and `text_encoder` override the autoencoder and text encoder recorded in the
    checkpoint (the same model in a folder that moved, or a local copy of a hub model)."""
    path = flow.resolve_checkpoint(path)
    checkpoint = flow.load_checkpoint(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != "text":
        raise SystemExit(f"error: {path} is not a train_text.py checkpoint (kind {checkpoint.get('kind')!r})")
    args, config = argparse.Namespace(**checkpoint["args"]), checkpoint["config"]
    if args.prior == "text":
        mapper_state(checkpoint, path)  # stops with one line if the mapper is missing
    device = torch.device(device)
    model = flow.load_weights(build_model(args, config), checkpoint["ema" if use_ema else "model"], path)
    prior = flow.load_weights(build_prior(args, config), checkpoint["prior"], path)
    text_encoder = text_encoder or args.text_encoder
    encoder = load_text_encoder(text_encoder, args.text_length, device)
    null = encoder([""])
    if null[0].shape[1] != config["pooled_dim"] or null[1].shape[2] != config["token_dim"]:
        raise SystemExit(f"error: the text encoder {text_encoder!r} gives {null[0].shape[1]}-d pooled "
                         f"and {null[1].shape[2]}-d token embeddings; {path} was trained on "
                         f"{config['pooled_dim']}-d and {config['token_dim']}-d")
    return flow.Sampler(
        kind="text", model=model.to(device).eval().requires_grad_(False), prior=prior.to(device).eval(),
        latent_shape=tuple(config["latent_shape"]), make_condition=lambda captions: encoder(list(captions)),
        null_condition=lambda batch: expand(null, batch), options=checkpoint["args"],
        decode=make_decoder(vae or args.vae, config, device), trained_with_dropout=args.cfg_dropout > 0)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: an option whose default is None says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    add = parser.add_argument
    # Data.
    add("--data", default="shapes", choices=["shapes", "coco"],
        help="built-in captioned shapes (offline), or captioned images in MS-COCO's layout")
    add("--data-root", default=None, help="--data coco: the folder holding annotations/captions_SPLIT.json "
                                          "and SPLIT/ for both splits")
    add("--coco-split", default="train2017", help="--data coco: the training split")
    add("--coco-val-split", default="val2017", help="--data coco: the validation split (its captions and "
                                                    "images give the sample grids and the mapper's "
                                                    "validation loss)")
    add("--max-train-images", type=int, default=None,
        help="use only the first N training images (quick runs)")
    add("--image-size", type=int, default=None,
        help="image side in pixels (default: 32 for shapes, 64 otherwise)")
    add("--vae", default="none", help="'none' (train on pixels), 'sd-ema', 'sd-mse', a local diffusers "
                                      "AutoencoderKL folder, or a folder with taef2_encoder.pth and "
                                      "taef2_decoder.pth")
    add("--latent-cache", default=None, help="folder for the encoded latents and text embeddings "
                                             "(default: OUT/latents); share it between runs")
    add("--workers", type=int, default=2,
        help="DataLoader workers that prepare the training batches (text-prior centres, noise, t, caption "
             "dropout, OT pairs) and read images for a latent cache; 0: in the main process")
    add("--text-encoder", default=None,
        help="'builtin', or a transformers folder or hub name of a CLIP text model or a sentence-embedding "
             f"model such as all-MiniLM-L6-v2 (default: builtin for shapes, {CLIP_DEFAULT} for coco)")
    add("--text-length", type=int, default=32, help="tokens per caption of a transformers text encoder "
                                                    "(padded or cut; 32 keeps the COCO token cache small)")
    # Model and method.
    add("--model", default=None, choices=list(MODELS),
        help="DiT preset, as in train_class.py (default: small-p8 for the 32x8x8 latents of TAEF2 at "
             "--image-size 64, as captioned Fashion-MNIST; mini otherwise)")
    add("--patch-size", type=int, default=None,
        help="DiT patch side in latent pixels (default: the preset's; 8 for the built-in 32x32 shapes)")
    add("--prior", default="text", choices=["gaussian", "text"],
        help="N(0, I) (CondOT) or N(P(tau(y)), sigma^2 I)")
    add("--prior-sigma", type=float, default=0.5,
        help="sigma of the text prior (the paper: 0.7 on COCO latents)")
    add("--coupling", default="independent", choices=["independent", "ot"],
        help="pairs as drawn, or minibatch OT of the prior noise (see training_pairs)")
    add("--time-schedule", default="uniform", choices=["uniform", "logit-normal"], help="distribution of t")
    add("--cfg-dropout", type=float, default=0.1,
        help="probability of dropping a caption to the empty caption (CFG training)")
    add("--cfg-null-prior", default="mixture", choices=["mixture", "own"], help="text prior: dropped-caption "
        "samples start from a random training caption's prior (the mixture) or their own")
    add("--mapper-steps", type=int, default=1000, help="stage-1 optimizer steps of the mapper (text prior)")
    add("--mapper-lr", type=float, default=1e-3, help="AdamW learning rate of the mapper after warmup")
    add("--mapper-width", type=int, default=512, help="hidden width of the mapper MLP")
    add("--mapper-noise-dim", type=int, default=0,
        help="size of the noise z fed to the mapper (the authors' code: 32)")
    add("--mapper-from", default=None,
        help="take the mapper from this checkpoint (stage 1 or text-prior flow) instead of training one")
    # Optimisation.
    add("--steps", type=int, default=1000, help="stage-2 (flow) optimizer steps; 0 trains only the mapper")
    add("--global-batch", type=int, default=64, help="images per optimizer step, over all processes")
    add("--max-batch-per-gpu", type=int, default=512,
        help="micro-batch cap per process; larger batches accumulate gradients")
    add("--lr", type=float, default=3e-4, help="AdamW learning rate after warmup")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay (both stages)")
    add("--warmup-steps", type=int, default=100, help="linear learning-rate warmup (both stages)")
    add("--grad-clip", type=float, default=1.0, help="gradient norm clip (both stages)")
    add("--ema-decay", type=float, default=0.995, help="EMA decay per step (after a warmup, see ema_decay)")
    add("--precision", default="bf16", choices=["bf16", "fp32"],
        help="autocast precision on CUDA (CPU runs fp32)")
    add("--compile", action="store_true", help="torch.compile the network")
    add("--seed", type=int, default=0,
        help="seed for the shapes, weights, data order and every example's noise (the same on every rank)")
    # Logging, samples, checkpoints.
    add("--log-every", type=int, default=50, help="steps between log.jsonl lines")
    add("--sample-every", type=int, default=500, help="steps between EMA sample grids")
    add("--sample-nfe", type=int, nargs="+", default=[1, 4, 16], help="NFEs (Euler) of the sample grids")
    add("--sample-cfg", type=float, default=1.0, help="guidance scale of the sample grids")
    add("--ckpt-every", type=int, default=500, help="steps between checkpoints (both stages)")
    add("--out", default="runs/train_text", help="output folder")
    add("--resume", action="store_true", help="continue from the latest checkpoint in --out (stage 1 or 2)")
    add("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args):
    """Every option checked before any data is read; fills in the data set's defaults."""
    shapes = args.data == "shapes"
    if shapes and (args.vae != "none" or args.data_root or args.text_encoder not in (None, "builtin")):
        parser.error("--data shapes generates pixels for the built-in text encoder: no --vae, --data-root or "
                     "--text-encoder")
    if not shapes and (not args.data_root or not os.path.isdir(args.data_root)):
        parser.error(f"--data {args.data} needs --data-root pointing to the data (got {args.data_root!r})")
    if args.data == "coco":
        missing = [path for split in (args.coco_split, args.coco_val_split)
                   for path in (os.path.join(args.data_root, "annotations", f"captions_{split}.json"),
                                os.path.join(args.data_root, split)) if not os.path.exists(path)]
        if missing:
            parser.error(f"--data-root {args.data_root} lacks {', '.join(missing)} (MS-COCO's layout)")
    args.image_size = args.image_size or (32 if shapes else 64)
    args.text_encoder = args.text_encoder or ("builtin" if shapes else CLIP_DEFAULT)
    for name in ("vae", "text_encoder"):  # recorded in the checkpoint: absolute, so sample.py finds it
        if os.path.isdir(getattr(args, name)):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    if args.vae not in ("none", *flow.VAE_NAMES) and not os.path.isdir(args.vae):
        parser.error(f"--vae {args.vae}: not 'none', 'sd-ema', 'sd-mse' or an existing folder")
    if args.mapper_from and args.prior != "text":
        parser.error("--mapper-from needs --prior text (the Gaussian prior has no mapper)")
    for name in ("cfg_dropout", "ema_decay"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must lie in [0, 1)")
    for name in ("mapper_steps", "global_batch", "max_batch_per_gpu", "log_every", "sample_every",
                 "ckpt_every", "patch_size", "warmup_steps", "max_train_images", "text_length",
                 "mapper_width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("lr", "mapper_lr", "grad_clip", "prior_sigma"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("workers", "steps", "mapper_noise_dim"):  # --steps 0: train the mapper alone
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if min(args.sample_nfe) < 1:
        parser.error("--sample-nfe must be positive")
    # The latents' side, where it is known before encoding: pixels, or the SD VAE and TAEF2 (8x smaller).
    eightfold = args.vae in flow.VAE_NAMES or flow.is_taef2_folder(args.vae)
    side = args.image_size if args.vae == "none" else -(-args.image_size // 8) if eightfold else None
    args.model = args.model or ("small-p8" if flow.is_taef2_folder(args.vae) and side == 8 else "mini")
    if args.patch_size is None:  # not `or`: --patch-size 0 must reach its check
        args.patch_size = 8 if shapes else MODELS[args.model]["patch"]
    if side and side % args.patch_size:
        parser.error(f"--patch-size {args.patch_size} does not divide the {side}x{side} latents of "
                     f"--image-size {args.image_size}")
    problem = flow.out_folder_problem(args.out)
    if problem:
        parser.error(f"--out {args.out}: {problem}")


if __name__ == "__main__":
    main(parse_args())

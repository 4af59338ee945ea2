"""Text-to-image flow matching with a text-conditional prior (the paper's MS-COCO experiment).

Two stages, in one run:
  1. the mapper P: a small MLP from the pooled text embedding tau(y) to latent space, trained by
     mean squared error onto the paired image latents, so that P(tau(y)) estimates the conditional
     mean E[x1 | y] (skipped with --prior gaussian, or given by --mapper-from);
  2. the flow: a DiT-style velocity network v(x_t, t, y) with cross-attention to the text token
     states, trained by flow matching from the prior
        --prior gaussian   x0 ~ N(0, I)                      (CondOT in the paper)
        --prior text       x0 | y ~ N(P(tau(y)), sigma^2 I)  (ours; sigma = --prior-sigma)
     with --coupling independent (pairs as drawn) or ot (minibatch optimal transport, see
     `draw_prior`: every prior sample keeps its caption's centre, only the noise is re-paired).

Data:
  --data shapes (default, offline): a generated set of 32x32 coloured shapes with compositional
      captions such as "a small red circle on the left"; a fixed set of caption combinations is
      held out of training. Pixels are the latents (--vae none) and the text encoder is a built-in
      word-level encoder. `check_caption` reads a generated image and says whether it matches.
  --data coco: MS-COCO captions (COCO_ROOT/annotations/captions_{split}.json and COCO_ROOT/{split}/),
      centre-cropped and resized (--image-size 64 or 256), encoded once with the SD VAE and cached;
      captions encoded once with CLIP (openai/clip-vit-base-patch32) and cached: the pooled
      embedding feeds the mapper and adaLN, the token states feed cross-attention.

Run:
    python train_text.py                                   # built-in shapes, both stages, CPU minutes
    python train_text.py --prior gaussian --out runs/text_gaussian
    torchrun --standalone --nproc_per_node=8 train_text.py --data coco --coco-root /data/coco \\
        --image-size 256 --model DiT-B --patch-size 2 --global-batch 256 --steps 400000 --lr 1e-4 \\
        --prior text --prior-sigma 0.7 --mapper-noise-dim 32 --out runs/coco_text
    # two nodes: torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \\
    #     --rdzv_endpoint=HOST:29500 train_text.py ...   (same options)
Resume an interrupted run: the same command plus --resume continues from the latest checkpoint in
--out (exactly: model, EMA, optimiser, mapper, step and every process's random state); --steps and
--mapper-steps may grow, the options that define the run may not.

Outputs in --out: args.json, log.jsonl (one JSON line per log step), checkpoints/step_XXXXXXX.pt
(the flow; the mapper lives inside "prior"), mapper/step_XXXXXXX.pt (stage 1), mapper_means.png
(real images next to P's decoded means), samples/step_XXXXXXX.png (grids titled by caption).
Sample with sample.py, which calls `load_for_sampling` below.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import re
import time

import numpy as np
import scipy.ndimage
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import flow

MODELS = {  # name: (width, depth, heads) of the velocity network; DiT-S / DiT-B as in Peebles & Xie
    "tiny": (64, 2, 2),
    "small": (128, 4, 4),
    "DiT-S": (384, 12, 6),
    "DiT-B": (768, 12, 12),
}
CLIP_DEFAULT = "openai/clip-vit-base-patch32"
# Options that define the model, the method and the data: a checkpoint made with other values cannot
# be resumed. Everything else (steps, logging, batch cap, workers) may change on resume.
CONFIG_KEYS = ("data", "coco_split", "image_size", "vae", "text_encoder", "text_length", "prior", "prior_sigma",
               "coupling", "mapper_lr", "mapper_width", "mapper_noise_dim", "model", "patch_size", "global_batch",
               "lr", "warmup_steps", "weight_decay", "grad_clip", "ema_decay", "cfg_dropout", "time_schedule", "seed")

# ----------------------------------------------------------------------------------------------
# The built-in captioned shapes. Every caption is "a {size} {colour} {shape} {position}"; some
# combinations are held out of training, so the generator has to compose attributes it has only
# seen apart. Geometry is in units of a 32-pixel image and scaled to --image-size.

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
    s, c, k, p = combination
    index = (list(SIZES).index(s) + list(COLOURS).index(c) + SHAPES.index(k) + list(POSITIONS).index(p))
    return index % 6 == 0


def caption_of(combination):
    size, colour, shape, position = combination
    return f"a {size} {colour} {shape} {position}"


def render_shapes(combination, count, image_size, rng):
    """`count` images (count, 3, H, W) in [-1, 1]: the shape on black, jittered in centre, size and brightness."""
    size, colour, shape, position = combination
    scale = image_size / 32
    radius = ((SIZES[size] + rng.uniform(-0.5, 0.5, count)) * scale)[:, None, None]
    cx, cy = ((16 + np.array(POSITIONS[position]) + rng.uniform(-1.5, 1.5, (count, 2))) * scale).T[:, :, None, None]
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
    caption_index = np.repeat(np.arange(len(combinations)), per_caption)
    return images, [caption_of(c) for c in combinations], caption_index


def read_shape(image):
    """What an image (H, W, 3) uint8 shows, by measurement: (combination, features).

    Foreground = the largest connected blob of pixels whose brightest channel is above mid-grey
    (generated images may hold stray bright pixels). colour: nearest palette colour
    of the mean foreground colour; position: the larger offset of the centroid from the centre;
    size: the longer side of the bounding box; shape: a triangle's mass sits below the centre of
    its box, and a circle fills pi/4 of its box, a square all of it. features: those
    measurements (9 numbers), for a Frechet distance.
    """
    scale = image.shape[0] / 32
    pixels = image.astype(np.float64) / 255
    blobs, count = scipy.ndimage.label(pixels.max(2) > 0.5)
    if count == 0:
        return None, np.zeros(9)
    mask = blobs == 1 + np.argmax(np.bincount(blobs.ravel())[1:])  # the largest blob: stray bright pixels are not the shape
    ys, xs = np.nonzero(mask)
    mean_rgb = pixels[mask].mean(0)
    colour = min(COLOURS, key=lambda c: np.abs(mean_rgb / mean_rgb.max() - COLOURS[c]).sum())
    dx, dy = (xs.mean() + 0.5) / scale - 16, (ys.mean() + 0.5) / scale - 16
    position = ("on the left" if dx < 0 else "on the right") if abs(dx) > abs(dy) else ("at the top" if dy < 0 else "at the bottom")
    width, height = (xs.max() - xs.min() + 1) / scale, (ys.max() - ys.min() + 1) / scale
    size = "small" if max(width, height) < 11 else "large"
    fill = mask.sum() / ((width * scale) * (height * scale))
    drop = (ys.mean() - (ys.min() + ys.max()) / 2) / (height * scale)  # triangle: mass sits 1/6 below the box centre
    shape = "triangle" if drop > 0.08 else ("circle" if fill < 0.97 else "square")
    features = np.array([*mean_rgb, dx, dy, width, height, fill, drop])
    return (size, colour, shape, position), features


def check_caption(image, caption):
    """True when the image (H, W, 3) uint8 shows what its built-in caption says."""
    combination, _ = read_shape(image)
    return combination is not None and caption_of(combination) == caption


# ----------------------------------------------------------------------------------------------
# MS-COCO captions: the official annotation files and image folders.


def read_coco(root, split):
    """(image paths, captions, caption -> image index) of COCO_ROOT/annotations/captions_{split}.json.

    Stops with one line if the file is missing, a caption refers to an image that is not listed
    or not on disk, or a caption is empty.
    """
    annotation_file = os.path.join(root, "annotations", f"captions_{split}.json")
    if not os.path.isfile(annotation_file):
        raise SystemExit(f"error: missing annotation file {annotation_file}")
    with open(annotation_file) as f:
        annotations = json.load(f)
    files = {image["id"]: os.path.join(root, split, image["file_name"]) for image in annotations["images"]}
    captions = annotations["annotations"]
    unlisted = [a["image_id"] for a in captions if a["image_id"] not in files]
    if unlisted:
        raise SystemExit(f"error: {len(unlisted)} captions in {annotation_file} refer to images it does not list (e.g. id {unlisted[0]})")
    empty = [a.get("id") for a in captions if not a["caption"].strip()]
    if empty:
        raise SystemExit(f"error: {len(empty)} empty captions in {annotation_file} (e.g. annotation id {empty[0]})")
    image_ids = sorted({a["image_id"] for a in captions})
    missing = [files[i] for i in image_ids if not os.path.isfile(files[i])]
    if missing:
        raise SystemExit(f"error: {len(missing)} captioned images are missing on disk (e.g. {missing[0]})")
    index_of = {image_id: k for k, image_id in enumerate(image_ids)}
    texts = [" ".join(a["caption"].split()) for a in captions]
    return [files[i] for i in image_ids], texts, np.array([index_of[a["image_id"]] for a in captions])


def center_crop(image, size):
    """PIL image -> the central square, resized to size x size (antialiased bicubic), uint8 HWC."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.convert("RGB").crop((left, top, left + side, top + side))
    return np.array(square.resize((size, size), resample=3))  # 3 = PIL.Image.BICUBIC


class ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return torch.from_numpy(center_crop(image, self.size)).permute(2, 0, 1).float() / 127.5 - 1


def encode_images(paths, args, device):
    """SD-VAE latents (N, 4, S/8, S/8) float16 of the images, one posterior sample each."""
    vae = flow.load_vae(args.vae, device)
    loader = torch.utils.data.DataLoader(ImageFiles(paths, args.image_size), batch_size=64, num_workers=args.workers)
    latents = [flow.vae_encode(vae, images.to(device)).half().cpu() for images in tqdm(loader, desc="VAE encode")]
    return torch.cat(latents).numpy()


# ----------------------------------------------------------------------------------------------
# Text encoders: encode(captions) -> pooled (B, D) for the mapper and adaLN, tokens (B, L, D) for
# cross-attention. Both are frozen. As in Stable Diffusion, cross-attention sees every position,
# padding included, and the empty caption "" is the null condition of classifier-free guidance.


class WordEncoder(nn.Module):
    """The built-in encoder: a fixed random vector per word of the shapes vocabulary.

    tokens = the word vectors, zero-padded to 8; pooled = their mean (zero for ""). A bag of
    words is all the shape captions need, and being linear in the words it lets the mapper
    compose attributes for held-out captions. (A randomly initialised CLIP would be a random
    nonlinear function of the caption, which says nothing about held-out captions.)
    """

    length, dim = 8, 64

    def __init__(self):
        super().__init__()
        words = sorted({w for c in shape_combinations() for w in caption_of(c).split()})
        self.index = {w: i for i, w in enumerate(words)}
        vectors = torch.randn(len(words), self.dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("vectors", vectors / math.sqrt(self.dim))

    @torch.no_grad()
    def forward(self, captions):
        tokens = torch.zeros(len(captions), self.length, self.dim, device=self.vectors.device)
        for row, caption in enumerate(captions):
            unknown = [w for w in caption.split() if w not in self.index]
            if unknown:
                raise SystemExit(f"error: the built-in text encoder does not know the word {unknown[0]!r} (caption {caption!r})")
            words = caption.split()[: self.length]
            tokens[row, : len(words)] = self.vectors[[self.index[w] for w in words]]
        counts = torch.tensor([max(1, len(c.split()[: self.length])) for c in captions], device=tokens.device)
        return tokens.sum(1) / counts[:, None], tokens


class ClipEncoder(nn.Module):
    """CLIP's text transformer (transformers): pooled = the EOS state, tokens = the last hidden states."""

    def __init__(self, name, length):
        super().__init__()
        transformers = flow.require("transformers")
        try:
            self.tokenizer = transformers.CLIPTokenizer.from_pretrained(name)
            self.model = transformers.CLIPTextModel.from_pretrained(name).eval().requires_grad_(False)
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: cannot load the CLIP text encoder {name!r} ({type(error).__name__}); "
                             "download it once with network access or pass a local folder") from None
        self.length, self.dim = length, self.model.config.hidden_size

    @torch.no_grad()
    def forward(self, captions):
        device = next(self.model.parameters()).device
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.length, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        out = self.model(input_ids=ids)
        return out.pooler_output.float(), out.last_hidden_state.float()


def load_text_encoder(args, device):
    encoder = WordEncoder() if args.text_encoder == "builtin" else ClipEncoder(args.text_encoder, args.text_length)
    return encoder.to(device)


def encode_captions(encoder, captions, batch=256, progress=False):
    """pooled (N, D) and tokens (N, L, D) as float16 numpy arrays, once per caption."""
    pooled, tokens = [], []
    for start in tqdm(range(0, len(captions), batch), desc="text encode", disable=not progress):
        p, k = encoder(captions[start: start + batch])
        pooled.append(p.half().cpu().numpy())
        tokens.append(k.half().cpu().numpy())
    return np.concatenate(pooled), np.concatenate(tokens)


# ----------------------------------------------------------------------------------------------
# Data splits. One split = image latents, the caption table (text, pooled, tokens) and the pairs
# (image index, caption index) that training draws from. Arrays may be memory-mapped caches.


class Split:
    def __init__(self, latents, captions, pooled, tokens, image_of_caption):
        self.latents, self.captions, self.pooled, self.tokens = latents, captions, pooled, tokens
        self.image_of_caption = np.asarray(image_of_caption)  # (num captions,) the image each caption describes

    def __len__(self):
        return len(self.image_of_caption)

    def batch(self, index, device):
        """Pairs `index` -> (x1 (B, C, H, W), cond = (pooled (B, Dp), tokens (B, L, Dt)))."""
        index = np.asarray(index)
        x1 = torch.from_numpy(np.asarray(self.latents[self.image_of_caption[index]], dtype=np.float32))
        return x1.to(device), self.condition(index, device)

    def condition(self, index, device):
        as_tensor = lambda a: torch.from_numpy(np.asarray(a[index], dtype=np.float32)).to(device)  # noqa: E731
        return as_tensor(self.pooled), as_tensor(self.tokens)


def shape_splits(args, encoder):
    """train: 40 images per seen caption; val: 8 fresh images per seen caption; heldout: 8 per held-out caption."""
    seen = [c for c in shape_combinations() if not is_held_out(c)]
    held = [c for c in shape_combinations() if is_held_out(c)]
    splits = {}
    for name, combinations, per_caption, seed in (("train", seen, 40, args.seed), ("val", seen, 8, args.seed + 1),
                                                  ("heldout", held, 8, args.seed + 2)):
        images, captions, caption_of_image = make_shapes(combinations, per_caption, args.image_size, seed)
        pooled, tokens = encode_captions(encoder, captions)
        # one pair per image: "caption" index k of the split = image k, whose text is captions[caption_of_image[k]]
        splits[name] = Split(images, [captions[i] for i in caption_of_image], pooled[caption_of_image],
                             tokens[caption_of_image], np.arange(len(images)))
    return splits


def coco_split(args, split, encoder, device, rank):
    """Read one COCO split, building the latent and text caches once (rank 0; the others wait)."""
    paths, captions, image_of_caption = read_coco(args.coco_root, split)
    vae_tag = re.sub(r"[^A-Za-z0-9]+", "-", args.vae)
    text_tag = re.sub(r"[^A-Za-z0-9]+", "-", args.text_encoder)
    cache = os.path.join(args.cache_dir or os.path.join(args.coco_root, "cache"), split)
    latents_file = os.path.join(cache, f"latents_{args.image_size}px_{vae_tag}.npy")
    unique = sorted(set(captions))
    text_files = [os.path.join(cache, f"text_{text_tag}_L{args.text_length}_{part}.npy") for part in ("pooled", "tokens")]
    if rank == 0:
        os.makedirs(cache, exist_ok=True)
        if not os.path.isfile(latents_file):
            save_npy_atomic(latents_file, encode_images(paths, args, device))
        if not all(os.path.isfile(f) for f in text_files):
            pooled, tokens = encode_captions(encoder, unique, progress=True)
            save_npy_atomic(text_files[0], pooled)
            save_npy_atomic(text_files[1], tokens)
    if dist.is_initialized():
        dist.barrier()
    latents = np.load(latents_file, mmap_mode="r")
    pooled, tokens = (np.load(f, mmap_mode="r") for f in text_files)
    if len(latents) != len(paths) or len(pooled) != len(unique):
        raise SystemExit(f"error: the cache in {cache} does not match the annotations; delete it to rebuild")
    row = {c: k for k, c in enumerate(unique)}
    caption_rows = np.array([row[c] for c in captions])
    # pairs index the annotation list; pooled/tokens are looked up through caption_rows lazily
    return Split(latents, captions, IndexedArray(pooled, caption_rows), IndexedArray(tokens, caption_rows), image_of_caption)


class IndexedArray:
    """array[rows[index]]: the per-annotation view of a per-unique-caption cache, without copying it."""

    def __init__(self, array, rows):
        self.array, self.rows = array, rows

    def __getitem__(self, index):
        return self.array[self.rows[index]]


def save_npy_atomic(path, array):
    with open(f"{path}.tmp", "wb") as f:
        np.save(f, array)
    os.replace(f"{path}.tmp", path)


# ----------------------------------------------------------------------------------------------
# Stage 1: the mapper P and the text prior x0 | y ~ N(P(tau(y), z), sigma^2 I).


class Mapper(nn.Module):
    """P: pooled text embedding (and an optional noise vector z) -> a point in latent space."""

    def __init__(self, text_dim, latent_shape, width=512, noise_dim=0):
        super().__init__()
        self.latent_shape, self.noise_dim = tuple(latent_shape), noise_dim
        self.net = nn.Sequential(nn.Linear(text_dim + noise_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, int(np.prod(latent_shape))))

    def forward(self, pooled, z=None):
        if self.noise_dim:
            pooled = torch.cat([pooled, z], 1)
        return self.net(pooled).reshape(-1, *self.latent_shape)


class TextPrior(nn.Module):
    """x0 = P(tau(y), z) + sigma * noise, noise ~ N(0, I) of latent shape.

    The mapper's z (as the authors' code: --mapper-noise-dim 32) is read off the same noise by a
    fixed orthonormal projection, so z ~ N(0, I) and one noise tensor per image still fixes the
    sample (sample.py draws one per image).
    """

    def __init__(self, mapper, sigma):
        super().__init__()
        self.mapper = mapper
        self.register_buffer("sigma", torch.tensor(float(sigma)))
        dim = int(np.prod(mapper.latent_shape))
        projection = torch.linalg.qr(torch.randn(dim, max(mapper.noise_dim, 1), generator=torch.Generator().manual_seed(0)))[0]
        self.register_buffer("z_projection", projection[:, : mapper.noise_dim].contiguous())

    def centre(self, cond, noise):
        """P(tau(y), z): the point the prior of caption y is centred on."""
        return self.mapper(cond[0], noise.flatten(1) @ self.z_projection)

    def sample(self, cond, noise):
        return self.centre(cond, noise) + self.sigma * noise


def mapper_loss(mapper, x1, cond, z):
    """|| P(tau(y), z) - x1 ||^2: minimised by the conditional mean E[x1 | y] (z is ignored at the optimum)."""
    return (mapper(cond[0], z).float() - x1).pow(2).mean()


@torch.no_grad()
def mapper_validation_loss(mapper, split, device, batch=512):
    """Mean squared error of P on a whole split (z from a fixed generator: no global RNG is used)."""
    total, generator = 0.0, torch.Generator().manual_seed(0)
    for start in range(0, len(split), batch):
        x1, cond = split.batch(np.arange(start, min(start + batch, len(split))), device)
        z = torch.randn(len(x1), mapper.noise_dim, generator=generator).to(device)
        total += mapper_loss(mapper, x1, cond, z).item() * len(x1)
    return total / len(split)


# ----------------------------------------------------------------------------------------------
# Stage 2: the velocity network. DiT blocks (adaLN-zero on time + pooled text) with a
# cross-attention layer to the caption's token states between self-attention and the MLP
# (as PixArt-alpha), zero-initialised so that every block starts as the identity.


def timestep_embedding(t, dim=256):
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as DiT's integer timesteps)."""
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], 1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, width, heads, context_width=None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_width or width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x, context):  # x (B, N, D), context (B, M, D) -> (B, N, D)
        split = lambda a: a.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731 (B, heads, N, D/heads)
        k, v = self.kv(context).chunk(2, -1)
        out = F.scaled_dot_product_attention(split(self.q(x)), split(k), split(v))
        return self.out(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.cross = Attention(width, heads)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, h, c, text):  # h (B, N, D) image tokens, c (B, D) time + pooled text, text (B, L, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None].chunk(6, -1)
        x = modulate(self.norm1(h), shift1, scale1)
        h = h + gate1 * self.attn(x, x)
        h = h + self.cross(self.norm2(h), text)
        return h + gate2 * self.mlp(modulate(self.norm3(h), shift2, scale2))


class TextDiT(nn.Module):
    """v_theta(x_t, t, y): latents (B, C, H, W), t (B,), cond = (pooled (B, Dp), tokens (B, L, Dt))."""

    def __init__(self, latent_shape, pooled_dim, token_dim, width, depth, heads, patch):
        super().__init__()
        channels, height, width_px = latent_shape
        if height % patch or width_px % patch:
            raise SystemExit(f"error: latent size {height}x{width_px} is not divisible by --patch-size {patch}")
        self.latent_shape, self.patch = tuple(latent_shape), patch
        self.patchify = nn.Conv2d(channels, width, patch, patch)
        self.position = nn.Parameter(torch.randn(1, (height // patch) * (width_px // patch), width) * 0.02)
        self.time = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.pooled = nn.Sequential(nn.Linear(pooled_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.text = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final = nn.Linear(width, patch * patch * channels)
        for layer in [b.modulation[-1] for b in self.blocks] + [b.cross.out for b in self.blocks] + [self.final_modulation[-1], self.final]:
            nn.init.zeros_(layer.weight)  # adaLN-zero: every block, and the output, start at zero
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, cond):
        pooled, tokens = cond
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.position  # (B, N, D)
        c = self.time(timestep_embedding(t)) + self.pooled(pooled)  # (B, D)
        text = self.text(tokens)  # (B, L, D)
        for block in self.blocks:
            h = block(h, c, text)
        shift, scale = self.final_modulation(c)[:, None].chunk(2, -1)
        h = self.final(modulate(self.final_norm(h), shift, scale))  # (B, N, p*p*C)
        channels, height, width = self.latent_shape
        p = self.patch
        h = h.reshape(len(x), height // p, width // p, p, p, channels)
        return torch.einsum("bhwpqc->bchpwq", h).reshape(len(x), channels, height, width)


def build_model(args, latent_shape, pooled_dim, token_dim):
    width, depth, heads = MODELS[args.model]
    return TextDiT(latent_shape, pooled_dim, token_dim, width, depth, heads, args.patch_size)


def build_prior(args, latent_shape, pooled_dim):
    if args.prior == "gaussian":
        return flow.GaussianPrior(latent_shape)
    mapper = Mapper(pooled_dim, latent_shape, args.mapper_width, args.mapper_noise_dim)
    return TextPrior(mapper, args.prior_sigma)


@torch.no_grad()
def draw_prior(prior, cond, x1, coupling):
    """x0 for the data x1, paired by `coupling`.

    x0 = centre(y) + sigma * noise, centre = 0 for the Gaussian prior and P(tau(y), z) for the
    text prior. With "ot" the noise parts are re-paired by exact minibatch OT against the
    residuals x1 - centre(y), and every x0 keeps its own caption's centre: the prior of each
    caption stays centred where it belongs. (Captions almost never repeat within a batch, so OT
    among identical captions only, as for class labels, would do nothing.) For the Gaussian prior
    this is plain BatchOT.
    """
    noise = torch.randn_like(x1)
    x0 = prior.sample(cond, noise)
    if coupling == "independent":
        return x0
    centre = prior.centre(cond, noise) if isinstance(prior, TextPrior) else torch.zeros_like(x1)
    return centre + flow.couple(x0 - centre, x1 - centre, coupling)


# ----------------------------------------------------------------------------------------------
# Training utilities.


def batch_sizes(args, world):
    """(micro-batch per process, accumulation steps) for --global-batch over `world` processes."""
    if args.global_batch % world:
        raise SystemExit(f"error: --global-batch {args.global_batch} is not divisible by {world} processes")
    per_process = args.global_batch // world
    micro = min(per_process, args.max_batch_per_gpu)
    if per_process % micro:
        raise SystemExit(f"error: {per_process} samples per process cannot be split into micro-batches of {micro}")
    return micro, per_process // micro


def mapper_state(checkpoint, path):
    """The mapper weights inside a stage-1 or a text-prior flow checkpoint."""
    if "mapper" in checkpoint:
        return checkpoint["mapper"]
    state = {k[len("mapper."):]: v for k, v in checkpoint.get("prior", {}).items() if k.startswith("mapper.")}
    if not state:
        raise SystemExit(f"error: the checkpoint {path} has no mapper (trained with --prior gaussian?)")
    return state


def load_mapper_weights(mapper, state, path):
    try:
        mapper.load_state_dict(state)
    except RuntimeError:
        raise SystemExit(f"error: the mapper in {path} does not fit this run (another text encoder, latent shape, "
                         "--mapper-width or --mapper-noise-dim?)") from None


def restore_rng_state(states, rank):
    if len(states) != (dist.get_world_size() if dist.is_initialized() else 1):
        raise SystemExit(f"error: the checkpoint was written by {len(states)} processes; resume with as many")
    flow.set_rng_state(states[rank])


def mean_over_processes(values):
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor.tolist()


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
        ax.set_title("\n".join(_wrap(title, 24)), fontsize=5)
    fig.tight_layout()
    fig.savefig(f"{path}.tmp.png", dpi=150)
    plt.close(fig)
    os.replace(f"{path}.tmp.png", path)


def _wrap(text, width):
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def make_decoder(vae_name, device):
    """latents -> images in [-1, 1]: identity for pixels, the SD VAE decoder otherwise."""
    if vae_name == "none":
        return lambda latents: latents.clamp(-1, 1)
    vae = flow.load_vae(vae_name, device)
    return lambda latents: flow.vae_decode(vae, latents)


def grid_pairs(splits):
    """(split, pair index) of the sample grids: 8 seen (val) and 8 held-out captions for shapes, else 16 val pairs."""
    if "heldout" not in splits:
        return [(splits["val"], i) for i in range(min(16, len(splits["val"])))]
    return [(split, i) for split in (splits["val"], splits["heldout"]) for i in range(0, len(split), len(split) // 8)[:8]]


def grid_batch(pairs, device):
    """Real latents, conditions and captions of a list of (split, pair index)."""
    batches = [split.batch([index], device) for split, index in pairs]
    x1 = torch.cat([x for x, _ in batches])
    cond = tuple(torch.cat(parts) for parts in zip(*[c for _, c in batches]))
    return x1, cond, [split.captions[index] for split, index in pairs]


@torch.no_grad()
def generate(model, prior, cond, null_cond, seeds, latent_shape, nfe, cfg_scale=1.0, solver="euler"):
    """One sample per seed (EDM style: the noise of image i depends only on seeds[i])."""
    device = cond[0].device
    noise = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)
    x0 = prior.sample(cond, noise)
    velocity = flow.guided_velocity(model, cond, null_cond, cfg_scale)
    return flow.solve(velocity, x0, nfe, solver).x


# ----------------------------------------------------------------------------------------------
# The training loop, shared by both stages: accumulation, clipping, logging, checkpoints.


class Trainer:
    def __init__(self, args, rank, world, device, out):
        self.args, self.rank, self.world, self.device, self.out = args, rank, world, device, out
        self.micro, self.accumulation = batch_sizes(args, world)
        use_bf16 = device.type == "cuda" and args.precision == "bf16"
        self.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    def log(self, record):
        if self.rank == 0:
            with open(os.path.join(self.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def run(self, stage, module, optimizer, lr, start, steps, split, loss_of_batch, after_step, save):
        """Optimise `module` (DDP-wrapped when distributed) from step `start` to `steps`.

        loss_of_batch(x1, cond) -> (loss, {name: value}); after_step(step) updates
        the EMA; save(step) writes a checkpoint. The learning rate warms up linearly over
        --warmup-steps. Gradients are clipped before the optimiser step (the authors' code
        clipped after it, which has no effect).
        """
        args, parameters = self.args, [p for p in module.parameters() if p.requires_grad]
        sums, count, clock = {}, 0, time.time()
        bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, disable=self.rank != 0 or args.quiet)
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = flow.warmup_lr(lr, step, args.warmup_steps)
            optimizer.zero_grad(set_to_none=True)
            for micro in range(self.accumulation):
                x1, cond = split.batch(np.random.randint(len(split), size=self.micro), self.device)
                sync = micro == self.accumulation - 1 or not isinstance(module, nn.parallel.DistributedDataParallel)
                with (contextlib.nullcontext() if sync else module.no_sync()), self.autocast():
                    loss, extras = loss_of_batch(x1, cond)
                    (loss / self.accumulation).backward()
                for name, value in {"loss": loss.item(), **extras}.items():
                    sums[name] = sums.get(name, 0.0) + value
                count += 1
            grad_norm = nn.utils.clip_grad_norm_(parameters, args.grad_clip).item()
            if not (math.isfinite(loss.item()) and math.isfinite(grad_norm)):
                raise SystemExit(f"error: non-finite {stage} loss or gradient at step {step + 1}; "
                                 f"the last checkpoint in {args.out} is intact")
            optimizer.step()
            after_step(step + 1)
            done = step + 1
            if done % args.log_every == 0 or done == steps:
                names = sorted(sums)
                means = mean_over_processes([sums[n] / count for n in names])
                images_per_s = count * self.micro * self.world / (time.time() - clock)
                record = {"stage": stage, "step": done, **dict(zip(names, means)), "grad_norm": grad_norm,
                          "lr": optimizer.param_groups[0]["lr"], "images_per_s": images_per_s}
                self.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                sums, count, clock = {}, 0, time.time()
            if done % args.ckpt_every == 0 or done == steps:
                save(done)


def check_resumable(args, path):
    """Stop before any work if the checkpoint to resume was made with other model-defining options."""
    saved = flow.load_checkpoint(path)["args"]
    for key in CONFIG_KEYS:
        if saved.get(key) != getattr(args, key):
            raise SystemExit(f"error: {path} was trained with --{key.replace('_', '-')} {saved.get(key)!r}, "
                             f"not {getattr(args, key)!r}: use another --out or the same options")


def resume(args, flow_file, mapper_file, prior, mapper_optimizer, model, ema, optimizer, rank):
    """Load the latest flow checkpoint, else the latest mapper checkpoint; return (mapper step, flow step).

    Log lines written after that checkpoint are dropped: the resumed run writes them again.
    """
    if not (flow_file or mapper_file):
        return 0, 0
    path = flow_file or mapper_file
    checkpoint = flow.load_checkpoint(path)
    restore_rng_state(checkpoint["rng"], rank)
    step = checkpoint["step"]
    if flow_file:
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["opt"])
        prior.load_state_dict(checkpoint["prior"])
        keep, steps = lambda r: r["stage"] == "mapper" or r["step"] <= step, (args.mapper_steps, step)  # noqa: E731
    else:
        load_mapper_weights(prior.mapper, checkpoint["mapper"], path)
        mapper_optimizer.load_state_dict(checkpoint["opt"])
        keep, steps = lambda r: r["stage"] == "mapper" and "loss" in r and r["step"] <= step, (step, 0)  # noqa: E731
    if rank == 0:
        flow.trim_log(os.path.join(args.out, "log.jsonl"), keep)
        print(f"resumed from {path}")
    return steps


# ----------------------------------------------------------------------------------------------
# Loading for sample.py (INTERFACE.md).


def load_for_sampling(path, device, use_ema=True):
    """A checkpoint file (or a run folder: its latest checkpoint) -> what sample.py needs (INTERFACE.md)."""
    import types

    path = flow.resolve_checkpoint(path)  # a run folder: its latest checkpoint
    checkpoint = flow.load_checkpoint(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != "text":
        raise SystemExit(f"error: {path} is not a train_text.py checkpoint (kind {checkpoint.get('kind')!r})")
    args = argparse.Namespace(**checkpoint["args"])
    if args.prior == "text":
        mapper_state(checkpoint, path)  # stops with one line if the mapper is missing
    device = torch.device(device)
    encoder = load_text_encoder(args, device)
    null_pooled, null_tokens = encoder([""])
    latent_shape = tuple(checkpoint["latent_shape"])
    model = build_model(args, latent_shape, null_pooled.shape[1], null_tokens.shape[2])
    model.load_state_dict(checkpoint["ema" if use_ema else "model"])
    prior = build_prior(args, latent_shape, null_pooled.shape[1])
    prior.load_state_dict(checkpoint["prior"])
    return types.SimpleNamespace(
        model=model.to(device).eval().requires_grad_(False), prior=prior.to(device).eval(), latent_shape=latent_shape,
        make_condition=lambda captions: encoder(list(captions)),
        null_condition=lambda batch: (null_pooled.expand(batch, -1), null_tokens.expand(batch, -1, -1)),
        decode=make_decoder(args.vae, device), num_classes=None, args=checkpoint["args"])


# ----------------------------------------------------------------------------------------------
# Main.


def resolve_defaults(args):
    """Fill the options whose default depends on --data (written resolved into args.json)."""
    shapes = args.data == "shapes"
    if args.data == "coco" and not args.coco_root:
        raise SystemExit("error: --data coco needs --coco-root (the folder holding annotations/ and the image folders)")
    args.image_size = args.image_size or (32 if shapes else 64)
    args.vae = args.vae or ("none" if shapes else "sd-ema")
    args.text_encoder = args.text_encoder or ("builtin" if shapes else CLIP_DEFAULT)
    args.patch_size = args.patch_size or (8 if shapes else 2)
    if args.mapper_from and args.prior != "text":
        raise SystemExit("error: --mapper-from needs --prior text (the Gaussian prior has no mapper)")
    if shapes and (args.vae != "none" or args.text_encoder != "builtin"):
        raise SystemExit("error: --data shapes uses pixels and the built-in text encoder (--vae none --text-encoder builtin)")
    return args


def main(args):
    args = resolve_defaults(args)
    rank, world, device = flow.setup_distributed()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: free speed on Ampere and later
        torch.backends.cudnn.allow_tf32 = True
    trainer = Trainer(args, rank, world, device, args.out)  # checks the batch sizes before any work
    out = args.out
    flow_file, mapper_file = flow.latest_checkpoint(os.path.join(out, "checkpoints")), flow.latest_checkpoint(os.path.join(out, "mapper"))
    flow.refuse_overwrite(out, [flow_file, mapper_file], args.resume)
    if flow_file or mapper_file:
        check_resumable(args, flow_file or mapper_file)
    if rank == 0:
        for folder in ("checkpoints", "mapper", "samples"):
            os.makedirs(os.path.join(out, folder), exist_ok=True)
        with open(os.path.join(out, "args.json.tmp"), "w") as f:
            json.dump(vars(args), f, indent=2)
        os.replace(os.path.join(out, "args.json.tmp"), os.path.join(out, "args.json"))

    # Data and text embeddings (cached once).
    encoder = load_text_encoder(args, device)
    null_pooled, null_tokens = encoder([""])
    if args.data == "shapes":
        splits = shape_splits(args, encoder)
    else:
        splits = {"train": coco_split(args, args.coco_split, encoder, device, rank),
                  "val": coco_split(args, args.coco_val_split, encoder, device, rank)}
    del encoder
    train = splits["train"]
    latent_shape = tuple(train.latents.shape[1:])
    pooled_dim, token_dim = null_pooled.shape[1], null_tokens.shape[2]

    # Models: the same initial weights on every process; then a different random stream per rank.
    torch.manual_seed(args.seed)
    prior = build_prior(args, latent_shape, pooled_dim).to(device)
    model = build_model(args, latent_shape, pooled_dim, token_dim).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    mapper_optimizer = torch.optim.AdamW(prior.parameters(), lr=args.mapper_lr, weight_decay=args.weight_decay) if args.prior == "text" else None
    torch.manual_seed(args.seed * 1000 + rank)
    np.random.seed((args.seed * 1000 + rank) % 2**32)
    wrap = lambda m: nn.parallel.DistributedDataParallel(m) if world > 1 else m  # noqa: E731
    if rank == 0:
        print(f"{len(train)} training pairs, latents {latent_shape}, model {args.model}: "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{trainer.micro} x {trainer.accumulation} x {world} = {args.global_batch} per step")

    # Resume (the latest flow checkpoint, else the latest mapper checkpoint) or reuse a mapper.
    mapper_start, flow_start = resume(args, flow_file, mapper_file, prior, mapper_optimizer, model, ema, optimizer, rank)
    if args.mapper_from and args.prior == "text" and not (flow_file or mapper_file):
        load_mapper_weights(prior.mapper, mapper_state(flow.load_checkpoint(args.mapper_from), args.mapper_from), args.mapper_from)
        mapper_start = args.mapper_steps

    # Stage 1: the mapper, by regression onto the paired latents.
    if args.prior == "text" and mapper_start < args.mapper_steps:
        mapper = wrap(prior.mapper)

        def save_mapper(step):
            states = flow.gather_rng_states()
            if rank == 0:
                flow.save_atomic({"kind": "text-mapper", "args": vars(args), "mapper": prior.mapper.state_dict(),
                                  "opt": mapper_optimizer.state_dict(), "step": step, "rng": states},
                                 os.path.join(out, "mapper", f"step_{step:07d}.pt"))

        def loss_of_batch(x1, cond):
            z = torch.randn(len(x1), args.mapper_noise_dim, device=device)
            return mapper_loss(mapper, x1, cond, z), {}

        trainer.run("mapper", mapper, mapper_optimizer, args.mapper_lr, mapper_start, args.mapper_steps, train,
                    loss_of_batch, lambda step: None, save_mapper)
    decode = make_decoder(args.vae, device) if rank == 0 else None
    if args.prior == "text" and rank == 0 and (mapper_start < args.mapper_steps or not flow_file):
        report_mapper(prior.mapper, splits, decode, args, device, trainer)

    # Stage 2: the flow.
    ddp_model = wrap(model)
    prior.requires_grad_(False).eval()
    null_pooled, null_tokens = null_pooled.to(device), null_tokens.to(device)
    _, grid_cond, captions = grid_batch(grid_pairs(splits), device)
    grid_null = (null_pooled.expand(len(captions), -1), null_tokens.expand(len(captions), -1, -1))

    def flow_loss(x1, cond):
        x0 = draw_prior(prior, cond, x1, args.coupling)
        # Caption dropout for classifier-free guidance: the sample keeps its caption's prior (as at
        # sampling time, where both branches start from it) but the network sees the empty caption.
        drop = torch.rand(len(x1), device=device) < args.cfg_dropout
        cond = (torch.where(drop[:, None], null_pooled, cond[0]), torch.where(drop[:, None, None], null_tokens, cond[1]))
        loss = flow.flow_matching_loss(ddp_model, x0, x1, cond, args.time_schedule)
        return loss, {"transport_cost": flow.transport_cost(x0, x1)}

    def save_flow(step):
        states = flow.gather_rng_states()
        if rank == 0:
            flow.save_atomic({"kind": "text", "args": vars(args), "model": model.state_dict(), "ema": ema.state_dict(),
                              "opt": optimizer.state_dict(), "prior": prior.state_dict(), "step": step, "rng": states,
                              "latent_shape": latent_shape}, os.path.join(out, "checkpoints", f"step_{step:07d}.pt"))
            if step % args.sample_every == 0 or step == args.steps:
                latents = generate(ema, prior, grid_cond, grid_null, range(len(captions)), latent_shape, args.sample_nfe, args.sample_cfg)
                save_image_grid(decode(latents), captions, os.path.join(out, "samples", f"step_{step:07d}.png"))

    trainer.run("flow", ddp_model, optimizer, args.lr, flow_start, args.steps, train, flow_loss,
                lambda step: flow.update_ema(ema, model, args.ema_decay), save_flow)
    if rank == 0:
        print(f"done: {out}")
    if dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def report_mapper(mapper, splits, decode, args, device, trainer):
    """Validation loss of P (per split) into log.jsonl, and real images next to P's decoded means."""
    losses = {f"val_loss_{name}": mapper_validation_loss(mapper, split, device) for name, split in splits.items() if name != "train"}
    trainer.log({"stage": "mapper", "step": args.mapper_steps, **losses})
    print("mapper " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    x1, cond, captions = grid_batch(grid_pairs(splits), device)
    means = mapper(cond[0], torch.zeros(len(x1), mapper.noise_dim, device=device))
    # rows of 8: real images, then P's means for the same captions right below them
    images, titles = [], []
    for start in range(0, len(x1), 8):
        images += [decode(x1[start: start + 8]), decode(means[start: start + 8])]
        titles += [f"real: {c}" for c in captions[start: start + 8]] + [f"P mean: {c}" for c in captions[start: start + 8]]
    save_image_grid(torch.cat(images), titles, os.path.join(args.out, "mapper_means.png"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data and text
    parser.add_argument("--data", default="shapes", choices=["shapes", "coco"], help="built-in captioned shapes, or MS-COCO captions")
    parser.add_argument("--coco-root", default=None, help="COCO folder with annotations/captions_{split}.json and {split}/ images")
    parser.add_argument("--coco-split", default="train2017", help="COCO training split (train2014 or train2017)")
    parser.add_argument("--coco-val-split", default="val2017", help="COCO validation split (val2014 or val2017)")
    parser.add_argument("--cache-dir", default=None, help="where COCO latents and text embeddings are cached (default COCO_ROOT/cache)")
    parser.add_argument("--image-size", type=int, default=None, help="image side in pixels (default 32 for shapes, 64 for coco; 256 as in the paper)")
    parser.add_argument("--vae", default=None, help="'none' (pixels), 'sd-ema', 'sd-mse' or a local diffusers AutoencoderKL folder (default none for shapes, sd-ema for coco)")
    parser.add_argument("--text-encoder", default=None, help=f"'builtin' or a CLIP name / local folder (default builtin for shapes, {CLIP_DEFAULT} for coco)")
    parser.add_argument("--text-length", type=int, default=32, help="CLIP tokens per caption (padded / truncated); 32 keeps the COCO token cache small")
    parser.add_argument("--workers", type=int, default=4, help="image-reading workers while building the COCO latent cache")
    # prior and mapper (stage 1)
    parser.add_argument("--prior", default="text", choices=["gaussian", "text"], help="x0 ~ N(0, I), or x0 | y ~ N(P(tau(y)), sigma^2 I)")
    parser.add_argument("--prior-sigma", type=float, default=0.5, help="sigma of the text prior (the paper: 0.7 on COCO latents)")
    parser.add_argument("--coupling", default="independent", choices=["independent", "ot"], help="pairs as drawn, or minibatch OT of the prior noise (see draw_prior)")
    parser.add_argument("--mapper-steps", type=int, default=1000, help="stage-1 steps of the mapper (text prior)")
    parser.add_argument("--mapper-lr", type=float, default=1e-3, help="AdamW learning rate of the mapper")
    parser.add_argument("--mapper-width", type=int, default=512, help="hidden width of the mapper MLP")
    parser.add_argument("--mapper-noise-dim", type=int, default=0, help="size of the noise z fed to the mapper (the authors' code: 32)")
    parser.add_argument("--mapper-from", default=None, help="take the mapper from this checkpoint (stage 1 or text-prior flow) instead of training one")
    # flow (stage 2)
    parser.add_argument("--model", default="small", choices=list(MODELS), help="velocity network size")
    parser.add_argument("--patch-size", type=int, default=None, help="patch side in latent pixels (default 8 for shapes: 16 tokens, cheap on CPU; 2 for coco)")
    parser.add_argument("--steps", type=int, default=1000, help="stage-2 optimiser steps")
    parser.add_argument("--global-batch", type=int, default=64, help="samples per optimiser step, over all processes")
    parser.add_argument("--max-batch-per-gpu", type=int, default=64, help="largest micro-batch per process; more is reached by gradient accumulation")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate of the velocity network")
    parser.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (both stages)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this before every step")
    parser.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay per step (DiT: 0.9999 for long runs)")
    parser.add_argument("--cfg-dropout", type=float, default=0.1, help="probability of training on the empty caption (for classifier-free guidance)")
    parser.add_argument("--time-schedule", default="uniform", choices=["uniform", "logit-normal"], help="distribution of t")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast precision on CUDA (CPU runs fp32)")
    # outputs
    parser.add_argument("--out", default="runs/text", help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out (stage 1 or 2)")
    parser.add_argument("--log-every", type=int, default=50, help="steps between log.jsonl lines")
    parser.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints (and the last step)")
    parser.add_argument("--sample-every", type=int, default=1000, help="steps between sample grids (checkpoint steps only, and the last step)")
    parser.add_argument("--sample-nfe", type=int, default=16, help="Euler NFE of the sample grids")
    parser.add_argument("--sample-cfg", type=float, default=1.0, help="classifier-free guidance scale of the sample grids")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights and noise")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())

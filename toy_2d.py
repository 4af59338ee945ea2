"""Conditional-prior flow matching on 2D toy data: where it helps, and where it cannot.

Trains the same small MLP velocity field v(x, t, c) four ways, with the same steps, batch, data
order and initial weights, and compares how well each samples at few function evaluations (NFE):

    condot    prior N(0, I),             pairs as drawn              (CondOT)
    batchot   prior N(0, I),             minibatch OT across classes  (BatchOT)
    cprior    prior N(m(c), sigma^2 I),  pairs as drawn              (ours)
    cprior-ot prior N(m(c), sigma^2 I),  minibatch OT within a class  (ours + OT)
    c2ot      prior N(0, I),             minibatch OT within a class  (extra baseline, like C2OT)

m(c) is the mean of the training points of class c. Quality is the class-conditional 2-Wasserstein
distance: for every class, the exact W2 between generated samples and as many held-out samples of
that class, averaged over classes (lower is better; 0 means the same point sets).

Data sets (`make_data`):
    blobs    4 classes, each 3 neighbouring Gaussian blobs on a circle: means near the data.
    moons    2 interleaved half-moons: non-Gaussian shapes, means near the data.
    spirals  3 interleaved spiral arms: means pile up near the centre, off most of the data.
    rings    3 concentric rings: every class mean is the empty centre, so the prior cannot help.

Run:
    python toy_2d.py                                  # blobs, all four methods, ~1-2 min on 2 cores
    python toy_2d.py --dataset rings --out runs/rings
    python toy_2d.py --sigma-sweep 0.05 0.1 0.25 0.5 1  # W2 at low NFE against the prior's sigma
Outputs in --out: results.json, samples.npz, args.json, trajectories.png, samples.png,
w2_vs_nfe.png (and sigma_sweep.json / sigma_sweep.png with --sigma-sweep).
"""
import argparse
import json
import math
import os
import time

import numpy as np
import scipy.optimize
import torch
from torch import nn
from tqdm import tqdm

import flow

METHODS = {  # name: (prior, coupling); "class-ot" is OT restricted to pairs of the same class
    "condot": ("gaussian", "independent"),
    "batchot": ("gaussian", "ot"),
    "cprior": ("class", "independent"),
    "cprior-ot": ("class", "ot"),
    "c2ot": ("gaussian", "class-ot"),
}
DEFAULT_METHODS = ["condot", "batchot", "cprior", "cprior-ot"]
DATASETS = ["blobs", "moons", "spirals", "rings"]

# ----------------------------------------------------------------------------------------------
# Data: every generator returns x (n, 2) float32 and y (n,) int64, scaled to about unit spread.


def make_data(name, n, seed):
    """n points of the 2D conditional data set `name`, reproducible from `seed`."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose from {DATASETS}")
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES[name], size=n)
    x = GENERATORS[name](y, rng)
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)


def _blobs(y, rng):
    blob = 3 * y + rng.integers(0, 3, size=len(y))  # class k owns blobs 3k, 3k+1, 3k+2
    angle = 2 * np.pi * blob / 12
    centres = 2.0 * np.stack([np.cos(angle), np.sin(angle)], 1)
    return centres + 0.15 * rng.standard_normal((len(y), 2))


def _moons(y, rng):
    angle = np.pi * rng.random(len(y))
    upper = np.stack([np.cos(angle), np.sin(angle)], 1)
    lower = np.stack([1 - np.cos(angle), 0.5 - np.sin(angle)], 1)
    x = np.where(y[:, None] == 0, upper, lower) - np.array([0.5, 0.25])
    return 1.5 * x + 0.08 * rng.standard_normal((len(y), 2))


def _spirals(y, rng):
    radius = rng.random(len(y))
    angle = 3 * np.pi * radius + 2 * np.pi * y / 3
    x = 2.2 * radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
    return x + 0.06 * rng.standard_normal((len(y), 2))


def _rings(y, rng):
    angle = 2 * np.pi * rng.random(len(y))
    radius = 0.7 * (y + 1)
    circle = np.stack([np.cos(angle), np.sin(angle)], 1)
    return radius[:, None] * circle + 0.06 * rng.standard_normal((len(y), 2))


GENERATORS = {"blobs": _blobs, "moons": _moons, "spirals": _spirals, "rings": _rings}
NUM_CLASSES = {"blobs": 4, "moons": 2, "spirals": 3, "rings": 3}

# ----------------------------------------------------------------------------------------------
# Model: an MLP on [x, Fourier features of t, class embedding].


class VelocityMLP(nn.Module):
    def __init__(self, num_classes, width=128, depth=3, time_frequencies=8):
        super().__init__()
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(time_frequencies).float() / 2)
        self.class_embedding = nn.Embedding(num_classes, 32)
        layers, size = [], 2 + 2 * time_frequencies + 32
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.SiLU()]
            size = width
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, x, t, y):  # x (B, 2), t (B,), y (B,) -> v (B, 2)
        angles = t[:, None] * self.frequencies
        features = [x, angles.sin(), angles.cos(), self.class_embedding(y)]
        return self.net(torch.cat(features, 1))


# ----------------------------------------------------------------------------------------------
# Training one method.


def make_prior(prior_name, x_train, y_train, num_classes, sigma):
    if prior_name == "gaussian":
        return flow.GaussianPrior((2,))
    prior = flow.ClassPrior(num_classes, (2,), sigma=sigma)
    prior.accumulate(x_train, y_train)  # toy data fits in memory: one call is the whole pass
    return prior.finalize()


def train(method, x_train, y_train, num_classes, args):
    """Train one method; return (model, prior, mean transport cost of the training pairs, seconds)."""
    prior_name, coupling = METHODS[method]
    device = torch.device(args.device)
    prior = make_prior(prior_name, x_train, y_train, num_classes, args.prior_sigma).to(device)
    torch.manual_seed(args.seed)  # same initial weights and same data order for every method
    model = VelocityMLP(num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    # Cosine decay to 0: at a fixed small budget it ends much closer to the optimum than a constant lr.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    x_train, y_train = x_train.to(device), y_train.to(device)
    cost, start = 0.0, time.perf_counter()
    for _ in tqdm(range(args.steps), desc=method, leave=False, disable=args.quiet):
        index = torch.randint(len(x_train), (args.batch_size,), device=device)
        x1, y = x_train[index], y_train[index]
        x0 = prior.sample(y)
        # With the class prior each x0 belongs to its class, so OT may only re-pair within a class.
        within_class = prior_name == "class" or coupling == "class-ot"
        x0 = flow.couple(x0, x1, "independent" if coupling == "independent" else "ot",
                         groups=y if within_class else None)
        loss = flow.flow_matching_loss(model, x0, x1, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        cost += flow.transport_cost(x0, x1) / args.steps
    return model.eval(), prior, cost, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Evaluation.


def class_conditional_w2(generated, reference, labels):
    """Mean over classes of the exact W2 between equal-size point sets of that class."""
    distances = []
    for c in labels.unique():
        a, b = generated[labels == c].double(), reference[labels == c].double()
        cost = torch.cdist(a, b).pow(2).numpy()
        rows, cols = scipy.optimize.linear_sum_assignment(cost)
        distances.append(math.sqrt(cost[rows, cols].mean()))
    return float(np.mean(distances))


def generate(model, prior, labels, nfe, solver, noise, trajectory=False):
    velocity = lambda x, t: model(x, t, labels)  # the class is fixed along the path
    return flow.solve(velocity, prior.sample(labels, noise), nfe, solver, trajectory)


def nfe_budgets(solver, nfes):
    """The NFEs a solver can spend exactly (midpoint needs an even number)."""
    per_step = flow.NFE_PER_STEP[solver]
    return [n for n in nfes if n % per_step == 0]


def evaluate(model, prior, x_test, y_test, noise, args):
    """W2 for every solver and NFE, the samples, and the straightness of the finest Euler paths."""
    w2, samples = {}, {}
    device = torch.device(args.device)
    labels, noise = y_test.to(device), noise.to(device)
    for solver in args.solvers:
        w2[solver] = {}
        for nfe in nfe_budgets(solver, args.nfe):
            x = generate(model, prior, labels, nfe, solver, noise).x.cpu()
            w2[solver][str(nfe)] = class_conditional_w2(x, x_test, y_test)
            samples[f"{solver}/{nfe}"] = x.numpy()
    finest = generate(model, prior, labels, max(args.nfe), "euler", noise, trajectory=True)
    return w2, samples, flow.straightness(finest.trajectory)


# ----------------------------------------------------------------------------------------------
# Plots.


def save_figure(figure, path, dpi=110):
    """Through flow.atomic_file: a full disk leaves no cut-off PNG, only one line naming it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with flow.atomic_file(path) as file:
        figure.savefig(file, format="png", dpi=dpi)
    plt.close(figure)


def write_json(data, path):
    with flow.atomic_file(path, "w") as file:
        json.dump(data, file, indent=2)


def plot_trajectories(models, x_test, y_test, args, path):
    """Each method's paths from the same prior noise and labels, over the held-out data."""
    import matplotlib.pyplot as plt

    count = min(300, len(y_test))
    labels = y_test[:count].to(args.device)
    noise = torch.randn(count, 2, generator=torch.Generator().manual_seed(args.seed))
    figure, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 4), squeeze=False, sharex=True,
                                sharey=True)
    for ax, (method, (model, prior)) in zip(axes[0], models.items()):
        solution = generate(model, prior, labels, 32, "euler", noise.to(args.device), trajectory=True)
        paths = solution.trajectory.cpu()
        ax.scatter(*x_test.T, s=1, c="lightgray")
        for c in range(int(y_test.max()) + 1):
            chosen = (labels.cpu() == c).nonzero().flatten()
            ax.plot(paths[:, chosen, 0], paths[:, chosen, 1], lw=0.4, alpha=0.5, color=f"C{c}")
        ax.scatter(*paths[0].T, s=3, c="black", label="x0 (prior)")
        ax.scatter(*paths[-1].T, s=3, c=[f"C{int(c)}" for c in labels.cpu()], label="x1 (32 Euler steps)")
        ax.set_title(method)
        ax.set_aspect("equal")
    axes[0][0].legend(loc="lower left", fontsize=7)
    save_figure(figure, path)


def plot_samples(samples, y_test, methods, path, nfes=(1, 2, 8)):
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(methods), len(nfes), figsize=(3 * len(nfes), 3 * len(methods)),
                                squeeze=False)
    colours = [f"C{int(c)}" for c in y_test]
    for row, method in zip(axes, methods):
        for ax, nfe in zip(row, nfes):
            x = samples.get(f"{method}/euler/{nfe}")
            if x is not None:
                ax.scatter(*x.T, s=1, c=colours)
            ax.set_title(f"{method}, Euler NFE {nfe}", fontsize=9)
            ax.set_xlim(-3, 3), ax.set_ylim(-3, 3), ax.set_aspect("equal")
    save_figure(figure, path, dpi=100)


def plot_w2(results, path):
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 4))
    for i, (method, result) in enumerate(results["methods"].items()):
        for solver, style in (("euler", "-o"), ("midpoint", "--s")):
            curve = result["w2"].get(solver, {})
            if curve:
                ax.plot([int(n) for n in curve], list(curve.values()), style, color=f"C{i}",
                        label=f"{method} {solver}", ms=3)
    ax.set_xscale("log", base=2), ax.set_yscale("log")
    ax.set_xlabel("NFE"), ax.set_ylabel("class-conditional W2 (lower is better)")
    ax.set_title(results["dataset"])
    ax.legend(fontsize=7)
    save_figure(figure, path)


def plot_sigma_sweep(sweep, path):
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(5, 4))
    for nfe in sweep["nfe"]:
        ax.plot(sweep["sigma"], [row[str(nfe)] for row in sweep["w2"]], "-o",
                label=f"cprior, Euler NFE {nfe}", ms=3)
        ax.axhline(sweep["condot"][str(nfe)], ls=":", color=ax.lines[-1].get_color(), lw=1)
    ax.set_xscale("log"), ax.set_xlabel("prior sigma"), ax.set_ylabel("class-conditional W2")
    ax.set_title(f"{sweep['dataset']}: dotted = condot at the same NFE")
    ax.legend(fontsize=7)
    save_figure(figure, path)


# ----------------------------------------------------------------------------------------------
# Entry points.


def compare_methods(args, x_train, y_train, x_test, y_test):
    num_classes = NUM_CLASSES[args.dataset]
    noise = torch.randn(len(x_test), 2, generator=torch.Generator().manual_seed(args.seed + 1))
    # W2 between two independent true samples of the same labels: the best any method can score.
    fresh = GENERATORS[args.dataset](y_test.numpy(), np.random.default_rng(args.seed + 20_000))
    fresh = torch.as_tensor(fresh, dtype=torch.float32)
    results = {"dataset": args.dataset, "data_w2_floor": class_conditional_w2(fresh, x_test, y_test),
               "methods": {}}
    samples = {"data": x_test.numpy(), "data_labels": y_test.numpy()}
    models = {}
    for method in args.methods:
        model, prior, cost, seconds = train(method, x_train, y_train, num_classes, args)
        w2, method_samples, straight = evaluate(model, prior, x_test, y_test, noise, args)
        results["methods"][method] = {"transport_cost": cost, "straightness": straight,
                                      "train_seconds": seconds, "w2": w2}
        for key, x in method_samples.items():
            samples[f"{method}/{key}"] = x
            samples[f"{method}/{key}/labels"] = y_test.numpy()
        models[method] = (model, prior)
    return results, samples, models


def print_table(results, solvers, nfes):
    columns = [(s, n) for s in solvers for n in nfe_budgets(s, nfes)]
    header = f"{'method':<10} {'cost':>6} {'straight':>8} " + " ".join(f"{s[0]}{n:<5}" for s, n in columns)
    print(f"\nclass-conditional W2 on {results['dataset']} (e = Euler, m = midpoint; columns are NFE)")
    print(header)
    floor = f"{results['data_w2_floor']:<6.3f}"
    print(f"{'true data':<10} {'':>6} {'':>8} " + " ".join(floor for _ in columns))
    for method, r in results["methods"].items():
        cells = " ".join(f"{r['w2'][s][str(n)]:<6.3f}" for s, n in columns)
        print(f"{method:<10} {r['transport_cost']:>6.3f} {r['straightness']:>8.4f} {cells}")


def sigma_sweep(args, x_train, y_train, x_test, y_test):
    """W2 at low NFE of the class prior against sigma, with CondOT as the reference."""
    num_classes, low_nfe = NUM_CLASSES[args.dataset], [n for n in args.nfe if n <= 4] or [min(args.nfe)]
    generator = torch.Generator().manual_seed(args.seed + 1)
    noise = torch.randn(len(x_test), 2, generator=generator).to(args.device)

    def low_nfe_w2(model, prior):
        labels = y_test.to(args.device)
        samples = {n: generate(model, prior, labels, n, "euler", noise).x.cpu() for n in low_nfe}
        return {str(n): class_conditional_w2(x, x_test, y_test) for n, x in samples.items()}

    sweep = {"dataset": args.dataset, "nfe": low_nfe, "sigma": args.sigma_sweep, "w2": []}
    sweep["condot"] = low_nfe_w2(*train("condot", x_train, y_train, num_classes, args)[:2])
    for sigma in args.sigma_sweep:
        swept = argparse.Namespace(**{**vars(args), "prior_sigma": sigma})
        sweep["w2"].append(low_nfe_w2(*train("cprior", x_train, y_train, num_classes, swept)[:2]))
        values = ", ".join(f"{v:.3f}" for v in sweep["w2"][-1].values())
        print(f"sigma {sigma:<6g} W2 at Euler NFE {low_nfe}: {values}")
    return sweep


def main(args):
    # A 256-wide MLP is too small for intra-op parallelism: extra threads only spin and contend.
    torch.set_num_threads(1)
    x_train, y_train = make_data(args.dataset, args.train_size, args.seed)
    empty = sorted(set(range(NUM_CLASSES[args.dataset])) - set(y_train.tolist()))
    if empty:  # the class prior needs every class's mean
        raise SystemExit(f"error: --train-size {args.train_size} leaves classes {empty} of {args.dataset} "
                         "without training points: use more")
    with flow.write_errors(args.out):
        os.makedirs(args.out, exist_ok=True)
    write_json(vars(args), os.path.join(args.out, "args.json"))  # before training: a full disk stops here
    x_test, y_test = make_data(args.dataset, args.test_size, args.seed + 10_000)  # held out: another seed
    if args.sigma_sweep:
        sweep = sigma_sweep(args, x_train, y_train, x_test, y_test)
        write_json(sweep, os.path.join(args.out, "sigma_sweep.json"))
        plot_sigma_sweep(sweep, os.path.join(args.out, "sigma_sweep.png"))
        print(f"wrote {args.out} (args.json, sigma_sweep.json, sigma_sweep.png)")
        return
    results, samples, models = compare_methods(args, x_train, y_train, x_test, y_test)
    write_json(results, os.path.join(args.out, "results.json"))
    with flow.atomic_file(os.path.join(args.out, "samples.npz")) as file:
        np.savez(file, **samples)
    plot_trajectories(models, x_test, y_test, args, os.path.join(args.out, "trajectories.png"))
    plot_samples(samples, y_test.numpy(), args.methods, os.path.join(args.out, "samples.png"))
    plot_w2(results, os.path.join(args.out, "w2_vs_nfe.png"))
    print_table(results, args.solvers, args.nfe)
    print(f"\nwrote {args.out} (args.json, results.json, samples.npz, trajectories.png, samples.png, "
          "w2_vs_nfe.png)")


def device_problem(name):
    """Why `name` is not a torch device on this machine (misspelt, or no such hardware here), or None."""
    try:
        torch.device(name)
    except RuntimeError:
        return "not a torch device name (cpu, cuda, cuda:1, mps...)"
    try:
        torch.empty(0, device=name)
    except Exception as error:  # noqa: BLE001 - RuntimeError, AssertionError, NotImplementedError by backend
        return f"not available on this machine ({type(error).__name__}: {str(error).split('. ')[0]})"
    return None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: an option whose default is None says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="blobs", choices=DATASETS, help="2D conditional data set")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
                        help="methods to train and compare")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per method")
    parser.add_argument("--batch-size", type=int, default=256, help="training batch size")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (cosine decay to 0)")
    parser.add_argument("--prior-sigma", type=float, default=0.5,
                        help="std of the class prior N(m(c), sigma^2 I)")
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32],
                        help="NFE budgets to evaluate (midpoint, 2 per step, evaluates the even ones)")
    parser.add_argument("--solvers", nargs="+", default=["euler", "midpoint"], choices=list(flow.SOLVERS),
                        help="ODE solvers to evaluate")
    parser.add_argument("--train-size", type=int, default=20_000, help="training points")
    parser.add_argument("--test-size", type=int, default=2_000,
                        help="held-out points (and generated samples) for W2")
    parser.add_argument("--sigma-sweep", type=float, nargs="+", default=None,
                        help="instead of comparing methods, sweep the class prior's sigma over these values")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, weights and noise")
    parser.add_argument("--out", default="runs/toy_2d", help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "train_size", "test_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if min(args.nfe) < 1:
        parser.error(f"--nfe values must be positive, got {args.nfe}")
    for solver in args.solvers:  # it would leave an empty result
        if not nfe_budgets(solver, args.nfe):
            parser.error(f"--solvers {solver} takes {flow.NFE_PER_STEP[solver]} evaluations per step: "
                         f"no --nfe in {args.nfe} is a multiple of {flow.NFE_PER_STEP[solver]}")
    if not 0 < args.lr < math.inf:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.prior_sigma <= 0 or (args.sigma_sweep and min(args.sigma_sweep) <= 0):
        parser.error("prior sigma must be positive")
    problem = device_problem(args.device)
    if problem:
        parser.error(f"--device {args.device}: {problem}")
    problem = flow.out_folder_problem(args.out)
    if problem:
        parser.error(f"--out {args.out}: {problem}")
    written = ["args.json", "sigma_sweep.json"] if args.sigma_sweep else ["args.json", "results.json"]
    existing = [name for name in written if os.path.exists(os.path.join(args.out, name))]
    if existing and not args.overwrite:
        parser.error(f"--out {args.out} already holds {', '.join(existing)}: "
                     "pass --overwrite or another --out")
    return args


if __name__ == "__main__":
    main(parse_args())

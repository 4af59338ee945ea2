"""Sample quality of train_class.py runs on the built-in digits, against NFE and training steps.

For every run folder and checkpoint, generates --per-class samples of each digit (one seed per
image, the same seeds for every run), Euler at each NFE, and measures them in fid.py's offline
"digits" feature space: the Frechet distance (FD) to the held-out digits (index % 5 == 0) and the
accuracy of the digits classifier on the generated samples (does a sample show the digit it was
asked for?), and the straightness of the sampled paths at that NFE. The FD of the training split to the
held-out split is printed as the floor that real data reaches.

Run (after training the runs, see docs/train_class.md):
    python benchmarks/train_class_quality.py --runs runs/bench_tc/gaussian-independent ... \\
        --json docs/train_class_quality.json --plot docs/train_class_quality.png --grid docs/train_class_samples.png
    python benchmarks/train_class_quality.py --runs runs/bench_tc/cfg-class runs/bench_tc/cfg-mixture \\
        --cfg-scales 1 1.5 2 3 --nfe 4 16 --json docs/train_class_cfg.json
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid  # noqa: E402
import flow  # noqa: E402
import train_class  # noqa: E402


def to_uint8(images):
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), the mapping fid.py assumes for the digits."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def reference_statistics():
    test_images, _ = fid.load_digits_split(test=True)
    train_images, _ = fid.load_digits_split(test=False)
    reference = flow.gaussian_statistics(fid.digits_features(test_images))
    floor = flow.frechet_distance(*flow.gaussian_statistics(fid.digits_features(train_images)), *reference)
    return reference, floor


@torch.no_grad()
def generate(sampler, labels, nfe, cfg_scale, trajectory=False):
    noise = torch.stack([torch.randn(sampler.latent_shape, generator=torch.Generator().manual_seed(seed))
                         for seed in range(len(labels))])
    cond = sampler.make_condition(labels)
    velocity = flow.guided_velocity(sampler.model, cond, sampler.null_condition(len(labels)), cfg_scale)
    return flow.solve(velocity, sampler.prior.sample(cond, noise), nfe, "euler", trajectory)


def measure(sampler, labels, nfe, cfg_scale, reference):
    solution = generate(sampler, labels, nfe, cfg_scale, trajectory=True)
    images = to_uint8(sampler.decode(solution.x))
    fd = flow.frechet_distance(*flow.gaussian_statistics(fid.digits_features(images)), *reference)
    accuracy = float((fid.digits_predict(images) == labels.numpy()).mean())
    return {"fd": fd, "accuracy": accuracy, "straightness": flow.straightness(solution.trajectory)}


def evaluate_run(run, labels, args, reference):
    paths = train_class.checkpoint_paths(run)
    if not paths:
        raise SystemExit(f"error: no checkpoints in {run}")
    result = {"by_nfe": {}, "by_step": {}}
    final = train_class.load_for_sampling(paths[-1], "cpu", use_ema=args.weights == "ema")
    for scale in args.cfg_scales:
        for nfe in args.nfe:
            result["by_nfe"][f"cfg{scale}/nfe{nfe}"] = measure(final, labels, nfe, scale, reference)
    for path in paths:
        sampler = train_class.load_for_sampling(path, "cpu", use_ema=args.weights == "ema")
        step = torch.load(path, map_location="cpu", weights_only=False)["step"]
        result["by_step"][str(step)] = {f"nfe{nfe}": measure(sampler, labels, nfe, 1.0, reference) for nfe in args.step_nfe}
    with open(os.path.join(run, "log.jsonl")) as file:
        records = [json.loads(line) for line in file]
    result["transport_cost"] = float(np.mean([r["transport_cost"] for r in records]))
    result["args"] = final.args
    return final, result


def save_plot(results, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, result in results.items():
        axes[0].plot(args.nfe, [result["by_nfe"][f"cfg1.0/nfe{n}"]["fd"] for n in args.nfe], "o-", label=name)
        axes[1].plot(args.nfe, [result["by_nfe"][f"cfg1.0/nfe{n}"]["accuracy"] for n in args.nfe], "o-", label=name)
        steps = sorted(result["by_step"], key=int)
        axes[2].plot([int(s) for s in steps], [result["by_step"][s][f"nfe{args.step_nfe[0]}"]["fd"] for s in steps],
                     "o-", label=name)
    for ax, title in zip(axes, ["digits FD vs NFE (Euler)", "class accuracy vs NFE", f"digits FD vs step (NFE {args.step_nfe[0]})"]):
        ax.set_title(title)
        ax.legend()
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE")
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("training step")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=80)


def save_grid(samplers, args):
    """One panel per run: rows = digits 0..9, columns = 4 samples at NFE 1, then 4 at NFE 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    labels = torch.arange(10).repeat_interleave(4)
    fig, axes = plt.subplots(1, len(samplers), figsize=(3 * len(samplers), 4.6))
    for ax, (name, sampler) in zip(np.atleast_1d(axes), samplers.items()):
        columns = [sampler.decode(generate(sampler, labels, nfe, 1.0).x).reshape(10, 4, 3, 8, 8) for nfe in (1, 4)]
        grid = make_grid((torch.cat(columns, 1).reshape(-1, 3, 8, 8) + 1) / 2, nrow=8, padding=1, pad_value=0.5)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"{name}\nNFE 1 | NFE 4", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.grid, dpi=80)


def main(args):
    torch.set_num_threads(1)  # a shared machine
    reference, floor = reference_statistics()
    print(f"floor: FD of the train split to the held-out split = {floor:.3f}")
    labels = torch.arange(10).repeat_interleave(args.per_class)
    results, samplers = {"floor_fd_train_vs_test": floor}, {}
    for run in args.runs:
        name = os.path.basename(os.path.normpath(run))
        samplers[name], results[name] = evaluate_run(run, labels, args, reference)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "args"}))
    with open(args.json, "w") as file:
        json.dump(results, file, indent=1)
    if args.plot:
        save_plot({k: v for k, v in results.items() if k != "floor_fd_train_vs_test"}, args)
    if args.grid:
        save_grid(samplers, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="train_class.py output folders")
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="Euler NFEs for the final checkpoint")
    parser.add_argument("--step-nfe", type=int, nargs="+", default=[4], help="NFEs measured at every checkpoint")
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0], help="guidance scales for the final checkpoint")
    parser.add_argument("--per-class", type=int, default=50, help="generated samples per digit")
    parser.add_argument("--weights", default="ema", choices=["ema", "raw"], help="EMA weights, or the raw trained weights (shows the EMA's lag)")
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--plot", default=None, help="PNG: FD and accuracy vs NFE, FD vs steps")
    parser.add_argument("--grid", default=None, help="PNG: samples of every run at NFE 1 and 4")
    main(parser.parse_args())

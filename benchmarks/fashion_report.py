"""Tables and plots of the Fashion-MNIST experiment, regenerated from its run folders.

Reads what benchmarks/fashion_experiment.py left in --out (sample.py's JSON per NFE, train_class.py's
log.jsonl, the floors) and writes into --docs: fashion_results.json (every number), fashion_tables.md
(the tables of docs/fashion_mnist.md), fashion_fd_vs_nfe.png (FD against NFE and against steps),
fashion_grid_nfeN.png (one row per class) and fashion_class_means.png.

Run:
    python benchmarks/fashion_report.py --out runs/fashion --docs docs/img
    python benchmarks/fashion_report.py --smoke     # on a made-up run folder, under a temporary folder
"""
import argparse
import glob
import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flow

MAIN = ("condot", "batchot", "class", "class-ot")
CURVE_NFE = 8  # fashion_experiment.py evaluates the earlier checkpoints at this NFE
NAMES = {"condot": "CondOT (N(0, I))", "batchot": "BatchOT", "class": "class prior",
         "class-ot": "class prior + OT", "class-sigma0.25": "class prior, sigma 0.25",
         "class-sigma1": "class prior, sigma 1",
         "class-spread": "class prior, sigma = class std", "condot-logitnormal": "CondOT, logit-normal t",
         "class-logitnormal": "class prior, logit-normal t", "class-cfg": "class prior, CFG dropout 0.1"}


def read_json(path):
    with open(path) as file:
        return json.load(file)


def read_run(run):
    """Everything measured for one configuration."""
    results = {"euler": {}, "midpoint": {}, "steps": {}, "cfg": {}}
    for solver in ("euler", "midpoint"):
        for path in glob.glob(os.path.join(run, "eval", solver, f"{solver}_nfe*.json")):
            record = read_json(path)
            results[solver][record["nfe"]] = record
    for path in glob.glob(os.path.join(run, "eval", "step_*", "euler_nfe*.json")):
        record = read_json(path)
        step = int(os.path.basename(os.path.dirname(path))[5:])
        results["steps"].setdefault(step, {})[record["nfe"]] = record["fd"]
    final_step = max((int(os.path.basename(p)[5:-3])
                      for p in glob.glob(os.path.join(run, "checkpoints", "*.pt"))), default=0)
    for nfe, record in results["euler"].items():
        results["steps"].setdefault(final_step, {})[nfe] = record["fd"]
    for path in glob.glob(os.path.join(run, "eval", "cfg*", "euler_nfe*.json")):
        record = read_json(path)
        results["cfg"].setdefault(record["cfg_scale"], {})[record["nfe"]] = record
    log = []
    if os.path.exists(os.path.join(run, "log.jsonl")):
        with open(os.path.join(run, "log.jsonl")) as file:
            log = [json.loads(line) for line in file]
    results["final_step"] = final_step
    if log:
        tail = log[len(log) // 2:]  # the second half: past warm-up and start-up
        results["train_transport_cost"] = float(np.mean([r["transport_cost"] for r in tail]))
        results["train_images_per_s"] = float(np.median([r["images_per_s"] for r in tail]))
        results["peak_memory_gib"] = max((r.get("peak_memory_gib", 0) for r in log), default=0)
    return results


def merge_seeds(runs):
    """{config: results} with FD, class accuracy, straightness and transport cost averaged over the
    seeds of `runs` ({"config-seedS": results}); 'fd_std' and 'class_accuracy_std' hold their spread
    (sample standard deviation, 0 for one seed) and 'seeds' their number. Steps: the first seed's."""
    groups = {}
    for run in sorted(runs, key=lambda r: int(r.rsplit("-seed", 1)[1]) if "-seed" in r else 0):
        groups.setdefault(run.rsplit("-seed", 1)[0], []).append(runs[run])
    merged = {}
    for name, seeds in groups.items():
        first = dict(seeds[0])
        for solver in ("euler", "midpoint"):
            first[solver] = {nfe: merge_records([s[solver][nfe] for s in seeds if nfe in s[solver]])
                             for nfe in seeds[0][solver]}
        costs = [s["train_transport_cost"] for s in seeds if "train_transport_cost" in s]
        if costs:
            first["train_transport_cost"] = float(np.mean(costs))
        merged[name] = first
    return merged


def merge_records(records):
    merged = dict(records[0], seeds=len(records))
    for key in ("fd", "class_accuracy", "straightness"):
        values = [r[key] for r in records if key in r]
        if values:
            merged[key] = float(np.mean(values))
            merged[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return merged


def fd(results, nfe, solver="euler"):
    record = results[solver].get(nfe)
    return record["fd"] if record else float("nan")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def number(value, digits=1):
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def spread(results, nfe, solver, key, scale=1.0, digits=1):
    """'mean ± std' over the seeds (the mean alone for one seed)."""
    record = results[solver].get(nfe) or {}
    text = number(scale * record.get(key, float("nan")), digits)
    return text + (f" ± {scale * record[key + '_std']:.{digits}f}" if record.get("seeds", 1) > 1 else "")


def nfe_table(runs, names, solver, nfes, floors):
    rows = [[NAMES[n]] + [f"{spread(runs[n], k, solver, 'fd')} / "
                          f"{spread(runs[n], k, solver, 'class_accuracy', 100, 0)}%"
                          for k in nfes] for n in names if n in runs]
    rows += [[f"floor: {label}"] + [number(value)] * len(nfes) for label, value in floors]
    return table([f"{solver}: FD-EffNet / class accuracy"] + [f"NFE {k}" for k in nfes], rows)


def acc(results, nfe, solver="euler"):
    record = results[solver].get(nfe)
    return record.get("class_accuracy", float("nan")) if record else float("nan")


def first_step_reaching(curve, nfe, target):
    steps = [step for step in sorted(curve) if curve[step].get(nfe, float("inf")) <= target]
    return steps[0] if steps else None


def targets(runs, floor_autoencoder):
    """The paper's claims and the issue's targets, as measured: the best class-prior configuration at
    NFE 8 (lowest mean FD-EffNet) against the 75% probe accuracy and twice the TAEF2 floor; the NFE at
    which it matches CondOT's NFE-16 FD; the share of CondOT's steps it needs to reach CondOT's final FD
    at NFE 8 (first seed's checkpoints); the transport costs."""
    if "condot" not in runs:
        return {}
    condot = runs["condot"]
    candidates = [n for n in runs if n.startswith("class") and n != "class-cfg" and 8 in runs[n]["euler"]]
    if not candidates:
        return {}
    best = min(candidates, key=lambda n: fd(runs[n], 8))
    out = {"best_class_config": best, "fd_nfe8": fd(runs[best], 8), "accuracy_nfe8": acc(runs[best], 8),
           "twice_autoencoder_floor": 2 * floor_autoencoder, "condot_fd_nfe8": fd(condot, 8),
           "condot_accuracy_nfe8": acc(condot, 8)}
    out["target_accuracy_75_met"] = out["accuracy_nfe8"] >= 0.75
    out["target_fd_twice_floor_met"] = out["fd_nfe8"] <= out["twice_autoencoder_floor"]
    matched = [k for k in sorted(runs[best]["euler"]) if fd(runs[best], k) <= fd(condot, 16)]
    out["condot_fd_nfe16"] = fd(condot, 16)
    out["nfe_matching_condot_nfe16"] = matched[0] if matched else None
    reached = first_step_reaching(runs[best]["steps"], 8, fd(condot, 8))
    out["steps_to_condot_final_fd_nfe8"] = reached
    share = reached / condot["final_step"] if reached and condot["final_step"] else None
    out["share_of_condot_steps"] = share
    out["transport_cost"] = {n: runs[n].get("train_transport_cost") for n in runs}
    return out


def plots(runs, floors, docs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in [n for n in MAIN if n in runs]:
        for solver, style in (("euler", "-o"), ("midpoint", "--s")):
            nfes = sorted(runs[name][solver])
            axes[0].plot(nfes, [fd(runs[name], k, solver) for k in nfes], style,
                         label=f"{NAMES[name]}, {solver}")
        curve = runs[name]["steps"]
        axes[1].plot(sorted(curve), [curve[s].get(CURVE_NFE, np.nan) for s in sorted(curve)], "-o",
                     label=NAMES[name])
    for axis in axes:
        for label, value in floors:
            if np.isfinite(value):
                axis.axhline(value, color="gray", linestyle=":", linewidth=1)
        if axis.has_data():
            axis.set_yscale("log")
        axis.set_ylabel("FD-EffNet")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("NFE")
    axes[1].set_xlabel(f"training step (Euler, NFE {CURVE_NFE})")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    with flow.atomic_file(os.path.join(docs, "fashion_fd_vs_nfe.png")) as file:
        figure.savefig(file, dpi=110, format="png")
    plt.close(figure)


def grids(out, docs):
    """One PNG per NFE: the four configurations side by side, one row per class, 8 samples each."""
    from PIL import Image

    for path in glob.glob(os.path.join(out, "runs", "condot*", "eval", "grids", "euler_nfe*.npz")):
        panels = []
        for name in MAIN:
            npz = next(iter(glob.glob(os.path.join(out, "runs", f"{name}-seed*", "eval", "grids",
                                                   os.path.basename(path)))), "")
            if not os.path.exists(npz):
                continue
            with np.load(npz) as data:
                images, labels = data["arr_0"], data["arr_1"]
            rows = [np.concatenate(list(images[labels == c][:8]), axis=1) for c in np.unique(labels)]
            panels += [np.concatenate(rows, axis=0),
                       np.full((len(rows) * images.shape[1], 8, 3), 255, np.uint8)]
        name = "fashion_grid_" + os.path.basename(path).split("_")[1][:-4] + ".png"
        with flow.atomic_file(os.path.join(docs, name)) as file:
            Image.fromarray(np.concatenate(panels[:-1], axis=1)).save(file, format="PNG")


def main(args):
    os.makedirs(args.docs, exist_ok=True)
    seeds = {os.path.basename(run): read_run(run)
             for run in sorted(glob.glob(os.path.join(args.out, "runs", "*")))}
    runs = merge_seeds(seeds)
    seed_count = {name: max((r.get("seeds", 1) for r in runs[name]["euler"].values()), default=1)
                  for name in runs}
    floor_real = read_json(os.path.join(args.out, "floor_real.json"))["fd"]
    floor_path = next(iter(glob.glob(os.path.join(args.out, "runs", "class-ot*", "eval", "floor",
                                                  "vae_floor.json"))), "")
    floor_ae = read_json(floor_path)["fd"] if os.path.exists(floor_path) else float("nan")
    floors = [("real vs real", floor_real), ("TAEF2 reconstructions", floor_ae)]
    prepare = read_json(os.path.join(args.out, "prepare.json"))
    results = {"runs": runs, "seeds": seeds, "seed_count": seed_count, "floor_real": floor_real,
               "floor_autoencoder": floor_ae, "prepare": prepare,
               "targets": targets(runs, floor_ae)}
    with flow.atomic_file(os.path.join(args.docs, "fashion_results.json"), "w") as file:
        json.dump(results, file, indent=1, default=str)
    euler_nfes, midpoint_nfes = (1, 2, 4, 8, 16, 32), (2, 4, 8, 16)
    sections = [
        "### Prior x coupling, Euler\n\n" + nfe_table(runs, MAIN, "euler", euler_nfes, floors),
        "### Prior x coupling, midpoint\n\n" + nfe_table(runs, MAIN, "midpoint", midpoint_nfes, floors),
        "### Transport cost and straightness\n\n" + table(
            ["configuration", "training transport cost", "straightness (Euler, NFE 32)", "step"],
            [[NAMES[n], number(runs[n].get("train_transport_cost")),
              number(runs[n]["euler"].get(32, {}).get("straightness"), 2), str(runs[n]["final_step"])]
             for n in runs]),
        "### FD-EffNet against training steps (Euler NFE 8, first seed)\n\n" + table(
            ["configuration"] + [str(s) for s in sorted(runs.get("condot", {"steps": {}})["steps"])],
            [[NAMES[n]] + [number(runs[n]["steps"][s].get(CURVE_NFE)) for s in sorted(runs[n]["steps"])]
             for n in runs if len(runs[n]["steps"]) > 1]),
    ]
    variants = {"Sigma of the class prior": ("class-sigma0.25", "class", "class-sigma1", "class-spread"),
                "Time schedule": ("condot", "condot-logitnormal", "class", "class-logitnormal")}
    for title, names in variants.items():  # only where a variant of the grid was run
        if any(n in runs and n not in MAIN for n in names):
            sections.append(f"### {title} (Euler)\n\n" + nfe_table(runs, names, "euler", euler_nfes, floors))
    if "class-cfg" in runs:
        cfg = runs["class-cfg"]
        scales = {1.0: {k: v for k, v in cfg["euler"].items()}, **cfg["cfg"]}
        sections.append("### Classifier-free guidance with the class prior "
                        "(Euler; FD-EffNet / class accuracy)\n\n"
                        + table(["scale"] + [f"NFE {k}" for k in (1, 2, 4, 16)],
                                [[str(s)] + [f"{number(scales[s][k]['fd'])} / "
                                             f"{number(100 * scales[s][k].get('class_accuracy', np.nan), 0)}%"
                                             if k in scales[s] else "-" for k in (1, 2, 4, 16)]
                                 for s in sorted(scales)]))
    sections.append("### Throughput\n\n" + table(
        ["configuration", "training images/s", "peak GPU memory (GiB)"],
        [[NAMES[n], number(runs[n].get("train_images_per_s"), 0), number(runs[n].get("peak_memory_gib"), 2)]
         for n in runs])
        + f"\n\nLatent cache: {prepare['latent_examples']} latents "
        f"in {prepare['cache_seconds']:.0f} s on {prepare['device']}, "
        f"{prepare['latent_examples'] / prepare['cache_seconds']:.0f} images/s "
        "including reading and resizing.")
    sections.append("### Targets\n\n```\n" + json.dumps(results["targets"], indent=1) + "\n```")
    with flow.atomic_file(os.path.join(args.docs, "fashion_tables.md"), "w") as file:
        file.write("\n\n".join(sections) + "\n")
    plots(runs, floors, args.docs)
    grids(args.out, args.docs)
    if os.path.exists(os.path.join(args.out, "class_means.png")):
        with open(os.path.join(args.out, "class_means.png"), "rb") as source, \
                flow.atomic_file(os.path.join(args.docs, "fashion_class_means.png")) as target:
            shutil.copyfileobj(source, target)
    print("\n\n".join(sections))


def fake_run_folder(out):
    """A made-up run folder with the files the report reads (for --smoke)."""
    rng = np.random.default_rng(0)

    def write(path, obj):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as file:
            file.write(json.dumps(obj))

    write(os.path.join(out, "floor_real.json"), {"fd": 10.0})
    write(os.path.join(out, "prepare.json"), {"latent_examples": 100, "cache_seconds": 2.0, "device": "cpu"})
    for name in [f"{config}-seed{seed}" for config in MAIN for seed in (0, 1)]:
        run = os.path.join(out, "runs", name)
        os.makedirs(os.path.join(run, "checkpoints"))
        open(os.path.join(run, "checkpoints", "step_0000008.pt"), "w").close()
        write(os.path.join(run, "log.jsonl"), {"step": 8, "transport_cost": 1.0, "images_per_s": 5.0})
        for solver, nfes in (("euler", (1, 2, 4, 8, 16, 32)), ("midpoint", (2, 4, 8, 16, 32))):
            for nfe in nfes:
                write(os.path.join(run, "eval", solver, f"{solver}_nfe{nfe:03d}.json"),
                      {"nfe": nfe, "fd": float(rng.uniform(10, 100)), "class_accuracy": 0.5,
                       "straightness": 1.0})
        write(os.path.join(run, "eval", "step_0000004", "euler_nfe008.json"), {"nfe": 8, "fd": 200.0})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/fashion-experiment",
                        help="the experiment folder of fashion_experiment.py")
    parser.add_argument("--docs", default="docs/img", help="where the tables, results and figures go")
    parser.add_argument("--smoke", action="store_true",
                        help="report on a made-up run folder, in a temporary folder")
    args = parser.parse_args(argv)
    if args.smoke:
        args.out = tempfile.mkdtemp(prefix="fashion_report_smoke_")
        args.docs = os.path.join(args.out, "docs")
        fake_run_folder(args.out)
    return args


if __name__ == "__main__":
    main(parse_args())

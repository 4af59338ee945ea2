"""Which DiT uses a CPU best on captioned Fashion, for CondOT and for the text prior: the recipe search.

The Fashion class recipe (small-p8: one 2048-value token per image) was found for class labels. With
captions, CondOT must read the item, size and tone from cross-attention, and the baseline must be as
strong as it can be, so each recipe MODEL:PATCH:STEPS (a flow.DIT_PRESETS name, its patch side in
latent pixels, flow steps chosen so that every run takes about the same CPU minutes: time a step
with benchmarks/train_text_speed.py --setup fashion) is trained for --configs at one seed with every
other setting of a finished text_fashion_experiment.py folder (--experiment: its data, caches, mapper,
judge, batch and learning rate), then evaluated the same way. The experiment's own recipe is read from
its results, not trained again. Writes a markdown table, the rows as JSON and accuracy against NFE
per recipe into --docs.

Run (on 2 CPU cores: two runs at once, ~12 min of training per recipe, ~6 min of evaluation each):
    python benchmarks/text_recipe_search.py --experiment runs/text-recipe --out runs/text-search \\
        --recipes small-p8:8:1000 small:4:760 mini:2:1360 mini:4:2760 tiny:2:3680 \\
        --docs docs/text-fashion-recipe/search
    python benchmarks/text_recipe_search.py --smoke  # tiny budget under a temporary folder
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import text_fashion_experiment as experiment
from fashion_experiment import save_json

import flow

SHARED = ("captioned-fashion", "latents", "mappers")  # what every recipe takes from --experiment
NFE = (1, 2, 4, 8)  # the table's: NFE 16 adds as much sampling as these four together


def parse_recipe(text):
    """'MODEL:PATCH:STEPS' -> (model, patch, steps), or ValueError naming the problem."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in flow.DIT_PRESETS:
        raise ValueError(f"recipe {text!r}: want MODEL:PATCH:STEPS, MODEL one of "
                         f"{', '.join(flow.DIT_PRESETS)}")
    try:
        patch, steps = int(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"recipe {text!r}: PATCH and STEPS must be whole numbers") from None
    if patch < 1 or steps < 1:
        raise ValueError(f"recipe {text!r}: PATCH and STEPS must be positive")
    return parts[0], patch, steps


def recipe_name(model, patch, steps):
    """'mini p4, 2760 steps'; a preset named for its patch (small-p8) at that patch is named alone."""
    return f"{model if model.endswith(f'-p{patch}') else f'{model} p{patch}'}, {steps} steps"


def experiment_recipe(settings):
    """The (model, patch, steps) that the --experiment folder itself was run with."""
    patch = settings.get("patch_size") or flow.DIT_PRESETS[settings["model"]]["patch"]
    return settings["model"], patch, settings["steps"]


def recipe_folder(args, recipe):
    return os.path.join(args.out, "{}-p{}-{}".format(*recipe))


def recipe_settings(args, settings, recipe):
    """The experiment's settings with this recipe, --configs, --seed, and a folder of its own under --out
    whose data, caches and mapper are links to the experiment's (made here)."""
    model, patch, steps = recipe
    folder = recipe_folder(args, recipe)
    os.makedirs(folder, exist_ok=True)
    for part in SHARED:
        link = os.path.join(folder, part)
        if not os.path.lexists(link):
            os.symlink(os.path.realpath(os.path.join(args.experiment, part)), link)
    return argparse.Namespace(**{**settings, "out": folder, "docs": os.path.join(folder, "report"),
                                 "model": model, "patch_size": patch, "steps": steps, "configs": args.configs,
                                 "seeds": [args.seed], "nfe": list(NFE), "parallel": args.parallel,
                                 "quiet": True})


def missing_results(options):
    """Names of this folder's runs (configs x encoders x seeds) that its eval/results.json lacks."""
    path = os.path.join(options.out, "eval", "results.json")
    found = flow.read_json(path, "experiment results")["runs"] if os.path.isfile(path) else {}
    names = [experiment.run_name(*run) for run in experiment.runs(options)]
    return [name for name in names if name not in found]


def run_recipe(args, settings, recipe):
    """Train and evaluate one recipe (each stage only where its outputs are missing); its results."""
    options = recipe_settings(args, settings, recipe)
    trained = len(experiment.trained_runs(options)) == len(experiment.runs(options))
    stages = ([] if trained else ["train"]) + (["eval"] if not trained or missing_results(options) else [])
    if stages:
        options.stages = stages
        print(f"{recipe_name(*recipe)}: {', '.join(stages)} in {options.out}", flush=True)
        experiment.main(options)
    return read_results(options.out)


def read_results(folder):
    return flow.read_json(os.path.join(folder, "eval", "results.json"), "experiment results")


def training_minutes(run, batch):
    """Minutes of flow training from the run's log: images / (images per second), record by record."""
    with open(os.path.join(run, "log.jsonl")) as file:
        records = [json.loads(line) for line in file]
    flow_records = [r for r in records if r["stage"] == "flow"]
    steps = np.diff([0] + [r["step"] for r in flow_records])
    return float(sum(n * batch / r["images_per_s"] for n, r in zip(steps, flow_records)) / 60)


def parameters(run, steps):
    checkpoint = flow.load_checkpoint(experiment.checkpoint_path(run, steps))
    return sum(value.numel() for value in checkpoint["model"].values())


def recipe_rows(results, folder, recipe, configs, encoder, seed, batch):
    """One row per configuration: the recipe, its size and minutes, the judge and FD-EffNet at every NFE,
    seen all-correct accuracy at CURVE_NFE at every checkpoint."""
    rows = []
    for config in configs:
        name = experiment.run_name(config, encoder, seed)
        run, measured = os.path.join(folder, "runs", name), results["runs"][name]["nfe"]
        curve = {int(step): m["judge"]["seen"]["all"] for step, m in results["runs"][name]["steps"].items()}
        if str(experiment.CURVE_NFE) in measured:
            curve[recipe[2]] = measured[str(experiment.CURVE_NFE)]["judge"]["seen"]["all"]
        rows.append({"recipe": recipe_name(*recipe), "config": config, "curve": dict(sorted(curve.items())),
                     "parameters": parameters(run, recipe[2]), "train_minutes": training_minutes(run, batch),
                     "nfe": {nfe: {"judge": {group: measured[str(nfe)]["judge"][group]
                                             for group in ("seen", "heldout")},
                                   "fd_seen": measured[str(nfe)]["fd"]["seen"]}
                             for nfe in NFE if str(nfe) in measured}})
    return rows


def markdown(rows, floors):
    """The rows as one table: all-correct accuracy (seen / held-out) at every NFE, attributes at NFE 8, and
    seen all-correct accuracy at the run's checkpoints (quality against CPU minutes)."""
    header = ["recipe", "configuration", "parameters", "training min",
              *(f"all correct NFE {nfe}" for nfe in NFE), "item / size / tone NFE 8", "FD seen NFE 4",
              f"seen, NFE {experiment.CURVE_NFE}, at each quarter of the steps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        judged = {nfe: row["nfe"].get(nfe) for nfe in NFE}
        cells = [f"{m['judge']['seen']['all']:.0%} / {m['judge']['heldout']['all']:.0%}" if m else "-"
                 for m in judged.values()]
        at8 = judged[8]["judge"]["seen"] if judged[8] else None
        attributes = " / ".join(f"{at8[key]:.0%}" for key in ("item", "size", "tone")) if at8 else "-"
        fd = f"{judged[4]['fd_seen']:.0f}" if judged[4] else "-"
        lines.append("| " + " | ".join([row["recipe"], experiment.NAMES[row["config"]],
                                        f"{row['parameters'] / 1e6:.2f}M", f"{row['train_minutes']:.1f}",
                                        *cells, attributes, fd,
                                        " / ".join(f"{100 * v:.0f}" for v in row["curve"].values())]) + " |")
    real, judged = floors["real"], floors["real"]["judge"]
    lines.append(f"\nReal canvases: all correct {judged['seen']['all']:.0%} / "
                 f"{judged['heldout']['all']:.0%}, FD-EffNet seen {real['fd']['seen']:.0f} (the floor).")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """Seen all-correct accuracy against NFE, one line per recipe, one panel per configuration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(row["config"] for row in rows))
    figure, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 3.6), sharey=True, squeeze=False)
    for axis, config in zip(axes[0], configs):
        for row in (r for r in rows if r["config"] == config):
            nfes = sorted(row["nfe"])
            axis.plot(nfes, [100 * row["nfe"][n]["judge"]["seen"]["all"] for n in nfes], marker="o",
                      label=f"{row['recipe']} ({row['train_minutes']:.0f} min)")
        axis.set(xscale="log", xticks=list(NFE), xticklabels=list(NFE), xlabel="Euler NFE",
                 title=experiment.NAMES[config])
        axis.minorticks_off()
        axis.legend(fontsize=7)
    axes[0][0].set_ylabel("all attributes correct, seen captions (%)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(args):
    settings = flow.read_json(os.path.join(args.experiment, "experiment_args.json"), "experiment settings")
    encoder = settings["encoders"][0]
    rows = []
    for recipe in args.recipes:
        if recipe == experiment_recipe(settings):  # the experiment's own runs, as they were evaluated
            folder, results = args.experiment, read_results(args.experiment)
            if any(experiment.run_name(c, encoder, args.seed) not in results["runs"] for c in args.configs):
                raise SystemExit(f"error: {args.experiment}/eval/results.json lacks seed {args.seed} of "
                                 f"{', '.join(args.configs)}: run its eval stage")
        else:
            results = run_recipe(args, settings, recipe)
            folder = recipe_folder(args, recipe)
        batch = settings["global_batch"]
        rows += recipe_rows(results, folder, recipe, args.configs, encoder, args.seed, batch)
    os.makedirs(args.docs, exist_ok=True)
    save_json({"experiment": args.experiment, "encoder": encoder, "seed": args.seed, "rows": rows,
               "floors": results["floors"]}, os.path.join(args.docs, "recipe_search.json"))
    with flow.atomic_file(os.path.join(args.docs, "recipe_search.md"), "w") as file:
        file.write(markdown(rows, results["floors"]))
    plot(rows, os.path.join(args.docs, "recipe_search.png"))
    print(f"wrote {args.docs}/recipe_search.md, recipe_search.json and recipe_search.png", flush=True)


def smoke(args):
    """The text experiment's smoke folder (CondOT, built-in encoder, 2 steps) as --experiment, and one
    more recipe (patch 1) trained and evaluated beside it."""
    options = experiment.parse_args(["--smoke", "train", "eval"])
    options.configs, options.seeds = ["condot"], [0]
    experiment.main(options)
    args.experiment, args.configs, args.parallel = options.out, ["condot"], 1
    args.out, args.docs = os.path.join(options.out, "search"), os.path.join(options.out, "search-report")
    args.recipes = [("tiny", 2, 2), ("tiny", 1, 2)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=experiment.HelpFormatter)
    add = parser.add_argument
    add("--experiment", default="runs/text-fashion-experiment",
        help="a text_fashion_experiment.py folder after its eval stage: data, caches, mapper, settings")
    add("--recipes", nargs="+", default=["small-p8:8:1000", "small:4:760", "mini:2:1360", "mini:4:2760",
                                          "tiny:2:3680"], help="MODEL:PATCH:STEPS of each recipe")
    add("--configs", nargs="+", default=["condot", "text-ot"], choices=list(experiment.CONFIGS),
        help="configurations trained at every recipe")
    add("--seed", type=int, default=0, help="training seed of every run")
    add("--out", default="runs/text-recipe-search", help="one folder per recipe")
    add("--docs", default=None, help="where the table, JSON and plot go (default: OUT/report)")
    add("--parallel", type=int, default=2, help="processes at once")
    add("--smoke", action="store_true", help="tiny budget on the CPU under a temporary folder")
    args = parser.parse_args(argv)
    if args.smoke:
        smoke(args)
        return args
    try:
        args.recipes = [parse_recipe(text) for text in args.recipes]
    except ValueError as error:
        parser.error(str(error))
    if not os.path.isfile(os.path.join(args.experiment, "experiment_args.json")):
        parser.error(f"--experiment {args.experiment} has no experiment_args.json: run "
                     "text_fashion_experiment.py train eval there first")
    missing = [part for part in SHARED if not os.path.exists(os.path.join(args.experiment, part))]
    if missing:
        parser.error(f"--experiment {args.experiment} lacks {', '.join(missing)}: run its train stage first")
    if args.parallel < 1:
        parser.error("--parallel must be positive")
    args.docs = args.docs or os.path.join(args.out, "report")
    return args


if __name__ == "__main__":
    main(parse_args())

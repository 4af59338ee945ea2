"""Time one training step of train_text.py's velocity network (forward, backward, AdamW step).

Prints, per configuration: parameters, seconds per step, images per second, and peak memory
(CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak resident set size).

    python benchmarks/train_text_speed.py                       # the built-in shapes setup
    python benchmarks/train_text_speed.py --setup coco64 --model S B --batch 64
    python benchmarks/train_text_speed.py --setup fashion --model small-p8 mini --patch 4 --batch 128
    python benchmarks/train_text_speed.py --smoke               # seconds: one tiny step, writes nothing
"""
import argparse
import os
import resource
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flow
import train_text

SETUPS = {  # name: (latent shape, patch (None: the preset's), pooled dim, token dim, tokens)
    "shapes": ((3, 32, 32), 8, 64, 64, 8),  # pixels, built-in word encoder
    "coco64": ((4, 8, 8), 2, 512, 512, 32),  # 64 px through the SD VAE, CLIP ViT-B/32, --text-length 32
    "coco256": ((4, 32, 32), 2, 512, 512, 32),  # 256 px, the paper's resolution
    "fashion": ((32, 8, 8), None, 384, 384, 32),  # captioned Fashion through TAEF2, all-MiniLM-L6-v2
}


def time_steps(model, batch, setup, device, steps, warmup=2):
    shape, _, pooled_dim, token_dim, tokens = SETUPS[setup]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x1 = torch.randn(batch, *shape, device=device)
    y = (torch.randn(batch, pooled_dim, device=device), torch.randn(batch, tokens, token_dim, device=device))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast:
            loss = flow.flow_matching_loss(model, torch.randn_like(x1), x1, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(args):
    if args.smoke:
        args.model, args.batch, args.steps = ["tiny"], 4, 1
    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, setup {args.setup}, batch {args.batch}")
    print("| model | patch | parameters | s / step | images / s | peak memory |")
    print("|---|---|---|---|---|---|")
    shape, setup_patch, pooled_dim, token_dim, _ = SETUPS[args.setup]
    for name in args.model:
        patch = args.patch or setup_patch or train_text.MODELS[name]["patch"]
        torch.manual_seed(0)
        model = train_text.DiT(shape, pooled_dim, token_dim, **{**train_text.MODELS[name], "patch": patch})
        model = model.to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = time_steps(model, args.batch, args.setup, device, args.steps)
        peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"  # ru_maxrss: KiB on Linux
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        size = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {patch} | {size:.2f}M | {seconds:.3f} | {args.batch / seconds:.1f} | "
              f"{peak / 2**20:.0f} MiB |")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: an option whose default is None says in its own help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--setup", default="shapes", choices=list(SETUPS), help="latent shape and text encoder sizes")
    add("--model", nargs="+", default=["tiny", "mini"], choices=list(train_text.MODELS),
        help="DiT presets (flow.DIT_PRESETS; each at the setup's patch, else its own)")
    add("--patch", type=int, default=None,
        help="patch side for every preset (default: the setup's, else the preset's)")
    add("--batch", type=int, default=64, help="images per step")
    add("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    add("--smoke", action="store_true", help="one timed step of the tiny network at batch 4 (a quick check)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or (args.patch is not None and args.patch < 1):
        parser.error("--batch, --steps and --patch must be positive")
    return args


if __name__ == "__main__":
    main(parse_args())

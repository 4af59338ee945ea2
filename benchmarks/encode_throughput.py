"""Images per second of the TAEF2 encoder and decoder on this machine, as the latent cache and sample.py
run them (flow.Autoencoder: channels-last convolutions), against the layout they used before
(contiguous tensors), at several batch sizes. Fashion-MNIST images, 64x64 RGB.

Run:
    python benchmarks/encode_throughput.py --vae ../shared/weights/taef2 --json docs/encode_throughput.json
    python benchmarks/encode_throughput.py --smoke    # random weights and images, seconds
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import flow


def images_per_second(function, batch, seconds):
    """Calls of function(batch) for about `seconds` after one warm-up call."""
    with torch.no_grad():
        function(batch)
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            function(batch)
            done += len(batch)
    return done / (time.perf_counter() - start)


def measure(args):
    autoencoder = flow.load_autoencoder(args.vae)
    if args.smoke:
        images = torch.rand(max(args.batch_sizes), 3, 64, 64) * 2 - 1
    else:
        pixels, _ = flow.load_fashion_mnist(args.data_root, "train")
        images = flow.fashion_to_rgb(pixels[:max(args.batch_sizes)]).float() / 127.5 - 1
    latents = autoencoder.encode(images)
    rows = []
    for layout in ("contiguous", "channels_last"):
        memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        encoder, decoder = (part.to(memory_format=memory_format) for part in (autoencoder.encoder,
                                                                              autoencoder.decoder))
        for size in args.batch_sizes:
            x, z = (t[:size].contiguous(memory_format=memory_format) for t in (images, latents))
            row = {"layout": layout, "batch": size,
                   "encode_images_per_s": images_per_second(encoder, (x + 1) / 2, args.seconds),
                   "decode_images_per_s": images_per_second(decoder, z, args.seconds)}
            print(f"{layout:13s} batch {size:4d}: encode {row['encode_images_per_s']:6.1f} images/s, "
                  f"decode {row['decode_images_per_s']:6.1f} images/s", flush=True)
            rows.append(row)
    return rows


def main(args):
    rows = measure(args)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    if args.json:
        with flow.atomic_file(args.json, "w") as file:
            json.dump(result, file, indent=1)
        print(f"wrote {args.json}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--vae", default=os.path.join(ROOT, "..", "shared", "weights", "taef2"),
                        help="TAEF2 folder (taef2_encoder.pth, taef2_decoder.pth)")
    parser.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist",
                        help="Fashion-MNIST idx files")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256], help="images per call")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measurement")
    parser.add_argument("--json", default=None, help="where to write the results")
    parser.add_argument("--smoke", action="store_true", help="random weights and images, a few seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        from fashion_experiment import write_smoke_inputs

        args.data_root, args.vae = write_smoke_inputs(tempfile.mkdtemp(prefix="encode_smoke_"))
        args.batch_sizes, args.seconds = [2, 4], 0.2
    return args


if __name__ == "__main__":
    main(parse_args())

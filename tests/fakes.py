"""Small fake inputs the tests write themselves: Fashion-MNIST idx files, MS-COCO, random TAEF2 weights
(the tests never read ../shared or the Debian data set, which users and CI may not have); a damaged
checkpoint; and the check both trainers' TrainingBatches must pass."""
import gzip
import json
import os

import numpy as np
import torch

import flow


def write_idx(path, array):
    """An idx file as in the Fashion-MNIST release: magic (0, 0, 8 = uint8, ndim), big-endian sizes, data."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.tobytes())


def write_fashion(root, train=30, test=10, seed=0):
    """A tiny Fashion-MNIST release (all four idx files); label i % 10, so every class has images."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        image_file, label_file = flow.FASHION_FILES[split]
        write_idx(os.path.join(root, image_file), rng.integers(0, 256, (count, 28, 28)))
        write_idx(os.path.join(root, label_file), np.arange(count) % 10)


def write_coco(root, split="train2017", images=3, captions_per_image=2, size=(40, 24), words="a  red circle"):
    """A COCO split: random images (the same for every call) and their captions; returns the annotations."""
    from PIL import Image

    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    listed, annotations = [], []
    rng = np.random.RandomState(0)
    for k in range(images):
        name = f"{k:012d}.png"
        pixels = rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, split, name))
        listed.append({"id": 100 + k, "file_name": name, "width": size[0], "height": size[1]})
        for j in range(captions_per_image):
            annotations.append({"id": 1000 + 10 * k + j, "image_id": 100 + k,
                                "caption": f" {words} {'a' * (k + 1)} {j}\n"})
    with open(os.path.join(root, "annotations", f"captions_{split}.json"), "w") as f:
        json.dump({"images": listed, "annotations": annotations}, f)
    return annotations


def write_taef2(folder, seed=0):
    """Random TAEF2 weights in the release's layout (two state dicts, float16); returns the modules."""
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    modules = flow.taef2_encoder(), flow.taef2_decoder()
    for module, name in zip(modules, flow.TAEF2_FILES):
        half = {key: value.half() for key, value in module.state_dict().items()}
        torch.save(half, os.path.join(folder, name))
    return modules


def flip_weight_bytes(path, name="out.weight"):
    """Flip 64 bytes of the model weight `name` inside checkpoint `path`, as a failing disk would: the
    file still loads (torch.load does not check the zip CRC), only the checkpoint's checksum tells."""
    weight = flow.load_checkpoint(str(path))["model"][name].numpy().tobytes()
    with open(path, "rb") as file:
        data = bytearray(file.read())
    start = data.find(weight)
    data[start:start + 64] = bytes(255 - b for b in data[start:start + 64])
    with open(path, "wb") as file:
        file.write(bytes(data))


def whole_batch(make_batches, step=7):
    """make_batches(rank, world_size) -> a trainer's TrainingBatches. Asserts that item `step` is the same
    whether one process takes it whole or three take their shares, and when a DataLoader worker makes
    it; returns (the whole item, the data indices of its global batch)."""
    batches = [make_batches(rank, world_size) for rank, world_size in ((0, 1), (0, 3), (1, 3), (2, 3))]
    whole, *shares = (batch[step] for batch in batches)
    for part, parts in zip(whole, zip(*shares)):
        assert torch.equal(part, torch.cat(parts))
    loader = torch.utils.data.DataLoader(batches[0], batch_size=None, sampler=range(step - 1, step + 1),
                                         num_workers=2)
    for part, again in zip(whole, list(loader)[1]):
        assert torch.equal(part, again)
    return whole, batches[0].order.indices(step)

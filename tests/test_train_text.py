"""Tests of train_text.py (data readers, text encoders, mapper, prior samples, both training stages,
resume, DDP, bad input, load_for_sampling) and of the caption checker of
benchmarks/train_text_eval.py. Everything offline, on tiny random configurations."""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import flip_weight_bytes, whole_batch, write_coco, write_taef2

import flow
import train_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import train_text_eval  # the caption checker

TINY = ["--model", "tiny", "--global-batch", "8", "--max-batch-per-gpu", "4", "--log-every", "2",
        "--ckpt-every", "2", "--sample-every", "4", "--sample-nfe", "2", "--warmup-steps", "2",
        "--mapper-width", "32", "--quiet", "--workers", "0"]


def read_shards(cache):
    """The raw latents of a complete latent cache, through its index."""
    return flow.read_shards(str(cache), json.loads((cache / "info.json").read_text())["shards"])["latents"]


def to_uint8(images):
    return ((images + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)


def run(out, *extra):
    train_text.main(train_text.parse_args(["--out", str(out), *TINY, *extra]))


def load(path):
    return flow.load_checkpoint(str(path))


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
# Built-in shapes and the caption checker.


def test_checker_reads_rendered_shapes_exactly():
    combinations = train_text.shape_combinations()
    images, captions, index = train_text.make_shapes(combinations, 4, 32, seed=123)
    matches = [train_text_eval.check_caption(image, captions[i]) for image, i in zip(to_uint8(images), index)]
    assert np.mean(matches) == 1.0
    stray = to_uint8(images)
    stray[:, 0, 0] = 255  # a stray white pixel in a corner is not the shape
    assert all(train_text_eval.check_caption(image, captions[i]) for image, i in zip(stray, index))
    # and it can say no: every image checked against another caption of the same size, colour and position
    wrong_shape = [captions[i].replace("circle", "square") if "circle" in captions[i]
                   else captions[i].replace("square", "circle").replace("triangle", "circle") for i in index]
    assert not any(train_text_eval.check_caption(image, c) for image, c in zip(to_uint8(images), wrong_shape))
    assert not train_text_eval.check_caption(np.zeros((32, 32, 3), np.uint8), captions[0])  # empty image


def test_checker_reads_soft_edged_renders():
    # Edges blurred by a Gaussian of 0.5 pixel (a generator's soft edges) still read exactly; the fill
    # threshold of 0.97 is what gives first (measured: squares 87% at 0.75 pixel, 50% at 1 pixel).
    import scipy.ndimage
    combinations = train_text.shape_combinations()
    images, captions, index = train_text.make_shapes(combinations, 4, 32, seed=321)
    soft = scipy.ndimage.gaussian_filter(to_uint8(images).astype(np.float64), (0, 0.5, 0.5, 0))
    soft = soft.round().astype(np.uint8)
    assert all(train_text_eval.check_caption(image, captions[i]) for image, i in zip(soft, index))


def test_checker_scores_report_the_shape_confusion_and_features():
    sets = train_text_eval.caption_sets(1, 1, seed=5)
    captions, reference = sets["seen"]
    scores = train_text_eval.score(reference, captions, reference)
    expected = np.zeros((3, 4), int)  # rows: the caption's shape; columns: the shape read, then none
    np.fill_diagonal(expected, len(captions) // 3)
    assert scores["shape"] == 1.0 and np.array_equal(scores["shape_confusion"], expected)
    features = scores["shape_features"]
    assert features["square"]["fill"][1] == 1.0 and features["triangle"]["drop"][1] > 0.08


def test_held_out_captions_compose_seen_attributes():
    combinations = train_text.shape_combinations()
    held = [c for c in combinations if train_text.is_held_out(c)]
    seen = [c for c in combinations if not train_text.is_held_out(c)]
    assert len(combinations) == 144 and len(held) == 24
    for attribute in range(4):  # every size, colour, shape and position is seen in training
        assert {c[attribute] for c in held} <= {c[attribute] for c in seen}


def test_word_encoder_gives_each_word_one_vector_and_pools_their_mean():
    encoder = train_text.WordEncoder()
    pooled, tokens = encoder(["a small red circle on the left", "", "Red, circle: a purple-ish one"])
    assert tokens.shape == (3, 12, 64) and pooled.shape == (3, 64)
    assert torch.allclose(pooled[0], tokens[0, :7].mean(0)) and tokens[0, 7:].abs().sum() == 0
    assert pooled[1].abs().sum() == 0 and tokens[1].abs().sum() == 0  # "" is the null condition
    # a word's vector depends on the word alone (case and punctuation aside), wherever it stands
    assert torch.equal(tokens[2, 0], tokens[0, 2]) and torch.equal(tokens[2, 1], tokens[0, 3])
    assert tokens[2, 3].abs().sum() > 0 and not torch.equal(tokens[2, 3], tokens[0, 2])  # any word has one


# ---------------------------------------------------------------------------------------------
# MS-COCO reader, the SD-VAE and CLIP paths (tiny random configurations written by the test).


def test_coco_reader_pairs_captions_with_their_images(tmp_path):
    annotations = write_coco(tmp_path)
    paths, captions, image_of_caption = train_text.read_coco(str(tmp_path), "train2017")
    assert [os.path.basename(p) for p in paths] == [f"{k:012d}.png" for k in range(3)]
    assert captions[0] == "a red circle a 0"  # whitespace normalised
    assert image_of_caption.tolist() == [(a["image_id"] - 100) for a in annotations]


def test_image_files_keep_the_middle_square_and_name_an_unreadable_file(tmp_path):
    from PIL import Image

    array = np.zeros((20, 40, 3), np.uint8)
    array[:, 5:35] = 255  # the middle is white, the sides black
    Image.fromarray(array).save(tmp_path / "wide.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG cut short")
    images = train_text.ImageFiles([str(tmp_path / "wide.png"), str(tmp_path / "bad.png")], 8)
    assert images[0].dtype == torch.uint8 and images[0].shape == (3, 8, 8) and images[0].min() == 255
    loader = torch.utils.data.DataLoader(images, batch_size=2, num_workers=1)  # raised in a worker
    with pytest.raises(SystemExit, match=f"^error: cannot read image {tmp_path / 'bad.png'} "):
        list(flow.stop_on_unreadable_images(loader))


@pytest.mark.parametrize("damage, message", [
    ("no_file", "missing annotation file"),
    ("unlisted", "refer to images it does not list"),
    ("empty", "empty captions"),
    ("no_image", "missing on disk"),
])
def test_coco_bad_input_stops_with_one_line(tmp_path, damage, message):
    write_coco(tmp_path)
    annotation_file = tmp_path / "annotations" / "captions_train2017.json"
    data = json.loads(annotation_file.read_text())
    if damage == "no_file":
        annotation_file.unlink()
    elif damage == "unlisted":
        data["annotations"][0]["image_id"] = 999
    elif damage == "empty":
        data["annotations"][1]["caption"] = "  "
    else:
        (tmp_path / "train2017" / data["images"][0]["file_name"]).unlink()
    if damage in ("unlisted", "empty"):
        annotation_file.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match=message) as error:
        train_text.read_coco(str(tmp_path), "train2017")
    assert str(error.value).startswith("error: ") and "\n" not in str(error.value)


def write_tiny_clip(folder):
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(folder)
    return str(folder)


def write_tiny_vae(folder):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                            layers_per_block=1).save_pretrained(folder)
    return str(folder)


def test_clip_encoder_gives_pooled_eos_state_and_token_states(tmp_path):
    encoder = train_text.load_text_encoder(write_tiny_clip(tmp_path / "clip"), 16, "cpu")
    assert encoder.clip  # recognised from the config's model_type
    pooled, tokens = encoder(["a red circle", "a blue square", ""])
    assert pooled.shape == (3, 32) and tokens.shape == (3, 16, 32)
    ids = encoder.tokenizer(["a red circle"], padding="max_length", max_length=16).input_ids[0]
    assert torch.allclose(pooled[0], tokens[0, ids.index(1)])  # pooled = the final state at the first EOS
    assert not torch.allclose(pooled[0], pooled[1])
    with pytest.raises(SystemExit, match="cannot load the text encoder"):
        train_text.load_text_encoder(str(tmp_path / "nowhere"), 16, "cpu")


def write_tiny_bert(folder):
    """A sentence-embedding model as all-MiniLM-L6-v2 is laid out (BERT, WordPiece), tiny and random."""
    transformers = pytest.importorskip("transformers")
    os.makedirs(folder, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "small",
             "large", "dark", "light", "bag", "boot", ",", ":"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return str(folder)


def test_sentence_encoder_pools_the_masked_mean_of_the_token_states(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = write_tiny_bert(tmp_path / "bert")
    encoder = train_text.load_text_encoder(folder, 16, "cpu")
    assert not encoder.clip
    pooled, tokens = encoder(["a red circle", "a small dark bag , large", ""])
    assert pooled.shape == (3, 24) and tokens.shape == (3, 16, 24)
    # brute force: the model run on each caption alone, unpadded; mean over its tokens, L2-normalised
    model = transformers.AutoModel.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    for row, caption in enumerate(["a red circle", "a small dark bag , large", ""]):
        with torch.no_grad():
            states = model(**tokenizer([caption], return_tensors="pt")).last_hidden_state[0]
        assert torch.allclose(pooled[row], F.normalize(states.mean(0), dim=0), atol=1e-5)
    assert torch.allclose(pooled.norm(dim=1), torch.ones(3), atol=1e-5)


def test_coco_run_caches_latents_and_text_then_samples(tmp_path):
    root = tmp_path / "coco"
    write_coco(root, "train2017", images=4)
    write_coco(root, "val2017", images=2)
    clip, vae = write_tiny_clip(tmp_path / "clip"), write_tiny_vae(tmp_path / "vae")
    out = tmp_path / "run"
    coco = ["--data", "coco", "--data-root", str(root), "--vae", vae, "--text-encoder", clip,
            "--image-size", "16", "--text-length", "16", "--workers", "0", "--mapper-steps", "2",
            "--steps", "2"]
    run(out, *coco)
    cache = out / "latents" / "train2017"
    raw = read_shards(cache)
    assert raw.shape == (4, 4, 8, 8)  # one latent per image, 16 px / 2 (the tiny VAE halves the size)
    text_cache = cache / "text-clip-16"  # one embedding per distinct caption, "" first
    assert np.load(text_cache / "pooled.npy").shape == (9, 32)
    assert (out / "mapper_means.png").exists() and (out / "samples" / "step_0000002_nfe_2.png").exists()
    # per-channel latent statistics of the training cache, in the cache and in the checkpoint
    info = json.loads((cache / "info.json").read_text())
    channels = torch.from_numpy(raw).double().transpose(0, 1).flatten(1)
    assert np.allclose(info["latent_mean"], channels.mean(1))
    assert np.allclose(info["latent_std"], channels.std(1))
    checkpoint = load(out / "checkpoints" / "step_0000002.pt")
    assert checkpoint["config"]["latent_mean"] == info["latent_mean"]
    args = train_text.parse_args(["--out", str(out), *coco])
    split, _ = train_text.disk_split(args, "train2017", 0, 1, torch.device("cpu"))
    normalised = torch.from_numpy(split.images).transpose(0, 1).flatten(1)
    assert torch.allclose(normalised.mean(1), torch.zeros(4), atol=1e-4)
    assert torch.allclose(normalised.std(1), torch.ones(4), atol=1e-3)
    loaded = train_text.load_for_sampling(str(out / "checkpoints" / "step_0000002.pt"), "cpu")
    cond = loaded.make_condition(["a red circle a 0", "a red circle aa 1"])
    x0 = loaded.prior.sample(cond, torch.randn(2, *loaded.latent_shape))
    x = flow.solve(flow.guided_velocity(loaded.model, cond, loaded.null_condition(2), 2.0), x0, 2).x
    images = loaded.decode(x)
    assert loaded.latent_shape == (4, 8, 8) and images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    # the cached embedding of a caption is the one the sampler computes (float16 cache)
    assert torch.allclose(split.batch([0], "cpu")[1][0], cond[0][:1], atol=1e-2)
    # the decoder undoes the normalisation: decoded normalised latents = decoded raw latents
    autoencoder = flow.load_autoencoder(vae)
    assert torch.allclose(loaded.decode(torch.from_numpy(split.images[:1])),
                          autoencoder.decode(torch.from_numpy(raw[:1]).float()), atol=1e-4)
    with pytest.raises(SystemExit, match="pass another --latent-cache"):  # a cache of other images
        train_text.disk_split(train_text.parse_args(["--out", str(out), *coco, "--max-train-images", "2"]),
                                "train2017", 0, 1, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# A captioned-image folder with a sentence encoder (as captioned Fashion-MNIST with all-MiniLM-L6-v2).


def test_coco_layout_run_with_a_sentence_encoder(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    loads = []  # the two splits' text caches share one load of the encoder; none once they exist
    load_text_encoder = train_text.load_text_encoder
    monkeypatch.setattr(train_text, "load_text_encoder", lambda *a: loads.append(a) or load_text_encoder(*a))
    for split, count in (("train", 6), ("val", 3)):
        write_coco(tmp_path / "data", split, images=count, words="a small dark bag")
    write_taef2(tmp_path / "taef2")
    bert = write_tiny_bert(tmp_path / "bert")
    out = tmp_path / "run"
    options = ["--data", "coco", "--data-root", str(tmp_path / "data"), "--coco-split", "train",
               "--coco-val-split", "val", "--vae", str(tmp_path / "taef2"), "--text-encoder", bert,
               "--image-size", "32", "--workers", "0", "--mapper-steps", "2", "--steps", "2"]
    run(out, *options)
    assert len(loads) == 1
    args = train_text.parse_args(["--out", str(out), *options])
    splits, _ = train_text.load_data(args, 0, 1, torch.device("cpu"))  # from the caches
    assert list(splits) == ["train", "val"] and len(loads) == 1
    monkeypatch.undo()
    assert len(splits["train"]) == 12 and splits["train"].images.shape == (6, 32, 4, 4)  # 2 captions each
    for name in ("train", "val"):
        assert splits[name].captions[0] == ""
        assert (out / "latents" / name / "text-bert-32" / "info.json").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert "val_loss_val" in set().union(*log)
    loaded = train_text.load_for_sampling(str(out), "cpu")
    rows = splits["val"].caption_of_pair[:1]
    cached = torch.from_numpy(np.asarray(splits["val"].pooled[rows], np.float32))
    assert torch.allclose(loaded.make_condition(splits["val"].texts([0]))[0], cached, atol=1e-2)
    # the encoder moved: sample.py --text-encoder; an encoder of another size: one line
    shutil.copytree(bert, tmp_path / "moved")
    moved = train_text.load_for_sampling(str(out), "cpu", text_encoder=str(tmp_path / "moved"))
    assert torch.equal(moved.make_condition(["a red bag"])[0], loaded.make_condition(["a red bag"])[0])
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig.from_pretrained(bert)
    config.hidden_size, config.intermediate_size = 16, 32
    transformers.BertModel(config).save_pretrained(tmp_path / "moved")
    with pytest.raises(SystemExit, match="gives 16-d pooled and 16-d token embeddings"):
        train_text.load_for_sampling(str(out), "cpu", text_encoder=str(tmp_path / "moved"))


# ---------------------------------------------------------------------------------------------
# Stage 1: the mapper estimates the conditional mean.


@pytest.mark.parametrize("noise_dim", [0, 8])
def test_mapper_regression_finds_the_conditional_mean(noise_dim):
    torch.manual_seed(0)
    means = torch.randn(4, 2, 3, 3)  # the known conditional means of 4 "captions"
    embeddings = torch.randn(4, 6)
    mapper = train_text.Mapper(6, (2, 3, 3), width=64, noise_dim=noise_dim)
    optimizer = torch.optim.Adam(mapper.parameters(), lr=3e-3)
    for _ in range(600):
        y = torch.randint(4, (64,))
        x1 = means[y] + 0.5 * torch.randn(64, 2, 3, 3)  # data = mean + noise of variance 0.25
        loss = train_text.mapper_loss(mapper, x1, embeddings[y], torch.randn(64, noise_dim))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        estimate = mapper(embeddings, torch.randn(4, noise_dim))
    assert (estimate - means).pow(2).mean() < 0.01  # far below the data variance 0.25
    assert abs(loss.item() - 0.25) < 0.05  # the remaining loss is the noise variance


def pair_options(**options):
    return argparse.Namespace(**{"prior": "text", "coupling": "independent", "cfg_dropout": 0.0,
                                 "cfg_null_prior": "mixture", "seed": 0, "time_schedule": "uniform",
                                 **options})


def test_text_prior_is_centred_on_the_mapper_and_ot_keeps_each_centre():
    torch.manual_seed(0)
    prior = train_text.TextPrior(train_text.Mapper(5, (3, 4, 4), width=16, noise_dim=2), sigma=0.3)
    train = tiny_split(pairs=32)
    x1, cond = train.batch(np.arange(32), "cpu")
    x1 = x1 * 2
    noise, t, _ = flow.draw_examples(0, 3, 32, (3, 4, 4), uniforms=2)  # step 3's, as training_pairs draws it
    centre = prior.centre(cond, noise)
    assert torch.allclose(prior.sample(cond, noise), centre + 0.3 * noise)
    independent, same, times, seen = train_text.training_pairs(3, x1, cond, prior, train, pair_options())
    assert torch.equal(independent, prior.sample(cond, noise))  # as drawn
    assert torch.equal(same, x1) and torch.equal(times, t)
    assert all(torch.equal(a, b) for a, b in zip(seen, cond))  # no dropout: the network sees the captions
    ot = train_text.training_pairs(3, x1, cond, prior, train, pair_options(coupling="ot"))[0]
    # OT only re-orders the noise parts: the same set of residuals, each x0 on its own caption's centre
    def by_first(residuals):
        return residuals[torch.argsort(residuals[:, 0])]

    assert torch.allclose(by_first((independent - centre).flatten(1)), by_first((ot - centre).flatten(1)),
                          atol=1e-6)
    assert not torch.allclose(ot, independent)
    assert flow.transport_cost(ot, x1) < flow.transport_cost(independent, x1)


def test_dropped_captions_start_from_the_mixture_or_their_own_prior():
    torch.manual_seed(0)
    prior = train_text.TextPrior(train_text.Mapper(5, (3, 4, 4), width=16), sigma=0.3)
    # the null caption "" and two training captions, a and b, one pair each
    pooled = np.stack([np.zeros(5), np.ones(5), -np.ones(5)]).astype(np.float32)
    train = train_text.Split(np.zeros((2, 3, 4, 4), np.float32), ["", "a", "b"], pooled, np.zeros((3, 2, 5)),
                             [0, 1], [1, 2])
    cond = (torch.from_numpy(pooled[[1] * 64]), torch.ones(64, 2, 5))  # 64 times caption a
    x1 = torch.zeros(64, 3, 4, 4)
    centres = prior.mapper(torch.from_numpy(pooled[1:])).detach()
    noise, _, uniforms = flow.draw_examples(0, 5, 64, (3, 4, 4), uniforms=2)
    for null_prior in ("own", "mixture"):
        options = pair_options(cfg_dropout=1.0, cfg_null_prior=null_prior)
        x0, _, _, seen = train_text.training_pairs(5, x1, cond, prior, train, options)
        is_a, is_b = ((x0 - 0.3 * noise - centre).flatten(1).abs().amax(1) < 1e-5 for centre in centres)
        assert torch.all(is_a | is_b)
        # mixture: the second uniform picks the training pair, here a (below 1/2) or b; own: always a
        assert torch.equal(is_b, (uniforms[:, 1] >= 0.5) & (null_prior == "mixture"))
        assert seen[0].abs().sum() == 0 and seen[1].abs().sum() == 0  # every caption dropped to ""


# ---------------------------------------------------------------------------------------------
# Both stages end to end, resume, DDP, bad input and load_for_sampling.


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "full"
    run(out, "--mapper-steps", "4", "--steps", "4")
    return out


def test_both_stages_write_logs_checkpoints_and_pictures(shapes_run):
    out = shapes_run
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["mapper", "mapper", "mapper", "flow", "flow"]
    assert "val_loss_heldout" in records[2] and all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert json.loads((out / "args.json").read_text())["patch_size"] == 8  # resolved defaults
    checkpoint = load(out / "checkpoints" / "step_0000004.pt")
    assert checkpoint["kind"] == "text" and checkpoint["step"] == 4
    assert "rng" not in checkpoint  # nothing to restore: batches are a function of (seed, step)
    assert any(k.startswith("mapper.") for k in checkpoint["prior"])  # the mapper travels with the flow
    assert (out / "mapper_means.png").exists() and (out / "samples" / "step_0000004_nfe_2.png").exists()


def test_resume_of_both_stages_equals_an_uninterrupted_run(shapes_run, tmp_path):
    out = tmp_path / "resumed"
    run(out, "--mapper-steps", "2", "--steps", "0")  # stopped inside stage 1 ...
    with pytest.raises(SystemExit, match="add --resume"):  # nothing is overwritten by mistake
        run(out, "--mapper-steps", "4", "--steps", "2")
    with pytest.raises(SystemExit, match="--mapper-steps 2 and --steps 0 leave nothing to train"):
        run(out, "--mapper-steps", "2", "--steps", "0", "--resume")
    run(out, "--mapper-steps", "4", "--steps", "2", "--resume")  # ... resumed, stopped inside stage 2 ...
    with pytest.raises(SystemExit, match="already at step 2: --steps 2 leaves nothing to train"):
        run(out, "--mapper-steps", "4", "--steps", "2", "--resume")
    with pytest.raises(SystemExit, match="was trained with --prior-sigma 0.5, not 0.3"):
        run(out, "--mapper-steps", "4", "--steps", "4", "--resume", "--prior-sigma", "0.3")
    with open(out / "log.jsonl", "a") as file:  # cut short mid-line (a full disk) when it stopped
        file.write('{"stage": "flow", "step": 3, "lo')
    run(out, "--mapper-steps", "4", "--steps", "4", "--resume")  # ... and resumed again
    assert all(json.loads(line) for line in (out / "log.jsonl").read_text().splitlines())
    a, b = load(shapes_run / "checkpoints" / "step_0000004.pt"), load(out / "checkpoints" / "step_0000004.pt")
    for key in ("model", "ema", "prior"):
        assert_same_state(a[key], b[key])
    assert_same_state(load(shapes_run / "mapper" / "step_0000004.pt")["mapper"],
                      load(out / "mapper" / "step_0000004.pt")["mapper"])
    # the log reads as one run: no line written twice
    flow_lines = [(folder / "log.jsonl").read_text().count('"stage": "flow"') for folder in (out, shapes_run)]
    assert flow_lines[0] == flow_lines[1]


def test_gaussian_and_text_priors_start_from_the_same_network(tmp_path, monkeypatch):
    """The DiT is built from the seed before the mapper draws its weights: the comparison of the priors is
    the same network from the same start."""
    initial = {}
    initial_networks = train_text.initial_networks

    def recorded(args, config, device):
        model, ema, prior = initial_networks(args, config, device)
        initial[args.prior, args.seed] = {key: value.clone() for key, value in model.state_dict().items()}
        return model, ema, prior

    monkeypatch.setattr(train_text, "initial_networks", recorded)
    run(tmp_path / "gaussian", "--prior", "gaussian", "--steps", "1")
    run(tmp_path / "text", "--mapper-steps", "1", "--steps", "1")
    run(tmp_path / "seed", "--mapper-steps", "1", "--steps", "1", "--seed", "1")
    assert_same_state(initial["gaussian", 0], initial["text", 0])
    assert not torch.equal(initial["text", 0]["position"], initial["text", 1]["position"])  # from the seed


KILLED = ["--mapper-steps", "100", "--steps", "2", "--ckpt-every", "1", "--log-every", "1", "--sample-every",
          "1000"]


def test_kill_during_the_mapper_stage_resumes_as_an_uninterrupted_run(tmp_path):
    """kill -9 while the mapper trains (perhaps while it writes a checkpoint), then --resume: the same
    mapper, flow and log as a run that was never stopped."""
    out = tmp_path / "killed"
    command = [sys.executable, os.path.join(ROOT, "train_text.py"), "--out", str(out), *TINY, *KILLED]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while not (out / "mapper" / "step_0000005.pt").exists() and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it was killed"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stopped_at = flow.latest_checkpoint(str(out / "mapper"))
    assert stopped_at and not os.path.exists(out / "checkpoints" / "step_0000001.pt")  # killed in stage 1
    assert not stopped_at.endswith("step_0000100.pt")
    run(out, *KILLED, "--resume")
    run(tmp_path / "whole", *KILLED)
    for folder, parts in (("checkpoints/step_0000002.pt", ("model", "ema", "prior")),
                          ("mapper/step_0000100.pt", ("mapper",))):
        killed, whole = load(out / folder), load(tmp_path / "whole" / folder)
        for part in parts:
            assert_same_state(killed[part], whole[part])
    lines = [[(record["stage"], record["step"]) for record in map(json.loads, log.read_text().splitlines())]
             for log in (out / "log.jsonl", tmp_path / "whole" / "log.jsonl")]
    assert lines[0] == lines[1]  # no line lost or written twice


def test_checkpoints_made_before_the_shared_presets_still_load(tmp_path):
    """train_text's own "small" (width 128, depth 4) was flow.DIT_PRESETS' mini: such a checkpoint (no
    "shared_presets" in its config) is built from the names it was made with."""
    run(tmp_path / "run", "--model", "mini", "--prior", "gaussian", "--steps", "1")
    path = tmp_path / "run" / "checkpoints" / "step_0000001.pt"
    checkpoint = load(path)
    old = dict(checkpoint, args=dict(checkpoint["args"], model="small"),
               config={k: v for k, v in checkpoint["config"].items() if k != "shared_presets"})
    flow.save_atomic(old, str(tmp_path / "old.pt"))
    assert_same_state(train_text.load_for_sampling(str(tmp_path / "old.pt"), "cpu").model.state_dict(),
                      checkpoint["ema"])


def test_load_for_sampling_round_trip(shapes_run, tmp_path):
    path = str(shapes_run / "checkpoints" / "step_0000004.pt")
    loaded = train_text.load_for_sampling(path, "cpu")
    checkpoint = load(path)
    assert_same_state(loaded.model.state_dict(), checkpoint["ema"])
    # a checkpoint written before batches were a function of (seed, step): RNG states, no checksum
    torch.save(dict(checkpoint, rng=[{"python": random.getstate(), "torch": torch.get_rng_state()}] * 2),
               tmp_path / "old.pt")
    assert_same_state(train_text.load_for_sampling(str(tmp_path / "old.pt"), "cpu").model.state_dict(),
                      checkpoint["ema"])
    raw = train_text.load_for_sampling(path, "cpu", use_ema=False)
    assert_same_state(raw.model.state_dict(), checkpoint["model"])
    assert loaded.latent_shape == (3, 32, 32) and loaded.kind == "text" and loaded.options["prior"] == "text"
    assert loaded.trained_with_dropout
    captions = ["a small red circle on the left", "a large blue triangle at the top"]
    cond = loaded.make_condition(captions)
    noise = torch.randn(2, 3, 32, 32)
    x0 = loaded.prior.sample(cond, noise)
    mapper = train_text.Mapper(64, (3, 32, 32), width=32)
    mapper.load_state_dict(train_text.mapper_state(checkpoint, path))
    assert torch.allclose(x0, mapper(cond[0]) + 0.5 * noise, atol=1e-6)  # N(P(tau(y)), sigma^2 I)
    x = flow.solve(flow.guided_velocity(loaded.model, cond, loaded.null_condition(2), 1.5), x0, 4).x
    images = loaded.decode(x)
    assert images.shape == (2, 3, 32, 32) and -1 <= images.min() and images.max() <= 1


def test_gaussian_prior_run_and_bad_checkpoints(tmp_path, shapes_run):
    gaussian = tmp_path / "gaussian"
    run(gaussian, "--prior", "gaussian", "--coupling", "ot", "--steps", "2")
    checkpoint_path = gaussian / "checkpoints" / "step_0000002.pt"
    assert not (gaussian / "mapper_means.png").exists()
    loaded = train_text.load_for_sampling(str(checkpoint_path), "cpu")
    assert torch.equal(loaded.prior.sample(None, torch.ones(1, 3, 32, 32)), torch.ones(1, 3, 32, 32))
    # a checkpoint without a mapper cannot give the text prior one ...
    with pytest.raises(SystemExit, match="has no mapper"):
        run(tmp_path / "reuse", "--mapper-from", str(checkpoint_path), "--steps", "2")
    # ... nor can a text-prior checkpoint whose mapper is gone be sampled; nothing else is touched
    broken = load(shapes_run / "checkpoints" / "step_0000004.pt")
    broken["prior"] = {k: v for k, v in broken["prior"].items() if not k.startswith("mapper.")}
    flow.save_atomic(broken, str(tmp_path / "broken.pt"))
    with pytest.raises(SystemExit, match="has no mapper"):
        train_text.load_for_sampling(str(tmp_path / "broken.pt"), "cpu")
    with pytest.raises(SystemExit, match="no checkpoint at"):
        train_text.load_for_sampling(str(tmp_path / "missing.pt"), "cpu")
    flow.save_atomic({"kind": "class"}, str(tmp_path / "class.pt"))
    with pytest.raises(SystemExit, match="not a train_text.py checkpoint"):
        train_text.load_for_sampling(str(tmp_path / "class.pt"), "cpu")


@pytest.mark.parametrize("options, message", [
    (["--data", "coco"], "needs --data-root"),
    (["--vae", "sd-ema"], "--data shapes generates pixels"),
    (["--prior", "gaussian", "--mapper-from", "x.pt"], "needs --prior text"),
    (["--cfg-dropout", "1"], "must lie in [0, 1)"),
    (["--global-batch", "0"], "--global-batch must be positive"),
    (["--ema-decay", "2"], "--ema-decay must lie in [0, 1)"),
    (["--workers", "-1"], "--workers must be >= 0"),
])
def test_bad_options_stop_before_anything_is_written(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit):
        run(tmp_path / "bad", *options)
    assert message in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_an_out_folder_that_cannot_be_made_is_refused_before_the_data_is_read(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        run(tmp_path / "file" / "run")
    assert f"{tmp_path / 'file'} is not a writable folder" in capsys.readouterr().err


def test_samples_and_checkpoints_on_their_own_steps_and_a_fresh_log(tmp_path):
    out = tmp_path / "own"
    out.mkdir()
    (out / "log.jsonl").write_text('{"stage": "flow", "step": 99, "loss": 0}\n')  # left by an older run
    run(out, "--prior", "gaussian", "--steps", "4", "--ckpt-every", "3", "--sample-every", "2",
        "--sample-nfe", "1", "2")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000003.pt", "step_0000004.pt"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"step_{s:07d}_nfe_{n}.png" for s in (2, 4)
                                                                   for n in (1, 2)]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [2, 4]


def test_mapper_from_reuses_a_trained_mapper(tmp_path, shapes_run, capsys):
    out = tmp_path / "reuse"
    run(out, "--mapper-from", str(shapes_run / "checkpoints" / "step_0000004.pt"), "--steps", "2")
    last = capsys.readouterr().out.splitlines()[-1]  # what the run wrote where, and it is all there
    assert last == (f"wrote {out} (args.json, log.jsonl, mapper_means.png, checkpoints/step_0000002.pt, "
                    "samples/step_0000002_nfe_*.png)")
    assert all(list(out.glob(name)) for name in last.split("(")[1].rstrip(")").split(", "))
    assert not list((out / "mapper").glob("*.pt"))  # no stage 1
    assert_same_state(load(shapes_run / "checkpoints" / "step_0000004.pt")["prior"],
                      load(out / "checkpoints" / "step_0000002.pt")["prior"])


# ---------------------------------------------------------------------------------------------
# A batch is a pure function of (seed, step): 1 or 2 processes, any micro-batch split, any number of
# DataLoader workers and a resume on another number of processes train on the same batches.

PURE = ["--mapper-steps", "4", "--mapper-noise-dim", "4", "--steps", "10", "--log-every", "1",
        "--ckpt-every", "5", "--sample-every", "10", "--coupling", "ot", "--cfg-dropout", "0.3"]


def losses(out, stage):
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if record["stage"] == stage and "loss" in record]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process") / "run"
    run(out, *PURE, "--workers", "2")  # 2 micro-batches of 4, 2 workers
    return out


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_processes") / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "train_text.py"), "--out", str(out), *TINY, *PURE,
               "--workers", "1"]  # 4 per process
    result = subprocess.run(command, cwd=out.parent, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_one_and_two_processes_train_on_the_same_batches(one_process_run, two_process_run):
    """The logged losses are means over the global batch, and both runs see the same z, x0, t and pairs."""
    assert len(losses(two_process_run, "flow")) == 10  # rank 0 alone writes the log
    for stage in ("mapper", "flow"):
        np.testing.assert_allclose(losses(two_process_run, stage), losses(one_process_run, stage), rtol=0,
                                   atol=1e-4)
    one, two = (load(out / "checkpoints" / "step_0000010.pt") for out in (one_process_run, two_process_run))
    assert "rng" not in two  # nothing to restore: batches are a function of (seed, step)
    for part in ("model", "prior"):
        for name, value in one[part].items():
            torch.testing.assert_close(two[part][name], value, rtol=0, atol=1e-4)


def test_resume_on_one_process_continues_a_two_process_run(tmp_path, one_process_run, two_process_run):
    shutil.copytree(two_process_run, tmp_path / "run")
    os.remove(tmp_path / "run" / "checkpoints" / "step_0000010.pt")
    run(tmp_path / "run", *PURE, "--resume")  # from flow step 5, on one process
    np.testing.assert_allclose(losses(tmp_path / "run", "flow"), losses(one_process_run, "flow"), rtol=0,
                               atol=1e-4)
    assert losses(tmp_path / "run", "flow")[:5] == losses(two_process_run, "flow")[:5]  # kept, not redone


def tiny_split(pairs=20, captions=6):
    """A training Split of random 3x4x4 images and captions; row 0 is the null caption "" (zeros)."""
    rng = np.random.RandomState(0)
    pooled, tokens = rng.randn(captions, 5).astype(np.float32), rng.randn(captions, 2, 5).astype(np.float32)
    pooled[0], tokens[0] = 0, 0
    return train_text.Split(rng.randn(pairs, 3, 4, 4).astype(np.float32), [""] + list("abcde"), pooled,
                            tokens, np.arange(pairs), rng.randint(1, captions, pairs))


class FlatBatches(train_text.TrainingBatches):
    """TrainingBatches with the condition's two parts side by side, as fakes.whole_batch compares items."""

    def __getitem__(self, step):
        item = super().__getitem__(step)
        return item if self.stage == "mapper" else (*item[:3], *item[3])


@pytest.mark.parametrize("stage", ["mapper", "flow"])
def test_training_batches_are_the_same_for_any_processes_and_workers(stage):
    args = train_text.parse_args(["--coupling", "ot", "--cfg-dropout", "0.5", "--global-batch", "12",
                                  "--mapper-noise-dim", "3"])
    train = tiny_split()
    torch.manual_seed(0)
    prior = train_text.TextPrior(train_text.Mapper(5, (3, 4, 4), width=16, noise_dim=3), sigma=0.5)
    whole, index = whole_batch(lambda rank, world_size: FlatBatches(stage, train, prior, args, rank,
                                                                    world_size))
    x1, (pooled, _) = train.batch(index, "cpu")
    if stage == "mapper":  # x1, pooled tau(y), z
        assert torch.equal(whole[0], x1) and torch.equal(whole[1], pooled) and whole[2].shape == (12, 3)
        return
    assert torch.equal(whole[1], x1)  # x0, x1, t, pooled, tokens: the data of the batch, in order
    kept = whole[3].abs().sum(1) > 0  # a dropped caption is the null caption ""
    assert torch.equal(whole[3][kept], pooled[kept]) and 0 < kept.sum() < 12


def test_resume_skips_a_corrupted_checkpoint_and_removes_partial_writes(tmp_path, shapes_run, capsys):
    shutil.copytree(shapes_run, tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "step_0000004.pt"
    flip_weight_bytes(newest)  # loads silently: only the checksum tells
    partial = [newest.parent / "step_0000006.pt.4242.tmp", tmp_path / "run" / "args.json.7.tmp",
               tmp_path / "run" / "mapper" / "step_0000006.pt.7.tmp"]
    for path in partial:
        path.write_bytes(b"cut short by a crash")
    with pytest.raises(SystemExit, match=f"^error: {newest} is corrupted"):
        train_text.load_for_sampling(str(tmp_path / "run"), "cpu")
    capsys.readouterr()
    run(tmp_path / "run", "--mapper-steps", "4", "--steps", "4", "--resume")
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert note == [(f"note: {newest} is corrupted (its contents do not match their checksum): refused: "
                     f"resuming from the previous valid checkpoint {newest.parent / 'step_0000002.pt'}")]
    assert not any(path.exists() for path in partial)
    assert_same_state(load(newest)["model"], load(shapes_run / "checkpoints" / "step_0000004.pt")["model"])

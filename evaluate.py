"""Fairness evaluation of generated images: FD, SPD, indicator entropy, and image quality beside them.

Balance (formulas in ddm.py): FD = ||u − p||₂ of the groups an attribute classifier assigns (hard: argmax; soft:
mean softmax); SPD over the success rates of prompting each group; the indicator's mean entropy (the authors'
signal). Quality, so that "fair" cannot mean "broken": confidence, the share of images outside the evaluated groups
(None where they are all the classes), the Fréchet distance to real images in the classifier's features (FID's
formula, our features). The classifier's held-out accuracy is reported beside every number: its errors distort FD.

Two judges, one interface (`class_names`, `__call__(images) -> logits`, `features(images)`, `heldout_accuracy`):
- `DigitClassifier`, a small CNN on the shipped MNIST train split, tested on the held-out one rendered as generated;
- `CLIPZeroShot` for real SD images: CLIP ViT-L/14 (clip_image.py) picks the most similar of K texts; quality is a
  CLIP-feature Fréchet distance to --reference and the CLIP score, the mean of 100 · max(cos(image, its prompt), 0)
  (Hessel et al. 2021's CLIP-S with w = 100; torchmetrics clamps the mean instead: equal unless a cosine is < 0).

    python evaluate.py IMAGE_DIR [...] [--groups 7 8] [--prompt-groups 7 8] [--classifier PATH]
    python evaluate.py IMAGE_DIR [...] --clip CLIP_DIR --attributes "a photo of a man" "a photo of a woman"
"""

import argparse
import hashlib
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

import cli
import clip_image
import data
import weights
from ddm import fairness_discrepancy, group_proportions, mean_entropy, statistical_parity_difference
from tokenizer import Tokenizer

DEFAULT_CLASSIFIER_PATH = Path(__file__).resolve().parent / "runs" / "digit_classifier.safetensors"
CLASSIFIER_FORMAT = "ddm-digit-classifier-v1"  # bump when the architecture or its training changes
CLIP_BATCH_SIZE = 32  # images per CLIP forward pass unless --batch-size says otherwise


# ----------------------------------------------------------------------------------------------------------------
# The built-in digit classifier

def to_gray28(images):
    """Digit images, uint8 (N,H,W,3) as sample.py writes them or (N,C,H,W), or float (N,C,H,W) in [-1,1], C 1 or 3;
    (N,H,W) is one channel -> float (N,1,28,28) in [-1,1]."""
    x = torch.as_tensor(images)
    x = x.unsqueeze(1) if x.dim() == 3 else x
    assert x.dim() == 4 and (x.dtype == torch.uint8 or x.is_floating_point()), f"images {x.dtype} {tuple(x.shape)}"
    if x.dtype == torch.uint8:
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)  # channels-last (sample.py) -> channels-first
        x = x.float() / 127.5 - 1.0
    x = x.float()
    assert x.shape[1] in (1, 3), f"images must have 1 or 3 channels, got shape {tuple(x.shape)}"
    if x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)  # ITU-R 601 luma
    if x.shape[-2:] != (28, 28):
        x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    return x


class DigitClassifier(nn.Module):
    """Small CNN: digit images -> 10 logits; `features` is its 128-d penultimate layer."""

    def __init__(self, width=16, feature_dim=128):
        super().__init__()
        self.class_names = list(range(10))
        self.heldout_accuracy, self.split, self.seed = None, (0, 100), None  # set by training or loading
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),  # (N,w,14,14)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),  # (N,2w,7,7)
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(), nn.MaxPool2d(2),  # (N,4w,3,3)
            nn.Flatten(), nn.Linear(4 * w * 9, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def forward(self, images):
        return self.head(self.body(to_gray28(images)))

    @torch.no_grad()
    def features(self, images):
        return self.body(to_gray28(images))


def _augment(x, generator):
    """Random small rotation / scale / shift of a (N,1,28,28) batch: handwriting varies, generators drift."""
    n = len(x)
    # ±12°, ±10% scale, ±1.4 px shift: within the spread of handwriting itself, so every label stays right
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(12)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.1  # 0.1 of the half-width = 1.4 px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # pad with background -1


@torch.no_grad()
def classify(classifier, images, batch_size=256, features=False):
    """Logits (N, K) of a batch of images, or with features=True the features the judge compares them by, computed
    in chunks in eval mode (batch norm then reads, and keeps, its running statistics), the mode left as it was."""
    was_training = getattr(classifier, "training", False)
    if was_training:
        classifier.eval()
    images, forward = torch.as_tensor(images), classifier.features if features else classifier
    out = torch.cat([forward(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    if was_training:
        classifier.train()
    return out


def heldout_digits(split_seed=0, heldout_per_class=100, resolution=32, groups=None):
    """Held-out real digits as generated images look: uint8 RGB (M, R, R, 3), and their labels (M,)."""
    images, labels = data.load_digits()
    _, heldout = data.split_digits(split_seed, heldout_per_class, labels)
    if groups is not None:
        heldout = heldout[np.isin(labels[heldout], [int(g) for g in groups])]
    return data.digit_images(images, heldout, resolution), labels[heldout]


def train_digit_classifier(seed=0, epochs=8, batch_size=64, lr=3e-3, split_seed=0, heldout_per_class=100,
                           progress=False):
    """Train `DigitClassifier` on the balanced train split, seeded, the caller's torch RNG left untouched -> (model
    in eval mode, held-out accuracy on digits rendered as generated images are, also stored on the model)."""
    images, labels = data.load_digits()
    train, _ = data.split_digits(split_seed, heldout_per_class, labels)
    x = torch.from_numpy(images[train]).float().unsqueeze(1) / 127.5 - 1.0  # (N,1,28,28) in [-1,1]
    y = torch.from_numpy(labels[train])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)  # light: augmentation does the regularising
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 28x28 CNN at batch 64 gains nothing from intra-op threads; on a busy machine
    try:                      # two spinning threads ran 10x slower (CPU time 167 s vs 16 s)
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                loss = F.cross_entropy(model(_augment(x[idx], gen)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if progress:
                print(f"digit classifier epoch {epoch + 1}/{epochs} loss {loss.item():.3f} "
                      f"{time.time() - t0:.1f}s", file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    held_images, held_labels = heldout_digits(split_seed, heldout_per_class)
    accuracy = (classify(model, held_images).argmax(1).numpy() == held_labels).mean().item()
    model.heldout_accuracy, model.split, model.seed = accuracy, (split_seed, heldout_per_class), seed
    return model, accuracy


def save_classifier(model, path):
    """Write a DigitClassifier to safetensors; held-out accuracy and split ride along as metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": CLASSIFIER_FORMAT, "heldout_accuracy": repr(model.heldout_accuracy),
                "split_seed": str(model.split[0]), "heldout_per_class": str(model.split[1]), "seed": str(model.seed)}
    weights.write_atomic(path, lambda tmp: weights.save_tensors(model.state_dict(), tmp, metadata))


def load_classifier(path):
    """Read a DigitClassifier written by `save_classifier` -> model in eval mode, with `.heldout_accuracy`."""
    path = weights.existing_file(path, "classifier file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    if metadata.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: not a digit classifier of this version (format {metadata.get('format')!r}, "
                         f"expected {CLASSIFIER_FORMAT!r}); retrain it with train_digit_classifier")
    model = weights.load_strict(DigitClassifier(), state, f"{path}: DigitClassifier", assign=False)
    meta, values = {"seed": "None", **metadata}, {}  # "None": no seed recorded (older files)
    for key, kind in (("heldout_accuracy", float), ("split_seed", int), ("heldout_per_class", int), ("seed", int)):
        try:
            values[key] = None if key == "seed" and meta[key] == "None" else kind(meta[key])
        except (KeyError, ValueError):
            raise ValueError(f"{path}: metadata '{key}' is {meta.get(key)!r}, not a number; retrain it with "
                             "train_digit_classifier") from None
    model.heldout_accuracy, model.seed = values["heldout_accuracy"], values["seed"]
    model.split = (values["split_seed"], values["heldout_per_class"])
    return model.eval()


def get_digit_classifier(path, progress=True):
    """Load the digit classifier at `path`; the default one, where missing, is trained (seed 0) and cached there."""
    path = Path(path)
    if path.is_file() or path != DEFAULT_CLASSIFIER_PATH:
        return load_classifier(path)
    t0 = time.time()
    model, accuracy = train_digit_classifier(seed=0, progress=progress)
    if progress:
        print(f"trained digit classifier: held-out accuracy {accuracy:.4f} in {time.time() - t0:.1f}s -> {path}",
              file=sys.stderr)
    save_classifier(model, path)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Judges of attributes the prompt does not name: ink colour and stroke width of the shipped digits (ours)

def white_ink(images):
    """uint8 (N, H, W, 3) digits in any ink colour -> the same in white ink (each pixel's brightest channel)."""
    return np.repeat(np.asarray(images).max(-1, keepdims=True), 3, axis=-1)


class AttributeJudge:
    """Ink colour and stroke width of generated digits of one class, as an attribute classifier (the interface of
    evaluate_images): colour by the exact pixel rule (more red than green ink: red), width by the ink mass
    (data.ink_mass) against that digit's median among the real training digits, `threshold`; "colour+width"
    judges their intersections. Features: the digit classifier's, of the images in white ink.

    Every image gets a group, ties included: as much red as green ink reads as green, an ink mass at the threshold
    as thin, so a blank (black) image is green+thin. reproduce.py's content accuracy catches blank images under the
    prompts 0 and 7 but not 1 (the digit classifier reads a black image as a 1); the Frechet distance, every time."""
    VALUES = {"colour": sorted(data.COLOURS), "width": ["thick", "thin"]}

    def __init__(self, attribute, digit_classifier, threshold):
        self.parts, self.classifier, self.threshold = attribute.split("+"), digit_classifier, threshold
        self.class_names = ["+".join(v) for v in itertools.product(*[self.VALUES[p] for p in self.parts])]
        self.heldout_accuracy = None  # exact rules, checked in the tests and on held-out digits by reproduce.py

    def names(self, images):
        x = np.asarray(images, dtype=np.float64)
        value = {"colour": np.where(x[..., 0].sum((1, 2)) > x[..., 1].sum((1, 2)), "red", "green"),
                 "width": np.where(data.ink_mass(x) > self.threshold, "thick", "thin")}
        return ["+".join(v) for v in zip(*[value[p] for p in self.parts])]

    def __call__(self, images):
        # logits of a sure verdict: softmax(0, -30) is one-hot to 1e-13, as the exact rules are
        return torch.tensor([[0.0 if c == n else -30.0 for c in self.class_names] for n in self.names(images)])

    def features(self, images):
        return self.classifier.features(white_ink(images))


# ----------------------------------------------------------------------------------------------------------------
# CLIP zero-shot attribute classification, for real Stable Diffusion images

class CLIPZeroShot:
    """CLIP as an attribute classifier (the interface above) that reads image *embeddings*, not pixels.

    The K class texts are embedded once; an image's logits are exp(t) * cos(image, text_k)
    (`clip_image.CLIPModel.logits`), its features its projected CLIP embedding (768-d for ViT-L/14). Handing
    `evaluate_images` the embeddings of `clip_image_embeddings` runs the image tower once per image for the
    classifier, the Frechet distance and the CLIP score together.
    """

    def __init__(self, model, tokenizer, attributes):
        self.model = model
        self.class_names = list(attributes)
        self.heldout_accuracy = None  # zero-shot: nothing held out; check it on labelled real images of yours
        with torch.no_grad():
            self.text_embeds = model.encode_text(tokenizer(self.class_names).to(model.logit_scale.device))

    def __call__(self, image_embeds):
        with torch.no_grad():
            return self.model.logits(image_embeds.to(self.text_embeds.device), self.text_embeds).float().cpu()

    def features(self, image_embeds):
        return torch.as_tensor(image_embeds)


@torch.no_grad()
def clip_image_embeddings(model, paths, batch_size=CLIP_BATCH_SIZE, progress=True, what="images"):
    """Projected CLIP embeddings of image files, float32 (N, D) on the CPU; each image is preprocessed on its own
    (`clip_image.preprocess`), so one folder may hold several sizes."""
    device, size = model.logit_scale.device, model.config.vision.image_size
    out = []
    for i in tqdm(range(0, len(paths), batch_size), f"CLIP {what}", unit="batch", disable=not progress):
        pixels = clip_image.preprocess([data.open_image(p) for p in paths[i:i + batch_size]], size)
        out.append(model.encode_image(pixels.to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def clip_scores(model, tokenizer, image_embeds, prompts, batch_size=CLIP_BATCH_SIZE):
    """CLIP score of each image against its prompt: 100 * max(cos(image, prompt), 0), float (N,), clamped per image
    (CLIP-S of Hessel et al. 2021 with w = 100; the result's clip_score is their mean); the distinct prompts go
    through the text tower `batch_size` at a time (a folder may hold thousands of captions)."""
    unique = sorted(set(prompts))
    text = torch.cat([model.encode_text(tokenizer(unique[i:i + batch_size]).to(model.logit_scale.device)).float().cpu()
                      for i in range(0, len(unique), batch_size)])
    row = {p: k for k, p in enumerate(unique)}
    text = F.normalize(text, dim=-1)[[row[p] for p in prompts]]
    return (100 * (F.normalize(image_embeds, dim=-1) * text).sum(1)).clamp(min=0)


def sample_prompts(directory, paths, fallback=None):
    """The prompt of every image in `paths`: from the folder's samples.json (sample.py's record: its `files` and
    `prompts` lists, in step) when it has one, else `fallback` for all."""
    record_path = Path(directory) / "samples.json"
    if not record_path.is_file():
        if fallback is None:
            raise ValueError(f"{directory} has no samples.json to read the prompts from; pass --prompt TEXT "
                             "(the prompt its images were generated from) for the CLIP score")
        return [fallback] * len(paths)
    record = weights.read_json(record_path)
    try:
        by_file = dict(zip(record["files"], record["prompts"], strict=True))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{record_path}: expected sample.py's record, with 'files' and 'prompts' lists of one "
                         f"length ({type(e).__name__}: {e})") from None
    unlisted = [p.name for p in paths if p.name not in by_file]
    broken = [p.name for p in paths if p.name in by_file and not isinstance(by_file[p.name], str)]
    if unlisted or broken:
        raise ValueError(f"{record_path} lists no prompt for {len(unlisted)} images of the folder, e.g. "
                         f"{', '.join(unlisted[:3])}: not the run's images; move them away" if unlisted else
                         f"{record_path}: the prompt of {broken[0]} is {by_file[broken[0]]!r}, not a text: the "
                         "record is broken; write the image's prompt there")
    return [by_file[p.name] for p in paths]


# ----------------------------------------------------------------------------------------------------------------
# Metrics

def _moments(features, name):
    f = torch.as_tensor(features).double()
    assert f.dim() == 2 and len(f) >= 2, f"{name} must be (N, D) with N >= 2 for a covariance, got {tuple(f.shape)}"
    return f.mean(0), torch.cov(f.T).view(f.shape[1], f.shape[1])  # view: cov of one feature is 0-d


def _frechet(mu_a, cov_a, mu_b, cov_b):
    """|| mu_a - mu_b ||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), the Gaussians' Frechet distance."""
    def sqrt_psd(m):  # symmetric PSD square root by eigendecomposition; round-off negatives clipped to 0
        vals, vecs = torch.linalg.eigh((m + m.T) / 2)
        return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T

    root_a = sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).clamp(min=0).item()


def frechet_distance(features_a, features_b):
    """Frechet distance between Gaussians fitted to two feature sets (N, D) and (M, D) (FID's formula)."""
    mu_a, cov_a = _moments(features_a, "features_a")
    mu_b, cov_b = _moments(features_b, "features_b")
    assert len(mu_a) == len(mu_b), f"features have different widths: {len(mu_a)} and {len(mu_b)}"
    return _frechet(mu_a, cov_a, mu_b, cov_b)


def mixture_moments(features_by_group, weights):
    """Mean and covariance of the mixture sum_g w_g N(mu_g, S_g) of per-group feature sets -> (mu, cov)."""
    mu, second = 0, 0
    for f, w in zip(features_by_group, weights):
        mu_g, cov_g = _moments(f, "reference features of every group")
        mu = mu + w * mu_g
        second = second + w * (cov_g + torch.outer(mu_g, mu_g))
    return mu, second - torch.outer(mu, mu)


# images per set and group, and random draws averaged: at 20 draws a model's per-group recall moved by sd 0.03 with
# the draws alone; 200 cost 0.7 s a model and leave about 0.01
DIVERSITY_SUBSET, DIVERSITY_DRAWS = 40, 200


def request_error(class_names, groups, n, requested=None, indicator_logits=None):
    """Why the evaluated groups, the images, the requested groups and the indicator logits do not fit each other,
    or None."""
    unknown = [g for g in groups if g not in class_names]
    if unknown:
        return (f"group {unknown[0]!r} is not a class of the classifier whose K={len(class_names)} classes "
                f"are {class_names}")
    if len(set(groups)) != len(groups) or len(groups) < 2:
        return f"groups must be at least two distinct classes, got {groups}"
    if n == 0:
        return "no images to evaluate"
    if requested is not None:
        wrong, never = sorted({str(r) for r in requested if r not in groups}), [g for g in groups if g not in requested]
        if len(requested) != n or wrong or never:
            return (f"requested must name one of the evaluated groups {groups} per image ({len(requested)} "
                    f"for {n} images; not among them: {wrong}); SPD needs every group prompted at least "
                    f"once; never requested: {never}")
    shape = None if indicator_logits is None else tuple(torch.as_tensor(indicator_logits).shape)
    if shape is not None and shape != (n, len(groups)):
        return (f"indicator logits have shape {shape}, expected (N, {len(groups)}) with N = {n}: a row per "
                f"image, a column per evaluated group {groups}")
    return None


def prompt_groups_error(groups, prompted, fix):
    """Why --prompt-groups (the group each folder's prompt asked for; None: not given) does not fit the evaluated
    groups, or None; `fix` says how to evaluate only the prompted groups."""
    wrong, never = [g for g in prompted or [] if g not in groups], [g for g in groups if g not in (prompted or groups)]
    if wrong:
        return f"--prompt-groups {wrong[0]} is not among the evaluated groups {groups}"
    if never:
        return (f"--prompt-groups prompts no folder for the evaluated groups {never}: SPD compares the success of "
                f"prompting each group, so each needs a folder of its own; or {fix}")
    return None


def evaluate_images(images, classifier, groups=None, *, requested=None, indicator_logits=None,
                    reference_features=None, diversity_subset=DIVERSITY_SUBSET):
    """Group balance and quality of generated images -> dict of JSON-ready numbers (None where not computed).

    groups: the K groups to judge balance over, a subset of `classifier.class_names` (default all of them);
    images are assigned to the most likely of these K classes (proportions, FD, SPD); share_outside_groups is the
    share whose most likely class of all is none of them (None where they are all the classes: 0 by construction),
    and left out of the per-group Frechet, precision and recall, which are of each group's own images. requested:
    per image, the group its prompt asked for (conditional scenario) -> success rates and SPD; every group must be
    requested at least once.
    indicator_logits: (N, K) logits of the trained indicator, one row per image -> mean entropy.
    reference_features: classifier features of real images -> Frechet distance; either (M, D), or a dict
    {group: (M_g, D)} for every group, whose mixture is weighted by the generated (hard) proportions; with the
    dict also precision and recall, overall and per group (`diversity`), the per-group ones and the per-group
    Frechet distances on equal-size subsets of `diversity_subset`.
    """
    class_names = list(classifier.class_names)
    groups = class_names if groups is None else list(groups)
    images = torch.as_tensor(images)
    why = request_error(class_names, groups, len(images), requested, indicator_logits)
    if why:
        raise ValueError(why)
    K = len(groups)
    logits = classify(classifier, images)
    assert logits.shape == (len(images), len(class_names)), \
        f"classifier returned logits of shape {tuple(logits.shape)} for {len(images)} images, but it names " \
        f"K={len(class_names)} classes"
    probs = logits.softmax(1)
    columns = [class_names.index(g) for g in groups]
    group_logits = logits[:, columns]  # (N, K): the decision restricted to the evaluated groups
    labels = group_logits.argmax(1)
    p = group_proportions(labels, K)
    p_soft = group_proportions(group_logits.softmax(1), K)
    inside = torch.isin(probs.argmax(1), torch.tensor(columns))  # the images whose best class of all is a group
    share_outside = None if len(columns) == len(class_names) else (~inside).double().mean().item()  # None: 0 always
    result = {
        "n_images": len(images), "groups": groups,
        "classifier_heldout_accuracy": getattr(classifier, "heldout_accuracy", None),
        "proportions": p.tolist(), "proportions_soft": p_soft.tolist(),
        "fd": fairness_discrepancy(p), "fd_soft": fairness_discrepancy(p_soft), "fd_max": math.sqrt((K - 1) / K),
        "success_rates": None, "spd": None,
        "indicator_entropy": None if indicator_logits is None else mean_entropy(indicator_logits),
        "indicator_entropy_max": math.log(K),
        "mean_confidence": probs.max(1).values.mean().item(),
        "share_outside_groups": share_outside,
        "frechet_distance": None, "frechet_per_group": None,
    }
    if requested is not None:
        asked = torch.tensor([groups.index(r) for r in requested])
        rates = {str(g): (labels[asked == k] == k).double().mean().item() for k, g in enumerate(groups)}
        result.update(success_rates=rates, spd=statistical_parity_difference(rates))
    if reference_features is not None:  # a group's own columns: its images, not another class nearer it than the rest
        feats, own = classify(classifier, images, features=True), torch.where(inside, labels, -1)
        result.update(frechet_distances(feats, own, p, groups, reference_features, m=diversity_subset))
        if isinstance(reference_features, dict):
            result.update(diversity(feats, own, groups, reference_features, m=diversity_subset))
    return result


def frechet_distances(feats, labels, p, groups, reference_features, m=DIVERSITY_SUBSET, draws=DIVERSITY_DRAWS,
                      seed=0):
    """{"frechet_distance", "frechet_per_group"}: generated features (group labels, shares p) against real ones, (M, D)
    or {group: (M_g, D)} mixed in the shares p (bias alone is not bad quality); per group, the images judged g against
    real g (a group's broken images cannot hide in the mix) on equal_subsets of m, as the distance falls with the
    number of images (None for fewer than m). {} for one image, which has no covariance."""
    if len(feats) < 2:
        return {}
    if not isinstance(reference_features, dict):
        return {"frechet_distance": frechet_distance(feats, reference_features)}
    assert all(g in reference_features for g in groups), f"reference_features lacks groups of {groups}"
    mu_ref, cov_ref = mixture_moments([reference_features[g] for g in groups], p.tolist())
    mu, cov = _moments(feats, "features of the generated images")
    gen = torch.Generator().manual_seed(seed)

    def mean_fd(real, fake):
        pairs = equal_subsets(real, fake, m, draws, gen)
        return None if pairs is None else float(np.mean([frechet_distance(f, r) for r, f in pairs]))

    drawn = {k: mean_fd(reference_features[groups[k]], feats[labels == k]) for k in name_order(groups)}
    return {"frechet_distance": _frechet(mu, cov, mu_ref, cov_ref),
            "frechet_per_group": {str(g): drawn[k] for k, g in enumerate(groups)}}


def name_order(groups):
    """The indices of `groups` in the order of their names: random subsets are drawn group by group in this order,
    so a group's numbers do not depend on where --groups lists it."""
    return sorted(range(len(groups)), key=lambda k: str(groups[k]))


def equal_subsets(real, fake, m, draws, gen):
    """`draws` pairs of random subsets of m points of each set, or None where either holds fewer: compared on one
    size, a group with more images earns nothing (its Frechet distance falls with the number, its recall grows).
    Drawn from each set in the order of its points' values (canonical), so the same images give the same subsets in
    any order: the folders in another order on the command line, or a folder's files renamed."""
    if min(len(real), len(fake)) < m:
        return None
    real, fake = canonical(real), canonical(fake)
    return [(real[torch.randperm(len(real), generator=gen)[:m]], fake[torch.randperm(len(fake), generator=gen)[:m]])
            for _ in range(draws)]


def canonical(points):
    """The rows of (N, D) `points` sorted by their values (the first column first, ties by the next): an order that
    does not depend on the one they came in. Equal rows are interchangeable."""
    points = torch.as_tensor(points)
    return points[torch.from_numpy(np.lexsort(points.double().cpu().numpy().T[::-1]).copy())]


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkäänniemi et al. 2019, eq. 1-3): each set's manifold is the union of
    balls around its points, of radius the distance to the point's k-th nearest neighbour in its own set.
    Precision: the share of generated points inside the real manifold (are they realistic?); recall: the share
    of real points inside the generated manifold (is the real variety covered?). -> (precision, recall)"""
    def radii(x):
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # k + 1: a point is its own nearest neighbour

    real, fake = real.double(), fake.double()
    d = torch.cdist(fake, real)  # (F, R)
    precision = (d <= radii(real)[None]).any(1).double().mean().item()
    recall = (d.T <= radii(fake)[None]).any(1).double().mean().item()
    return precision, recall


def diversity(feats, labels, groups, reference_features, m=DIVERSITY_SUBSET, draws=DIVERSITY_DRAWS, seed=0):
    """{"precision", "recall"} overall and {"precision_per_group", "recall_per_group"}: each group's generated
    images (as judged) against its real ones, both on equal-size random subsets of m (mean over `draws` draws),
    so that having more images of a group earns nothing. None where a group has fewer than m images. The subsets
    are drawn group by group in name_order."""
    gen, order = torch.Generator().manual_seed(seed), name_order(groups)

    def mean_pr(real, fake):
        pairs = equal_subsets(real, fake, m, draws, gen) if m >= 4 else None  # a 3rd nearest neighbour in a subset
        if pairs is None:
            return None, None
        precision, recall = zip(*[precision_recall(r, f) for r, f in pairs])
        return float(np.mean(precision)), float(np.mean(recall))

    drawn = {k: mean_pr(reference_features[groups[k]], feats[labels == k]) for k in order}
    overall = mean_pr(torch.cat([reference_features[groups[k]] for k in order]), feats)
    return {"precision": overall[0], "recall": overall[1],
            "precision_per_group": {str(g): drawn[k][0] for k, g in enumerate(groups)},
            "recall_per_group": {str(g): drawn[k][1] for k, g in enumerate(groups)}}


# ----------------------------------------------------------------------------------------------------------------
# Folders of generated images

def image_files(directory, name="image folder"):
    """The image files of one folder, sorted by name: a sample.py run's images but its grid.png, or every image a
    data folder's metadata.jsonl lists (in its subfolders too); other files (samples.json, ...) are skipped. Refused
    where the folder (called `name`, or the flag that gave it) is missing, a sample.py run that stopped, a grid.png
    without its samples.json, or a folder whose metadata.jsonl or samples.json does not list them all."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{name} {directory} " + ("is a file, not a folder" if directory.exists() else
                                                         "does not exist"))
    files = sorted(p for p in directory.iterdir() if p.is_file())
    grid = "grid.png" if (directory / "samples.json").exists() else None  # sample.py's grid of its own images
    paths = [p for p in files if p.suffix.lower() in data.IMAGE_EXTENSIONS and p.name != grid]
    meta = directory / "metadata.jsonl"
    if meta.is_file():  # a data folder: every file it lists, in subfolders too (train.py reads them all)
        root = directory.resolve()
        paths = sorted({*paths, *(directory / p.relative_to(root) for p in data.listed_files(meta))})
    others = ", ".join(p.name for p in files[:5]) + (" ..." if len(files) > 5 else "")
    empty = None if paths else (f"no images in {directory} (looked for {', '.join(data.IMAGE_EXTENSIONS)}; found "
                                f"{len(files)} other files{': ' + others if files else ''})")
    copied = directory / "grid.png" in paths and not meta.is_file()  # the images of a run, copied without its record
    grid_error = (f"{directory / 'grid.png'}: no samples.json beside it to tell sample.py's grid of these images from "
                  "an image: move it away (or put the run's samples.json back)") if copied else None
    why = unfinished_error(directory) or empty or grid_error or unlisted_error(directory, paths)
    if why:
        raise ValueError(why)
    files, prompts = (json_object(directory / "samples.json").get(k) for k in ("files", "prompts"))
    if isinstance(files, list) and isinstance(prompts, list) and len(files) == len(prompts):
        sample_prompts(directory, paths)  # sample.py's record: an image it does not list is not its run's
    return paths


def unlisted_error(directory, paths):
    """Why the images `paths` of a data folder are not all its own, or None: its metadata.jsonl lists the images of
    the folder, and one it does not list (put there by hand, or left by an earlier build that --overwrite did not
    write again) would be judged with them; one it lists is gone; or a build of the folder stopped half-way."""
    meta, why = directory / "metadata.jsonl", data.interrupted_error(directory)
    if not meta.is_file():  # a plain image folder, or a first build stopped half-way
        return why
    gone = next((p for p in paths if not p.is_file()), None)
    broken = next((n for n, line in data.text_lines(meta) if line.strip() and not data.line_file(directory, line)), 0)
    if why or gone or broken:
        return why or (f"{meta}, line {broken}: no JSON object with a 'file_name' inside the folder (its image would "
                       "be left out)" if broken else f"{meta} lists {gone.relative_to(directory)}, which is not there")
    listed, root = data.listed_files(meta), directory.resolve()
    unlisted = [str(p.relative_to(directory)) for p in paths if root / p.relative_to(directory) not in listed]
    return (f"{meta} does not list {len(unlisted)} images of the folder, e.g. {', '.join(unlisted[:3])}; move them "
            "away, or build the data folder anew into an empty one") if unlisted else None


def json_object(path):
    """The JSON object the file `path` holds, or {} where none reads (missing, unreadable, not JSON, not an object);
    sample_prompts names a broken samples.json where it needs the prompts."""
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def unfinished_error(directory):
    """Why `directory` is the --out of a sample.py run that stopped before its last image, or None: its samples.json
    says finished: false (written first, true at the end), so images are missing, the last perhaps half-written."""
    record = json_object(directory / "samples.json")
    if record.get("finished") is not False:
        return None
    files = record.get("files") if isinstance(record.get("files"), list) else []
    here = sum(isinstance(n, str) and (directory / n).is_file() for n in files)
    return (f"{directory / 'samples.json'}: the sample.py run that wrote this folder did not finish ({here} of its "
            f"{len(files)} images are here); run it again with --overwrite before judging it")


def read_images(paths):
    """Image files (`image_files` of one folder or several) -> uint8 (N, H, W, 3); they must have one size."""
    arrays = []
    for p in paths:
        arrays.append(np.asarray(data.open_image(p)))
        if arrays[-1].shape != arrays[0].shape:
            raise ValueError(f"image {p} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]} but {paths[0]} is "
                             f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; the images evaluated together must have "
                             "one size")
    return np.stack(arrays)


def _parse_group(value):
    try:
        return int(value)
    except ValueError:
        return value


def build_parser():
    parser = argparse.ArgumentParser(
        description="Group balance (FD, SPD, indicator entropy) and quality of folders of generated images, judged "
                    "by the built-in digit classifier or, with --clip, by CLIP zero-shot classification among "
                    "attributes named in words.")
    parser.add_argument("image_dirs", nargs="+", metavar="IMAGE_DIR",
                        help="folders of generated images (e.g. sample.py --out); pooled for FD")
    parser.add_argument("--prompt-groups", nargs="+", type=_parse_group,
                        help="conditional scenario: the group each IMAGE_DIR's prompt asked for, one per folder "
                             "(a digit; with --clip an attribute's index from 0, or its text) -> success rates "
                             "and SPD")
    parser.add_argument("--indicator-logits", type=Path,
                        help="(N, K) indicator logits on the generated images, .npy or .safetensors -> entropy")
    parser.add_argument("--out", type=Path, help="JSON result (default: IMAGE_DIR/evaluation.json, first folder)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="a tqdm bar while CLIP embeds the images; the epochs of the default digit classifier "
                             "when it is trained")
    g = parser.add_argument_group("digit classifier (the default)")
    g.add_argument("--groups", nargs="+", type=_parse_group,
                   help="the classifier classes to judge balance over (default: all)")
    g.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER_PATH,
                   help="digit classifier (.safetensors) written by save_classifier; the default one is trained "
                        "(seed 0, ~20 s) and cached if missing, another path must exist")
    g = parser.add_argument_group("CLIP zero-shot classifier, for real Stable Diffusion images")
    g.add_argument("--clip", type=Path, metavar="CLIP_DIR",
                   help="a transformers CLIP folder, e.g. openai/clip-vit-large-patch14 (config.json, "
                        "model.safetensors or pytorch_model.bin, tokenizer files)")
    g.add_argument("--attributes", nargs="+", action="append", metavar="TEXT",
                   help='the K groups of one attribute as texts, e.g. "a photo of a man" "a photo of a woman"; each '
                        "image goes to the one CLIP finds most similar. Repeat it for several attributes (their "
                        "intersections are judged too; --prompt-groups and SPD refer to the first)")
    g.add_argument("--reference", type=Path, metavar="REAL_DIR",
                   help="real images -> Frechet distance in CLIP image-feature space (thousands for a stable one)")
    g.add_argument("--prompt", help="for folders without sample.py's samples.json: their prompt, for the CLIP "
                                    "score (folders with one use the prompts it records)")
    g.add_argument("--device", type=cli.device_arg, help="where CLIP runs (default: cuda if available, else cpu)")
    g.add_argument("--batch-size", type=int, help=f"images per CLIP forward pass (default {CLIP_BATCH_SIZE})")
    return parser


def parse_args(argv=None):
    """Every flag checked before anything is read or written; one line naming the flag otherwise (exit 2). Then the
    CLIP defaults (--device, --batch-size) are filled in: run() needs args from here."""
    parser = build_parser()
    args = parser.parse_args(argv)
    why = flag_error(args)
    if why:
        parser.error(why)
    args.device = args.device or cli.device_arg("cuda" if torch.cuda.is_available() else "cpu")
    args.batch_size = args.batch_size or CLIP_BATCH_SIZE
    return args


def flag_error(args):
    """Why the flags cannot be used as given, or None."""
    why = cli.range_error(args, {"batch_size": (1, None)})
    if why:
        return why
    if args.clip is None:  # the digit classifier runs on the CPU, at its own batch
        for name in ("attributes", "reference", "prompt", "device", "batch_size"):
            if getattr(args, name) is not None:
                return f"--{name.replace('_', '-')} is for the CLIP classifier: give --clip CLIP_DIR too"
    elif not args.attributes or any(len(a) < 2 for a in args.attributes):
        return ('--clip needs --attributes with at least two texts, e.g. --attributes "a photo of a man" '
                '"a photo of a woman"')
    elif args.groups is not None:
        return "--groups picks digit classes; with --clip the groups are the --attributes"
    elif args.classifier != DEFAULT_CLASSIFIER_PATH:
        return f"--classifier is the digit judge's; with --clip, CLIP judges (got --classifier {args.classifier})"
    tokenize = Tokenizer.default() if args.attributes else None  # as CLIP reads a text: NFC, lowered, 75 ids at most
    for texts in args.attributes or []:
        ids = [tuple(row) for row in tokenize(texts).tolist()]
        twice = cli.repeated(ids)
        if twice is not None:
            first, second = [t for t, row in zip(texts, ids) if row == twice][:2]
            same = "" if second == first else f": {second!r} reads as the same token ids to CLIP"
            return f"--attributes names the text {first!r} twice{same}; each group of an attribute needs its own text"
    resolved = [Path(d).resolve() for d in args.image_dirs]
    folder = next((t for texts in args.attributes or [] for t in texts
                   if t and Path(t).is_dir() and Path(t).resolve() not in resolved), None)
    if folder is not None:  # nargs="+" takes every word after --attributes: a folder put there became a text
        return (f"--attributes {folder!r} is a folder, not among the image folders: give them all before "
                "--attributes (and texts that are not also the names of other folders)")
    if args.prompt is not None and all((Path(d) / "samples.json").is_file() for d in args.image_dirs):
        return ("--prompt: every folder has a samples.json, whose prompts the CLIP score reads; leave --prompt out "
                "(it is for folders without one)")
    again = next((k for k, d in enumerate(resolved) if d in resolved[:k]), None)
    if again is not None:
        return (f"IMAGE_DIR {args.image_dirs[again]} is {args.image_dirs[resolved.index(resolved[again])]} again: "
                "its images would be judged twice; give each folder once")
    if args.prompt_groups is not None and len(args.prompt_groups) != len(args.image_dirs):
        return (f"--prompt-groups names {len(args.prompt_groups)} groups for {len(args.image_dirs)} image folders; "
                "give one per folder")
    if args.indicator_logits is not None and args.indicator_logits.suffix not in (".npy", ".safetensors"):
        return f"--indicator-logits {args.indicator_logits}: give a .npy or .safetensors file"
    return out_error(args.out or Path(args.image_dirs[0]) / "evaluation.json", default=args.out is None)


def out_error(out, default):
    """Why the result file `out` cannot be written, or None; checked before the evaluation, not after it. The default
    (evaluation.json in the first image folder) is left to the folder's own check when that folder is missing."""
    if default and not out.parent.is_dir():
        return None
    if out.is_dir():
        return f"--out {out}: is a folder; give the path of the JSON file to write"
    if not out.parent.is_dir():
        return f"--out {out}: {out.parent} " + ("is a file, not a folder" if out.parent.exists() else "does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        return f"--out {out}: the folder {out.parent} is not writable"
    if out.is_file() and not is_result(out):  # samples.json, metadata.jsonl, ...: nothing evaluate.py wrote
        return f"--out {out}: it exists and is not the result of an earlier evaluate.py run; choose another file"
    return None


def is_result(path):
    """Whether the file `path` holds a result `run` wrote (with its n_images and image_dirs), which --out replaces."""
    return {"n_images", "image_dirs"} <= json_object(path).keys()


def judged(path, folder):
    """Whether the file `path` holds a result `run` wrote about the images in `folder`: the sample.py run whose
    samples.json it recorded, wherever either was moved since; in a result without those, one of its image_dirs (as
    typed, resolved from the current folder) is `folder`."""
    record = json_object(path) if is_result(path) else {}
    hashes, dirs = record.get("samples_sha256"), record.get("image_dirs")
    if isinstance(hashes, list):
        return samples_hash(folder) in [h for h in hashes if h is not None]
    return isinstance(dirs, list) and Path(folder).resolve() in [Path(d).resolve() for d in dirs if isinstance(d, str)]


def samples_hash(folder):
    """The sha256 of the folder's samples.json (sample.py's record of its images), or None without one."""
    record = Path(folder) / "samples.json"
    return hashlib.sha256(record.read_bytes()).hexdigest() if record.is_file() else None


def main(argv=None):
    args = parse_args(argv)
    return cli.one_line_errors(lambda: run(args), "evaluate.py")  # ValueError covers weights.CheckpointError


def run(args):
    """Judge the folders, write the result (write_atomic names the file if the disk filled meanwhile), print it."""
    result = evaluate_clip(args) if args.clip is not None else evaluate_digits(args)
    result["image_dirs"] = [str(d) for d in args.image_dirs]
    result["samples_sha256"] = [samples_hash(d) for d in args.image_dirs]  # which runs' images: judged() reads it
    out = args.out or Path(args.image_dirs[0]) / "evaluation.json"
    weights.write_json(out, result)
    print(format_result(result))
    print(f"wrote {out}")
    return result


def evaluate_digits(args):
    """The CLI with the digit classifier: every folder read and checked, then judged against held-out digits."""
    files = [image_files(d) for d in args.image_dirs]
    images = read_images([p for paths in files for p in paths])
    requested = [g for g, paths in zip(args.prompt_groups, files) for _ in paths] if args.prompt_groups else None
    classifier = get_digit_classifier(args.classifier, args.progress)
    groups = args.groups or list(classifier.class_names)
    indicator_logits = None if args.indicator_logits is None else _read_logits(args.indicator_logits)
    prompted = " ".join(map(str, dict.fromkeys(args.prompt_groups or [])))
    why = (request_error(classifier.class_names, groups, len(images), indicator_logits=indicator_logits)
           or prompt_groups_error(groups, args.prompt_groups, f"judge the prompted alone with --groups {prompted}"))
    if why:  # before the held-out digits are rendered for groups that are no digits
        raise ValueError(why)
    reference, labels = heldout_digits(*classifier.split, images.shape[1], groups)
    reference_features = {g: classifier.features(reference[labels == g]) for g in groups}
    return evaluate_images(images, classifier, groups, requested=requested,
                           indicator_logits=indicator_logits, reference_features=reference_features)


def evaluate_clip(args):
    """The CLI with --clip: CLIP zero-shot groups of each --attributes list and of their intersections,
    CLIP-feature Frechet distance, CLIP score."""
    lists = [list(a) for a in args.attributes]
    asked = [_attribute(g, lists[0]) for g in args.prompt_groups or []]
    files = [image_files(d) for d in args.image_dirs]
    paths = [p for found in files for p in found]
    prompts = [t for d, found in zip(args.image_dirs, files) for t in sample_prompts(d, found, args.prompt)]
    requested = [g for g, found in zip(asked, files) for _ in found]
    reference = None if args.reference is None else image_files(args.reference, "--reference")
    if reference is not None and len(reference) < 2:
        raise ValueError(f"--reference {args.reference} holds 1 image; the Frechet distance needs at least 2 "
                         "(thousands for a stable one)")
    indicator_logits = None if args.indicator_logits is None else _read_logits(args.indicator_logits)
    why = (request_error(lists[0], lists[0], len(paths), indicator_logits=indicator_logits)
           or prompt_groups_error(lists[0], asked or None, "leave them out of the first --attributes list"))
    if why:  # before CLIP embeds every image
        raise ValueError(why)
    model = clip_image.load_clip(args.clip).to(args.device)
    tokenizer = clip_image.load_clip_tokenizer(args.clip, model.config.text)
    judges = [CLIPZeroShot(model, tokenizer, texts) for texts in lists]
    embeds = clip_image_embeddings(model, paths, args.batch_size, args.progress)
    reference_features = (None if reference is None else
                          clip_image_embeddings(model, reference, args.batch_size, args.progress, "--reference"))
    result = evaluate_images(embeds, judges[0], lists[0], requested=requested or None,
                             indicator_logits=indicator_logits, reference_features=reference_features)
    scores = clip_scores(model, tokenizer, embeds, prompts, args.batch_size)
    probs = [classify(j, embeds).softmax(1) for j in judges]
    picks = [p.argmax(1) for p in probs]  # each image's group of each attribute
    result.update(classifier="clip", clip=str(args.clip), clip_score=scores.mean().item(),
                  reference=None if reference is None else str(args.reference), n_reference=len(reference or ()))
    if len(lists) > 1:
        shares = [group_proportions(pick, len(texts)) for texts, pick in zip(lists, picks)]
        result["attributes"] = [{"groups": texts, "proportions": s.tolist(), "fd": fairness_discrepancy(s)}
                                for texts, s in zip(lists, shares)]
        joint = [" & ".join(c) for c in itertools.product(*lists)]
        index = sum(pick * math.prod(len(t) for t in lists[i + 1:]) for i, pick in enumerate(picks))
        share = group_proportions(index, len(joint))
        result["intersections"] = {"groups": joint, "proportions": share.tolist(), "fd": fairness_discrepancy(share)}
    labels = [[texts[k] for texts, k in zip(lists, row)] for row in zip(*[pick.tolist() for pick in picks])]
    result["images"] = [{"file": str(p), "prompt": t, "label": names[0], "probs": q.tolist(), "clip_score": c,
                         **({"labels": names} if len(lists) > 1 else {})}
                        for p, t, names, q, c in zip(paths, prompts, labels, probs[0], scores.tolist())]
    return result


def _attribute(group, attributes):
    """An --prompt-groups entry with --clip (an index from 0, or the text itself) -> the attribute text."""
    if isinstance(group, int) and 0 <= group < len(attributes) or group in attributes:
        return attributes[group] if isinstance(group, int) else group
    raise ValueError(f"--prompt-groups {group!r} names no attribute: give an index 0..{len(attributes) - 1} or one "
                     f"of the texts {attributes}")


def _read_logits(path):
    path = weights.existing_file(path, "indicator logits file")
    try:
        if path.suffix == ".npy":
            logits = torch.from_numpy(np.load(path))  # object arrays (pickles) are refused: allow_pickle=False
        else:  # .safetensors: flag_error refused any other suffix
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                if len(keys) != 1:
                    raise ValueError(f"it must hold exactly one tensor (the (N, K) logits), found {keys}")
                logits = f.get_tensor(keys[0])
    except (ValueError, TypeError, OSError, SafetensorError) as e:  # TypeError: a dtype torch has not
        raise ValueError(f"{path}: cannot read the indicator logits ({e})") from None
    # the entropy would drop an imaginary part, or be NaN; -inf is a probability of 0 (0 log 0 = 0)
    no_group = logits.dim() == 2 and not logits.isfinite().any(1).all()  # a row of -inf only
    if logits.is_complex() or logits.isnan().any() or (logits == math.inf).any() or no_group:
        raise ValueError(f"{path}: the indicator logits must be real numbers or -inf (probability 0), with a finite "
                         "one in every row")
    return logits


def format_result(r):
    """The numbers of `evaluate_images` as a short human-readable block."""
    def num(v, fmt=".4f"):
        return "-" if v is None else format(v, fmt)

    def shares(proportions):
        return " ".join(f"{p:.3f}" for p in proportions)
    clip = r.get("classifier") == "clip"
    lines = [f"images            {r['n_images']}   groups {r['groups']}",
             "classifier        CLIP zero-shot (no held-out accuracy)" if clip else
             f"classifier acc.   {num(r['classifier_heldout_accuracy'])} (held-out real digits)",
             f"proportions       {shares(r['proportions'])}   (soft {shares(r['proportions_soft'])})",
             f"FD                {num(r['fd'])}   soft {num(r['fd_soft'])}   (max {r['fd_max']:.4f})"]
    if r["spd"] is not None:
        rates = ", ".join(f"{g}: {v:.3f}" for g, v in r["success_rates"].items())
        lines.append(f"SPD               {num(r['spd'])}   success rates {rates}")
    if r["indicator_entropy"] is not None:
        lines.append(f"indicator entropy {num(r['indicator_entropy'])} nats (max {r['indicator_entropy_max']:.4f})")
    if r["frechet_distance"] is None:
        where = "(no --reference)" if clip and not r["n_reference"] else "(one image has no covariance)"
    else:
        where = (f"(CLIP image features, vs {r['n_reference']} images in --reference)" if clip else
                 "(classifier features, vs held-out real)")
    outside = r["share_outside_groups"]
    lines += [f"mean confidence   {num(r['mean_confidence'])}   outside groups {num(outside)}"
              + (" (every class is a group)" if outside is None else ""),
              f"Frechet distance  {num(r['frechet_distance'], '.3f')} {where}"]
    if r["frechet_per_group"] is not None:
        per = ", ".join(f"{g}: {num(v, '.3f')}" for g, v in r["frechet_per_group"].items())
        lines[-1] += f"   per group {per}   (-: fewer than {DIVERSITY_SUBSET} images)"
    if "precision" in r:  # the digit judge: precision and recall on subsets of DIVERSITY_SUBSET images
        per = ", ".join(f"{g}: {num(v, '.3f')} / {num(r['recall_per_group'][g], '.3f')}"
                        for g, v in r["precision_per_group"].items())
        lines.append(f"precision/recall  {num(r['precision'], '.3f')} / {num(r['recall'], '.3f')}   per group {per}   "
                     f"(-: fewer than {DIVERSITY_SUBSET} images)")
    if clip:
        lines.append(f"CLIP score        {r['clip_score']:.2f} (mean of 100 max(cos(image, its prompt), 0))")
    for k, a in enumerate(r.get("attributes", [])):  # several --attributes lists: each one, then the intersections
        lines.append(f"attribute {k + 1:<7} {shares(a['proportions'])}   FD {a['fd']:.4f}   {a['groups']}")
    if "intersections" in r:
        lines.append(f"intersections     {shares(r['intersections']['proportions'])}   "
                     f"FD {r['intersections']['fd']:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

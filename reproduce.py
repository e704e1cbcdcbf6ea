"""One command, one CPU: which forms of DDM's indicator make a fine-tuned latent diffusion model generate groups in
balance, at equal quality? (Huang, Tsao, Su, Chiang 2025, arXiv 2503.12536, on the shipped MNIST digits.)

By default 7 against 8 at 9 : 1 (`--groups 7,8 --counts 360,40`). Everything is trained here, from scratch, with
the classes of full-size SD v1.x (VAE, UNet, CLIP text encoder with CLIP's tokenizer), only tiny:
  1. judge       evaluate.py's 10-class digit CNN; never the indicator
  2. VAE, base   a VAE on every train digit; UNet + text encoder through train.py on BALANCED groups
  3. fine-tunes  the base on the BIASED set, one train.py run per method and seed (METHODS)
  4. evaluation  per model: images of the generic prompt (FD) and of each group prompt (SPD), judged by the
                 classifier; quality beside them; a CFG check; report.md, report.json and grids in --out

    python reproduce.py                      # runs/repro, about 10-16 CPU minutes on one core
    python reproduce.py --quick              # CI's smoke test sizes
Stages 1-2 and the data folders are cached in OUT/cache/<stage>-<hash of its settings>/ and reused when their
settings match; results are never overwritten without --overwrite, and files no run wrote never (the run is
refused); a second run on an OUT in use is refused.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import checkpoints
import cli
import data
import ddm
import evaluate
import sample
import train
import weights
from evaluate import DIVERSITY_DRAWS, DIVERSITY_SUBSET
from guidance import DECIDE_AT, decide_step, guides_for
from loading import latent_shape, load_indicator, load_models, load_run
from vae import VAE, VAEConfig, load_vae, vae_diffusers_config, vae_to_diffusers

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GENERIC_PROMPT = "a handwritten digit"  # the FD scenario: the prompt names no group


def group_prompt(digit):
    return f"{GENERIC_PROMPT} {WORDS[digit]}"  # the SPD scenario: the prompt names the group


RESOLUTION = 32  # px, the authors' digit example; the VAE takes it to 8 x 8 latents
TINY = {  # train.py --init-config: the SD classes, tiny (UNet 1.0M weights; text encoder 3.3M, 3.2M of them embeddings)
    "vae": {"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "num_groups": 8},  # 32 px -> 4 x 8 x 8 latents
    "unet": {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
             "num_heads": 4, "context_dim": 64, "num_groups": 8, "sample_size": 8},  # latents 8x8 -> 4x4
    "text_encoder": {"width": 64, "layers": 2, "heads": 4, "mlp": 256, "max_position": 16},  # captions: 6 tokens
}
TRAIN_PER_DIGIT = 400  # train digits per class (500 shipped, 100 held out for the judge and the Frechet reference)
CAPTION_DROPOUT = 0.1  # share of empty captions, so classifier-free guidance has an unconditional model


@dataclasses.dataclass
class Sizes:
    """Everything that differs between the full run and --quick."""
    classifier_epochs: int = 8  # evaluate.py's default: >= 97% held-out accuracy
    vae_steps: int = 400
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl: float = 1e-4  # KL weight (per latent element vs MSE per pixel): small, the latents only need to stay tame
    base_steps: int = 800
    base_batch: int = 64
    base_lr: float = 1e-3
    ft_steps: int = 60  # with 3e-4: about the bias of 100 steps at 2e-4 (docs/reproduction.md), in the budget
    ft_batch: int = 32
    ft_lr: float = 3e-4
    indicator_lr: float = 1e-3  # our noise-aware indicators start from scratch beside a trained UNet
    n_generic: int = 500  # images per model from the generic prompt (FD): SE(FD) ~ 0.025 at p = 0.8
    n_per_group: int = 100  # ... and from each group prompt (SPD)
    sample_steps: int = 10  # DDIM; an earlier run at 15 steps gave the same verdict, at 1.4x the sampling cost
    # classifier-free guidance of the main table: 1, the model's own distribution (the bias it learned, before CFG
    # amplifies it), at half the cost of s > 1; the group prompts then still miss, so SPD has something to tell
    guidance: float = 1.0
    cfg_check: tuple = (3.0, 7.5)  # other CFG scales at which plain and the best method are measured too
    calibration: int = 200  # images per prompt that set trajectory-aware targets and the auto scale
    # the attribute experiment: images per prompt (300: its rarest group, green at 1 in 10, fills 1.5 recall subsets
    # at its training share), calibration images per prompt, images per recall subset
    attr_n: int = 300
    attr_calibration: int = 64
    attr_diversity: int = 20
    grid_n: int = 32  # images per model in the grids


FULL = Sizes()
QUICK = Sizes(classifier_epochs=1, vae_steps=30, vae_batch=16, base_steps=30, base_batch=16, ft_steps=3, ft_batch=8,
              n_generic=12, n_per_group=4, sample_steps=3, grid_n=8, calibration=4, attr_n=6, attr_calibration=4,
              attr_diversity=4)


@dataclasses.dataclass
class Method:
    """One row of the verdict: what train.py runs (None: sample the `source` method's runs), and how to sample."""
    name: str
    label: str
    train: tuple = None
    labelled: float = 1.0  # share of the fine-tuning images that keep their group label
    source: str = None
    indicator_guidance: object = 0.0  # a scale, or "auto" (guidance.guides_for)
    decide_at: int = None  # None: each image's target drawn from the shares; else trajectory-aware (guidance.DECIDE_AT)
    clusters: int = 0  # > 0: no labels; the groups are this many clusters per group of the data (data.py clusters)
    default: bool = True  # in the default --methods

    @property
    def objective(self):
        """train.py's --objective of this method's runs (None: it samples another method's runs)."""
        return self.train[self.train.index("--objective") + 1] if self.train else None


NOISE_AWARE = ("--w-ind", "1", "--w-rec", "1")
AUTHORS_WEIGHTS = ("--w-ind", "0.05", "--w-rec", "0.95")
# plain-indicator trains the UNet exactly as plain fine-tuning (tests/test_train.py) and an indicator beside it
PLAIN_INDICATOR = ("--objective", "plain-indicator", *NOISE_AWARE)
METHODS = [
    Method("plain", "plain fine-tune", PLAIN_INDICATOR),
    Method("ddm", "DDM, the authors' (w_ind 0.05)", ("--objective", "ddm", *AUTHORS_WEIGHTS)),
    Method("ddm-x0", "DDM on x0_hat, the paper's figure", ("--objective", "ddm-x0", *AUTHORS_WEIGHTS)),
    Method("balanced", "balanced MSE (ours)", ("--objective", "balanced", "--w-ind", "0", "--w-rec", "1")),
    Method("iw", "indicator-weighted, all labels (ours)", ("--objective", "indicator-weighted", *NOISE_AWARE)),
    Method("iw-10", "indicator-weighted, 10% labels (ours)", ("--objective", "indicator-weighted", *NOISE_AWARE),
           labelled=0.1),
    Method("guided-3", "plain + indicator guidance 3 (ours)", source="plain", indicator_guidance=3.0),
    Method("guided-10", "plain + indicator guidance 10 (ours)", source="plain", indicator_guidance=10.0),
    # trajectory-aware targets, the scale chosen per prompt by the indicator alone; the few-label rows train the
    # same plain UNet (bit for bit: the labels only reach the detached indicator) beside an indicator that sees
    # 10% or 1% of the labels
    Method("guided-auto", "plain + guidance auto, trajectory-aware (ours)", source="plain", indicator_guidance="auto",
           decide_at=DECIDE_AT),
    Method("guided-auto-10", "plain + guidance auto, indicator of 10% labels (ours)", PLAIN_INDICATOR, labelled=0.1,
           indicator_guidance="auto", decide_at=DECIDE_AT),
    Method("guided-auto-1", "plain + guidance auto, indicator of 1% labels (ours)", PLAIN_INDICATOR, labelled=0.01,
           indicator_guidance="auto", decide_at=DECIDE_AT),
    # the stretch, no labels at all: a noise-aware indicator learns clusters of the clean latents, guidance 10
    # toward uniform clusters. Not in the default set (the 20-minute budget); `--methods plain,clusters,clusters-2x`
    Method("clusters", "plain + cluster guidance 10, K = groups, no labels (ours)", PLAIN_INDICATOR,
           indicator_guidance=10.0, clusters=1, default=False),
    Method("clusters-2x", "plain + cluster guidance 10, K = 2 x groups, no labels (ours)", PLAIN_INDICATOR,
           indicator_guidance=10.0, clusters=2, default=False),
]
BY_NAME = {m.name: m for m in METHODS}

# The attribute experiment (--experiment attributes): the prompt names the digit; ink colour and stroke width, which
# no caption names, are biased within every digit: colour 9 : 1, width 8 : 2, independently (72 : 18 : 8 : 2).
ATTR_DIGITS = (0, 1, 7)
ATTR_COUNTS = {("red", "thick"): 144, ("red", "thin"): 36, ("green", "thick"): 16, ("green", "thin"): 4}
ATTR_BALANCED = {k: 50 for k in ATTR_COUNTS}  # the base model's set: 200 per digit, every intersection alike
INTERSECTIONS = sorted("+".join(k) for k in ATTR_COUNTS)
ATTR_GROUPS = evaluate.AttributeJudge.VALUES  # each attribute's groups, as the judge names them
ATTR_GROUP_NAMES = [g for groups in ATTR_GROUPS.values() for g in groups]
ATTR_RUNS = {  # the train.py runs of each seed: plain fine-tunes (one UNet, bit for bit) beside indicators
    f"{attribute}{suffix}": Method(f"{attribute}{suffix}", attribute, (*PLAIN_INDICATOR, "--attribute", attribute),
                                   labelled=share)
    for suffix, share in (("", 1.0), ("-10", 0.1), ("-1", 0.01)) for attribute in ("colour", "width", "colour+width")}
ATTR_RUNS["ddm"] = Method("ddm", "colour", ("--objective", "ddm", *AUTHORS_WEIGHTS, "--attribute", "colour"))


@dataclasses.dataclass
class AttrRow:
    """One row of the attribute verdict: the run whose UNet samples, and the runs whose indicators guide it (auto
    scale, trajectory-aware targets, equal shares of each attribute's groups)."""
    name: str
    label: str
    unet: str = "colour"
    guides: tuple = ()


ATTR_ROWS = [AttrRow("plain", "plain fine-tune"), AttrRow("ddm", "DDM, the authors', on the colour", unet="ddm")] + [
    AttrRow(f"{kind}{suffix}", f"guidance auto, {label}, {share} labels (ours)", guides=tuple(
        f"{a}{suffix}" for a in attributes))
    for suffix, share in (("", "all"), ("-10", "10%"), ("-1", "1%"))
    for kind, label, attributes in (("per-attribute", "one indicator per attribute", ("colour", "width")),
                                    ("joint", "one indicator of the intersections", ("colour+width",)))]


# ----------------------------------------------------------------------------------------------------------------
# Cached stages


def stage_dir(cache, name, settings):
    """cache/<name>-<hash of settings>/: a stage's settings decide its folder, so changed settings retrain."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(cache) / f"{name}-{key}"


def cached(folder, settings, build, label):
    """Run build(folder) unless folder/done.json records its result; returns that record (build's dict). A build's
    "path" is a file or folder in `folder`: reused, it is read where `folder` is now (the cache moved, or another
    working directory reaches it by another relative path). The lookup and build hold an exclusive lock on
    cache/.<stage>.lock: a second run sharing the cache waits for the build and reuses it, instead of deleting the
    folder under it (a killed holder frees it)."""
    done = folder / "done.json"
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = weights.lock_file(folder.parent / f".{folder.name}.lock",
                           wait=lambda: tqdm.write(f"[cache] {label}: another run is building {folder}; waiting"))
    try:
        result = evaluate.json_object(done).get("result")  # None: no record that reads (killed, cut short, edited)
        if isinstance(result, dict) and isinstance(result.get("path", ""), str):
            tqdm.write(f"[cache] {label}: reusing {folder}")
            return {**result, "path": str(folder / Path(result["path"]).name)} if "path" in result else result
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished build: start it over
        folder.mkdir(parents=True)
        t0 = time.time()
        result = build(folder)
        weights.write_atomic(done, json.dumps({"settings": settings, "result": result, "seconds": time.time() - t0},
                                              indent=1, default=str))
        tqdm.write(f"[stage] {label}: {time.time() - t0:.0f}s")
        return result
    finally:
        os.close(fd)


def caption_for(seed):
    """A caption function for data.make_digit_folder: half the images generic, half naming their digit (seeded)."""
    rng = np.random.default_rng(seed)
    return lambda digit: group_prompt(digit) if rng.random() < 0.5 else GENERIC_PROMPT


def build_classifier(folder, sizes):
    model, acc = evaluate.train_digit_classifier(seed=0, epochs=sizes.classifier_epochs, progress=False)
    evaluate.save_classifier(model, folder / "classifier.safetensors")
    return {"heldout_accuracy": acc}


def digit_pixels(indices, coloured=False, seed=0):
    """The shipped digits at `indices` as the folders hold them, float (N,3,32,32) in [-1,1]: white ink, or with
    coloured=True each in an ink colour drawn at random (seeded) from data.COLOURS."""
    colours = np.random.default_rng(seed).choice(sorted(data.COLOURS), len(indices)) if coloured else None
    return sample.from_uint8(data.digit_images(data.load_digits()[0], indices, RESOLUTION, colours))


def train_vae(folder, sizes, seed=0, progress=True, coloured=False):
    """The tiny VAE, on every train digit (all ten; in both ink colours with coloured=True): MSE(decode(z), x) +
    kl · KL(q(z|x) || N(0, I)), z sampled. Written as a diffusers vae/ folder (load_vae reads it) with
    scaling_factor = 1 / std of the posterior means on the train digits: latents of unit variance, as SD's 0.18215.
    """
    train_idx, held_idx = data.split_digits(0)
    x, x_held = digit_pixels(train_idx, coloured), digit_pixels(held_idx, coloured, seed=1)
    cfg = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY["vae"].items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = VAE(cfg)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=sizes.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=sizes.vae_lr, total_steps=sizes.vae_steps, pct_start=0.1)
    bar = tqdm(range(sizes.vae_steps), desc="vae", unit="step", disable=not progress)
    for _ in bar:
        batch = x[torch.randint(0, len(x), (sizes.vae_batch,), generator=gen)]
        posterior = vae.encode(batch)
        recon = vae.decode(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen))
        mse = F.mse_loss(recon, batch)
        kl = 0.5 * (posterior.mean ** 2 + posterior.std ** 2 - 1 - posterior.logvar).mean()
        loss = mse + sizes.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix_str(f"mse {mse.item():.4f} kl {kl.item():.2f}", refresh=False)
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 256]).mean for i in range(0, len(x), 256)])
        held_mse = float(np.mean([F.mse_loss(vae.decode(vae.encode(x_held[i:i + 256]).mean), x_held[i:i + 256]).item()
                                  for i in range(0, len(x_held), 256)]))
    vae.config.scaling_factor = round(1.0 / z.std().item(), 5)
    out = folder / "vae"
    out.mkdir()
    weights.save_tensors(vae_to_diffusers(vae.state_dict(), vae.config), out / "diffusion_pytorch_model.safetensors")
    weights.write_json(out / "config.json", vae_diffusers_config(vae.config))
    load_vae(out)  # fails here, not three stages later, if the folder does not load back
    return {"heldout_mse": held_mse, "scaling_factor": vae.config.scaling_factor, "path": str(out)}


def build_folder(folder, counts, seed, labelled=1.0):
    images, labels = data.load_digits()
    train_idx, _ = data.split_digits(0)  # held-out digits never reach a diffusion model
    data.make_digit_folder(folder / "images", images, labels, counts, indices=train_idx, resolution=RESOLUTION,
                           prompt=caption_for(seed), seed=seed, labelled=labelled)
    return {"path": str(folder / "images"), "counts": {str(k): v for k, v in counts.items()}, "labelled": labelled}


def build_attribute_folder(folder, counts, seed, labelled=1.0):
    """The attribute experiment's data: `counts` {(colour, width): n} of every digit of ATTR_DIGITS, captions that
    name the digit and nothing else, labels on a `labelled` share (data.make_attribute_digits)."""
    images, labels = data.load_digits()
    train_idx, _ = data.split_digits(0)
    data.make_attribute_digits(folder / "images", images, labels, {d: counts for d in ATTR_DIGITS}, group_prompt,
                               indices=train_idx, resolution=RESOLUTION, seed=seed, labelled=labelled)
    return {"path": str(folder / "images"), "labelled": labelled}


def build_cluster_folder(folder, source, vae_path, k, seed):
    """A copy of the data folder `source` whose groups are k clusters of its latents (no labels: `data.py clusters`)."""
    _, sizes = data.make_cluster_folder(folder / "images", source, vae_path, k, resolution=RESOLUTION, seed=seed)
    return {"path": str(folder / "images"), "cluster_sizes": sizes.tolist()}


def common_train_args(batch, steps, lr, seed, progress):
    return ["--resolution", str(RESOLUTION), "--batch-size", str(batch), "--grad-accum", "1", "--max-steps",
            str(steps), "--lr", str(lr), "--seed", str(seed), "--caption-dropout", str(CAPTION_DROPOUT),
            "--cache-latents", "--checkpoint-every", "0", *([] if progress else ["--no-progress"])]


def train_base(folder, sizes, vae_path, data_path, progress, extra):
    """UNet + text encoder from random init through train.py's from-scratch path, plain denoising (w_ind = 0)."""
    config = folder / "init_config.json"
    weights.write_json(config, {k: v for k, v in TINY.items() if k != "vae"})
    run = train.train(["--init-config", str(config), "--vae", vae_path, "--data", data_path, "--out",
                       str(folder / "run"), "--w-ind", "0", "--w-rec", "1", *extra,
                       *common_train_args(sizes.base_batch, sizes.base_steps, sizes.base_lr, 0, progress)])
    return {"path": str(run), "final_loss": train_stats(run)}


def train_stats(run_dir):
    """Mean denoising MSE, and the indicator's accuracy and balanced accuracy on its training batches (None
    without an indicator), over the last 50 logged steps (one step is noisy)."""
    lines = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()][-50:]
    out = {"rec": float(np.mean([r["rec"] for r in lines]))}
    for key, name in (("acc", "indicator_acc"), ("bacc", "indicator_bacc")):
        values = [r[key] for r in lines if r.get(key) is not None]
        out[name] = float(np.mean(values)) if values else None
    meta = Path(weights.read_json(Path(run_dir) / "run.json")["config"]["data"]) / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    if "label" in rows[0]:  # a label-free run: what each of its clusters holds, by the labels training never read
        labels, clusters = sorted({r["label"] for r in rows}, key=str), sorted({r["group"] for r in rows})
        out["clusters"] = {c: {str(g): sum(r["group"] == c and r["label"] == g for r in rows) for g in labels}
                           for c in clusters}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sampling and evaluation of one model


def sample_settings(sizes, guidance=None):
    return dict(steps=sizes.sample_steps, guidance=guidance or sizes.guidance, height=RESOLUTION, width=RESOLUTION,
                batch_size=100)  # 32-px models run fastest in big batches; another size moves the images' last bits


def sample_scenarios(models, groups, sizes, *, indicator=None, method=None, guidance=None, generic_only=False,
                     progress=True):
    """(generic images, group images, group requested per image, what the guidance chose), uint8 (N,32,32,3).
    Image k of a scenario uses noise seed k in every model, so models are compared on identical starting noise.
    With indicator guidance (the method's scale and form, guidance.guides_for, one calibration per prompt) a generic
    image aims at the groups in equal shares; a group prompt aims at its group, or for a label-free indicator
    (clusters, which name no group) at equal shares of the clusters like every other image."""
    requested = [] if generic_only else [g for g in groups for _ in range(sizes.n_per_group)]
    # group prompts take seeds from 10,000 on: disjoint from the generic images' 0..n_generic-1 (n_generic <= 10,000)
    scenarios = [(GENERIC_PROMPT, list(range(sizes.n_generic)), None)] + [
        (group_prompt(g), list(range(10_000 + k * sizes.n_per_group, 10_000 + (k + 1) * sizes.n_per_group)), k)
        for k, g in enumerate(groups) if not generic_only]
    settings = sample_settings(sizes, guidance)
    images, chosen = [], {}
    for prompt, seeds, k in scenarios:
        guides = []
        if method and method.indicator_guidance:
            shares = torch.full((indicator.num_groups,), 1 / indicator.num_groups)
            if k is not None and not method.clusters:
                shares = torch.eye(len(groups))[k]
            guides, chosen[prompt] = guides_for(
                sample.generate, models, prompt, seeds, [(indicator, shares)], method.indicator_guidance,
                decide_at=method.decide_at, calibration=sizes.calibration, cal_seed=1, **settings)
        images.append(sample.generate(models, [prompt] * len(seeds), seeds, progress=progress, guides=guides,
                                      **settings))
    images = torch.cat(images)
    return images[:sizes.n_generic], images[sizes.n_generic:], requested, chosen


@torch.no_grad()
def indicator_logits(models, indicator, objective, images):
    """The indicator on generated images through the training step's own forward (train.micro_batch_inputs and
    DDMModel.micro_batch): each image encoded, noised at t ~ U{0..999} under the generic prompt -> (N, K) logits."""
    gen = torch.Generator().manual_seed(0)
    x = sample.from_uint8(images)
    hp = SimpleNamespace(objective=objective, caption_dropout=0.0, train_text_encoder=False)
    model = train.DDMModel(models.unet, models.text_encoder, indicator, hp, dict(
        alphas_cumprod=models.alphas_cumprod, prediction_type=models.prediction_type, group_shares=None,
        target_shares=None, labelled_share=None))
    out = []
    for i in range(0, len(x), 100):
        posterior = models.vae.encode(x[i:i + 100])
        inputs = train.micro_batch_inputs(posterior.mean, posterior.std, [GENERIC_PROMPT] * len(posterior.mean),
                                          models, hp, gen, "cpu")
        b = model.micro_batch(inputs, torch.full((len(posterior.mean),), -1))
        out.append(ddm.indicator_logits(b, indicator, objective))
    return torch.cat(out)


def evaluate_model(models, indicator, method, judge, groups, sizes, *, progress, guidance=None, generic_only=False):
    """One model's numbers: balance (FD, SPD), quality (confidence, share outside the groups, Frechet overall and
    per group), and for the authors' DDM its indicator's entropy on the generated images."""
    classifier, reference = judge
    generic, grouped, requested, chosen = sample_scenarios(models, groups, sizes, indicator=indicator, method=method,
                                                           guidance=guidance, generic_only=generic_only,
                                                           progress=progress)
    entropy_of = indicator is not None and method.objective == "ddm"
    fd = evaluate.evaluate_images(generic.numpy(), classifier, groups, reference_features=reference,
                                  indicator_logits=indicator_logits(models, indicator, "ddm", generic)
                                  if entropy_of else None)
    row = {k: fd[k] for k in ("fd", "fd_soft", "proportions", "indicator_entropy", "mean_confidence",
                              "share_outside_groups", "frechet_distance", "frechet_per_group", "precision", "recall",
                              "precision_per_group", "recall_per_group", "classifier_heldout_accuracy")}
    row.update(n_generic=len(generic), n_per_group=sizes.n_per_group, spd=None, success_rates=None,
               guidance_chosen=chosen or None)
    if not generic_only:
        spd = evaluate.evaluate_images(grouped.numpy(), classifier, groups, requested=requested)
        row.update(spd=spd["spd"], success_rates=spd["success_rates"])
    return row, generic


# ----------------------------------------------------------------------------------------------------------------
# Report


def flatten(row, groups):
    """The numbers of one row under flat keys (per-group values as share_7, frechet_7, recall_7, ...)."""
    flat = {k: row.get(k) for k in ("fd", "fd_soft", "spd", "frechet_distance", "share_outside_groups",
                                    "mean_confidence", "indicator_entropy", "precision", "recall")}
    flat.update({k: row.get("train", {}).get(k) for k in ("indicator_acc", "indicator_bacc")})
    for k, g in enumerate(groups):
        flat[f"share_{g}"] = row["proportions"][k]
        for key in ("frechet", "precision", "recall"):
            flat[f"{key}_{g}"] = (row.get(f"{key}_per_group") or {}).get(str(g))
    return flat


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def over_seeds(s, per_seed):
    """s[k], s[k_std] over the seeds for each number k of the per-seed dicts; s["partial"][k]: how many seeds
    measured a number that not all of them did (a seed with too few images of a group has no recall for it)."""
    s["n_seeds"], s["partial"] = len(per_seed), {}
    for k in per_seed[0]:
        values = [d[k] for d in per_seed]
        s[k], s[k + "_std"] = mean_std(values)
        measured = len(values) - values.count(None)
        if 0 < measured < len(values):
            s["partial"][k] = measured
    return s


def per_method(rows, numbers):
    """Per method, in the order rows first name it: (its rows, over_seeds of numbers(row) for each of them)."""
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        yield mine, over_seeds({"method": name, "label": mine[0]["label"], "seeds": [r["seed"] for r in mine]},
                               [numbers(r) for r in mine])


def summarize(rows, groups):
    """Per method (in the order rows first name it): mean ± std (sample std, ddof 1) of every number over seeds,
    the worst seed's FD, and whether it meets the bar against plain: FD at most half of plain's, Frechet at most
    10% worse, and every group's recall at least 0.9 x plain's (plain and base are not judged)."""
    out = [{**s, "fd_worst": max(r["fd"] for r in mine)} for mine, s in per_method(rows, lambda r: flatten(r, groups))]
    plain = next((s for s in out if s["method"] == "plain"), None)
    for s in out:
        s["meets_goal"] = None if plain is None or s["method"] in ("plain", "base") else bool(
            s["fd"] <= 0.5 * plain["fd"] and s["frechet_distance"] <= 1.1 * plain["frechet_distance"]
            and recall_kept(s, plain, groups))
    return out


def recall_kept(s, plain, groups):
    """Whether every group's recall is at least 0.9 x plain's, measured in every seed (a seed with too few images
    of a group has none); plain's is its mean over the seeds that measured it, and a group it has none for is not
    judged."""
    return all(s[f"recall_{g}"] is not None and f"recall_{g}" not in s["partial"]
               and s[f"recall_{g}"] >= 0.9 * plain[f"recall_{g}"] for g in groups if plain[f"recall_{g}"] is not None)


def _f(v, fmt=".3f"):
    return "–" if v is None else format(v, fmt)


def _pm(s, k, fmt=".3f"):
    """mean ± std over the seeds that measured it; the mean alone from one (base, --seeds 1), which has no spread
    to show; "(n of N seeds)" where not every seed measured it."""
    n, of = s["partial"].get(k, s["n_seeds"]), s["n_seeds"]
    return "–" if s[k] is None else (f"{s[k]:{fmt}}" + (f" ± {s[k + '_std']:{fmt}}" if n > 1 else "")
                                     + (f" ({n} of {of} seeds)" if n < of else ""))


VERDICT = {None: "–", True: "**yes**", False: "no"}  # meets_goal: not judged, meets the bar, misses it


def _table(head, lines):
    return "\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
                     + ["| " + " | ".join(line) + " |" for line in lines])


def verdict_table(summary, groups):
    """Markdown, one row per method: balance and quality side by side, mean ± std over seeds."""
    head = (["method", "FD", "worst seed", "SPD", "Frechet"] + [f"Frechet {g}" for g in groups]
            + [f"recall {g}" for g in groups] + [f"precision {g}" for g in groups]
            + ["outside groups", "indicator bacc", "FD ≤ ½ plain, Frechet ≤ +10%, recall ≥ 0.9× plain"])
    return _table(head, [[s["label"], f"**{_pm(s, 'fd')}**", _f(s["fd_worst"]), _pm(s, "spd"),
                          _pm(s, "frechet_distance", ".1f")] + [_pm(s, f"frechet_{g}", ".1f") for g in groups]
                         + [_pm(s, f"{k}_{g}", ".2f") for k in ("recall", "precision") for g in groups]
                         + [_pm(s, "share_outside_groups"), _pm(s, "indicator_bacc"),
                            VERDICT[s["meets_goal"]]] for s in summary])


def seed_table(rows, groups):
    """Markdown, every model: the numbers the verdict averages, and the ones behind them."""
    keys = (["fd", "fd_soft"] + [f"share_{g}" for g in groups] + ["spd", "frechet_distance"]
            + [f"{k}_{g}" for k in ("frechet", "recall", "precision") for g in groups]
            + ["share_outside_groups", "mean_confidence", "indicator_acc", "indicator_bacc", "indicator_entropy"])
    head = ["method", "seed"] + [k.replace("_", " ").replace("frechet distance", "Frechet") for k in keys]
    return _table(head, [[r["label"], str(r["seed"])] + [_f(flatten(r, groups)[k], ".1f" if "frechet" in k else ".3f")
                                                        for k in keys] for r in rows])


def cfg_table(cfg_rows):
    lines = []
    for label in dict.fromkeys(r["label"] for r in cfg_rows):
        for scale in sorted({r["cfg"] for r in cfg_rows if r["label"] == label}):
            picked = [r for r in cfg_rows if r["label"] == label and r["cfg"] == scale]
            s = over_seeds({}, [{"fd": r["fd"], "frechet": r["frechet_distance"]} for r in picked])
            lines.append([label, f"{scale:g}", _pm(s, "fd"), _pm(s, "frechet", ".1f")])
    return _table(["method", "CFG scale", "FD", "Frechet"], lines)


LABEL_HEIGHT = 12  # px: one line of PIL's default bitmap font above each grid block


def save_grid(panels, path, cols=8, per_row=3):
    """Blocks of images, one per model under its label, `per_row` blocks a row: [(label, uint8 (N,R,R,3))]."""
    blocks = [(label, sample.make_grid(torch.as_tensor(np.asarray(images)), cols, (255, 255, 255)))
              for label, images in panels]
    gap = 6
    w, h = max(b.width for _, b in blocks) + gap, max(b.height for _, b in blocks) + LABEL_HEIGHT + gap
    n_cols = min(per_row, len(blocks))
    canvas = Image.new("RGB", (n_cols * w - gap, math.ceil(len(blocks) / per_row) * h - gap), (255, 255, 255))
    for k, (label, b) in enumerate(blocks):
        x, y = (k % per_row) * w, (k // per_row) * h
        head = Image.new("RGB", (b.width, LABEL_HEIGHT), (255, 255, 255))
        ImageDraw.Draw(head).text((2, 0), label, fill=(0, 0, 0))
        canvas.paste(head, (x, y))
        canvas.paste(b, (x, y + LABEL_HEIGHT))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The whole reproduction


DEFAULT_GROUPS, DEFAULT_COUNTS = "7,8", "360,40"  # the digit experiment: 7 against 8 at 9 : 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DDM (arXiv 2503.12536) and its variants on real handwritten digits, "
                                            "on CPU.")
    p.add_argument("--out", type=Path, help="run directory (default runs/repro, runs/repro-attributes with "
                                            "--experiment attributes; -quick added with --quick)")
    p.add_argument("--cache", type=Path, help="cached stages (classifier, VAE, data, base model); default OUT/cache")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, not the science")
    p.add_argument("--experiment", choices=("digits", "attributes"), default="digits",
                   help="digits: balance digit classes under a generic prompt (default); attributes: balance ink "
                        "colour and stroke width, which the prompt (naming the digit) does not name")
    # the digit experiment's choices; the attribute experiment's digits, counts and rows are fixed (ATTR_*)
    p.add_argument("--groups", help=f"the digits whose balance is judged, K >= 2 (default {DEFAULT_GROUPS})")
    p.add_argument("--counts", help="fine-tuning images per group, in --groups order, at most "
                                    f"{TRAIN_PER_DIGIT} each (default {DEFAULT_COUNTS}: 9 : 1)")
    p.add_argument("--methods", help=f"comma-separated, from {', '.join(BY_NAME)} (default: all but the label-free "
                                     "clusters methods)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per method (>= 1)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT's results (cached stages are kept)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: these tiny models gain "
                                                          "little from more, and lose many times over when another "
                                                          "process competes for the cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    args = p.parse_args(argv)
    given = [f"--{name}" for name in ("groups", "counts", "methods") if getattr(args, name) is not None]
    args.groups = DEFAULT_GROUPS if args.groups is None else args.groups  # "" stays "", and is refused below
    args.counts = DEFAULT_COUNTS if args.counts is None else args.counts
    args.methods = ",".join(m.name for m in METHODS if m.default) if args.methods is None else args.methods
    try:
        groups = [int(g) for g in args.groups.split(",")]
        counts = [int(c) for c in args.counts.split(",")]
    except ValueError:
        groups = counts = None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    name = "runs/repro" + "-attributes" * (args.experiment == "attributes") + "-quick" * args.quick
    args.out = args.out or Path(name)
    args.cache = args.cache or args.out / "cache"
    folders = [(flag, path, cli.folder_error(path)) for flag, path in (("out", args.out), ("cache", args.cache))]
    why = (selection_error(args, given, groups, counts, methods)
           or cli.range_error(args, {"seeds": (1,), "threads": (1, os.cpu_count())})
           or next((f"--{flag} {path}: {e}" for flag, path, e in folders if e), None))
    if why:
        p.error(why)
    args.counts = dict(sorted(zip(groups, counts)))  # groups sorted, as train.py numbers them
    args.groups, args.methods = sorted(groups), methods
    return args


def selection_error(args, given, groups, counts, methods):
    """Why the digit experiment's --groups, --counts (None: not integers) or --methods are refused, or None; `given`:
    those of them on the command line, none of which the attribute experiment takes."""
    if args.experiment == "attributes" and given:
        return f"{given[0]} is for --experiment digits (the attribute experiment's digits, counts and rows are fixed)"
    if groups is None or counts is None:
        return f"--groups and --counts take comma-separated integers, got {args.groups!r} and {args.counts!r}"
    if len(groups) < 2 or len(set(groups)) != len(groups) or not all(0 <= g <= 9 for g in groups):
        return f"--groups must name at least two distinct digits 0-9, got {args.groups!r}"
    if len(counts) != len(groups) or not all(1 <= c <= TRAIN_PER_DIGIT for c in counts):
        return (f"--counts must give 1..{TRAIN_PER_DIGIT} images for each of the {len(groups)} groups, "
                f"got {args.counts!r}")
    unknown = [m for m in methods if m not in BY_NAME]
    if unknown or not methods:
        return f"--methods: unknown {unknown or 'none given'}; choose from {', '.join(BY_NAME)}"
    # else train.py refuses the set after stages 1-2, or data.py clusters finds fewer images than clusters
    need, what = (QUICK if args.quick else FULL).ft_batch, f"one fine-tuning batch{' of --quick' if args.quick else ''}"
    for m in methods:  # a label-free method: clusters x groups of them
        if BY_NAME[m].clusters * len(groups) > need:
            need, what = BY_NAME[m].clusters * len(groups), f"the {BY_NAME[m].clusters * len(groups)} clusters of {m}"
    if sum(counts) < need:
        return f"--counts must give at least {need} images in all ({what}), got {args.counts!r}"
    twice = cli.repeated(methods)
    return None if twice is None else f"--methods names {twice} twice"


RESULTS = ("finetune", "report.md", "report.json", "grids")  # what a run writes into OUT besides the cache
GRID_FILES = {"all_seed0.png", f"attributes_{WORDS[ATTR_DIGITS[0]]}_seed0.png",
              *(f"plain_vs_{name}_seed0.png" for name in BY_NAME)}  # save_grids and run_attributes
REPORT_TITLES = ("# Which indicators debias?", "# Debias what the prompt does not name")  # how report.md opens


def foreign_results(out):
    """What OUT holds under the names of RESULTS that no run wrote, and --overwrite must not delete: in finetune/
    anything but fine-tune runs (<run>-seed<k>/), in grids/ anything but the grids, a report.md of another title or
    (where report.json records its sha256) other bytes than the run wrote, a report.json that is no JSON report."""
    def runs(p):
        name, _, seed = p.name.rpartition("-seed")
        return p.is_dir() and seed.isdecimal() and (name in BY_NAME or name in ATTR_RUNS)

    found = []
    for folder, ours in ((out / "finetune", runs), (out / "grids", lambda p: p.is_file() and p.name in GRID_FILES)):
        if folder.is_dir():
            found += [p for p in sorted(folder.iterdir()) if not ours(p)]
        elif folder.exists():  # a file where a run writes a folder
            found.append(folder)
    md, stored = out / "report.md", evaluate.json_object(out / "report.json")  # {}: no report.json that reads
    sha = md.is_file() and hashlib.sha256(md.read_bytes()).hexdigest()
    if md.exists() and not (sha and stored.get("report_md_sha256") in (None, sha)  # None: written before the hash
                            and md.read_text(errors="replace").startswith(REPORT_TITLES)):
        found.append(md)
    if (out / "report.json").exists() and not {"mode", "rows", "summary"} <= stored.keys():  # in every report
        found.append(out / "report.json")
    return found


@contextlib.contextmanager
def own_run_dir(out):
    """OUT held by this run alone until it ends (an exclusive lock on OUT/.reproduce.lock, freed when a run is
    killed), so that a second run on the same --out, finding no results yet, cannot replace this run's report."""
    out.mkdir(parents=True, exist_ok=True)
    fd = weights.lock_file(out / ".reproduce.lock")
    if fd is None:
        raise FileExistsError(f"{out} is in use by another reproduce.py run; wait for it to end, or choose another "
                              "--out")
    try:
        yield
    finally:
        os.close(fd)


def claim_run_dir(out, overwrite):
    """Refuse a run directory that holds results, unless overwrite: then delete the results (never the cache). A
    folder holding anything under those names that this version's runs do not write (foreign_results) is refused
    either way."""
    foreign = [str(p.relative_to(out)) for p in foreign_results(out)]
    present = [name for name in RESULTS if (out / name).exists()]
    if foreign:
        why = (f"{out} holds {', '.join(foreign)}, which this reproduce.py does not write, where a run writes its "
               "results (yours, or an older version's); move them, or choose another --out (--overwrite deletes only "
               "a run's own)")
    elif present and not overwrite:
        why = (f"{out} already holds results ({', '.join(present)}); pass --overwrite to replace them (cached stages "
               "in it are reused), or choose another --out")
    else:
        why = None
    if why:
        raise FileExistsError(why)
    for name in present:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)


def prepare(args, sizes, timings):
    """Stages 1-2, cached: the judge (the digit classifier), the VAE, the balanced data and the base model on it.
    The attribute experiment's VAE also sees both ink colours, and its base every intersection alike."""
    cache, attributes, t0 = args.cache, args.experiment == "attributes", time.time()
    s = {"epochs": sizes.classifier_epochs, "format": evaluate.CLASSIFIER_FORMAT}
    folder = stage_dir(cache, "classifier", s)
    cached(folder, s, lambda f: build_classifier(f, sizes), "digit classifier")
    classifier = evaluate.load_classifier(folder / "classifier.safetensors")
    s = {"config": TINY["vae"], **{k: v for k, v in dataclasses.asdict(sizes).items() if k.startswith("vae")},
         **({"coloured": True} if attributes else {})}
    vae_info = cached(stage_dir(cache, "vae", s), s, lambda f: train_vae(f, sizes, progress=args.progress,
                                                                       coloured=attributes), "VAE")
    if attributes:
        balanced = {"attributes": {d: {"+".join(k): n for k, n in ATTR_BALANCED.items()} for d in ATTR_DIGITS}}
        build = lambda f: build_attribute_folder(f, ATTR_BALANCED, 0)  # noqa: E731
    else:
        balanced = {g: TRAIN_PER_DIGIT for g in args.groups}
        build = lambda f: build_folder(f, balanced, 0)  # noqa: E731
    folder = cached(stage_dir(cache, "data-balanced", balanced), balanced, build, "balanced groups")
    s = {"vae": s, "tiny": TINY, "data": balanced, "caption_dropout": CAPTION_DROPOUT,
         **{k: v for k, v in dataclasses.asdict(sizes).items() if k.startswith("base")}}
    base = cached(stage_dir(cache, "base", s), s, lambda f: train_base(
        f, sizes, vae_info["path"], folder["path"], args.progress, ["--attribute", "colour"] * attributes),
        "base model")
    timings["stages"] = time.time() - t0
    return classifier, vae_info, base


def digit_judge(classifier, groups):
    """The digit experiment's judge: the classifier and held-out real digits' features per group, so evaluate.py
    weighs them by each model's own shares (bias alone is not bad quality)."""
    reference, labels = evaluate.heldout_digits(*classifier.split, RESOLUTION, groups)
    return classifier, {g: classifier.features(reference[labels == g]) for g in groups}


def fine_tune(args, sizes, method, seed, base, vae):
    """One train.py run of a method on the biased set (cached data folder): its run directory. A label-free method
    reads a copy whose groups are clusters of the images' latents under the VAE (one clustering per seed)."""
    tqdm.write(f"[fine-tune] {method.name}, seed {seed}")
    if args.experiment == "attributes":
        s = {"attributes": {d: {"+".join(k): n for k, n in ATTR_COUNTS.items()} for d in ATTR_DIGITS},
             "labelled": method.labelled}
        build = lambda f: build_attribute_folder(f, ATTR_COUNTS, 1, method.labelled)  # noqa: E731
    else:
        s = {"counts": args.counts, "labelled": method.labelled}
        build = lambda f: build_folder(f, args.counts, 1, method.labelled)  # noqa: E731
    biased = cached(stage_dir(args.cache, "data-biased", s), s, build, f"biased set, {method.labelled:.0%} labelled")
    if method.clusters:
        k = method.clusters * len(args.groups)
        s = {"data": s, "vae": vae, "k": k, "seed": seed}
        biased = cached(stage_dir(args.cache, "data-clusters", s), s,
                        lambda f: build_cluster_folder(f, biased["path"], vae["path"], k, seed),
                        f"biased set in {k} clusters, seed {seed}")
    extra = ["--indicator-lr", str(sizes.indicator_lr)] if ddm.noise_aware(method.objective) else []
    return train.train(["--model", base["path"], "--data", biased["path"], "--out",
                        str(args.out / "finetune" / f"{method.name}-seed{seed}"), "--lora-rank", "0",
                        "--no-train-text-encoder", *method.train, *extra,
                        *common_train_args(sizes.ft_batch, sizes.ft_steps, sizes.ft_lr, seed, args.progress)])


def fine_tune_and_evaluate(args, sizes, base, vae_info, evaluated, timings):
    """Stages 3-4: every method's fine-tunes (guided methods sample their source's runs), each evaluated right
    away -> (rows, the first seed's generic images per method, {(method, seed): run directory})."""
    methods = [BY_NAME[n] for n in args.methods]
    rows, grid_images, runs = [], {}, {}
    row, grid_images["base"] = evaluated(load_models(base["path"]), None, None)
    rows.append({"method": "base", "label": "base (balanced training)", "seed": "-", "run": base["path"], **row})
    for seed in range(args.seeds):
        loaded = {}  # each run read once a seed: the guided methods sample their source's
        for name in dict.fromkeys(m.source or m.name for m in methods):
            t0 = time.time()
            runs[name, seed] = fine_tune(args, sizes, BY_NAME[name], seed, base, vae_info)
            timings["finetune"] += time.time() - t0
            loaded[name] = load_run(runs[name, seed])
        for m in methods:
            run_dir, trained = runs[m.source or m.name, seed], loaded[m.source or m.name]
            row, images = evaluated(trained.models, trained.indicator, m)
            rows.append({"method": m.name, "label": m.label, "seed": seed, "run": str(run_dir),
                         "train": train_stats(run_dir), "unet_as_plain": same_unet(run_dir, runs.get(("plain", seed))),
                         **row})
            grid_images.setdefault(m.name, images)
    order = ["base"] + args.methods
    rows.sort(key=lambda r: order.index(r["method"]))  # stable: each method's seeds stay in the order they ran
    return rows, grid_images, runs


def same_unet(run_dir, plain_dir):
    """Whether a run's UNet is bit for bit the plain fine-tune's (None without a plain run)."""
    if plain_dir is None:
        return None
    files = [checkpoints.latest_checkpoint(d) / "unet.safetensors" for d in (run_dir, plain_dir)]
    return files[0].read_bytes() == files[1].read_bytes()


def best_method(summary):
    """The method the CFG check measures beside plain: the lowest mean FD among the judged methods that meet the
    bar, or among all of them when none does."""
    tried = [s for s in summary if s["method"] not in ("base", "plain")]
    tried = [s for s in tried if s["meets_goal"]] or tried
    return min(tried, key=lambda s: s["fd"])["method"] if tried else None


def cfg_check(args, sizes, rows, runs, best, evaluated):
    """Classifier-free guidance amplifies the majority: FD of plain and of the best method at other CFG scales."""
    cfg_rows = [{**r, "cfg": sizes.guidance} for r in rows if r["method"] in ("plain", best)]
    for name in [n for n in ("plain", best) if n in args.methods]:
        m = BY_NAME[name]
        for seed in range(args.seeds):
            trained = load_run(runs[m.source or m.name, seed])
            for scale in sizes.cfg_check:
                row, _ = evaluated(trained.models, trained.indicator, m, guidance=scale, generic_only=True)
                cfg_rows.append({"method": name, "label": m.label, "seed": seed, "cfg": scale, **row})
    return cfg_rows


def run(args):
    """The experiment: stages 1-2 (prepare), then its own stages 3-4 (run_digits or run_attributes); report.json
    and report.md written, the verdict table and the wall time printed -> the report."""
    t_start, out = time.time(), args.out
    sizes = QUICK if args.quick else FULL
    with own_run_dir(out):  # held to the end: no other run writes its report here meanwhile
        claim_run_dir(out, args.overwrite)
        torch.set_num_threads(args.threads)
        timings = {"finetune": 0.0, "evaluate": 0.0}
        classifier, vae_info, base = prepare(args, sizes, timings)
        experiment = run_attributes if args.experiment == "attributes" else run_digits
        own, grids = experiment(args, sizes, classifier, vae_info, base, timings)
        timings.update(total=time.time() - t_start, cpu=time.process_time())  # cpu: ours alone, whatever else runs
        report = {"experiment": args.experiment, "mode": "quick" if args.quick else "full",
                  "sizes": dataclasses.asdict(sizes), **own, "vae": vae_info, "base": base, "seeds": args.seeds,
                  "grids": [str(g.relative_to(out)) for g in grids],
                  "timings_s": {k: round(v, 1) for k, v in timings.items()}, "threads": args.threads}
        if args.experiment == "attributes":
            markdown, table = attribute_markdown(report), attribute_table(report["summary"])
        else:
            markdown, table = report_markdown(report), verdict_table(report["summary"], report["groups"])
        report["report_md_sha256"] = hashlib.sha256(markdown.encode()).hexdigest()  # an edited report.md: the user's
        weights.write_json(out / "report.json", report)
        weights.write_atomic(out / "report.md", markdown)
        print(table)
        print(f"\nwall time {timings['total']:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())}); "
              f"report: {out / 'report.md'}")
        return report


def run_digits(args, sizes, classifier, vae_info, base, timings):
    """--experiment digits, stages 3-4: every method's fine-tunes evaluated, the CFG check, the grids -> (this
    experiment's part of the report, the grids' paths)."""
    groups = args.groups
    judge = digit_judge(classifier, groups)

    def evaluated(models, indicator, method, **kw):
        t0 = time.time()
        result = evaluate_model(models, indicator, method, judge, groups, sizes, progress=args.progress, **kw)
        timings["evaluate"] += time.time() - t0
        return result

    rows, grid_images, runs = fine_tune_and_evaluate(args, sizes, base, vae_info, evaluated, timings)
    summary = summarize(rows, groups)
    best = best_method(summary)
    cfg_rows = cfg_check(args, sizes, rows, runs, best, evaluated)
    grids = save_grids(args.out, grid_images, args.methods, sizes.grid_n)
    return {
        "paper": "Huang, Tsao, Su, Chiang 2025, Debiasing Diffusion Model, arXiv 2503.12536", "tiny_configs": TINY,
        "groups": groups, "counts": {str(k): v for k, v in args.counts.items()}, "generic_prompt": GENERIC_PROMPT,
        "group_prompts": [group_prompt(g) for g in groups],
        "methods": [dataclasses.asdict(BY_NAME[n]) for n in args.methods],
        "classifier_heldout_accuracy": judge[0].heldout_accuracy, "fd_max": math.sqrt((len(groups) - 1) / len(groups)),
        "rows": rows, "summary": summary, "best_method": best, "cfg_rows": cfg_rows,
        "versions": {"torch": torch.__version__},
    }, grids


def save_grids(out, grid_images, methods, n):
    """grids/all_seed0.png (every model, the same noise seeds) and plain beside each method -> their paths."""
    panels = [("base (balanced)", grid_images["base"][:n])] + [(k, grid_images[k][:n]) for k in methods]
    grids = [save_grid(panels, out / "grids" / "all_seed0.png")]
    if "plain" in methods:
        grids += [save_grid([panels[1 + methods.index("plain")], p], out / "grids" / f"plain_vs_{p[0]}_seed0.png")
                  for p in panels[1:] if p[0] != "plain"]
    return grids


def cluster_lines(rows):
    """What each cluster of the label-free runs holds, by the labels their training never read (markdown)."""
    lines = [f"- {r['label']}, seed {r['seed']}: " + "; ".join(
        f"{c} " + ", ".join(f"{n} × {g}" for g, n in held.items()) for c, held in r["train"]["clusters"].items())
        for r in rows if "clusters" in r.get("train", {})]
    return "\n## Clusters of the label-free runs (digits: labels training never read)\n\n" + "\n".join(lines) + "\n" \
        if lines else ""


def cfg_measured(report):
    """What the CFG check measured: plain, and the best method, each if it ran."""
    measured = {r["method"] for r in report["cfg_rows"]}
    return ", and ".join(["plain"] * ("plain" in measured)
                         + [f"the best method: {report['best_method']}"] * (report["best_method"] in measured))


def report_markdown(report):
    sizes, groups = report["sizes"], report["groups"]
    decided = decide_step(sizes["sample_steps"])  # 801 at 10 steps, 667 at --quick's 3
    return f"""# Which indicators debias? Handwritten digits {groups} at {report['counts']} ({report['mode']} run)

{report['paper']}. A base model trained on balanced groups, fine-tuned on the biased set above with each method
({sizes['ft_steps']} full fine-tuning steps of batch {sizes['ft_batch']}, {report['seeds']} seeds).
FD = ||uniform − shares||₂ over the groups from {sizes['n_generic']} images of
"{report['generic_prompt']}" (0 balanced, max {report['fd_max']:.3f}); SPD = max − min over groups of the share of
{sizes['n_per_group']} images per group prompt that the judge assigns to the requested digit. The judge is the
10-class digit classifier (held-out accuracy {report['classifier_heldout_accuracy']:.4f}), never the indicator; FD
and SPD count each image in the most likely of the groups, whatever its best class (as a judge of the groups alone).
Quality: Frechet distance to held-out real digits in the judge's features (mixed in the model's own shares, so bias
alone is not bad quality), the same per group (the images whose best class is the group against its real ones, on
equal-size subsets as below), the share of generic images whose best class is none of the groups, confidence.
Diversity: precision and recall (Kynkäänniemi et al. 2019, k = 3) in the judge's features, each group's generic images
(best class) against its held-out real digits, on equal-size random subsets of {DIVERSITY_SUBSET} (mean of
{DIVERSITY_DRAWS} draws). Indicator acc / bacc:
its accuracy on its training batches and balanced accuracy on those holding every group, last 50 steps. DDIM
{sizes['sample_steps']} steps, CFG {sizes['guidance']}. Std is the sample std over seeds (none for one model; "n of N
seeds": the seeds that measured it); "worst seed" is the largest FD of any seed. The bar, on the unrounded means over
seeds: FD at most half of plain's, Frechet at most 10% worse, and every group's recall at least 0.9x plain's (a
recall some seed could not measure fails it; a group whose recall plain could not measure is not judged). Guidance
auto (ours): trajectory-aware targets decided at t = {decided} and the scale chosen per prompt by the indicator
alone (guidance.guides_for; the scales chosen are in report.json, rows[].guidance_chosen).

## Verdict (mean ± std over seeds)

{verdict_table(report['summary'], groups)}

## Classifier-free guidance scale ({cfg_measured(report)})

{cfg_table(report['cfg_rows'])}

## Every model

{seed_table(report['rows'], groups)}
{cluster_lines(report['rows'])}
Grids (the same noise seeds in every panel, generic prompt): {', '.join(report['grids'])}

Wall time: {report['timings_s']} s on {report['threads']} thread(s).
"""


# ----------------------------------------------------------------------------------------------------------------
# The attribute experiment: debias what the prompt does not name


def attribute_judges(classifier, vae_path):
    """The judges of the attribute experiment, and how far they can be trusted -> (judges, their check). Per digit:
    the width threshold (the median ink mass of its real training digits) and the classifier's features of its
    held-out real digits, all and by width. The check: the colour rule on held-out digits in both colours; the
    width rule against each held-out digit's own-median split; both after a round trip through the VAE."""
    images, labels = data.load_digits()
    train_idx, held_idx = data.split_digits(0)
    thresholds = data.width_thresholds(data.ink_masses(images, train_idx, RESOLUTION), labels[train_idx])
    vae, judges, check = load_vae(vae_path), {}, {}
    for d in ATTR_DIGITS:
        held = held_idx[labels[held_idx] == d]
        white = data.digit_images(images, held, RESOLUTION)
        mass = data.ink_mass(white)
        thick = mass > thresholds[d]
        feats = classifier.features(white)
        judges[d] = (thresholds[d], {"all": feats, "thick": feats[torch.from_numpy(thick)],
                                     "thin": feats[torch.from_numpy(~thick)]})
        both = evaluate.AttributeJudge("colour+width", classifier, thresholds[d])
        for colour in sorted(data.COLOURS):
            x = data.digit_images(images, held, RESOLUTION, [colour] * len(held))
            with torch.no_grad():
                back = vae.decode(vae.encode(sample.from_uint8(x)).mean)
            truth = [f"{colour}+{'thick' if t else 'thin'}" for t in thick]
            check[f"{d} {colour}"] = {
                "rule": float(np.mean(np.array(both.names(x)) == truth)),
                "after_vae": float(np.mean(np.array(both.names(sample.to_uint8(back))) == truth))}
        check[f"{d} width vs held-out own median"] = float(np.mean((mass > np.median(mass)) == thick))
    return judges, check


def judge_attributes(images, digit, classifier, judges, sizes):
    """One prompt's images judged: FD, shares, Frechet, precision and recall of the colour, the width and their
    intersections (each group against held-out digits of its width), and the share read as the prompted digit."""
    threshold, ref = judges[digit]
    out = {"content": (evaluate.classify(classifier, evaluate.white_ink(images)).argmax(1) == digit).double().mean()
           .item()}
    for attribute, groups in [*ATTR_GROUPS.items(), ("colour+width", INTERSECTIONS)]:
        r = evaluate.evaluate_images(images.numpy(), evaluate.AttributeJudge(attribute, classifier, threshold), groups,
                                     reference_features={g: ref[g.split("+")[-1] if "width" in attribute else "all"]
                                                         for g in groups}, diversity_subset=sizes.attr_diversity)
        out[attribute] = {k: r[k] for k in ("fd", "proportions", "frechet_distance", "precision_per_group",
                                            "recall_per_group")}
    return out


def evaluate_attribute_row(models, indicators, classifier, judges, sizes, progress):
    """One model, each prompt (a digit) sampled from the same seeds in every model, guided when it has indicators
    -> the per-prompt numbers, and their mean over prompts and worst prompt; the first prompt's images."""
    per_prompt, grid, chosen = {}, None, {}
    settings = sample_settings(sizes)
    for k, d in enumerate(ATTR_DIGITS):
        prompt, seeds = group_prompt(d), list(range(20_000 + k * sizes.attr_n, 20_000 + (k + 1) * sizes.attr_n))
        guides = []
        if indicators:
            specs = [(ind, torch.full((ind.num_groups,), 1 / ind.num_groups)) for ind in indicators]
            guides, chosen[prompt] = guides_for(sample.generate, models, prompt, seeds, specs, "auto",
                                                cal_seed=1, calibration=sizes.attr_calibration, **settings)
        images = sample.generate(models, [prompt] * len(seeds), seeds, guides=guides, progress=progress, **settings)
        per_prompt[str(d)] = judge_attributes(images, d, classifier, judges, sizes)
        grid = images if grid is None else grid
    return attribute_summary(per_prompt, chosen), grid


def attribute_summary(per_prompt, chosen):
    """The numbers of one model over its prompts: means, the worst prompt's intersectional FD, recall per group."""
    prompts = list(per_prompt.values())
    row = {"per_prompt": per_prompt, "guidance_chosen": chosen or None,
           "fd_joint_worst_prompt": max(p["colour+width"]["fd"] for p in prompts)}
    for key, attribute in (("fd_colour", "colour"), ("fd_width", "width"), ("fd_joint", "colour+width")):
        row[key] = float(np.mean([p[attribute]["fd"] for p in prompts]))
    row["content"] = float(np.mean([p["content"] for p in prompts]))
    row["frechet"] = float(np.mean([p["colour+width"]["frechet_distance"] for p in prompts]))
    for attribute, groups in ATTR_GROUPS.items():
        for g in groups:
            for key in ("recall", "precision"):
                values = [p[attribute][f"{key}_per_group"][g] for p in prompts]
                row[f"{key}_{g}"] = None if None in values else float(np.mean(values))
    return row


ATTR_KEYS = ("fd_colour", "fd_width", "fd_joint", "fd_joint_worst_prompt", "content", "frechet") + tuple(
    f"{k}_{g}" for k in ("recall", "precision") for g in ATTR_GROUP_NAMES)


def summarize_attributes(rows):
    """Per row: mean ± std over seeds, the worst seed's intersectional FD, and the bar against plain: intersectional
    FD <= 0.10 over prompts and <= 0.15 at the worst prompt, content accuracy >= plain's - 1 point, Frechet <= plain
    + 10%, every group's recall >= 0.9 x plain's; and whether FD <= 0.15 (the bar with 10% of the labels)."""
    out = [{**s, "fd_joint_worst_seed": max(r["fd_joint"] for r in mine)}
           for mine, s in per_method(rows, lambda r: {k: r[k] for k in ATTR_KEYS})]
    plain = next(s for s in out if s["method"] == "plain")
    for s in out:
        s["meets_goal"] = None if s["method"] == "plain" else bool(
            s["fd_joint"] <= 0.10 and s["fd_joint_worst_prompt"] <= 0.15 and s["content"] >= plain["content"] - 0.01
            and s["frechet"] <= 1.1 * plain["frechet"] and recall_kept(s, plain, ATTR_GROUP_NAMES))
        s["fd_joint_at_most_0.15"] = s["fd_joint"] <= 0.15
    return out


def attribute_table(summary):
    head = (["method", "FD colour", "FD width", "FD intersections", "worst prompt", "worst seed", "content acc.",
             "Frechet"] + [f"recall {g}" for g in ATTR_GROUP_NAMES] + ["meets the bar"])
    return _table(head, [[s["label"], _pm(s, "fd_colour"), _pm(s, "fd_width"), f"**{_pm(s, 'fd_joint')}**",
                          _pm(s, "fd_joint_worst_prompt"), _f(s["fd_joint_worst_seed"]), _pm(s, "content"),
                          _pm(s, "frechet", ".1f")] + [_pm(s, f"recall_{g}", ".2f") for g in ATTR_GROUP_NAMES]
                         + [VERDICT[s["meets_goal"]]] for s in summary])


def run_attributes(args, sizes, classifier, vae_info, base, timings):
    """--experiment attributes, stages 3-4 on the attribute data: one table over the ATTR_ROWS -> (this
    experiment's part of the report, the grids' paths)."""
    judges, check = attribute_judges(classifier, vae_info["path"])
    rows, grids = [], {}
    for seed in range(args.seeds):
        t0 = time.time()
        runs = {name: fine_tune(args, sizes, m, seed, base, vae_info) for name, m in ATTR_RUNS.items()}
        timings["finetune"] += time.time() - t0
        t0 = time.time()
        unets = {name: load_run(runs[name]).models for name in dict.fromkeys(r.unet for r in ATTR_ROWS)}
        shape = latent_shape(unets["colour"], RESOLUTION, RESOLUTION)  # the guides' runs: their indicators alone
        indicators = {g: load_indicator(runs[g], shape)[0] for r in ATTR_ROWS for g in r.guides}
        for r in ATTR_ROWS:
            row, images = evaluate_attribute_row(unets[r.unet], [indicators[g] for g in r.guides], classifier, judges,
                                                 sizes, args.progress)
            rows.append({"method": r.name, "label": r.label, "seed": seed, "unet": str(runs[r.unet]),
                         "unet_as_plain": same_unet(runs[r.unet], runs["colour"]), **row})
            grids.setdefault(r.name, images[:sizes.grid_n])
        timings["evaluate"] += time.time() - t0
    grid = save_grid(list(grids.items()), args.out / "grids" / f"attributes_{WORDS[ATTR_DIGITS[0]]}_seed0.png")
    return {"digits": ATTR_DIGITS, "counts_per_digit": {"+".join(k): n for k, n in ATTR_COUNTS.items()},
            "judge_check": check, "rows": rows, "summary": summarize_attributes(rows)}, [grid]


def attribute_markdown(report):
    sizes = report["sizes"]
    return f"""# Debias what the prompt does not name: digits {list(report['digits'])} ({report['mode']} run)

The prompt names the digit ("{group_prompt(report['digits'][0])}"); ink colour and stroke width, which no caption
names, are biased within every digit (per digit: {report['counts_per_digit']}). Per prompt, {sizes['attr_n']} images:
FD of the colour, of the width and of the four intersections (the mean over prompts, and the worst prompt); content
accuracy: the share the digit classifier reads as the prompted digit; Frechet distance to held-out real digits of
the prompt's class, mixed by the generated intersections' shares; recall per group on equal-size subsets of
{sizes['attr_diversity']}. Guided rows: trajectory-aware targets, the scale chosen per prompt by the indicators
alone on {sizes['attr_calibration']} calibration images. {report['seeds']} seeds; std: sample std, none for one seed
("n of N seeds": the seeds that measured it). The bar, on the unrounded means over seeds: intersectional FD at most
0.10 over prompts and 0.15 at the worst prompt, content accuracy at least plain's minus 1 point, Frechet at most 10%
worse, and every group's recall at least 0.9x plain's (a recall some seed could not measure fails it; a group whose
recall plain could not measure is not judged).

## Verdict (mean ± std over seeds)

{attribute_table(report['summary'])}

## How far the judges can be trusted

{json.dumps(report['judge_check'], indent=1)}

Grids (the first prompt, the same noise seeds in every panel): {', '.join(report['grids'])}

Wall time: {report['timings_s']} s on {report['threads']} thread(s).
"""


def main(argv=None):
    args = parse_args(argv)
    return cli.one_line_errors(lambda: run(args), "reproduce.py")


if __name__ == "__main__":
    main()

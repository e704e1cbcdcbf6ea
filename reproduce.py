"""One command, one CPU: does DDM's indicator make a fine-tuned latent diffusion model generate groups in balance?

Huang, Tsao, Su, Chiang 2025, "Debiasing Diffusion Model" (arXiv 2503.12536), tested on real handwritten digits
(the shipped MNIST 5k, `data.py`) with the digit as the group, 7 against 8 (the authors' example run is digits at
32 px). Everything is trained here, from scratch, with the same classes as full-size Stable Diffusion v1.x (VAE,
UNet, CLIP text encoder with CLIP's real tokenizer), only tiny:

  1. digit classifier   evaluate.py's CNN on the balanced train split; its held-out accuracy rides with every number
  2. VAE                reconstruction MSE + a small KL on every train digit (the one training loop in this file);
                        the latent scaling factor is then measured, 1 / std(z), as SD's 0.18215 was
  3. base model         UNet + text encoder from scratch through train.py (--init-config, w_ind = 0) on BALANCED
                        7s and 8s, captions half generic ("a handwritten digit") and half naming the digit
                        ("a handwritten digit seven"), 10% dropped for classifier-free guidance
  4. fine-tunes         the base on a 9 : 1 BIASED set of 7s and 8s (train indices only, same caption mix), through
                        train.py: plain (w_ind = 0) and DDM (w_ind = 0.05, the authors' example, and 0.2, 0.5;
                        w_rec = 1 - w_ind, so 0.95 / 0.05 as the authors), each with --seeds seeds
  5. evaluation         per model: N images from the generic prompt (FD scenario, proportions of 7s and 8s) and
                        N/2 from each group prompt (SPD scenario, success rate per requested digit), scored with
                        evaluate.py: FD (hard and soft), SPD, the indicator's mean entropy on the generated images
                        (DDM runs: the images re-noised at random t, as in training), mean classifier confidence
                        and the Frechet distance to held-out real 7s/8s in the classifier's feature space
  6. report             RUN/report.md (every seed, then mean ± std per method), RUN/report.json, RUN/grids/*.png
                        (the same noise seeds through base, plain and DDM models side by side); the table is printed

    python reproduce.py                      # full run into runs/repro (about 10 min on one CPU core)
    python reproduce.py --quick              # smoke test sizes into runs/repro-quick (a few minutes)
    python reproduce.py --out DIR --seeds 5 --overwrite

Caching. Stages 1-3 and the data folders go to RUN/cache/<stage>-<hash of its settings>/ (or --cache DIR, which
can be shared between run directories) and are reused whenever their settings match; a stage is complete once
its done.json exists, so a killed run retrains only what was unfinished. Stages 4-6 are the results: an existing
run directory with results (finetune/, report.json) is refused unless --overwrite, which deletes those results
and keeps the cache.

Fine-tuning is full (--lora-rank 0, UNet only), not LoRA: the tiny UNet has a single attention level, so rank-8
adapters on its to_q/to_v would hold too few weights to pick up the 9 : 1 bias within a CPU budget, while a full
fine-tune of a 1.0M-weight UNet costs the same per step. The DDM objective is the same either way.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tqdm import tqdm

import data
import evaluate
import sample
import train
from vae import VAE, VAEConfig, load_vae, vae_diffusers_config, vae_to_diffusers

GROUPS = (7, 8)  # the two digits: the groups whose balance is judged
WORDS = {7: "seven", 8: "eight"}
GENERIC_PROMPT = "a handwritten digit"  # the FD scenario: the prompt names no group


def group_prompt(digit):
    return f"{GENERIC_PROMPT} {WORDS[digit]}"  # the SPD scenario: the prompt names the group


RESOLUTION = 32  # px, the authors' digit example; the VAE takes it to 8 x 8 latents
TINY = {  # train.py --init-config: the SD classes, tiny (UNet 1.0M weights; text encoder 3.3M, 3.2M of them embeddings)
    "vae": {"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "num_groups": 8},  # 32 px -> 4 x 8 x 8 latents
    "unet": {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
             "num_heads": 4, "context_dim": 64, "num_groups": 8, "sample_size": 8},  # latents 8x8 -> 4x4
    "text_encoder": {"width": 64, "layers": 2, "heads": 4, "mlp": 256},
}


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
    ft_steps: int = 100
    ft_batch: int = 32
    ft_lr: float = 2e-4
    w_inds: tuple = (0.05, 0.2, 0.5)  # the authors' example, then a small sweep
    n_generic: int = 200  # images per model from the generic prompt (FD)
    n_per_group: int = 100  # ... and from each group prompt (SPD)
    sample_steps: int = 15  # DDIM
    guidance: float = 3.0  # classifier-free guidance scale
    n_entropy_t: int = 1  # re-noisings per image for the indicator's entropy
    grid_n: int = 32  # images per model in the grids


FULL = Sizes()
QUICK = Sizes(classifier_epochs=1, vae_steps=30, vae_batch=16, base_steps=30, base_batch=16, ft_steps=4, ft_batch=8,
              w_inds=(0.05, 0.5), n_generic=16, n_per_group=8, sample_steps=4, grid_n=16)
CAPTION_DROPOUT = 0.1  # share of empty captions, so classifier-free guidance has an unconditional model
BIAS = {7: 360, 8: 40}  # the 9 : 1 fine-tuning set (of the 400 train digits per class)
BALANCED = {7: 400, 8: 400}  # the base model's set: every train 7 and 8


# ----------------------------------------------------------------------------------------------------------------
# Cached stages


def stage_dir(cache, name, settings):
    """cache/<name>-<hash of settings>/: a stage's settings decide its folder, so changed settings retrain."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(cache) / f"{name}-{key}"


def cached(folder, settings, build, label):
    """Run build(folder) unless folder/done.json exists; returns what done.json records (build's dict)."""
    done = folder / "done.json"
    if done.is_file():
        tqdm.write(f"[cache] {label}: reusing {folder}")
        return json.loads(done.read_text())["result"]
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished build: start it over
    folder.mkdir(parents=True)
    t0 = time.time()
    result = build(folder)
    tmp = folder / "done.json.tmp"
    tmp.write_text(json.dumps({"settings": settings, "result": result, "seconds": time.time() - t0}, indent=1,
                              default=str))
    os.replace(tmp, done)
    tqdm.write(f"[stage] {label}: {time.time() - t0:.0f}s")
    return result


def caption_for(seed):
    """A caption function for data.make_digit_folder: half the images generic, half naming their digit (seeded)."""
    rng = np.random.default_rng(seed)
    return lambda digit: group_prompt(digit) if rng.random() < 0.5 else GENERIC_PROMPT


def build_classifier(folder, sizes):
    model, acc = evaluate.train_digit_classifier(seed=0, epochs=sizes.classifier_epochs, progress=False)
    evaluate.save_classifier(model, folder / "classifier.safetensors")
    return {"heldout_accuracy": acc}


def train_vae(folder, sizes, seed=0, progress=True):
    """The tiny VAE, on every train digit (all ten): MSE(decode(z), x) + kl · KL(q(z|x) || N(0, I)), z sampled.

    Written as a diffusers vae/ folder (load_vae reads it) with scaling_factor = 1 / std of the posterior means,
    measured on the train digits, so the UNet sees latents of unit variance as SD's 0.18215 intends.
    """
    images, _ = data.load_digits()
    train_idx, held_idx = data.split_digits(0)
    to_pixels = lambda idx: torch.from_numpy(np.stack(  # noqa: E731  (N,3,32,32) in [-1,1]: the folders' images
        [np.asarray(data.digit_image(images[i], RESOLUTION)) for i in idx])).permute(0, 3, 1, 2).float() / 127.5 - 1
    x, x_held = to_pixels(train_idx), to_pixels(held_idx)
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
    save_file({k: v.contiguous() for k, v in vae_to_diffusers(vae.state_dict(), vae.config).items()},
              str(out / "diffusion_pytorch_model.safetensors"))
    (out / "config.json").write_text(json.dumps(vae_diffusers_config(vae.config), indent=1))
    load_vae(out)  # fails here, not three stages later, if the folder does not load back
    return {"heldout_mse": held_mse, "scaling_factor": vae.config.scaling_factor, "path": str(out)}


def build_folder(folder, counts, seed):
    images, labels = data.load_digits()
    train_idx, _ = data.split_digits(0)  # held-out digits never reach a diffusion model
    data.make_digit_folder(folder / "images", images, labels, counts, indices=train_idx, resolution=RESOLUTION,
                           prompt=caption_for(seed), seed=seed)
    return {"path": str(folder / "images"), "counts": {str(k): v for k, v in counts.items()}}


def common_train_args(batch, steps, lr, seed):
    return ["--resolution", str(RESOLUTION), "--batch-size", str(batch), "--grad-accum", "1", "--max-steps",
            str(steps), "--lr", str(lr), "--seed", str(seed), "--caption-dropout", str(CAPTION_DROPOUT),
            "--cache-latents", "--checkpoint-every", "0"]


def train_base(folder, sizes, vae_path, data_path, progress=True):
    """UNet + text encoder from random init through train.py's from-scratch path, plain denoising (w_ind = 0)."""
    config = folder / "init_config.json"
    config.write_text(json.dumps({k: v for k, v in TINY.items() if k != "vae"}, indent=1))
    run = train.train(["--init-config", str(config), "--vae", vae_path, "--data", data_path, "--out",
                       str(folder / "run"), "--w-ind", "0", "--w-rec", "1",
                       *common_train_args(sizes.base_batch, sizes.base_steps, sizes.base_lr, 0),
                       *([] if progress else ["--no-progress"])])
    return {"path": str(run), "final_loss": _final_loss(run)}


def _final_loss(run_dir, last=50):
    """{"rec": mean denoising MSE, "indicator_train_acc": mean indicator accuracy (None for a plain run)} over the
    last `last` logged steps (one step is noisy)."""
    lines = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()][-last:]
    out = {"rec": float(np.mean([r["rec"] for r in lines]))}
    accs = [r["acc"] for r in lines if r["acc"] is not None]
    out["indicator_train_acc"] = float(np.mean(accs)) if accs else None
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sampling and evaluation of one model


def method_name(w_ind):
    return "plain fine-tune" if w_ind == 0 else "DDM"


def generate_all(models, sizes, progress=True):
    """(generic images, group images, group requested per image), uint8 (N,32,32,3). Image k of a scenario uses
    noise seed k in every model, so models are compared on identical starting noise."""
    prompts = [GENERIC_PROMPT] * sizes.n_generic
    requested = [g for g in GROUPS for _ in range(sizes.n_per_group)]
    prompts += [group_prompt(g) for g in requested]
    # group prompts take seeds from 10,000 on: disjoint from the generic images' 0..n_generic-1 (n_generic <= 10,000)
    seeds = list(range(sizes.n_generic)) + list(range(10_000, 10_000 + len(requested)))
    images = sample.generate(models, prompts, seeds, steps=sizes.sample_steps, guidance=sizes.guidance,
                             height=RESOLUTION, width=RESOLUTION, batch_size=100, progress=progress)
    return images[:sizes.n_generic], images[sizes.n_generic:], requested


@torch.no_grad()
def indicator_logits(models, indicator, images, n_t, seed=0):
    """The indicator on generated images: each one encoded (posterior mean), noised at n_t random t ~ U{0..999}
    with the generic prompt, as in training; the UNet's ε̂ goes to the indicator -> (N·n_t, K) logits."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    context = sample.encode_text(models, [GENERIC_PROMPT])
    out = []
    for i in range(0, len(x), 100):
        z0 = models.vae.encode(x[i:i + 100]).mean * models.vae_config.scaling_factor
        for _ in range(n_t):
            t = torch.randint(0, train.N_TRAIN_TIMESTEPS, (len(z0),), generator=gen)
            noise = torch.randn(z0.shape, generator=gen)
            eps_hat = models.unet(sample.add_noise(z0, noise, t, models.alphas_cumprod), t,
                                  context.expand(len(z0), -1, -1))
            out.append(indicator(eps_hat))
    return torch.cat(out)


def evaluate_model(models, indicator, classifier, reference_features, sizes, progress=True):
    """One model's row: FD scenario numbers, SPD scenario numbers, indicator entropy, quality."""
    generic, grouped, requested = generate_all(models, sizes, progress)
    fd = evaluate.evaluate_images(generic.numpy(), classifier, list(GROUPS), reference_features=reference_features,
                                  indicator_logits=(None if indicator is None else
                                                    indicator_logits(models, indicator, generic, sizes.n_entropy_t)))
    spd = evaluate.evaluate_images(grouped.numpy(), classifier, list(GROUPS), requested=requested)
    row = {"fd": fd["fd"], "fd_soft": fd["fd_soft"], "proportions": fd["proportions"], "spd": spd["spd"],
           "success_rates": spd["success_rates"], "indicator_entropy": fd["indicator_entropy"],
           "mean_confidence": fd["mean_confidence"], "share_outside_groups": fd["share_outside_groups"],
           "frechet_distance": fd["frechet_distance"], "classifier_heldout_accuracy": fd["classifier_heldout_accuracy"],
           "n_generic": len(generic), "n_per_group": sizes.n_per_group}
    return row, generic


# ----------------------------------------------------------------------------------------------------------------
# Report


COLUMNS = ["method", "w_ind", "w_rec", "seed", "FD", "FD soft", "share of 7s", "SPD", "indicator entropy",
           "indicator train acc", "confidence", "outside 7/8", "Frechet", "classifier acc"]


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(rows):
    """Per (method, w_ind): mean ± std (sample std, ddof 1) of every number over its seeds."""
    out = []
    keys = ["fd", "fd_soft", "spd", "indicator_entropy", "mean_confidence", "share_outside_groups",
            "frechet_distance"]
    for w in dict.fromkeys(r["w_ind"] for r in rows if r["method"] != "base"):
        group = [r for r in rows if r["w_ind"] == w and r["method"] != "base"]
        s = {"method": group[0]["method"], "w_ind": w, "w_rec": group[0]["w_rec"], "seeds": [r["seed"] for r in group],
             "classifier_heldout_accuracy": group[0]["classifier_heldout_accuracy"]}
        for k in keys + ["share7", "indicator_train_acc"]:
            vals = [r["proportions"][0] if k == "share7" else r["train"][k] if k == "indicator_train_acc" else r[k]
                    for r in group]
            s[k], s[k + "_std"] = _mean_std(vals)
        out.append(s)
    return out


def _f(v, fmt=".3f"):
    return "–" if v is None else format(v, fmt)


def _pm(s, k, fmt=".3f"):
    return "–" if s[k] is None else f"{s[k]:{fmt}} ± {s[k + '_std']:{fmt}}"


def format_table(rows, summary):
    """Markdown: every model (each seed), then mean ± std per method."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["method"], _f(r["w_ind"], "g"), _f(r["w_rec"], "g"), str(r["seed"]), _f(r["fd"]), _f(r["fd_soft"]),
            _f(r["proportions"][0]), _f(r["spd"]), _f(r["indicator_entropy"]),
            _f(r.get("train", {}).get("indicator_train_acc")), _f(r["mean_confidence"]),
            _f(r["share_outside_groups"]), _f(r["frechet_distance"], ".2f"),
            _f(r["classifier_heldout_accuracy"], ".4f")]) + " |")
    for s in summary:
        lines.append("| " + " | ".join([
            f"**{s['method']}**", _f(s["w_ind"], "g"), _f(s["w_rec"], "g"), f"mean ± std ({len(s['seeds'])})",
            f"**{_pm(s, 'fd')}**", _pm(s, "fd_soft"), _pm(s, "share7"), _pm(s, "spd"), _pm(s, "indicator_entropy"),
            _pm(s, "indicator_train_acc"), _pm(s, "mean_confidence"), _pm(s, "share_outside_groups"),
            _pm(s, "frechet_distance", ".2f"),
            _f(s["classifier_heldout_accuracy"], ".4f")]) + " |")
    return "\n".join(lines)


LABEL_HEIGHT = 12  # px: one line of PIL's default bitmap font above each grid block


def _label(text, width):
    img = Image.new("RGB", (width, LABEL_HEIGHT), (255, 255, 255))
    ImageDraw.Draw(img).text((2, 0), text, fill=(0, 0, 0))
    return img


def save_grid(panels, path, cols=8):
    """Side-by-side blocks of images, one per model, each under its label: [(label, uint8 (N,R,R,3))]."""
    blocks = []
    for label, images in panels:
        images = np.asarray(images)
        rows = math.ceil(len(images) / cols)
        block = np.full((rows * RESOLUTION, cols * RESOLUTION, 3), 255, np.uint8)
        for k, im in enumerate(images):
            r, c = divmod(k, cols)
            block[r * RESOLUTION:(r + 1) * RESOLUTION, c * RESOLUTION:(c + 1) * RESOLUTION] = im
        blocks.append((label, Image.fromarray(block)))
    gap = 6
    width = sum(b.width for _, b in blocks) + gap * (len(blocks) - 1)
    height = max(b.height for _, b in blocks) + LABEL_HEIGHT
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for label, b in blocks:
        canvas.paste(_label(label, b.width), (x, 0))
        canvas.paste(b, (x, LABEL_HEIGHT))
        x += b.width + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The whole reproduction


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DDM (arXiv 2503.12536) reproduced on real handwritten 7s and 8s, on CPU.")
    p.add_argument("--out", type=Path, help="run directory (default runs/repro, or runs/repro-quick with --quick)")
    p.add_argument("--cache", type=Path, help="cached stages (classifier, VAE, data, base model); default OUT/cache")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline in a few minutes, "
                                                        "not the science")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per method (>= 1)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT's results (cached stages are kept)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: these tiny models gain "
                                                          "little from more, and lose many times over when another "
                                                          "process competes for the cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    args.out = args.out or Path("runs/repro-quick" if args.quick else "runs/repro")
    args.cache = args.cache or args.out / "cache"
    return args


RESULTS = ("finetune", "report.md", "report.json", "grids")  # what a run writes into OUT besides the cache


def claim_run_dir(out, overwrite):
    """Refuse a run directory that holds results, unless overwrite: then delete the results (never the cache)."""
    present = [name for name in RESULTS if (out / name).exists()]
    if present and not overwrite:
        raise FileExistsError(f"{out} already holds results ({', '.join(present)}); pass --overwrite to replace "
                              f"them (cached stages in it are reused), or choose another --out")
    for name in present:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)


def run(args):
    t_start = time.time()
    sizes = QUICK if args.quick else FULL
    out, cache = args.out, args.cache
    claim_run_dir(out, args.overwrite)
    torch.set_num_threads(args.threads)
    timings = {}

    def timed(name, fn):
        t0 = time.time()
        result = fn()
        timings[name] = round(time.time() - t0, 1)
        return result

    # 1-3: cached stages
    s = {"epochs": sizes.classifier_epochs, "format": evaluate.CLASSIFIER_FORMAT}
    folder = stage_dir(cache, "classifier", s)
    timed("classifier", lambda: cached(folder, s, lambda f: build_classifier(f, sizes), "digit classifier"))
    classifier = evaluate.load_classifier(folder / "classifier.safetensors")
    s = {"config": TINY["vae"], **{k: v for k, v in dataclasses.asdict(sizes).items() if k.startswith("vae")}}
    vae_info = timed("vae", lambda: cached(stage_dir(cache, "vae", s), s,
                                           lambda f: train_vae(f, sizes, progress=args.progress), "VAE"))
    balanced = cached(stage_dir(cache, "data-balanced", BALANCED), BALANCED,
                      lambda f: build_folder(f, BALANCED, 0), "balanced 7s and 8s")
    biased = cached(stage_dir(cache, "data-biased", BIAS), BIAS, lambda f: build_folder(f, BIAS, 1), "biased 9 : 1")
    s = {"vae": s, "tiny": TINY, "data": BALANCED, "caption_dropout": CAPTION_DROPOUT,
         **{k: v for k, v in dataclasses.asdict(sizes).items() if k.startswith("base")}}
    base = timed("base", lambda: cached(stage_dir(cache, "base", s), s,
                                        lambda f: train_base(f, sizes, vae_info["path"], balanced["path"], args.progress),
                                        "base model"))

    # reference: held-out real 7s and 8s in the classifier's feature space
    # (per digit, so evaluate.py weighs them by each model's own proportions: bias alone does not read as bad quality)
    reference, labels = evaluate.heldout_digits(*classifier.split, RESOLUTION, list(GROUPS))
    reference_features = {g: classifier.features(reference[labels == g]) for g in GROUPS}

    # 4-5: fine-tunes, each sampled and evaluated right away
    rows, grid_images = [], {}
    t0 = time.time()
    models = sample.load_models(base["path"])
    row, grid_images["base"] = evaluate_model(models, None, classifier, reference_features, sizes, args.progress)
    rows.append({"method": "base", "w_ind": None, "w_rec": None, "seed": "-", "run": base["path"], **row})
    timings["evaluate"] = time.time() - t0
    timings["finetune"] = 0.0
    for w_ind in (0.0,) + tuple(sizes.w_inds):
        for seed in range(args.seeds):
            name = f"{'plain' if w_ind == 0 else f'ddm{w_ind:g}'}-seed{seed}"
            tqdm.write(f"[fine-tune] {name}: w_ind {w_ind:g}, w_rec {1 - w_ind:g}")
            t0 = time.time()
            run_dir = train.train(["--model", base["path"], "--data", biased["path"], "--out",
                                   str(out / "finetune" / name), "--lora-rank", "0", "--no-train-text-encoder",
                                   "--w-ind", str(w_ind), "--w-rec", str(1 - w_ind),
                                   *common_train_args(sizes.ft_batch, sizes.ft_steps, sizes.ft_lr, seed),
                                   *([] if args.progress else ["--no-progress"])])
            timings["finetune"] += time.time() - t0
            t0 = time.time()
            trained = sample.load_run(run_dir)
            row, images = evaluate_model(trained.models, trained.indicator, classifier,
                                         reference_features, sizes, args.progress)
            rows.append({"method": method_name(w_ind), "w_ind": w_ind, "w_rec": 1 - w_ind, "seed": seed,
                         "run": str(run_dir), "train": _final_loss(run_dir), **row})
            if seed == 0:
                grid_images[name] = images
            timings["evaluate"] += time.time() - t0

    # 6: report
    summary = summarize(rows)
    table = format_table(rows, summary)
    grids = []
    n = sizes.grid_n
    base_panel = ("base (balanced)", grid_images["base"][:n])
    plain_panel = ("plain w_ind=0", grid_images["plain-seed0"][:n])
    ddm_panels = [(f"DDM w_ind={w:g}", grid_images[f"ddm{w:g}-seed0"][:n]) for w in sizes.w_inds]
    grids.append(save_grid([base_panel, plain_panel, *ddm_panels], out / "grids" / "all_seed0.png"))
    for panel, w in zip(ddm_panels, sizes.w_inds):
        grids.append(save_grid([plain_panel, panel], out / "grids" / f"plain_vs_ddm{w:g}_seed0.png"))
    timings["total"] = round(time.time() - t_start, 1)
    timings = {k: round(v, 1) for k, v in timings.items()}
    report = {
        "paper": "Huang, Tsao, Su, Chiang 2025, Debiasing Diffusion Model, arXiv 2503.12536",
        "mode": "quick" if args.quick else "full", "sizes": dataclasses.asdict(sizes), "tiny_configs": TINY,
        "groups": list(GROUPS), "generic_prompt": GENERIC_PROMPT, "group_prompts": [group_prompt(g) for g in GROUPS],
        "biased_counts": {str(k): v for k, v in BIAS.items()},
        "balanced_counts": {str(k): v for k, v in BALANCED.items()},
        "vae": vae_info, "base": base, "classifier_heldout_accuracy": classifier.heldout_accuracy,
        "fd_max": math.sqrt(1 / 2), "columns": COLUMNS, "rows": rows, "summary": summary,
        "grids": [str(g.relative_to(out)) for g in grids], "timings_s": timings, "threads": args.threads,
        "versions": {"torch": torch.__version__},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(report_markdown(report, table))
    print(table)
    print(f"\nwall time {timings['total']:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())}); "
          f"report: {out / 'report.md'}")
    return report


def report_markdown(report, table):
    sizes = report["sizes"]
    return f"""# DDM reproduction on handwritten 7s and 8s ({report['mode']} run)

{report['paper']}. Base model trained on balanced 7s and 8s ({report['balanced_counts']}), fine-tuned on a
9 : 1 biased set ({report['biased_counts']}); {sizes['ft_steps']} full fine-tuning steps of batch {sizes['ft_batch']}
per model. FD over the groups {report['groups']} from {sizes['n_generic']} images of "{report['generic_prompt']}"
(0 = balanced, max {report['fd_max']:.3f}); SPD = max − min over groups of the share of images, prompted with
"{report['group_prompts'][0]}" / "{report['group_prompts'][1]}" ({sizes['n_per_group']} each), that the classifier
assigns to the requested digit. Indicator entropy: mean softmax entropy (nats, max ln 2 = 0.693) of the trained
indicator on the generated generic images re-noised at random t (DDM runs only; the plain runs train no indicator).
Indicator train acc: the indicator's accuracy on
its training batches over the last 50 fine-tuning steps (0.9 = always answering "7", the majority of the 9 : 1 set).
Quality: mean classifier confidence (10 classes), the share of generic images whose best of the 10 classes is
neither 7 nor 8, and the Frechet distance to held-out real 7s/8s in the classifier's features
(the real 7s and 8s mixed in the model's own generated proportions, so that bias alone does not count as bad quality).
Classifier held-out accuracy (all 10 digits): {report['classifier_heldout_accuracy']:.4f}. DDIM {sizes['sample_steps']}
steps, guidance {sizes['guidance']}. Every seed is listed; std is the sample std over seeds.

{table}

Grids (the same noise seeds in every panel, generic prompt): {', '.join(report['grids'])}

Wall time: {report['timings_s']} s on {report['threads']} threads.
"""


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"reproduce.py: error: {e}")


if __name__ == "__main__":
    main()

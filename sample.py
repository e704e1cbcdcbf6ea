"""Prompt -> images with Stable Diffusion v1.x (diffusion.py's samplers), and the sampling CLI.

    python sample.py --model sd-v1-5/ --prompt "a photo of a doctor" --n 8 --steps 50 --guidance 7.5 --out out/doctor

`generate` encodes the texts, seeds image k's generator with seeds[k] (its initial noise and every later draw),
runs `diffusion.denoise` batch by batch and decodes; image k depends on (prompt k, seed k) alone. The CLI checks
every argument before any weight loads or any file is touched, then writes PNGs, grid.png and samples.json.
Indicator guidance (ours): `--indicator RUN --indicator-guidance S` pushes each image toward a target group drawn
for it from `--target`'s shares with its own seed.
"""
import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from tqdm import tqdm

import cli
import diffusion
import weights
from data import derive_seed, text_lines
from ddm import parse_target
from diffusion import SAMPLERS, Guidance, NonFiniteError
from loading import latent_shape, load_indicator, load_models, size_multiple

# Classifier-free guidance is used at 1 to 20 (SD's default 7.5), and images burn out well before 100; past that a
# value is a typo (75 for 7.5 stays allowed), and 1e30 makes every latent inf: a black image, not an experiment.
GUIDANCE_MAX = 100
RANGES = {"steps": (1, 1000), "guidance": (-GUIDANCE_MAX, GUIDANCE_MAX), "eta": (0, None), "batch_size": (1, None)}


@torch.inference_mode()
def encode_text(models, texts):
    """CLIP's last hidden state (B, 77, D) for a list of texts: SD v1's conditioning."""
    device = next(models.text_encoder.parameters()).device
    return models.text_encoder(models.tokenizer(texts).to(device))


@torch.inference_mode()
def decode_latents(models, z):
    """Latents (B,4,h,w) -> images (B,3,H,W) roughly in [-1, 1], float32; undoes the UNet-side scaling first."""
    vae_dtype = next(models.vae.parameters()).dtype
    return models.vae.decode((z / models.vae_config.scaling_factor).to(vae_dtype)).float()


def to_uint8(images):
    """(B,3,H,W) in [-1, 1] -> uint8 (B,H,W,3) on the CPU, rounded as diffusers' numpy_to_pil does."""
    return ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def check_settings(prompts, seeds, settings):
    """ValueError naming the first setting of `generate` that is wrong (the CLI checks its flags the same way)."""
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) < 1 or len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt and at least one prompt, got {len(prompts)} prompts, "
                         f"{len(seeds)} seeds")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 64]
    if bad:
        raise ValueError(f"seeds must be integers in 0..2**64-1 (torch.Generator's range), got {bad[0]!r}")
    if settings["sampler"] not in SAMPLERS:
        raise ValueError(f"unknown sampler {settings['sampler']!r}; choose from {', '.join(SAMPLERS)}")
    for name, spec in RANGES.items():
        why = cli.out_of_range(settings[name], *spec)
        if why:
            raise ValueError(f"{name} {why}, got {settings[name]}")


def generate(models, prompts, seeds, *, negative_prompt="", steps=50, guidance=7.5, height=512, width=512,
             sampler="ddim", eta=0.0, batch_size=8, guides=(), decode=True, progress=True, on_batch=None, until=None):
    """uint8 images (N, H, W, 3), image k from (prompts[k], seeds[k]) alone (float32 latents with decode=False).

    `guides`: diffusion.Guidance terms with one target per image. With `on_batch`, each batch goes to
    on_batch(index of its first image, images) as soon as it is done and nothing is kept (None is returned).
    Image k's pixels are the same at any batch size within one level (kernels round a batch of 2 and of 8
    differently in the last bit); runs at one batch size are bit-identical on CPU.
    """
    check_settings(prompts, seeds, dict(steps=steps, guidance=guidance, sampler=sampler, eta=eta,
                                        batch_size=batch_size))
    shape = latent_shape(models, height, width)
    device = next(models.unet.parameters()).device
    embeddings, kept = {}, []  # each distinct text is encoded once, in the first batch that has it
    with tqdm(total=len(prompts), desc="images", unit="img", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            rows = slice(start, start + batch_size)
            new = [t for t in dict.fromkeys(prompts[rows] + [negative_prompt] * (guidance != 1.0)) if t not in
                   embeddings]
            embeddings.update(zip(new, encode_text(models, new)) if new else ())
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds[rows]]
            cond = torch.stack([embeddings[p] for p in prompts[rows]])  # (B, 77, D)
            uncond = embeddings[negative_prompt][None] if guidance != 1.0 else None  # (1, 77, D)
            try:
                z = diffusion.denoise(models.unet, diffusion.per_image_noise(generators, shape, device), cond,
                                      uncond, models.alphas_cumprod, generators, steps=steps, guidance=guidance,
                                      sampler=sampler, eta=eta, prediction_type=models.prediction_type,
                                      progress=progress, guides=[g.rows(rows) for g in guides], until=until)
                images = decode_latents(models, z) if decode and until is None else z
                bad = (~torch.isfinite(images.flatten(1)).all(1)).nonzero()
                if len(bad):
                    raise NonFiniteError(int(bad[0, 0]), "in the decoded pixels")
            except NonFiniteError as e:
                raise NonFiniteError(start + e.image, e.where) from None
            images = to_uint8(images) if decode and until is None else images
            bar.update(len(images))
            on_batch(start, images) if on_batch else kept.append(images)
    return torch.cat(kept) if kept else None


def draw_targets(seeds, shares):
    """Image k's target group for indicator guidance: a draw from `shares` (K,) with its own seed, so it does not
    depend on the other images (and leaves image k's noise stream alone)."""
    return torch.tensor([torch.multinomial(shares.double(), 1, generator=torch.Generator().manual_seed(
        derive_seed(s, "target"))).item() for s in seeds])


# Indicator guidance (ours), set per prompt. Trajectory-aware targets are decided at the first step with t <= 801
# (a step of SD's spacing at 5, 10, 20, 25 or 50 steps); "auto" takes the smallest scale of the ladder at which
# AUTO_HIT of each group's calibration images end in their target group, read at t = AUTO_READ_AT. The ladder stops
# at 20: at 30 the digits showed artefacts. Measured on the 7-vs-8 digits (docs/reproduction.md): a hit of 0.9 kept
# the minority's recall above 0.9x plain's where 0.95-0.97 bought FD 0.03-0.04 with a recall 0.88x plain's.
DECIDE_AT = 801
AUTO_SCALES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20)
AUTO_HIT = 0.9


AUTO_READ_AT = 200  # the final latents are re-noised to this t before the indicator reads them (ending_groups)


@torch.no_grad()
def ending_groups(indicator, z0, seeds, alphas_cumprod, t=None):
    """The group each final latent ends in, as the indicator reads it after re-noising it to t (each image its own
    noise): noise washes out what guidance wrote only for the indicator, and keeps what makes the group."""
    t = AUTO_READ_AT if t is None else t
    noise = torch.cat([torch.randn((1, *z0.shape[1:]), generator=torch.Generator().manual_seed(
        derive_seed(s, "read"))) for s in seeds]).to(z0.device)
    return indicator(diffusion.add_noise(z0, noise, torch.full((len(z0),), t), alphas_cumprod), t).argmax(1).cpu()


def guides_for(models, prompt, seeds, specs, scale, *, decide_at=DECIDE_AT, calibration=200, cal_seed=0,
               **settings):
    """The indicator-guidance terms (ours) of one prompt's images (`seeds`), one per (indicator, target shares) in
    `specs`, without a judge -> (guides, record for samples.json).

    decide_at None: image k's target is drawn from the shares with its own seed (draw_targets). Otherwise a
    calibration batch of the prompt (its own seeds) runs unguided to the decide step, and its posteriors set the
    offsets that make the trajectory-aware targets come out in the shares (diffusion.decision_offsets). With scale
    "auto", each guide's scale is the smallest of AUTO_SCALES at which, on that batch, AUTO_HIT of the images
    targeted at each group end in it, as its own indicator reads the final latents at t = 0 (found by bisection)."""
    cal = [derive_seed(cal_seed, "calibration", k) for k in range(calibration)]
    t = next((t for t in diffusion.ddim_timesteps(settings["steps"]) if decide_at is not None and t <= decide_at), None)
    x_t = None if t is None else generate(models, [prompt] * calibration, cal, decode=False, until=decide_at,
                                          progress=False, **settings)
    guides, cal_guides, cal_targets = [], [], []
    for indicator, shares in specs:
        if t is None:
            guides.append(Guidance(indicator, draw_targets(seeds, shares), 0.0))
            cal_guides.append(Guidance(indicator, draw_targets(cal, shares), 0.0))
        else:
            with torch.no_grad():
                offsets = diffusion.decision_offsets(indicator(x_t, t).float().log_softmax(1), shares)
            guides.append(Guidance(indicator, torch.zeros(len(seeds), dtype=torch.long), 0.0, decide_at, offsets))
            cal_guides.append(Guidance(indicator, torch.zeros(calibration, dtype=torch.long), 0.0, decide_at, offsets))
        cal_targets.append(cal_guides[-1].targets if t is None else diffusion.decide_targets(indicator, x_t, t,
                                                                                               offsets))
    record = {"decide_step": t, "offsets": [None if g.offsets is None else  # JSON has no infinity: never targeted
                                            [v if math.isfinite(v) else None for v in g.offsets.tolist()]
                                            for g in guides]}
    low, high = [-1] * len(guides), [len(AUTO_SCALES) - 1] * len(guides)  # the rung sought lies in (low, high]
    while scale == "auto" and any(h - lo > 1 for lo, h in zip(low, high)):  # bisection: hits grow with the scale
        rungs = [(lo + h) // 2 if h - lo > 1 else h for lo, h in zip(low, high)]
        for g, r in zip(cal_guides, rungs):
            g.scale = float(AUTO_SCALES[r])
        z0 = generate(models, [prompt] * calibration, cal, guides=cal_guides, decode=False, progress=False, **settings)
        ends = [ending_groups(g.indicator, z0, cal, models.alphas_cumprod) for g in cal_guides]
        hits = [[(end[targets == k] == k).float().mean().item() for k in targets.unique().tolist()]
                for end, targets in zip(ends, cal_targets)]
        record.setdefault("calibration", []).append({"scales": [g.scale for g in cal_guides], "hit_rates": hits})
        for j, (r, h) in enumerate(zip(rungs, hits)):
            if high[j] - low[j] > 1:
                low[j], high[j] = (low[j], r) if min(h) >= AUTO_HIT else (r, high[j])
    for j, g in enumerate(guides):
        g.scale = float(AUTO_SCALES[high[j]] if scale == "auto" else scale)
    record["scales"] = [g.scale for g in guides]
    return guides, record


# ----------------------------------------------------------------------------------------------------------------
# CLI

GRID_MAX = 64  # grid.png shows at most the first 64 images: an evaluation run of thousands would not fit in memory
IMAGE_NAME = re.compile(r"[0-9]+\.png")  # the images a run writes, beside grid.png and samples.json


def build_parser():
    p = argparse.ArgumentParser(description="Generate images from a Stable Diffusion v1.x checkpoint.")
    p.add_argument("--model", required=True, help="diffusers SD folder, single-file .safetensors/.ckpt, or a "
                                                  "train.py run directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="one prompt")
    prompt.add_argument("--prompts", metavar="FILE", help="text file, one prompt a line (blank lines skipped)")
    p.add_argument("--negative-prompt", default="", help='the unconditional prompt of guidance (default "")')
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; 1 disables it")
    p.add_argument("--seed", type=int, default=0, help="image k (counting over all prompts) uses seed + k")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η: 0 deterministic, 1 ancestral")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run's images in --out")
    g = p.add_argument_group("indicator guidance (ours): steer each image toward a target group")
    g.add_argument("--indicator", metavar="RUN_OR_FILE", action="append", default=[],
                   help="a train.py run with a noise-aware indicator (--objective plain-indicator or "
                        "indicator-weighted), or its indicator.safetensors; repeat it for several attributes")
    g.add_argument("--indicator-guidance", type=guidance_scale, default=0.0, metavar="S|auto",
                   help="guidance scale (0: off), or auto: chosen per prompt on a calibration batch, by the "
                        "indicators alone")
    g.add_argument("--target", action="append", default=[], help="the group shares to aim for, per --indicator in "
                   "order (one value: all of them) or by attribute (ATTRIBUTE:SPEC): uniform (the default) or "
                   "NAME=SHARE,...")
    g.add_argument("--decide-at", type=decide_at_arg, default=DECIDE_AT, metavar="T|none",
                   help=f"trajectory-aware targets, decided at the first step with t <= T from each image's own "
                        f"posterior (default {DECIDE_AT}); none: drawn from the shares for each image at the start")
    g.add_argument("--calibration", type=int, default=200, metavar="N", help="calibration images per prompt for "
                   "trajectory-aware targets and the auto scale (default 200)")
    p.add_argument("--device", type=cli.device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    # Half-precision weights run as they are, without autocast (as diffusers' fp16 pipelines do; group norms stay
    # float32): autocast cost ~10% per UNet call on an H200 (README, Speed and memory).
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="precision of the weights and the computation on CUDA (default float16); the CPU runs "
                        "float32")
    return p


def guidance_scale(text):
    """argparse type of --indicator-guidance: "auto", or a finite number >= 0."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or cli.out_of_range(value, 0, None):
        raise argparse.ArgumentTypeError(f"must be auto or a number >= 0, got {text!r}")
    return value


def decide_at_arg(text):
    """argparse type of --decide-at: "none", or a timestep 0..999."""
    if text == "none":
        return None
    if not text.isdigit() or int(text) >= diffusion.N_TRAIN_TIMESTEPS:
        raise argparse.ArgumentTypeError(f"must be none or a timestep 0..{diffusion.N_TRAIN_TIMESTEPS - 1}, "
                                         f"got {text!r}")
    return int(text)


def parse_args(argv=None):
    """Parse and check every argument, the model's config files included, before any weights load and before
    anything is written or deleted; errors exit with status 2."""
    p = build_parser()
    args = p.parse_args(argv)
    why = cli.range_error(args, {"n": (1, None), "calibration": (2, None), **RANGES})
    if why:
        p.error(why)
    if args.eta > 1:  # σ_t² would pass 1 − ᾱ_prev: DDIM's √(1 − ᾱ_prev − σ_t²) is imaginary late in sampling
        p.error(f"--eta must be at most 1 (1 is DDPM's ancestral step), got {args.eta}")
    if args.indicator_guidance and not args.indicator:
        p.error("--indicator-guidance needs --indicator RUN_OR_FILE")
    if args.target and (not args.indicator or len(args.target) not in (1, len(args.indicator))):
        p.error(f"--target: give one for all indicators or one per --indicator ({len(args.indicator)}), got "
                f"{len(args.target)}" + ("" if args.indicator else "; it needs --indicator"))
    for flag, path in [("--indicator", path) for path in args.indicator] + [("--model", args.model)]:
        if not Path(path).exists():
            p.error(f"{flag} {path} does not exist")
    for name in ("height", "width"):
        if getattr(args, name) <= 0 or getattr(args, name) % 8:
            p.error(f"--{name} must be a positive multiple of 8 (the VAE's downsampling factor), "
                    f"got {getattr(args, name)}")
    try:
        args.prompt_list = [args.prompt] if args.prompts is None else read_prompts(args.prompts)
    except ValueError as e:
        p.error(f"--prompts {e}")
    count = len(args.prompt_list) * args.n
    if not 0 <= args.seed <= 2 ** 64 - count:  # torch.Generator takes 64-bit seeds; image k uses seed + k
        p.error(f"--seed must lie in 0..2**64-{count}" + (f" for {count} images" if count > 1 else "")
                + f", got {args.seed}")
    args.files = [f"{k:0{max(5, len(str(count - 1)))}d}.png" for k in range(count)]
    try:
        args.previous_outputs = previous_outputs(Path(args.out), args.overwrite, args.files)
    except (OSError, ValueError) as e:
        p.error(f"--out {args.out}: {e}")
    args.dtype = args.dtype or ("float16" if args.device.type == "cuda" else "float32")
    if args.device.type == "cpu" and args.dtype != "float32":
        p.error(f"--dtype {args.dtype} is for CUDA; the CPU runs float32")
    try:
        multiple = size_multiple(args.model)
    except (OSError, ValueError) as e:  # ValueError covers weights.CheckpointError
        p.error(f"--model {args.model}: {e}")
    for name in ("height", "width"):
        if getattr(args, name) % multiple:
            p.error(f"--{name} must be a multiple of {multiple} for this model (the VAE and the UNet downsample "
                    f"by that much together), got {getattr(args, name)}")
    return args


def read_prompts(path):
    """The non-blank lines of a prompts file, stripped; ValueError naming the file and line otherwise."""
    if not Path(path).is_file():
        raise ValueError(f"{path} is not a file")
    prompts = [line.strip() for _, line in text_lines(path) if line.strip()]
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return prompts


def previous_outputs(out, overwrite, files):
    """The files in `out` that the previous run there wrote and listed in its samples.json: what --overwrite may
    delete before `files`, grid.png and samples.json are written. ValueError, before anything is touched, when
    `out` cannot be written, or when a file the new run writes is there and is not the previous run's."""
    existing = next(folder for folder in (out, *out.parents) if folder.exists())
    if not existing.is_dir():
        raise ValueError(f"{existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{existing} is not writable")
    if existing != out or not any(out.iterdir()):
        return []
    if not overwrite:
        raise ValueError("it exists and is not empty; pass --overwrite to replace the images of a previous run there")
    listed = []
    if (out / "samples.json").exists():
        record = weights.read_json(out / "samples.json")
        names = record.get("files")
        if not isinstance(names, list) or not all(isinstance(n, str) and IMAGE_NAME.fullmatch(n) for n in names):
            raise ValueError(f"{out / 'samples.json'} does not list the images of a sample.py run (its 'files' must "
                             f"be names like 00000.png); move it away")
        listed = [n for n in names + ["grid.png"] * ("grid" in record) + ["samples.json"] if (out / n).is_file()]
    taken = [n for n in files + ["grid.png", "samples.json"] if (out / n).exists() and n not in listed]
    if taken:
        raise ValueError(f"{out / taken[0]} would be overwritten, and no samples.json of a previous run here lists "
                         f"it; move it away")
    return listed


def save_pngs(images, folder, names=None):
    """uint8 images (N,H,W,3) as PNG files in `folder` (created), named 00.png, 01.png, ... unless `names`."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image.numpy()).save(folder / (names[k] if names else f"{k:02d}.png"))


def make_grid(images):
    """uint8 (N,H,W,3) -> one PIL image, ⌈√N⌉ columns."""
    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    grid = Image.new("RGB", (cols * w, math.ceil(n / cols) * h))
    for k in range(n):
        grid.paste(Image.fromarray(images[k].numpy()), ((k % cols) * w, (k // cols) * h))
    return grid


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def record_of(args, argv, models, prompts, seeds, started):
    """samples.json: every setting, the per-image seeds and files, the versions."""
    return {
        "model": str(Path(args.model).resolve()), "prompts": prompts, "seeds": seeds, "files": args.files,
        "negative_prompt": args.negative_prompt, "sampler": args.sampler, "eta": args.eta, "steps": args.steps,
        "guidance": args.guidance, "height": args.height, "width": args.width, "batch_size": args.batch_size,
        "device": str(args.device), "dtype": args.dtype, "prediction_type": models.prediction_type,
        "command": [sys.executable] + sys.argv if argv is None else ["sample.py"] + list(argv),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "pillow": PIL.__version__, "git_commit": _git_commit()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "grid": args.files[:GRID_MAX], "finished": False, "indicator_guidance": None,
    }


def target_specs(targets, attributes):
    """Each indicator's --target: given in order (one for all), or by attribute as ATTRIBUTE:SPEC; "uniform" for an
    indicator none names. ValueError for an attribute no indicator guides."""
    named = {t.partition(":")[0]: t.partition(":")[2] for t in targets if "=" not in t.partition(":")[0] and ":" in t}
    if not named:
        return [targets[k if len(targets) > 1 else 0] if targets else "uniform" for k in range(len(attributes))]
    unknown = [a for a in named if a not in attributes]
    if unknown or len(named) != len(targets):
        raise ValueError(f"--target {unknown[0] if unknown else targets[0]}: name one of the attributes the "
                         f"indicators guide ({', '.join(str(a) for a in attributes)}) in every ATTRIBUTE:SPEC")
    return [named.get(a, "uniform") for a in attributes]


def indicator_guides(args, models, prompts, seeds):
    """The indicator guidance of every prompt (ours): [(prompt, its images' guides)] and what samples.json records
    of it; none when no indicator guides (a scale of 0 applies nothing, and nothing is recorded)."""
    if not args.indicator_guidance:
        return [(p, []) for p in args.prompt_list], None
    specs, names = [], []
    loaded = [(path, *load_indicator(path, latent_shape(models, args.height, args.width))) for path in args.indicator]
    targets = target_specs(args.target, [attribute for *_, attribute in loaded])
    for k, (path, indicator, groups, attribute) in enumerate(loaded):
        spec = targets[k]
        if any(n["attribute"] == attribute for n in names):
            raise ValueError(f"--indicator {path} guides the attribute {attribute or '(unnamed)'} that an earlier "
                             f"--indicator guides already: give one indicator per attribute")
        specs.append((indicator.to(args.device), parse_target(spec, groups)))
        names.append({"indicator": str(Path(path).resolve()), "attribute": attribute, "groups": groups,
                      "target": spec})
    settings = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                    height=args.height, width=args.width, sampler=args.sampler, eta=args.eta,
                    batch_size=args.batch_size)
    out, per_prompt = [], {}
    for prompt in args.prompt_list:
        mine = [s for p, s in zip(prompts, seeds) if p == prompt]
        guides, per_prompt[prompt] = guides_for(models, prompt, mine, specs, args.indicator_guidance,
                                                decide_at=args.decide_at, calibration=args.calibration,
                                                cal_seed=args.seed, **settings)
        if args.decide_at is None:
            per_prompt[prompt]["target_groups"] = [[n["groups"][k] for k in g.targets] for g, n in zip(guides, names)]
        out.append((prompt, guides))
    return out, {"scale": args.indicator_guidance, "decide_at": args.decide_at, "calibration": args.calibration,
                 "indicators": names, "prompts": per_prompt}


def main(argv=None):
    args = parse_args(argv)  # every argument checked; nothing touched yet
    prompts = [p for p in args.prompt_list for _ in range(args.n)]  # prompt-major: n images of each prompt
    seeds = [args.seed + k for k in range(len(prompts))]
    out, files, started = Path(args.out), args.files, time.time()
    try:
        models = load_models(args.model, args.device, getattr(torch, args.dtype))
    except (OSError, ValueError) as e:  # ValueError covers weights.CheckpointError
        sys.exit(f"error: cannot load --model {args.model}: {e}")
    record = record_of(args, argv, models, prompts, seeds, started)
    try:
        per_prompt, record["indicator_guidance"] = indicator_guides(args, models, prompts, seeds)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    written, grid_images = 0, []

    def save(start, images):
        nonlocal written
        for k, image in enumerate(images, start):
            Image.fromarray(image.numpy()).save(out / files[k])
            written += 1
            if k < GRID_MAX:
                grid_images.append(image)

    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in args.previous_outputs:  # only what the previous run's samples.json lists
            (out / name).unlink(missing_ok=True)
        # written first, so that a run stopped half-way still lists its images for the next --overwrite
        (out / "samples.json").write_text(json.dumps(record, indent=2) + "\n")
        # one call for all prompts; one per prompt when each has its own guidance
        for prompt, guides in per_prompt if record["indicator_guidance"] else [(None, [])]:
            rows = [k for k, p in enumerate(prompts) if prompt in (None, p)]
            generate(models, [prompts[k] for k in rows], [seeds[k] for k in rows], negative_prompt=args.negative_prompt,
                     steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
                     sampler=args.sampler, eta=args.eta, batch_size=args.batch_size, guides=guides,
                     on_batch=lambda start, images: save(rows[start], images))
        make_grid(torch.stack(grid_images)).save(out / "grid.png")
        record.update(seconds=round(time.time() - started, 3), finished=True)
        (out / "samples.json").write_text(json.dumps(record, indent=2) + "\n")
    except NonFiniteError as e:
        sys.exit(f"error: {e}: it would be an all-black PNG, so the run stops (NaN weights, or a model that "
                 f"overflows at these settings); {written} images were written to {out}")
    except OSError as e:
        sys.exit(f"error: cannot write to --out {out}: {e}")
    print(f"wrote {len(files)} images, grid.png and samples.json to {out}")


if __name__ == "__main__":
    main()

"""Prompt -> images with Stable Diffusion v1.x (diffusion.py's samplers), and the sampling CLI.

    python sample.py --model sd-v1-5/ --prompt "a photo of a doctor" --n 8 --steps 50 --guidance 7.5 --out out/doctor

`generate` encodes the texts, seeds image k's generator with seeds[k] (its initial noise and every later draw),
runs `diffusion.denoise` batch by batch and decodes; image k depends on (prompt k, seed k) alone. The CLI checks
every argument before any file is touched, and before any weight loads all but the indicators, --target and --steps
against the model's schedule; then it writes PNGs, grid.png and samples.json. Indicator guidance (ours, guidance.py):
`--indicator RUN --indicator-guidance auto` pushes each image toward a target group, in `--target`'s shares.
"""
import argparse
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
import guidance
import weights
from data import read_prompts
from diffusion import N_TRAIN_TIMESTEPS, SAMPLERS, STEPS_OFFSET, NonFiniteError
from evaluate import judged
from loading import latent_shape, load_models, model_sides

# CFG is used at 1 to 20 (SD: 7.5) and images burn out well before 100: past it a value is a typo (1e30: all inf)
GUIDANCE_MAX = 100
# steps: with SD's steps_offset, N steps on an N-step schedule would start at t = N, past its end
RANGES = {"steps": (1, N_TRAIN_TIMESTEPS - STEPS_OFFSET), "guidance": (-GUIDANCE_MAX, GUIDANCE_MAX), "eta": (0, None),
          "batch_size": (1, None)}


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


def from_uint8(images):
    """uint8 (B,H,W,3), a tensor or an array -> float (B,3,H,W) in [-1, 1]: what the VAE encodes."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def settings_error(models, prompts, seeds, settings):
    """Why the first wrong setting of `generate` is wrong, or None (the CLI checks its flags the same way)."""
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        return f"prompts must be a list of strings, got {type(prompts).__name__}"
    if len(prompts) < 1 or len(prompts) != len(seeds):
        return f"need one seed per prompt and at least one prompt, got {len(prompts)} prompts, {len(seeds)} seeds"
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 64]
    if bad:
        return f"seeds must be integers in 0..2**64-1 (torch.Generator's range), got {bad[0]!r}"
    if settings["sampler"] not in SAMPLERS:
        return f"unknown sampler {settings['sampler']!r}; choose from {', '.join(SAMPLERS)}"
    for name, spec in RANGES.items():
        why = cli.out_of_range(settings[name], *spec)
        if why:
            return f"{name} {why}, got {settings[name]}"
    return steps_error(settings["steps"], models)


def steps_error(steps, models):
    """Why `steps` does not fit the model's own schedule (its first step must be a step of it), or None."""
    n = len(models.alphas_cumprod)
    top = n - STEPS_OFFSET  # more steps would start past the schedule's end
    return f"steps {steps}: the model's schedule has {n} steps; at most {top}" if steps > top else None


def generate(models, prompts, seeds, *, negative_prompt="", steps=50, guidance=7.5, height=512, width=512,
             sampler="ddim", eta=0.0, batch_size=8, guides=(), decode=True, progress=True, on_batch=None, until=None):
    """uint8 images (N, H, W, 3), image k from (prompts[k], seeds[k]) alone (float32 latents with decode=False).

    `guides`: diffusion.Guidance terms with one target per image. With `on_batch`, each batch goes to
    on_batch(index of its first image, images) as soon as it is done and nothing is kept (None is returned).
    Image k's pixels are the same at any batch size within one level (kernels round a batch of 2 and of 8
    differently in the last bit); runs at one batch size are bit-identical on CPU.
    """
    why = settings_error(models, prompts, seeds, dict(steps=steps, guidance=guidance, sampler=sampler, eta=eta,
                                                      batch_size=batch_size))
    if why:
        raise ValueError(why)
    shape = latent_shape(models, height, width)
    device, pixels = next(models.unet.parameters()).device, decode and until is None
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
                images = decode_latents(models, z) if pixels else z
                bad = (~torch.isfinite(images.flatten(1)).all(1)).nonzero()
                if len(bad):
                    raise NonFiniteError(int(bad[0, 0]), "in the decoded pixels" if pixels else "in the latents")
            except NonFiniteError as e:
                raise NonFiniteError(start + e.image, e.where) from None
            images = to_uint8(images) if pixels else images
            bar.update(len(images))
            on_batch(start, images) if on_batch else kept.append(images)
    return torch.cat(kept) if kept else None


# ----------------------------------------------------------------------------------------------------------------
# CLI

GRID_MAX = 64  # grid.png shows at most the first 64 images: an evaluation run of thousands would not fit in memory
IMAGE_NAME = re.compile(r"[0-9]+\.png")  # the images a run writes, beside grid.png and samples.json


def build_parser():
    p = argparse.ArgumentParser(description="Generate images from a Stable Diffusion v1.x checkpoint.")
    p.add_argument("--model", required=True, help="diffusers SD folder, single-file .safetensors/.ckpt, or a "
                                                  "train.py run directory or one of its checkpoint folders")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="one prompt")
    prompt.add_argument("--prompts", metavar="FILE", help="text file, one prompt a line (blank lines skipped)")
    p.add_argument("--negative-prompt", default="", help='the unconditional prompt of guidance (default "")')
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; 1 disables it")
    p.add_argument("--seed", type=int, default=0, help="image k (counting over all prompts) uses seed + k")
    p.add_argument("--height", type=int, help="default: the side the model was trained at (512 for SD v1.x)")
    p.add_argument("--width", type=int, help="default: the side the model was trained at")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η: 0 deterministic, 1 ancestral")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run's images and their evaluation.json")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar")
    guidance.add_flags(p)
    p.add_argument("--device", type=cli.device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    # Half-precision weights run as they are, without autocast (as diffusers' fp16 pipelines do; CompVis' GroupNorm32
    # keeps the UNet's res-block norms float32): autocast cost ~10% per UNet call on an H200 (docs/speed.md).
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="precision of the weights and the computation on CUDA (default float16); the CPU runs "
                        "float32")
    return p


def parse_args(argv=None):
    """Parse and check every argument the weights do not decide, config files included, before any weights load and
    before anything is touched; errors exit with status 2. Defaults that depend on other flags are set here."""
    p = build_parser()
    args = p.parse_args(argv)
    why = flag_error(args)
    if why:
        p.error(why)
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
        previous_outputs(Path(args.out), args.overwrite, args.files)  # again before writing: the weights take time
    except (OSError, ValueError) as e:
        p.error(f"--out {args.out}: {e}")
    args.dtype = args.dtype or ("float16" if args.device.type == "cuda" else "float32")
    args.calibration = guidance.CALIBRATION if args.calibration is None else args.calibration
    try:
        multiple, side = model_sides(args.model)
    except (OSError, ValueError) as e:  # ValueError covers weights.CheckpointError
        p.error(f"--model {args.model}: {e}")
    args.height, args.width = (side if v is None else v for v in (args.height, args.width))
    why = cli.side_error("height", args.height, multiple) or cli.side_error("width", args.width, multiple)
    if why:
        p.error(why)
    return args


def flag_error(args):
    """Why the first wrong flag that needs no file read is wrong, as one line naming it, or None (the image sides
    wait for the model's size multiple)."""
    why = cli.range_error(args, {"n": (1, None), **RANGES})
    if why:
        return why
    if args.eta > 1:  # σ_t² would pass 1 − ᾱ_prev: DDIM's √(1 − ᾱ_prev − σ_t²) is imaginary late in sampling
        return f"--eta must be at most 1 (1 is DDPM's ancestral step), got {args.eta}"
    if args.eta and args.sampler != "ddim":  # the others would ignore it, and samples.json record it
        return f"--eta is DDIM's: --sampler {args.sampler} takes none"
    if args.negative_prompt and args.guidance == 1:  # CFG off: no unconditional pass reads it
        return f"--negative-prompt is classifier-free guidance's: --guidance {args.guidance} has none"
    if not Path(args.model).exists():
        return f"--model {args.model} does not exist"
    if not args.out:  # "--out $OUT" with OUT unset: Path("") is the working directory
        return "--out is empty: name the folder to write the images to"
    if args.device.type == "cpu" and args.dtype not in (None, "float32"):
        return f"--dtype {args.dtype} is for CUDA; the CPU runs float32"
    return guidance.flag_error(args)


def previous_outputs(out, overwrite, files):
    """The files in `out` the previous run there listed in its samples.json, and evaluate.py's evaluation.json of
    them: what --overwrite may delete before `files`, grid.png and samples.json are written. ValueError, before
    anything is touched, when `out` cannot be written, or when a file the new run writes is there and is not the
    previous run's."""
    why = cli.folder_error(out)
    if why:
        raise ValueError(why)
    if not out.exists() or not any(out.iterdir()):
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
        listed += ["evaluation.json"] * judged(out / "evaluation.json", out)  # of the old images: stale beside new
    taken = [n for n in files + ["grid.png", "samples.json"] if os.path.lexists(out / n) and n not in listed]
    if taken:
        raise ValueError(f"{out / taken[0]} would be overwritten, and no samples.json of a previous run here lists "
                         f"it; move it away")
    return listed


def save_pngs(images, folder, names=None):
    """uint8 images (N,H,W,3) as PNG files in `folder` (created), named 00.png, 01.png, ... unless `names`."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image.numpy()).save(folder / (names[k] if names else f"{k:02d}.png"))


def make_grid(images, cols=None, background=(0, 0, 0)):
    """uint8 (N,H,W,3) -> one PIL image, `cols` columns (default ⌈√N⌉), empty cells in `background`."""
    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    grid = Image.new("RGB", (cols * w, math.ceil(n / cols) * h), background)
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
        "grid": args.files[:GRID_MAX], "finished": False, "indicator_guidance": None, "checkpoint": models.checkpoint,
    }


def main(argv=None):
    args = parse_args(argv)  # every argument checked; nothing touched yet
    prompts = [p for p in args.prompt_list for _ in range(args.n)]  # prompt-major: n images of each prompt
    seeds = [args.seed + k for k in range(len(prompts))]
    out, files, started = Path(args.out), args.files, time.time()
    try:
        models = load_models(args.model, args.device, getattr(torch, args.dtype))
    except (OSError, ValueError) as e:  # ValueError covers weights.CheckpointError
        sys.exit(f"error: cannot load --model {args.model}: {e}")
    why = steps_error(args.steps, models)
    if why:
        sys.exit(f"error: --{why}")
    cut = models.tokenizer.cut(args.prompt_list + [args.negative_prompt])
    if cut:  # as diffusers' pipelines warn; samples.json keeps each prompt whole
        print(f"warning: {len(cut)} prompt{'s are' if len(cut) > 1 else ' is'} longer than the "
              f"{models.tokenizer.max_length - 2} tokens the text encoder reads, which cuts the rest; the first: "
              f"{cut[0][:40].rstrip()!r}...", file=sys.stderr)
    record = record_of(args, argv, models, prompts, seeds, started)
    settings = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance, height=args.height,
                    width=args.width, sampler=args.sampler, eta=args.eta, batch_size=args.batch_size)
    try:
        per_prompt, record["indicator_guidance"] = guidance.from_args(args, models, prompts, seeds, generate,
                                                                      settings)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    written, grid_images = 0, {}

    def save(rows, images):  # image j of a batch is row rows[j] of the prompts: its file, its place in the grid
        nonlocal written
        save_pngs(images, out, [files[k] for k in rows])
        written += len(images)
        grid_images.update((k, image) for k, image in zip(rows, images) if k < GRID_MAX)

    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in previous_outputs(out, args.overwrite, files):  # only the previous run's files and evaluation
            (out / name).unlink(missing_ok=True)
        # written first, so that a run stopped half-way still lists its images for the next --overwrite
        weights.write_json(out / "samples.json", record)
        for prompt, guides in per_prompt:  # prompt None: one call for all; else one per prompt, its own guidance
            rows = [k for k, p in enumerate(prompts) if prompt in (None, p)]
            generate(models, [prompts[k] for k in rows], [seeds[k] for k in rows], guides=guides,
                     on_batch=lambda start, images: save(rows[start:start + len(images)], images),
                     progress=args.progress, **settings)
        make_grid(torch.stack([grid_images[k] for k in sorted(grid_images)])).save(out / "grid.png")
        record.update(seconds=round(time.time() - started, 3), finished=True)
        weights.write_json(out / "samples.json", record)
    except NonFiniteError as e:  # e.image counts within the call of the prompt being generated: rows maps it back
        sys.exit(f"error: image {rows[e.image]}: NaN or infinite values {e.where}: it would be an all-black PNG, so "
                 f"the run stops (NaN weights, or an overflow at these settings); {written} images written to {out}")
    except (OSError, ValueError) as e:  # ValueError: another run wrote into --out while the weights loaded
        sys.exit(f"error: --out {out}: {e}")
    print(f"wrote {len(files)} images, grid.png and samples.json to {out}")


if __name__ == "__main__":
    main()

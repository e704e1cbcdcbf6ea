"""Prompt -> images with Stable Diffusion v1.x: the noise schedule, three samplers, classifier-free guidance, a CLI.

    python sample.py --model sd-v1-5/ --prompt "a photo of a doctor" --n 8 --steps 50 --guidance 7.5 --out out/doctor

Papers, by the section the code follows:
  DDPM   Ho, Jain, Abbeel 2020 (arXiv 2006.11239): forward process eq. 4, posterior eq. 6-7, x̂_0 from ε eq. 15.
  DDIM   Song, Meng, Ermon 2021 (arXiv 2010.02502): the generalised step eq. 12, its σ_t(η) eq. 16.
  Euler  Karras, Aittala, Aila, Laine 2022 (arXiv 2206.00364): Algorithm 1 in the σ parameterisation, no churn.
  CFG    Ho, Salimans 2022 (arXiv 2207.12598) eq. 6; v-prediction: Salimans, Ho 2022 (arXiv 2202.00512) §4.

The schedule section at the top is shared with training (`add_noise`, `v_target`). Samplers are stateless
functions of the schedule and the timestep list; `denoise` is the whole reverse process for one batch of latents,
`generate` adds text encoding, seeding, batching and decoding. Image k depends only on (prompt k, seed k): its
initial noise and every later noise draw come from its own `torch.Generator`, never from a batch-wide one (and
how far its pixels are bit-identical across batch sizes is in `generate`'s docstring).
"""
import argparse
import json
import math
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from tqdm import tqdm

from clip_text import CLIPTextModel, Tokenizer, load_text_encoder, load_tokenizer
from unet import UNet, load_unet
from vae import VAE, VAEConfig, load_vae

# ----------------------------------------------------------------------------------------------------------------
# Noise schedule and training targets (DDPM eq. 4), float64 as in CompVis' make_beta_schedule


def scaled_linear_betas(n=1000, beta_start=0.00085, beta_end=0.012):
    """β_t = linspace(√β_start, √β_end, n)²: the latent-diffusion schedule of SD v1.x (CompVis `linear`)."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2


def linear_betas(n=1000, beta_start=0.0001, beta_end=0.02):
    """β_t = linspace(β_start, β_end, n): DDPM's schedule (Ho et al. 2020 §4)."""
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)


def alphas_cumprod(betas):
    """ᾱ_t = ∏_{s<=t} (1 − β_s)."""
    return torch.cumprod(1 - betas, dim=0)


def _coefficients(t, alphas_cumprod, x):
    """(√ᾱ_t, √(1−ᾱ_t)) for each sample's t, shaped to broadcast against x, in x's dtype and device."""
    a = alphas_cumprod.to(x.device)[t.to(x.device)]
    shape = (-1,) + (1,) * (x.dim() - 1)
    return a.sqrt().to(x.dtype).view(shape), (1 - a).sqrt().to(x.dtype).view(shape)


def add_noise(x0, noise, t, alphas_cumprod):
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (DDPM eq. 4), t (B,) long; the ε-prediction target is `noise` itself."""
    sa, s1a = _coefficients(t, alphas_cumprod, x0)
    return sa * x0 + s1a * noise


def v_target(x0, noise, t, alphas_cumprod):
    """v = √ᾱ_t ε − √(1−ᾱ_t) x_0, the v-prediction target of SD 2.x (Salimans & Ho 2022 §4)."""
    sa, s1a = _coefficients(t, alphas_cumprod, x0)
    return sa * noise - s1a * x0


def eps_from_v(x_t, v, t, alphas_cumprod):
    """ε = √ᾱ_t v + √(1−ᾱ_t) x_t: turns a v-prediction model's output into the ε the samplers take."""
    a = float(alphas_cumprod[t])
    return a ** 0.5 * v + (1 - a) ** 0.5 * x_t


def sd_schedule():
    """ᾱ of SD v1.x: 1000 scaled-linear steps from β = 0.00085 to 0.012."""
    return alphas_cumprod(scaled_linear_betas())


# ----------------------------------------------------------------------------------------------------------------
# Samplers: one step each, stateless


def ddim_timesteps(steps, n_train=1000, offset=1):
    """τ_i = i·⌊n_train/steps⌋ + offset for i = steps−1 … 0: SD's "leading" spacing with steps_offset 1.

    With 50 steps: 981, 961, …, 21, 1. Each step goes from τ_i to τ_{i−1}; the last goes past 0 (t_prev = −1).
    """
    if not 1 <= steps <= n_train:
        raise ValueError(f"steps must be between 1 and {n_train}, got {steps}")
    stride = n_train // steps
    return [i * stride + offset for i in reversed(range(steps))]


def ddim_step(x_t, eps, t, t_prev, alphas_cumprod, eta=0.0, noise=None):
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12 with σ from eq. 16):

        x̂_0    = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t
        σ_t    = η · √((1−ᾱ_prev) / (1−ᾱ_t)) · √(1 − ᾱ_t/ᾱ_prev)
        x_prev = √ᾱ_prev x̂_0  +  √(1 − ᾱ_prev − σ_t²) ε  +  σ_t z,      z ~ N(0, I) = `noise`

    ᾱ_prev = ᾱ[t_prev], and ᾱ[0] past the last step (t_prev < 0): SD v1.x sets `set_alpha_to_one=False`.
    η = 0 is deterministic; η = 1 makes the step DDPM's ancestral one.
    """
    a_t = float(alphas_cumprod[t])
    a_prev = float(alphas_cumprod[t_prev if t_prev >= 0 else 0])
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs `noise`")
        x_prev = x_prev + sigma * noise
    return x_prev


def ddpm_step(x_t, eps, t, t_prev, alphas_cumprod, noise):
    """One ancestral DDPM step x_t -> x_{t_prev}, a sample of the posterior q(x_prev | x_t, x̂_0) (Ho et al. eq. 6-7):

        x̂_0    = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t                                        (eq. 15)
        α, β   = ᾱ_t/ᾱ_prev, 1 − α                          (the step's own α, β when steps are skipped)
        μ      = √ᾱ_prev β/(1−ᾱ_t) x̂_0  +  √α (1−ᾱ_prev)/(1−ᾱ_t) x_t
        σ²     = β̃ = (1−ᾱ_prev)/(1−ᾱ_t) β                                          ("fixed_small")
        x_prev = μ + σ z,      z ~ N(0, I) = `noise`

    ᾱ_prev = ᾱ[t_prev], and 1 past the last step (t_prev < 0), as diffusers' DDPMScheduler does.
    """
    a_t = float(alphas_cumprod[t])
    a_prev = float(alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
    alpha = a_t / a_prev
    beta = 1 - alpha
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    mean = a_prev ** 0.5 * beta / (1 - a_t) * x0 + alpha ** 0.5 * (1 - a_prev) / (1 - a_t) * x_t
    sigma = ((1 - a_prev) / (1 - a_t) * beta) ** 0.5
    return mean + sigma * noise


def euler_sigmas(timesteps, alphas_cumprod):
    """σ_t = √((1−ᾱ_t)/ᾱ_t) for each timestep, then σ = 0: the noise levels of Karras' σ parameterisation,
    where x = x_t/√ᾱ_t = x_0 + σ ε."""
    return [float(((1 - alphas_cumprod[t]) / alphas_cumprod[t]) ** 0.5) for t in timesteps] + [0.0]


def euler_step(x, eps, sigma, sigma_next):
    """One Euler step of the probability-flow ODE dx/dσ = (x − x̂_0)/σ = ε (Karras et al. Alg. 1, no churn):

        x_next = x + (σ_next − σ) ε

    The UNet sees the variance-preserving x_t = x/√(σ²+1), and the chain starts at x = z·√(σ_0²+1).
    """
    return x + (sigma_next - sigma) * eps


SAMPLERS = ("ddim", "ddpm", "euler")


def _per_image_noise(generators, shape, device):
    """(B, *shape) standard normal noise, row k drawn from generators[k] on the CPU (so any device gives the
    same numbers), exactly as diffusers' randn_tensor does with a list of generators."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(device)


@torch.inference_mode()
def denoise(unet, x, cond, uncond, alphas_cumprod, generators, *, steps=50, guidance=7.5, sampler="ddim",
            eta=0.0, prediction_type="epsilon", progress=False):
    """The reverse process for one batch: initial noise x (B,C,h,w) -> latents x_0 (B,C,h,w), float32.

    Classifier-free guidance (Ho & Salimans eq. 6) with one UNet call on the unconditional and conditional halves
    stacked along the batch:  ε̃ = ε(x_t, ∅) + s·(ε(x_t, c) − ε(x_t, ∅)),  s = `guidance`; s = 1 is plain
    conditional sampling and skips the unconditional half. (diffusers switches guidance off for every s <= 1;
    here s < 1 means what the formula says.) `cond` (B,T,D), `uncond` (1,T,D) or (B,T,D) or None when s = 1.
    `generators[k]` supplies image k's per-step noise (DDPM, DDIM with η > 0).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    n = x.shape[0]
    dtype = next(unet.parameters()).dtype
    timesteps = ddim_timesteps(steps, len(alphas_cumprod))
    t_prevs = timesteps[1:] + [-1]
    if guidance != 1.0:
        context = torch.cat([uncond.expand(n, -1, -1), cond]).to(dtype)  # (2B, T, D)
    else:
        context = cond.to(dtype)
    if sampler == "euler":
        sigmas = euler_sigmas(timesteps, alphas_cumprod)
        x = x * (sigmas[0] ** 2 + 1) ** 0.5
    x = x.float()
    for i, t in enumerate(tqdm(timesteps, desc="steps", leave=False, disable=not progress)):
        x_in = x / (sigmas[i] ** 2 + 1) ** 0.5 if sampler == "euler" else x
        # t is one int for the whole batch: the UNet embeds it once and broadcasts it
        if guidance != 1.0:
            out_uncond, out_cond = unet(torch.cat([x_in, x_in]).to(dtype), t, context).float().chunk(2)
            out = out_uncond + guidance * (out_cond - out_uncond)
        else:
            out = unet(x_in.to(dtype), t, context).float()
        eps = eps_from_v(x_in, out, t, alphas_cumprod) if prediction_type == "v_prediction" else out
        if sampler == "ddim":
            noise = _per_image_noise(generators, x.shape[1:], x.device) if eta > 0 else None
            x = ddim_step(x, eps, t, t_prevs[i], alphas_cumprod, eta, noise)
        elif sampler == "ddpm":
            x = ddpm_step(x, eps, t, t_prevs[i], alphas_cumprod, _per_image_noise(generators, x.shape[1:], x.device))
        else:
            x = euler_step(x, eps, sigmas[i], sigmas[i + 1])
    return x


# ----------------------------------------------------------------------------------------------------------------
# Models, text, decoding


@dataclass
class Models:
    """Everything `generate` needs: the three networks, the tokenizer, and the schedule they were trained with."""
    unet: UNet
    vae: VAE
    text_encoder: CLIPTextModel
    tokenizer: Tokenizer
    vae_config: VAEConfig
    alphas_cumprod: torch.Tensor = field(default_factory=sd_schedule)
    prediction_type: str = "epsilon"  # "v_prediction" for SD 2.x-v checkpoints


def read_schedule(path):
    """(ᾱ, prediction_type) from a diffusers folder's scheduler/scheduler_config.json (its trained_betas, or its
    named schedule); SD v1.x's otherwise.

    The sampler's own settings stay SD v1.x's whatever the file says: "leading" spacing, steps_offset 1, and
    ᾱ[0] past the last DDIM step (set_alpha_to_one false)."""
    config = Path(path) / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return sd_schedule(), "epsilon"
    c = json.loads(config.read_text())
    n, kind = c.get("num_train_timesteps", 1000), c.get("beta_schedule", "scaled_linear")
    if c.get("trained_betas") is not None:  # listed betas win over the named schedule, as in diffusers
        betas = torch.tensor(c["trained_betas"], dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = scaled_linear_betas(n, c.get("beta_start", 0.00085), c.get("beta_end", 0.012))
    elif kind == "linear":
        betas = linear_betas(n, c.get("beta_start", 0.0001), c.get("beta_end", 0.02))
    else:
        raise ValueError(f"{config}: beta_schedule {kind!r} is not supported (scaled_linear, linear)")
    prediction_type = c.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"{config}: prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")
    return alphas_cumprod(betas), prediction_type


def load_models(path, device="cpu", dtype=torch.float32):
    """UNet, VAE, text encoder and tokenizer from a diffusers SD folder or a single-file checkpoint, in eval mode;
    or from a train.py run directory: its base model plus the trained weights (LoRA merged), see train.load_run."""
    if (Path(path) / "run.json").is_file():
        import train  # here, not at the top: train.py imports this file
        return train.load_run(path, device, dtype).models
    vae = load_vae(path, dtype).to(device)
    schedule, prediction_type = read_schedule(path)
    return Models(unet=load_unet(path, dtype).to(device), vae=vae,
                  text_encoder=load_text_encoder(path, dtype).to(device), tokenizer=load_tokenizer(path),
                  vae_config=vae.config, alphas_cumprod=schedule, prediction_type=prediction_type)


@torch.inference_mode()
def encode_text(models, texts):
    """CLIP's last hidden state (B, 77, D) for a list of texts: SD v1's conditioning."""
    device = next(models.text_encoder.parameters()).device
    return models.text_encoder(models.tokenizer(texts).to(device))


@torch.inference_mode()
def decode_latents(models, z):
    """Latents (B,4,h,w) -> images (B,3,H,W) roughly in [-1, 1], float32; undoes the UNet-side scaling first.

    One image at a time: the decoder's full-resolution activations then do not grow with the batch, and a batch of
    one is a shape every batch size shares (oneDNN convolutions take another path for one image than for four,
    which moves the last bit)."""
    vae_dtype = next(models.vae.parameters()).dtype
    z = (z / models.vae_config.scaling_factor).to(vae_dtype)
    return torch.cat([models.vae.decode(z[k:k + 1]).float() for k in range(len(z))])


def to_uint8(images):
    """(B,3,H,W) in [-1, 1] -> uint8 (B,H,W,3) on the CPU, rounded as diffusers' numpy_to_pil does."""
    return ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def _check_settings(prompts, seeds, steps, guidance, height, width, sampler, eta, batch_size):
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) < 1 or len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt and at least one prompt, got {len(prompts)} prompts, "
                         f"{len(seeds)} seeds")
    if height <= 0 or width <= 0 or height % 8 or width % 8:
        raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")
    if not 1 <= steps <= 1000:
        raise ValueError(f"steps must be between 1 and 1000, got {steps}")
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a number >= 0, got {eta}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _latent_shape(models, height, width):
    f = models.vae_config.downsample_factor  # 8 for SD
    side = f * 2 ** (len(models.unet.config.channel_mult) - 1)  # the UNet halves the latents once per level but one
    if height % side or width % side:
        raise ValueError(f"height and width must be multiples of {side} for this model, got {height}x{width}")
    return models.vae_config.z_channels, height // f, width // f


def sample_latents(models, prompts, seeds, *, negative_prompt="", steps=50, guidance=7.5, height=512, width=512,
                   sampler="ddim", eta=0.0, progress=False, embeddings=None):
    """One batch, text to final latents (B, 4, H/8, W/8) float32: encode the texts, draw image k's initial noise
    from a generator seeded with seeds[k] (which then gives its later noise too), run `denoise`.

    `embeddings` ({text: (77, D)}) is a cache shared across batches, so each distinct text is encoded once.
    """
    _check_settings(prompts, seeds, steps, guidance, height, width, sampler, eta, len(prompts))
    latent_shape = _latent_shape(models, height, width)
    device = next(models.unet.parameters()).device
    embeddings = {} if embeddings is None else embeddings
    new = [t for t in dict.fromkeys(prompts + [negative_prompt] * (guidance != 1.0)) if t not in embeddings]
    for text in new:  # one at a time, so that a text's embedding does not depend on which texts came with it
        embeddings[text] = encode_text(models, [text])[0]
    cond = torch.stack([embeddings[p] for p in prompts])  # (B, 77, D)
    uncond = embeddings[negative_prompt][None] if guidance != 1.0 else None  # (1, 77, D)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = _per_image_noise(generators, latent_shape, device)
    return denoise(models.unet, x, cond, uncond, models.alphas_cumprod, generators, steps=steps, guidance=guidance,
                   sampler=sampler, eta=eta, prediction_type=models.prediction_type, progress=progress)


def generate_batches(models, prompts, seeds, *, negative_prompt="", steps=50, guidance=7.5, height=512, width=512,
                     sampler="ddim", eta=0.0, batch_size=8, progress=True):
    """Yield (index of the first image, uint8 images (B,H,W,3)) batch by batch: `generate` without holding every
    image at once (an evaluation run writes thousands)."""
    _check_settings(prompts, seeds, steps, guidance, height, width, sampler, eta, batch_size)
    _latent_shape(models, height, width)
    embeddings = {}
    with tqdm(total=len(prompts), desc="images", unit="img", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = slice(start, start + batch_size)
            z = sample_latents(models, prompts[batch], seeds[batch], negative_prompt=negative_prompt, steps=steps,
                               guidance=guidance, height=height, width=width, sampler=sampler, eta=eta,
                               progress=progress, embeddings=embeddings)
            images = to_uint8(decode_latents(models, z))
            bar.update(len(images))
            yield start, images


def generate(models, prompts, seeds, *, negative_prompt="", steps=50, guidance=7.5, height=512, width=512,
             sampler="ddim", eta=0.0, batch_size=8, progress=True):
    """uint8 images (N, H, W, 3), image k from (prompts[k], seeds[k]) alone.

    Its noise is the same whatever the batch size, and so are its pixels, bit for bit, wherever the kernels round
    each image's numbers the same way for every batch shape: tested on CPU for a tiny model at 2 threads and batch
    sizes 1, 3 and 4. Texts are encoded one by one, the timestep is embedded once per step and the VAE decodes one
    image at a time to get there (the UNet's feed-forwards, which split large batches on CPU, split them between
    whole images). Not guaranteed beyond that: at SD v1.5 size, multithreaded CPU GEMMs of a few hundred rows round
    differently for 2 and 8 rows (~1e-7 in ε̂ per step, measured), and GPU libraries choose kernels by shape; a
    pixel can then move by one level. On CPU, runs at one batch size are bit-identical."""
    return torch.cat([images for _, images in generate_batches(
        models, prompts, seeds, negative_prompt=negative_prompt, steps=steps, guidance=guidance, height=height,
        width=width, sampler=sampler, eta=eta, batch_size=batch_size, progress=progress)])


# ----------------------------------------------------------------------------------------------------------------
# CLI

GRID_MAX = 64  # grid.png shows at most the first 64 images: an evaluation run of thousands would not fit in memory
OUTPUT_NAME = re.compile(r"^\d+\.png$|^grid\.png$|^samples\.json$")  # what a previous run here wrote


def parse_args(argv=None):
    """Parse and check every argument, before any weights load; argparse errors exit with status 2."""
    p = argparse.ArgumentParser(description="Generate images from a Stable Diffusion v1.x checkpoint.")
    p.add_argument("--model", required=True, help="diffusers SD folder or single-file .safetensors/.ckpt")
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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # Half-precision weights run as they are, without autocast (as diffusers' fp16 pipelines do; group norms stay
    # float32): autocast cost ~10% per UNet call on an H200 (README, Speed and memory).
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="precision of the weights and the computation on CUDA (default float16); the CPU runs "
                        "float32")
    args = p.parse_args(argv)

    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 1 <= args.steps <= 1000:
        p.error(f"--steps must be between 1 and 1000, got {args.steps}")
    if not math.isfinite(args.guidance):
        p.error(f"--guidance must be a finite number, got {args.guidance}")
    if not (math.isfinite(args.eta) and args.eta >= 0):
        p.error(f"--eta must be a number >= 0, got {args.eta}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v <= 0 or v % 8:
            p.error(f"--{name} must be a positive multiple of 8 (the VAE's downsampling factor), got {v}")
    if not Path(args.model).exists():
        p.error(f"--model {args.model} does not exist (expected a diffusers SD folder or a single checkpoint file)")
    if args.prompts is not None:
        path = Path(args.prompts)
        if not path.is_file():
            p.error(f"--prompts {path} is not a file")
        args.prompt_list = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not args.prompt_list:
            p.error(f"--prompts {path} has no prompts")
    else:
        args.prompt_list = [args.prompt]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        p.error(f"--out {out} exists and is not empty; pass --overwrite to replace its images")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but no CUDA device is available")
    if args.dtype is None:
        args.dtype = "float16" if args.device.type == "cuda" else "float32"
    if args.device.type == "cpu" and args.dtype != "float32":
        p.error(f"--dtype {args.dtype} is for CUDA; the CPU runs float32")
    return args


def make_grid(images):
    """uint8 (N,H,W,3) -> one PIL image, ⌈√N⌉ columns."""
    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = Image.new("RGB", (cols * w, rows * h))
    for k in range(n):
        grid.paste(Image.fromarray(images[k].numpy()), ((k % cols) * w, (k // cols) * h))
    return grid


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None):
    args = parse_args(argv)
    prompts = [p for p in args.prompt_list for _ in range(args.n)]  # prompt-major: n images of each prompt
    seeds = [args.seed + k for k in range(len(prompts))]
    out = Path(args.out)
    started = time.time()
    try:
        models = load_models(args.model, args.device, getattr(torch, args.dtype))
    except (FileNotFoundError, ValueError) as e:  # ValueError covers weights.CheckpointError
        sys.exit(f"error: cannot load --model {args.model}: {e}")

    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # only reached with --overwrite or an empty folder: drop the previous run's outputs
        if old.is_file() and OUTPUT_NAME.match(old.name):
            old.unlink()
    digits = max(5, len(str(len(prompts) - 1)))
    files = [f"{k:0{digits}d}.png" for k in range(len(prompts))]
    record = {
        "model": str(Path(args.model).resolve()), "prompts": prompts, "seeds": seeds, "files": files,
        "negative_prompt": args.negative_prompt, "sampler": args.sampler, "eta": args.eta, "steps": args.steps,
        "guidance": args.guidance, "height": args.height, "width": args.width, "batch_size": args.batch_size,
        "device": str(args.device), "dtype": args.dtype, "prediction_type": models.prediction_type,
        "command": [sys.executable] + sys.argv if argv is None else ["sample.py"] + list(argv),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "pillow": PIL.__version__, "git_commit": _git_commit()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "grid": files[:GRID_MAX],
    }
    grid_images = []
    for start, images in generate_batches(models, prompts, seeds, negative_prompt=args.negative_prompt,
                                          steps=args.steps, guidance=args.guidance, height=args.height,
                                          width=args.width, sampler=args.sampler, eta=args.eta,
                                          batch_size=args.batch_size):
        for k, image in enumerate(images, start):
            Image.fromarray(image.numpy()).save(out / files[k])
            if k < GRID_MAX:
                grid_images.append(image)
    make_grid(torch.stack(grid_images)).save(out / "grid.png")
    record["seconds"] = round(time.time() - started, 3)
    (out / "samples.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {len(files)} images, grid.png and samples.json to {out}")


if __name__ == "__main__":
    main()

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
import dataclasses
import json
import math
import os
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

import checkpoints
import lora
import weights
from clip_text import WEIGHT_NAMES as TEXT_ENCODER_FILES
from clip_text import (CLIPTextConfig, CLIPTextModel, Tokenizer, load_text_encoder, load_tokenizer,
                       text_encoder_config_from_hf)
from data import derive_seed, text_lines
from ddm import Indicator, make_indicator, parse_target, uses_indicator
from unet import WEIGHT_NAMES as UNET_FILES
from unet import UNet, UNetConfig, load_unet, unet_config_from_diffusers
from vae import WEIGHT_NAMES as VAE_FILES
from vae import VAE, VAEConfig, load_vae, vae_config_from_diffusers

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


# Classifier-free guidance is used at 1 to 20 (SD's default 7.5), and images burn out well before 100; past that a
# value is a typo (75 for 7.5 stays allowed), and 1e30 makes every latent inf: a black image, not an experiment.
GUIDANCE_MAX = 100


class NonFiniteError(FloatingPointError):
    """An image whose latents or pixels became NaN or infinite (NaN weights, an overflow): saved, it would be an
    all-black PNG. `image` counts from the first image of the call; `where` says at which step or stage."""

    def __init__(self, image, where):
        super().__init__(f"image {image}: NaN or infinite values {where}")
        self.image, self.where = image, where


def _check_finite(x, where):
    """NonFiniteError for the first image (row of x) holding a NaN or an infinity."""
    bad = ~torch.isfinite(x.flatten(1)).all(1)
    if bad.any():
        raise NonFiniteError(int(bad.nonzero()[0, 0]), where)


def _per_image_noise(generators, shape, device):
    """(B, *shape) standard normal noise, row k drawn from generators[k] on the CPU (so any device gives the
    same numbers), exactly as diffusers' randn_tensor does with a list of generators."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(device)


def indicator_gradient(indicator, x, t, groups):
    """∇_x log p(g | x, t) (B, C, h, w) for each image's target group g, through a noise-aware indicator only."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().float().requires_grad_(True)
        log_p = indicator(x, t).float().log_softmax(1)
        return torch.autograd.grad(log_p[torch.arange(len(x)), groups].sum(), x)[0]


@torch.inference_mode()
def denoise(unet, x, cond, uncond, alphas_cumprod, generators, *, steps=50, guidance=7.5, sampler="ddim",
            eta=0.0, prediction_type="epsilon", progress=False, guide=None):
    """The reverse process for one batch: initial noise x (B,C,h,w) -> latents x_0 (B,C,h,w), float32.

    Classifier-free guidance (Ho & Salimans eq. 6) with one UNet call on the unconditional and conditional halves
    stacked along the batch:  ε̃ = ε(x_t, ∅) + s·(ε(x_t, c) − ε(x_t, ∅)),  s = `guidance`; s = 1 is plain
    conditional sampling and skips the unconditional half. (diffusers switches guidance off for every s <= 1;
    here s < 1 means what the formula says.) `cond` (B,T,D), `uncond` (1,T,D) or (B,T,D) or None when s = 1.
    `generators[k]` supplies image k's per-step noise (DDPM, DDIM with η > 0).

    Indicator guidance (ours; classifier guidance, Dhariwal & Nichol 2021 eq. 14, toward a target group per image):
    with guide = (indicator, target groups (B,), scale S),  ε̃ = ε̃ − S·√(1−ᾱ_t)·∇_{x_t} log p(g | x_t, t).
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
    finite = []  # per step, (B,) on the device: read once at the end, as reading it every step would sync a GPU
    for i, t in enumerate(tqdm(timesteps, desc="steps", leave=False, disable=not progress)):
        x_in = x / (sigmas[i] ** 2 + 1) ** 0.5 if sampler == "euler" else x
        # t is one int for the whole batch: the UNet embeds it once and broadcasts it
        if guidance != 1.0:
            out_uncond, out_cond = unet(torch.cat([x_in, x_in]).to(dtype), t, context).float().chunk(2)
            out = out_uncond + guidance * (out_cond - out_uncond)
        else:
            out = unet(x_in.to(dtype), t, context).float()
        eps = eps_from_v(x_in, out, t, alphas_cumprod) if prediction_type == "v_prediction" else out
        if guide is not None and guide[2] > 0:
            indicator, groups, scale = guide
            eps = eps - scale * float(1 - alphas_cumprod[t]) ** 0.5 * indicator_gradient(indicator, x_in, t, groups)
        if sampler == "ddim":
            noise = _per_image_noise(generators, x.shape[1:], x.device) if eta > 0 else None
            x = ddim_step(x, eps, t, t_prevs[i], alphas_cumprod, eta, noise)
        elif sampler == "ddpm":
            x = ddpm_step(x, eps, t, t_prevs[i], alphas_cumprod, _per_image_noise(generators, x.shape[1:], x.device))
        else:
            x = euler_step(x, eps, sigmas[i], sigmas[i + 1])
        finite.append(torch.isfinite(x.flatten(1)).all(1))
    bad = (~torch.stack(finite)).nonzero()  # (step, image) pairs, the earliest step first
    if len(bad):
        step, image = bad[0].tolist()
        raise NonFiniteError(image, f"in the latents after step {step + 1} of {steps} (t={timesteps[step]})")
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

    def __post_init__(self):
        # texts are padded to the positions the text encoder has: 77 in every SD, fewer in a tiny model (reproduce.py)
        self.tokenizer.max_length = self.text_encoder.config.max_position


def read_schedule(path):
    """(ᾱ, prediction_type) from a diffusers folder's scheduler/scheduler_config.json (its trained_betas, or its
    named schedule); SD v1.x's otherwise.

    The sampler's own settings stay SD v1.x's whatever the file says: "leading" spacing, steps_offset 1, and
    ᾱ[0] past the last DDIM step (set_alpha_to_one false)."""
    config = Path(path) / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return sd_schedule(), "epsilon"
    return weights.read_config(config, _schedule_from_config)


def _schedule_from_config(c):
    n = weights.config_value(c, "num_train_timesteps", "int", 1000)
    kind = weights.config_value(c, "beta_schedule", "str", "scaled_linear")
    if c.get("trained_betas") is not None:  # listed betas win over the named schedule, as in diffusers
        betas = torch.tensor(c["trained_betas"], dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = scaled_linear_betas(n, weights.config_value(c, "beta_start", "number", 0.00085),
                                    weights.config_value(c, "beta_end", "number", 0.012))
    elif kind == "linear":
        betas = linear_betas(n, weights.config_value(c, "beta_start", "number", 0.0001),
                             weights.config_value(c, "beta_end", "number", 0.02))
    else:
        raise ValueError(f"beta_schedule {kind!r} is not supported (scaled_linear, linear)")
    prediction_type = weights.config_value(c, "prediction_type", "str", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")
    return alphas_cumprod(betas), prediction_type


def size_multiple(path):
    """What image sides must be a multiple of for the model at `path` (a diffusers folder, a single file or a
    train.py run directory): the VAE's downsampling times the UNet's, 64 for SD v1.x. Read from the config files
    alone, all of them checked (UNet, VAE, text encoder, scheduler), so a broken one costs no weight loading."""
    path = Path(path)
    if (path / "run.json").is_file():
        info = weights.read_json(path / "run.json")
        if not isinstance(info.get("base"), str):
            raise weights.CheckpointError(f"{path / 'run.json'}: field 'base' must be a string")
        return size_multiple(checkpoints.base_path(path, info))
    _, unet_config = weights.find_component(path, subfolder="unet", weight_names=UNET_FILES)
    if unet_config is None:  # a single file: SD v1.x or v2.x
        u, v = UNetConfig(), VAEConfig()
    else:
        u = weights.read_config(unet_config, unet_config_from_diffusers)
        v = weights.read_config(weights.find_component(path, subfolder="vae", weight_names=VAE_FILES)[1],
                                vae_config_from_diffusers)
        weights.read_config(weights.find_component(path, subfolder="text_encoder", weight_names=TEXT_ENCODER_FILES)[1],
                            text_encoder_config_from_hf)
        read_schedule(path)
    return side_multiple(u, v)


def side_multiple(unet_config, vae_config):
    """What image sides must be a multiple of: the VAE's downsampling, then one halving per UNet level but one."""
    return vae_config.downsample_factor * 2 ** (len(unet_config.channel_mult) - 1)


def load_models(path, device="cpu", dtype=torch.float32):
    """UNet, VAE, text encoder and tokenizer from a diffusers SD folder or a single-file checkpoint, in eval mode;
    or from a train.py run directory: its base model plus the trained weights, LoRA merged (`load_run`)."""
    if (Path(path) / "run.json").is_file():
        return load_run(path, device, dtype).models
    vae = load_vae(path, dtype).to(device)
    schedule, prediction_type = read_schedule(path)
    return Models(unet=load_unet(path, dtype).to(device), vae=vae,
                  text_encoder=load_text_encoder(path, dtype).to(device), tokenizer=load_tokenizer(path),
                  vae_config=vae.config, alphas_cumprod=schedule, prediction_type=prediction_type)


@dataclass
class Run:
    """A trained run: `models` (LoRA merged unless asked not to), its indicator and groups (checkpoints.py)."""
    models: Models
    indicator: Indicator  # None when the run's objective has none (ddm.uses_indicator)
    group_names: list
    step: int
    info: dict  # run.json


def load_run(run_dir, device="cpu", dtype=torch.float32, merge=True):
    """The models of a run directory's latest checkpoint: its base model plus the trained weights."""
    run_dir = Path(run_dir)
    info = checkpoints.read_run_json(run_dir)
    config = info["config"]
    ckpt = checkpoints.newest_checkpoint(run_dir, checkpoints.checkpoint_files(config))  # passes over broken ones
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} holds no finished checkpoint yet")
    models = load_models(checkpoints.base_path(run_dir, info))
    checkpoints.setup_trainable(models, config["lora_rank"], config["lora_alpha"], config["train_text_encoder"])
    indicator = None
    if uses_indicator(config.get("objective", "ddm"), config["w_ind"]):
        indicator = make_indicator(config.get("objective", "ddm"), info["latent_shape"], len(config["group_names"]),
                                   config["indicator_hidden"])
    checkpoints.load_checkpoint_weights(ckpt, models.unet, models.text_encoder, indicator, config)
    for m in (models.unet, models.text_encoder, indicator):
        if m is not None:
            if merge:
                lora.merge_lora(m)
            m.requires_grad_(False).to(device, dtype).eval()
    models.vae.to(device, dtype)
    return Run(models, indicator, config["group_names"], ckpt["step"], info)


def read_init_config(path):
    """(the file's JSON dict, {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig or None})."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--init-config {path}: cannot read it as JSON ({e})") from None
    out = {}
    for key, cls in (("unet", UNetConfig), ("vae", VAEConfig), ("text_encoder", CLIPTextConfig)):
        fields = raw.get(key)
        unknown = sorted(set(fields or ()) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"--init-config {path}: {key} has unknown fields {unknown}")
        out[key] = None if fields is None else cls(**{k: tuple(v) if isinstance(v, list) else v
                                                      for k, v in fields.items()})
    return raw, out


def models_from_config(init_config, vae_path=None, seed=0):
    """Randomly initialised UNet / text encoder (and VAE unless `vae_path`), seeded, CLIP's tokenizer."""
    _, cfgs = read_init_config(init_config)
    if vae_path and cfgs["vae"] is not None:
        raise ValueError(f"--init-config {init_config} has a 'vae' config and --vae {vae_path} was given: "
                         "choose one")
    for key in ("unet", "text_encoder") + (() if vae_path else ("vae",)):
        if cfgs[key] is None:
            raise ValueError(f"--init-config {init_config}: missing the '{key}' config"
                             + (" (or pass --vae PATH)" if key == "vae" else ""))
    with torch.random.fork_rng(devices=[]):  # seeds the init without touching the caller's global RNG
        torch.manual_seed(seed)
        unet, text_encoder = UNet(cfgs["unet"]), CLIPTextModel(cfgs["text_encoder"])
        vae = load_vae(vae_path) if vae_path else VAE(cfgs["vae"])
    return Models(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=Tokenizer.default(),
                         vae_config=vae.config)


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
    if not -GUIDANCE_MAX <= guidance <= GUIDANCE_MAX:
        raise ValueError(f"guidance must lie between -{GUIDANCE_MAX} and {GUIDANCE_MAX}, got {guidance}")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 64]
    if bad:
        raise ValueError(f"seeds must be integers in 0..2**64-1 (torch.Generator's range), got {bad[0]!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a number >= 0, got {eta}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def latent_shape(models, height, width):
    """(C, h, w) of the latents for images of height x width; ValueError when the models do not fit each other or
    the size."""
    u, v, c = models.unet.config, models.vae_config, models.text_encoder.config
    if u.context_dim != c.width:
        raise ValueError(f"UNet context_dim {u.context_dim} != text encoder width {c.width}")
    if u.in_channels != v.z_channels or u.out_channels != v.z_channels:
        raise ValueError(f"UNet in/out channels {u.in_channels}/{u.out_channels} != VAE z_channels {v.z_channels}")
    f, side = v.downsample_factor, side_multiple(u, v)  # 8 and 64 for SD
    if height % side or width % side:
        raise ValueError(f"height and width must be multiples of {side} for this model, got {height}x{width}")
    return v.z_channels, height // f, width // f


def sample_latents(models, prompts, seeds, *, negative_prompt="", steps=50, guidance=7.5, height=512, width=512,
                   sampler="ddim", eta=0.0, progress=False, embeddings=None, guide=None):
    """One batch, text to final latents (B, 4, H/8, W/8) float32: encode the texts, draw image k's initial noise
    from a generator seeded with seeds[k] (which then gives its later noise too), run `denoise`.

    `embeddings` ({text: (77, D)}) is a cache shared across batches, so each distinct text is encoded once.
    `guide` = (indicator, target group of each image, scale): indicator guidance, see `denoise`.
    """
    _check_settings(prompts, seeds, steps, guidance, height, width, sampler, eta, len(prompts))
    shape = latent_shape(models, height, width)
    device = next(models.unet.parameters()).device
    embeddings = {} if embeddings is None else embeddings
    new = [t for t in dict.fromkeys(prompts + [negative_prompt] * (guidance != 1.0)) if t not in embeddings]
    if new:
        embeddings.update(zip(new, encode_text(models, new)))
    cond = torch.stack([embeddings[p] for p in prompts])  # (B, 77, D)
    uncond = embeddings[negative_prompt][None] if guidance != 1.0 else None  # (1, 77, D)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = _per_image_noise(generators, shape, device)
    return denoise(models.unet, x, cond, uncond, models.alphas_cumprod, generators, steps=steps, guidance=guidance,
                   sampler=sampler, eta=eta, prediction_type=models.prediction_type, progress=progress,
                   guide=None if guide is None else (guide[0], torch.as_tensor(guide[1], device=device), guide[2]))


def generate_batches(models, prompts, seeds, *, negative_prompt="", steps=50, guidance=7.5, height=512, width=512,
                     sampler="ddim", eta=0.0, batch_size=8, progress=True, guide=None):
    """Yield (index of the first image, uint8 images (B,H,W,3)) batch by batch: `generate` without holding every
    image at once (an evaluation run writes thousands)."""
    _check_settings(prompts, seeds, steps, guidance, height, width, sampler, eta, batch_size)
    latent_shape(models, height, width)
    embeddings = {}
    with tqdm(total=len(prompts), desc="images", unit="img", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = slice(start, start + batch_size)
            try:
                z = sample_latents(models, prompts[batch], seeds[batch], negative_prompt=negative_prompt,
                                   steps=steps, guidance=guidance, height=height, width=width, sampler=sampler,
                                   eta=eta, progress=progress, embeddings=embeddings,
                                   guide=None if guide is None else (guide[0], guide[1][batch], guide[2]))
                images = decode_latents(models, z)
                _check_finite(images, "in the decoded pixels")
            except NonFiniteError as e:
                raise NonFiniteError(start + e.image, e.where) from None
            images = to_uint8(images)
            bar.update(len(images))
            yield start, images


def generate(models, prompts, seeds, *, negative_prompt="", steps=50, guidance=7.5, height=512, width=512,
             sampler="ddim", eta=0.0, batch_size=8, progress=True, guide=None):
    """uint8 images (N, H, W, 3), image k from (prompts[k], seeds[k]) alone.

    Image k's noise comes from its own generator, so it is the same at any batch size; its pixels then agree within
    one level (kernels round a batch of 2 and of 8 differently in the last bit, and a pixel can cross a rounding
    edge). Runs at one batch size on one machine are bit-identical on CPU."""
    return torch.cat([images for _, images in generate_batches(
        models, prompts, seeds, negative_prompt=negative_prompt, steps=steps, guidance=guidance, height=height,
        width=width, sampler=sampler, eta=eta, batch_size=batch_size, progress=progress, guide=guide)])


def draw_targets(seeds, shares):
    """Image k's target group for indicator guidance: a draw from `shares` (K,) with its own seed, so it does not
    depend on the other images (and leaves image k's noise stream alone)."""
    return [torch.multinomial(shares.double(), 1, generator=torch.Generator().manual_seed(derive_seed(s, "target")))
            .item() for s in seeds]


def load_indicator(path, latent_shape):
    """(noise-aware indicator, group names) from a train.py run directory, or from an indicator.safetensors file
    (then the groups are named 0..K-1 and the widths are read off the tensors)."""
    path = Path(path)
    if path.is_dir():
        run = load_run(path)
        indicator, names = run.indicator, [str(g) for g in run.group_names]
        if indicator is None:
            raise ValueError(f"--indicator {path}: this run trained no indicator (objective "
                             f"{run.info['config'].get('objective', 'ddm')}, w_ind {run.info['config']['w_ind']})")
    else:
        sd = weights.read_state_dict(path)
        linears = sorted((int(k.split(".")[1]), v) for k, v in sd.items() if k.endswith(".weight"))
        if not linears or any(not k.startswith("net.") for k in sd):
            raise ValueError(f"--indicator {path}: not an indicator.safetensors (tensors {sorted(sd)[:4]})")
        widths = [w.shape[0] for _, w in linears]
        time_dim = linears[0][1].shape[1] - math.prod(latent_shape)
        indicator = Indicator(latent_shape, widths[-1], widths[:-1], max(time_dim, 0))
        weights.load_strict(indicator, sd, f"indicator from {path}")
        names = [str(k) for k in range(widths[-1])]
    if indicator.timestep_dim == 0:
        raise ValueError(f"--indicator {path}: this indicator reads eps_hat, not (z_t, t); guidance needs a "
                         "noise-aware one (train.py --objective plain-indicator or indicator-weighted)")
    return indicator.float().eval(), names


# ----------------------------------------------------------------------------------------------------------------
# CLI

GRID_MAX = 64  # grid.png shows at most the first 64 images: an evaluation run of thousands would not fit in memory
IMAGE_NAME = re.compile(r"[0-9]+\.png")  # the images a run writes, beside grid.png and samples.json


def device_arg(spec):
    """argparse type of --device (here and in evaluate.py): a torch.device that this machine has."""
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda asked for, but no CUDA device is available")
    return device


def build_parser():
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
    g = p.add_argument_group("indicator guidance (ours): steer each image toward a target group")
    g.add_argument("--indicator", metavar="RUN_OR_FILE",
                   help="a train.py run with a noise-aware indicator (--objective plain-indicator or "
                        "indicator-weighted), or its indicator.safetensors")
    g.add_argument("--indicator-guidance", type=float, default=0.0, metavar="S", help="guidance scale (0: off)")
    g.add_argument("--target", default="uniform", help="group shares the targets are drawn from: uniform or "
                                                       "NAME=SHARE,...")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    # Half-precision weights run as they are, without autocast (as diffusers' fp16 pipelines do; group norms stay
    # float32): autocast cost ~10% per UNet call on an H200 (README, Speed and memory).
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="precision of the weights and the computation on CUDA (default float16); the CPU runs "
                        "float32")
    return p


def parse_args(argv=None):
    """Parse and check every argument, the model's config files included, before any weights load and before
    anything is written or deleted; errors exit with status 2."""
    p = build_parser()
    args = p.parse_args(argv)

    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 1 <= args.steps <= 1000:
        p.error(f"--steps must be between 1 and 1000, got {args.steps}")
    if not math.isfinite(args.guidance):
        p.error(f"--guidance must be a finite number, got {args.guidance}")
    if not -GUIDANCE_MAX <= args.guidance <= GUIDANCE_MAX:
        p.error(f"--guidance must lie between -{GUIDANCE_MAX} and {GUIDANCE_MAX} (1 to 20 is usual), "
                f"got {args.guidance}")
    if not (math.isfinite(args.eta) and args.eta >= 0):
        p.error(f"--eta must be a number >= 0, got {args.eta}")
    if not (math.isfinite(args.indicator_guidance) and args.indicator_guidance >= 0):
        p.error(f"--indicator-guidance must be a number >= 0, got {args.indicator_guidance}")
    if args.indicator_guidance > 0 and not args.indicator:
        p.error("--indicator-guidance needs --indicator RUN_OR_FILE")
    if args.indicator and not Path(args.indicator).exists():
        p.error(f"--indicator {args.indicator} does not exist")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v <= 0 or v % 8:
            p.error(f"--{name} must be a positive multiple of 8 (the VAE's downsampling factor), got {v}")
    if not Path(args.model).exists():
        p.error(f"--model {args.model} does not exist (expected a diffusers SD folder or a single checkpoint file)")
    try:
        args.prompt_list = [args.prompt] if args.prompts is None else read_prompts(args.prompts)
    except ValueError as e:
        p.error(f"--prompts {e}")
    count = len(args.prompt_list) * args.n
    if not 0 <= args.seed <= 2 ** 64 - count:  # torch.Generator takes 64-bit seeds; image k uses seed + k
        p.error(f"--seed must lie in 0..2**64-{count}" + (f" for {count} images" if count > 1 else "")
                + f", got {args.seed}")
    digits = max(5, len(str(count - 1)))
    args.files = [f"{k:0{digits}d}.png" for k in range(count)]
    try:
        args.previous_outputs = previous_outputs(Path(args.out), args.overwrite, args.files)
    except (OSError, ValueError) as e:
        p.error(f"--out {args.out}: {e}")
    if args.dtype is None:
        args.dtype = "float16" if args.device.type == "cuda" else "float32"
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


def save_pngs(images, folder, names=None):
    """uint8 images (N,H,W,3) as PNG files in `folder` (created), named 00.png, 01.png, ... unless `names`."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image.numpy()).save(folder / (names[k] if names else f"{k:02d}.png"))


def read_prompts(path):
    """The non-blank lines of a prompts file, stripped; ValueError naming the file and line otherwise."""
    path = Path(path)
    if not path.is_file():
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
    for name in files + ["grid.png", "samples.json"]:
        if (out / name).exists() and name not in listed:
            raise ValueError(f"{out / name} would be overwritten, and no samples.json of a previous run here lists "
                             f"it; move it away")
    return listed


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
    args = parse_args(argv)  # every argument checked; nothing touched yet
    prompts = [p for p in args.prompt_list for _ in range(args.n)]  # prompt-major: n images of each prompt
    seeds = [args.seed + k for k in range(len(prompts))]
    out, files = Path(args.out), args.files
    started = time.time()
    try:
        models = load_models(args.model, args.device, getattr(torch, args.dtype))
    except (OSError, ValueError) as e:  # ValueError covers weights.CheckpointError
        sys.exit(f"error: cannot load --model {args.model}: {e}")
    guide, targets = None, None
    if args.indicator:
        try:
            indicator, names = load_indicator(args.indicator, latent_shape(models, args.height, args.width))
            targets = draw_targets(seeds, parse_target(args.target, names))
        except (OSError, ValueError) as e:
            sys.exit(f"error: {e}")
        guide = (indicator.to(args.device), targets, args.indicator_guidance)
        targets = [names[g] for g in targets]
    record = {
        "model": str(Path(args.model).resolve()), "prompts": prompts, "seeds": seeds, "files": files,
        "negative_prompt": args.negative_prompt, "sampler": args.sampler, "eta": args.eta, "steps": args.steps,
        "guidance": args.guidance, "height": args.height, "width": args.width, "batch_size": args.batch_size,
        "device": str(args.device), "dtype": args.dtype, "prediction_type": models.prediction_type,
        "command": [sys.executable] + sys.argv if argv is None else ["sample.py"] + list(argv),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "pillow": PIL.__version__, "git_commit": _git_commit()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "grid": files[:GRID_MAX], "finished": False,
        "indicator": args.indicator and str(Path(args.indicator).resolve()),
        "indicator_guidance": args.indicator_guidance, "target": args.target, "target_groups": targets,
    }
    written = 0
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in args.previous_outputs:  # only what the previous run's samples.json lists
            (out / name).unlink(missing_ok=True)
        # written first, so that a run stopped half-way still lists its images for the next --overwrite
        (out / "samples.json").write_text(json.dumps(record, indent=2) + "\n")
        grid_images = []
        for start, images in generate_batches(models, prompts, seeds, negative_prompt=args.negative_prompt,
                                              steps=args.steps, guidance=args.guidance, height=args.height,
                                              width=args.width, sampler=args.sampler, eta=args.eta,
                                              batch_size=args.batch_size, guide=guide):
            for k, image in enumerate(images, start):
                Image.fromarray(image.numpy()).save(out / files[k])
                written += 1
                if k < GRID_MAX:
                    grid_images.append(image)
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

"""The diffusion process of Stable Diffusion v1.x: noise schedule, training targets, samplers, guidance.

  DDPM   Ho, Jain, Abbeel 2020 (arXiv 2006.11239): forward process eq. 4, posterior eq. 6-7, x̂_0 from ε eq. 15.
  DDIM   Song, Meng, Ermon 2021 (arXiv 2010.02502): the generalised step eq. 12, its σ_t(η) eq. 16.
  Euler  Karras, Aittala, Aila, Laine 2022 (arXiv 2206.00364): Algorithm 1 in the σ parameterisation, no churn.
  CFG    Ho, Salimans 2022 (arXiv 2207.12598) eq. 6; v-prediction: Salimans, Ho 2022 (arXiv 2202.00512) §4.
  Indicator guidance (ours): classifier guidance (Dhariwal & Nichol 2021, eq. 14) toward a target group per image.

This file imports nothing of ours, so training, sampling and export read the same ᾱ. Samplers are stateless
functions of the schedule and the timestep list; `denoise` is the reverse process of one batch, and image k's
noise comes from its own torch.Generator, never from a batch-wide one.
"""
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

N_TRAIN_TIMESTEPS = 1000  # SD's DDPM schedule length, t in {0, ..., 999}; a scheduler_config.json may set another
BETA_START, BETA_END = 0.00085, 0.012  # SD v1.x's β range (CompVis' linear_start, linear_end in v1-inference.yaml)
DDPM_BETA_START, DDPM_BETA_END = 1e-4, 0.02  # DDPM's linear range (Ho et al. 2020 §4), diffusers' "linear" defaults
STEPS_OFFSET = 1  # SD's scheduler steps_offset: the sampler's last step lands on t = 1, as SD's own config says

# ----------------------------------------------------------------------------------------------------------------
# Noise schedule and training targets (DDPM eq. 4), float64 as in CompVis' make_beta_schedule


def scaled_linear_betas(n=N_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END):
    """β_t = linspace(√β_start, √β_end, n)²: the latent-diffusion schedule of SD v1.x (CompVis `linear`)."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2


def linear_betas(n=N_TRAIN_TIMESTEPS, beta_start=DDPM_BETA_START, beta_end=DDPM_BETA_END):
    """β_t = linspace(β_start, β_end, n): DDPM's schedule (Ho et al. 2020 §4)."""
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)


def alphas_cumprod(betas):
    """ᾱ_t = ∏_{s<=t} (1 − β_s)."""
    return torch.cumprod(1 - betas, dim=0)


def sd_schedule():
    """ᾱ of SD v1.x: 1000 scaled-linear steps from β = 0.00085 to 0.012."""
    return alphas_cumprod(scaled_linear_betas())


def _coefficients(t, alphas_cumprod, x):
    """(√ᾱ_t, √(1−ᾱ_t)) for each sample's t, shaped to broadcast against x, in x's dtype and device."""
    a = alphas_cumprod.to(x.device)[torch.as_tensor(t, device=x.device)]
    shape = (-1,) + (1,) * (x.dim() - 1) if a.dim() else ()
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
    sa, s1a = _coefficients(t, alphas_cumprod, x_t)
    return sa * v + s1a * x_t


def predicted_x0(x_t, pred, t, alphas_cumprod, prediction_type="epsilon"):
    """x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t (DDPM eq. 15), or √ᾱ_t x_t − √(1−ᾱ_t) v̂ for a v-prediction; t (B,),
    in the dtype of x_t and the prediction together (float32 for an autocast UNet's bfloat16 ε̂ and float32 x_t). The
    roots are taken in ᾱ's own precision and rounded to that dtype, never to the prediction's alone: ᾱ_0 = 0.99915 in
    bfloat16 is 1, which made √(1−ᾱ_0) 0 instead of 0.029 (x̂_0 = x_t at t = 0)."""
    a, dtype = alphas_cumprod[t].view(-1, *[1] * (pred.dim() - 1)), torch.promote_types(x_t.dtype, pred.dtype)
    sa, s1a = a.sqrt().to(dtype), (1 - a).sqrt().to(dtype)
    if prediction_type == "v_prediction":
        return sa * x_t - s1a * pred
    return (x_t - s1a * pred) / sa


# ----------------------------------------------------------------------------------------------------------------
# Samplers: one step each, stateless


def ddim_timesteps(steps, n_train=N_TRAIN_TIMESTEPS):
    """τ_i = i·⌊n_train/steps⌋ + STEPS_OFFSET for i = steps−1 … 0: SD's "leading" spacing.

    With 50 steps: 981, 961, …, 21, 1. Each step goes from τ_i to τ_{i−1}; the last goes past 0 (t_prev = −1).
    """
    assert 1 <= steps <= n_train, f"steps must be between 1 and {n_train}, got {steps}"
    stride = n_train // steps
    return [i * stride + STEPS_OFFSET for i in reversed(range(steps))]


def ddim_step(x_t, eps, t, t_prev, alphas_cumprod, eta=0.0, noise=None):
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12 with σ from eq. 16):

        x̂_0    = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t
        σ_t    = η · √((1−ᾱ_prev) / (1−ᾱ_t)) · √(1 − ᾱ_t/ᾱ_prev)
        x_prev = √ᾱ_prev x̂_0  +  √(1 − ᾱ_prev − σ_t²) ε  +  σ_t z,      z ~ N(0, I) = `noise`

    ᾱ_prev = ᾱ[t_prev], and ᾱ[0] past the last step (t_prev < 0): SD v1.x sets `set_alpha_to_one=False`.
    η = 0 is deterministic; η = 1 makes the step DDPM's ancestral one.
    """
    a_t = float(alphas_cumprod[t])
    a_prev = float(alphas_cumprod[max(t_prev, 0)])
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
    if sigma > 0:
        assert noise is not None, "ddim_step with eta > 0 needs `noise`"
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


# ----------------------------------------------------------------------------------------------------------------
# Guidance and the reverse process


@dataclass
class Guidance:
    """Indicator guidance (ours) by one noise-aware indicator p(g | x_t, t): image k is pushed toward its target
    group targets[k] (B,) with strength `scale`; several of them (one per attribute) add their terms.

    Trajectory-aware targets (with `decide_at`): no push while t > decide_at; at the first step with t <= decide_at
    image k takes the target argmax_g (log p(g | x_t, t) − offsets_g) from its own posterior, the offsets (K,) set
    on a calibration batch so that the targets come out in the asked shares, and keeps it to the end."""
    indicator: torch.nn.Module
    targets: torch.Tensor
    scale: float
    decide_at: int = None
    offsets: torch.Tensor = None

    def rows(self, index):
        """The same guidance for a slice or an index tensor of the images."""
        return replace(self, targets=self.targets[index])


@torch.no_grad()
def decide_targets(indicator, x, t, offsets):
    """argmax_g (log p(g | x, t) − offsets_g) for each image: its target from its own posterior."""
    return (indicator(x.float(), t).float().log_softmax(1) - offsets.to(x.device)).argmax(1).cpu()


def indicator_gradient(indicator, x, t, groups):
    """∇_x log p(g | x, t) (B, C, h, w) for each image's target group g, through the indicator only."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().float().requires_grad_(True)
        log_p = indicator(x, t).float().log_softmax(1)
        groups = groups.to(x.device).clone()  # a normal tensor: targets decided in inference mode are not
        return torch.autograd.grad(log_p[torch.arange(len(x)), groups].sum(), x)[0]


class NonFiniteError(FloatingPointError):
    """An image whose latents or pixels became NaN or infinite (NaN weights, an overflow): saved, it would be an
    all-black PNG. `image` counts from the first image of the call; `where` says at which step or stage."""

    def __init__(self, image, where):
        super().__init__(f"image {image}: NaN or infinite values {where}")
        self.image, self.where = image, where


def per_image_noise(generators, shape, device):
    """(B, *shape) standard normal noise, row k drawn from generators[k] on the CPU (so any device gives the
    same numbers), exactly as diffusers' randn_tensor does with a list of generators."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(device)


@torch.inference_mode()
def denoise(unet, x, cond, uncond, alphas_cumprod, generators, *, steps=50, guidance=7.5, sampler="ddim",
            eta=0.0, prediction_type="epsilon", progress=False, guides=(), until=None):
    """The reverse process for one batch: initial noise x (B,C,h,w) -> latents x_0 (B,C,h,w), float32.

    Classifier-free guidance (Ho & Salimans eq. 6), one UNet call on the unconditional and conditional halves
    stacked along the batch:  ε̃ = ε(x_t, ∅) + s·(ε(x_t, c) − ε(x_t, ∅)),  s = `guidance`; s = 1 skips the
    unconditional half (diffusers switches guidance off for every s <= 1; here s < 1 means what the formula says).
    `cond` (B,T,D), `uncond` (1,T,D) or (B,T,D), None when s = 1. `generators[k]`: image k's per-step noise.
    Indicator guidance (ours), for each Guidance:  ε̃ ← ε̃ − S·√(1−ᾱ_t)·∇_{x_t} log p(g | x_t, t), the indicator
    reading the variance-preserving x_t it was trained on (under Euler too). With `until`, the process stops at
    the first step with t <= until and returns that step's x_t (for calibrating trajectory-aware targets).
    """
    dtype = next(unet.parameters()).dtype
    timesteps = ddim_timesteps(steps, len(alphas_cumprod))
    t_prevs = timesteps[1:] + [-1]
    context = (cond if guidance == 1.0 else torch.cat([uncond.expand(len(x), -1, -1), cond])).to(dtype)
    sigmas = euler_sigmas(timesteps, alphas_cumprod) if sampler == "euler" else None
    x = (x * (sigmas[0] ** 2 + 1) ** 0.5 if sigmas else x).float()
    targets = [None if g.decide_at is not None else g.targets for g in guides]  # None: not decided yet
    finite = []  # per step, (B,) on the device: read once at the end, as reading it every step would sync a GPU
    for i, t in enumerate(tqdm(timesteps, desc="steps", leave=False, disable=not progress)):
        x_t = x / (sigmas[i] ** 2 + 1) ** 0.5 if sigmas else x
        if until is not None and t <= until:
            return x_t
        # t is one int for the whole batch: the UNet embeds it once and broadcasts it
        if guidance == 1.0:
            out = unet(x_t.to(dtype), t, context).float()
        else:
            out_uncond, out_cond = unet(torch.cat([x_t, x_t]).to(dtype), t, context).float().chunk(2)
            out = out_uncond + guidance * (out_cond - out_uncond)
        eps = eps_from_v(x_t, out, t, alphas_cumprod) if prediction_type == "v_prediction" else out
        for j, g in enumerate(guides):
            if targets[j] is None and t <= g.decide_at:
                targets[j] = decide_targets(g.indicator, x_t, t, g.offsets)
            if g.scale and targets[j] is not None:
                eps = eps - g.scale * float(1 - alphas_cumprod[t]) ** 0.5 * indicator_gradient(
                    g.indicator, x_t, t, targets[j])
        if sampler == "ddim":
            noise = per_image_noise(generators, x.shape[1:], x.device) if eta > 0 else None
            x = ddim_step(x, eps, t, t_prevs[i], alphas_cumprod, eta, noise)
        elif sampler == "ddpm":
            x = ddpm_step(x, eps, t, t_prevs[i], alphas_cumprod, per_image_noise(generators, x.shape[1:], x.device))
        else:
            x = euler_step(x, eps, sigmas[i], sigmas[i + 1])
        finite.append(torch.isfinite(x.flatten(1)).all(1))
    bad = (~torch.stack(finite)).nonzero()  # (step, image) pairs, the earliest step first
    if len(bad):
        step, image = bad[0].tolist()
        raise NonFiniteError(image, f"in the latents after step {step + 1} of {steps} (t={timesteps[step]})")
    return x

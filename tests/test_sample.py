"""sample.py against diffusers: schedule, timesteps, single sampler steps, and whole runs of StableDiffusionPipeline
on a tiny random-weight SD saved as a diffusers folder; seeding, the CLI and its argument checks."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

import sample

# SD v1.5's scheduler/scheduler_config.json, the fields that matter.
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
DDPM_SCHEDULER = {k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"}
EULER_SCHEDULER = {**{k: v for k, v in DDPM_SCHEDULER.items() if k != "clip_sample"}, "timestep_spacing": "leading"}
F32 = 1e-6  # diffusers keeps ᾱ in float32; ours is float64 as in CompVis, so they agree to float32 rounding


def test_schedules_are_float64_and_equal_diffusers_alphas_cumprod():
    ours = sample.sd_schedule()
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    theirs = DDIMScheduler(**SD_SCHEDULER).alphas_cumprod
    assert (ours - theirs.double()).abs().max() < F32
    assert (sample.alphas_cumprod(sample.scaled_linear_betas()) == ours).all()
    linear = sample.alphas_cumprod(sample.linear_betas())
    assert linear.dtype == torch.float64
    assert (linear - DDPMScheduler(beta_schedule="linear").alphas_cumprod.double()).abs().max() < F32
    assert (linear - ours).abs().max() > 0.1  # the two schedules really differ


@pytest.mark.parametrize("steps", [1, 3, 7, 20, 50, 999, 1000])
def test_ddim_timesteps_equal_diffusers_leading_spacing(steps):
    s = DDIMScheduler(**SD_SCHEDULER)
    s.set_timesteps(steps)
    assert sample.ddim_timesteps(steps) == s.timesteps.tolist()


def test_ddim_timesteps_reject_bad_step_counts():
    for steps in (0, -1, 1001):
        with pytest.raises(ValueError, match="steps"):
            sample.ddim_timesteps(steps)


def _step_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 8, 8, generator=g) for _ in range(3)]  # x_t, ε, z


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps,index", [(50, 0), (50, 25), (50, 49), (7, 6)])
def test_one_ddim_step_equals_diffusers(eta, steps, index):
    x, eps, z = _step_inputs()
    s = DDIMScheduler(**SD_SCHEDULER)
    s.set_timesteps(steps)
    t = int(s.timesteps[index])
    theirs = s.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
    timesteps = sample.ddim_timesteps(steps)
    t_prev = timesteps[index + 1] if index + 1 < steps else -1  # the last step lands on ᾱ[0]
    ours = sample.ddim_step(x, eps, t, t_prev, sample.sd_schedule(), eta, z)
    same_schedule = sample.ddim_step(x, eps, t, t_prev, s.alphas_cumprod, eta, z)
    assert (same_schedule - theirs).abs().max() < 2e-6  # the update rule itself
    assert (ours - theirs).abs().max() < 2e-5  # plus the float64 schedule (x̂_0 = .../√ᾱ_t amplifies at t≈1000)


def test_ddim_final_step_uses_alphas_cumprod_0_not_one():
    x, eps, _ = _step_inputs()
    ac = sample.sd_schedule()
    out = sample.ddim_step(x, eps, 1, -1, ac)
    x0 = (x - (1 - ac[1]).sqrt().float() * eps) / ac[1].sqrt().float()
    assert (out - x0).abs().max() > 1e-3  # ᾱ = 1 would return x̂_0 itself
    assert (out - sample.ddim_step(x, eps, 1, 0, ac)).abs().max() == 0


def test_ddim_with_eta_needs_noise():
    x, eps, _ = _step_inputs()
    with pytest.raises(ValueError, match="noise"):
        sample.ddim_step(x, eps, 981, 961, sample.sd_schedule(), eta=1.0)


@pytest.mark.parametrize("steps,index", [(50, 0), (50, 30), (50, 49), (1000, 500), (1000, 999)])
def test_one_ddpm_step_equals_diffusers(steps, index, monkeypatch):
    x, eps, z = _step_inputs(1)
    s = DDPMScheduler(**DDPM_SCHEDULER)
    s.set_timesteps(steps)
    t = int(s.timesteps[index])
    from diffusers.schedulers import scheduling_ddpm
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: z)  # DDPMScheduler draws z itself
    theirs = s.step(eps, t, x).prev_sample
    timesteps = sample.ddim_timesteps(steps)
    t_prev = timesteps[index + 1] if index + 1 < steps else -1
    same_schedule = sample.ddpm_step(x, eps, t, t_prev, s.alphas_cumprod, z)
    ours = sample.ddpm_step(x, eps, t, t_prev, sample.sd_schedule(), z)
    assert (same_schedule - theirs).abs().max() < 2e-6
    assert (ours - theirs).abs().max() < 2e-5


def test_ddpm_step_is_ddim_with_eta_one():
    x, eps, z = _step_inputs(2)
    ac = sample.sd_schedule()
    for t, t_prev in [(981, 961), (501, 481), (21, 1)]:
        assert (sample.ddpm_step(x, eps, t, t_prev, ac, z) - sample.ddim_step(x, eps, t, t_prev, ac, 1.0, z)
                ).abs().max() < 1e-5


@pytest.mark.parametrize("steps", [1, 10, 30])
def test_euler_run_equals_diffusers(steps):
    """Whole Euler chains with a fixed linear 'model' ε = 0.1·x + c, so every step and the σ list are exercised."""
    x_T, c, _ = _step_inputs(3)
    s = EulerDiscreteScheduler(**EULER_SCHEDULER)
    s.set_timesteps(steps)
    theirs = x_T * s.init_noise_sigma
    for t in s.timesteps:
        theirs = s.step(0.1 * s.scale_model_input(theirs, t) + c, t, theirs).prev_sample
    timesteps = sample.ddim_timesteps(steps)
    assert timesteps == s.timesteps.long().tolist()
    sigmas = sample.euler_sigmas(timesteps, sample.sd_schedule())
    torch.testing.assert_close(torch.tensor(sigmas), s.sigmas, atol=0, rtol=4e-6)  # float32 σ
    ours = x_T * (sigmas[0] ** 2 + 1) ** 0.5
    for i in range(steps):
        ours = sample.euler_step(ours, 0.1 * ours / (sigmas[i] ** 2 + 1) ** 0.5 + c, sigmas[i], sigmas[i + 1])
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()


def test_add_noise_and_v_target_equal_diffusers():
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 998, 999])
    s = DDPMScheduler(**DDPM_SCHEDULER)
    ac = sample.sd_schedule()
    tol = dict(atol=2e-6, rtol=F32)  # diffusers' float32 1 − ᾱ_0 = 0.00085 keeps only ~4 digits
    torch.testing.assert_close(sample.add_noise(x0, noise, t, ac), s.add_noise(x0, noise, t), **tol)
    torch.testing.assert_close(sample.v_target(x0, noise, t, ac), s.get_velocity(x0, noise, t), **tol)
    assert sample.add_noise(x0.double(), noise.double(), t, ac).dtype == torch.float64
    assert sample.add_noise(x0.bfloat16(), noise.bfloat16(), t, ac).dtype == torch.bfloat16
    # v-prediction round trip: ε recovered from v at x_t
    x_t = sample.add_noise(x0, noise, t, ac)
    v = sample.v_target(x0, noise, t, ac)
    for k in range(5):
        eps = sample.eps_from_v(x_t[k], v[k], int(t[k]), ac)
        assert (eps - noise[k]).abs().max() < 1e-5


def test_one_ddim_step_with_v_prediction_equals_diffusers():
    x, v, _ = _step_inputs(5)
    s = DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": "v_prediction"})
    s.set_timesteps(20)
    ac = sample.sd_schedule()
    theirs = s.step(v, 501, x).prev_sample
    ours = sample.ddim_step(x, sample.eps_from_v(x, v, 501, ac), 501, 451, ac)
    assert (ours - theirs).abs().max() < 1e-5

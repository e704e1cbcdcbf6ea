"""sample.py against diffusers: schedule, timesteps, single sampler steps, and whole runs of StableDiffusionPipeline
on a tiny random-weight SD saved as a diffusers folder; seeding, the CLI and its argument checks; indicator
guidance's targets, one per image from its own seed, kept at any batch size."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from PIL import Image

import diffusion
import guidance
import loading
import sample

# SD v1.5's scheduler/scheduler_config.json, the fields that matter.
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
DDPM_SCHEDULER = {k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"}
EULER_SCHEDULER = {**{k: v for k, v in DDPM_SCHEDULER.items() if k != "clip_sample"}, "timestep_spacing": "leading"}
F32 = 1e-6  # diffusers keeps ᾱ in float32; ours is float64 as in CompVis, so they agree to float32 rounding


def test_schedules_are_float64_and_equal_diffusers_alphas_cumprod():
    ours = diffusion.sd_schedule()
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    theirs = DDIMScheduler(**SD_SCHEDULER).alphas_cumprod
    assert (ours - theirs.double()).abs().max() < F32
    # the closed form in float64, one Python float at a time: β_i = (√β_0 + i/999 (√β_999 − √β_0))², ᾱ_t = ∏(1 − β_i)
    b0, b1, product, by_hand = 0.00085 ** 0.5, 0.012 ** 0.5, 1.0, []
    for i in range(1000):
        product *= 1 - (b0 + i / 999 * (b1 - b0)) ** 2
        by_hand.append(product)
    assert (ours - torch.tensor(by_hand, dtype=torch.float64)).abs().max() < 1e-15
    assert ours[0] == pytest.approx(0.99915, abs=1e-15) and ours[-1] == pytest.approx(0.0046601, abs=1e-7)
    linear = diffusion.alphas_cumprod(diffusion.linear_betas())
    assert linear.dtype == torch.float64
    assert (linear - DDPMScheduler(beta_schedule="linear").alphas_cumprod.double()).abs().max() < F32
    assert (linear - ours).abs().max() > 0.1  # the two schedules really differ


@pytest.mark.parametrize("steps", [1, 3, 7, 20, 50, 999, 1000])
def test_ddim_timesteps_equal_diffusers_leading_spacing(steps):
    s = DDIMScheduler(**SD_SCHEDULER)
    s.set_timesteps(steps)
    assert diffusion.ddim_timesteps(steps) == s.timesteps.tolist()


def test_ddim_timesteps_reject_bad_step_counts():
    for steps in (0, -1, 1001):  # sample.py refuses such --steps first; here it is a programming error
        with pytest.raises(AssertionError, match="steps"):
            diffusion.ddim_timesteps(steps)


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
    timesteps = diffusion.ddim_timesteps(steps)
    t_prev = timesteps[index + 1] if index + 1 < steps else -1  # the last step lands on ᾱ[0]
    ours = diffusion.ddim_step(x, eps, t, t_prev, diffusion.sd_schedule(), eta, z)
    same_schedule = diffusion.ddim_step(x, eps, t, t_prev, s.alphas_cumprod, eta, z)
    assert (same_schedule - theirs).abs().max() < 2e-6  # the update rule itself
    assert (ours - theirs).abs().max() < 2e-5  # plus the float64 schedule (x̂_0 = .../√ᾱ_t amplifies at t≈1000)


def test_ddim_final_step_uses_alphas_cumprod_0_not_one():
    x, eps, _ = _step_inputs()
    ac = diffusion.sd_schedule()
    out = diffusion.ddim_step(x, eps, 1, -1, ac)
    x0 = (x - (1 - ac[1]).sqrt().float() * eps) / ac[1].sqrt().float()
    assert (out - x0).abs().max() > 1e-3  # ᾱ = 1 would return x̂_0 itself
    assert (out - diffusion.ddim_step(x, eps, 1, 0, ac)).abs().max() == 0


def test_ddim_with_eta_needs_noise():
    x, eps, _ = _step_inputs()
    with pytest.raises(AssertionError, match="noise"):
        diffusion.ddim_step(x, eps, 981, 961, diffusion.sd_schedule(), eta=1.0)


@pytest.mark.parametrize("steps,index", [(50, 0), (50, 30), (50, 49), (1000, 500), (1000, 999)])
def test_one_ddpm_step_equals_diffusers(steps, index, monkeypatch):
    x, eps, z = _step_inputs(1)
    s = DDPMScheduler(**DDPM_SCHEDULER)
    s.set_timesteps(steps)
    t = int(s.timesteps[index])
    from diffusers.schedulers import scheduling_ddpm
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: z)  # DDPMScheduler draws z itself
    theirs = s.step(eps, t, x).prev_sample
    timesteps = diffusion.ddim_timesteps(steps)
    t_prev = timesteps[index + 1] if index + 1 < steps else -1
    same_schedule = diffusion.ddpm_step(x, eps, t, t_prev, s.alphas_cumprod, z)
    ours = diffusion.ddpm_step(x, eps, t, t_prev, diffusion.sd_schedule(), z)
    assert (same_schedule - theirs).abs().max() < 2e-6
    assert (ours - theirs).abs().max() < 2e-5


def test_ddpm_step_is_ddim_with_eta_one():
    x, eps, z = _step_inputs(2)
    ac = diffusion.sd_schedule()
    for t, t_prev in [(981, 961), (501, 481), (21, 1)]:
        assert (diffusion.ddpm_step(x, eps, t, t_prev, ac, z) - diffusion.ddim_step(x, eps, t, t_prev, ac, 1.0, z)
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
    timesteps = diffusion.ddim_timesteps(steps)
    assert timesteps == s.timesteps.long().tolist()
    sigmas = diffusion.euler_sigmas(timesteps, diffusion.sd_schedule())
    torch.testing.assert_close(torch.tensor(sigmas), s.sigmas, atol=0, rtol=4e-6)  # float32 σ
    ours = x_T * (sigmas[0] ** 2 + 1) ** 0.5
    for i in range(steps):
        ours = diffusion.euler_step(ours, 0.1 * ours / (sigmas[i] ** 2 + 1) ** 0.5 + c, sigmas[i], sigmas[i + 1])
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()


@pytest.mark.parametrize("steps", [1, 10])
def test_a_v_prediction_models_euler_run_through_denoise_equals_diffusers(steps):
    """denoise turns v̂ into ε at the variance-preserving x_t = x/√(σ²+1) the model read, not at the Euler state x
    (a planted eps_from_v(x, ...) passed every test: no test ran a v-prediction model under Euler). The 'model' is
    linear, v̂ = 0.1·x_in + c, so every step counts."""
    x_T, c, _ = _step_inputs(3)
    s = EulerDiscreteScheduler(**{**EULER_SCHEDULER, "prediction_type": "v_prediction"})
    s.set_timesteps(steps)
    theirs = x_T * s.init_noise_sigma
    for t in s.timesteps:
        theirs = s.step(0.1 * s.scale_model_input(theirs, t) + c, t, theirs).prev_sample

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, context):
            return 0.1 * x + c

    ours = diffusion.denoise(Linear(), x_T, torch.zeros(2, 77, 8), None, diffusion.sd_schedule(), [None] * 2,
                             steps=steps, guidance=1.0, sampler="euler", prediction_type="v_prediction")
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()


def test_add_noise_and_v_target_equal_diffusers():
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 998, 999])
    s = DDPMScheduler(**DDPM_SCHEDULER)
    ac = diffusion.sd_schedule()
    tol = dict(atol=2e-6, rtol=F32)  # diffusers' float32 1 − ᾱ_0 = 0.00085 keeps only ~4 digits
    torch.testing.assert_close(diffusion.add_noise(x0, noise, t, ac), s.add_noise(x0, noise, t), **tol)
    torch.testing.assert_close(diffusion.v_target(x0, noise, t, ac), s.get_velocity(x0, noise, t), **tol)
    assert diffusion.add_noise(x0.double(), noise.double(), t, ac).dtype == torch.float64
    assert diffusion.add_noise(x0.bfloat16(), noise.bfloat16(), t, ac).dtype == torch.bfloat16
    # v-prediction round trip: ε recovered from v at x_t
    x_t = diffusion.add_noise(x0, noise, t, ac)
    v = diffusion.v_target(x0, noise, t, ac)
    for k in range(5):
        eps = diffusion.eps_from_v(x_t[k], v[k], int(t[k]), ac)
        assert (eps - noise[k]).abs().max() < 1e-5


def test_one_ddim_step_with_v_prediction_equals_diffusers():
    x, v, _ = _step_inputs(5)
    s = DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": "v_prediction"})
    s.set_timesteps(20)
    ac = diffusion.sd_schedule()
    theirs = s.step(v, 501, x).prev_sample
    ours = diffusion.ddim_step(x, diffusion.eps_from_v(x, v, 501, ac), 501, 451, ac)
    assert (ours - theirs).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Whole runs on a tiny random-weight SD, saved as a diffusers folder with the real CLIP vocabulary

H, W = 32, 48  # non-square, so a height/width swap fails; latents 16x24 with the tiny VAE's factor 2
PROMPTS = ["a photo of a doctor", "a nurse, smiling", "a photo of a doctor", "an astronaut riding a horse"]
SEEDS = [0, 1, 2, 12345]


def _perturb(model, seed):
    """Move every weight away from its initialisation (zero-init layers would hide wiring mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _tiny_pipeline(scheduler, tokenizer_dir):
    import transformers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)  # as SD ships it
    return StableDiffusionPipeline(
        vae=_perturb(vae, 1), text_encoder=_perturb(text_encoder, 2), tokenizer=tokenizer, unet=_perturb(unet, 3),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers pipeline, our Models loaded from the folder it saved, that folder)."""
    from tools.make_sd_tokenizer import write_sd_tokenizer

    tokenizer_dir = write_sd_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    pipe = _tiny_pipeline(DDIMScheduler(**SD_SCHEDULER), tokenizer_dir)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("tiny-sd")
    pipe.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):  # SD's tokenizer/ files (transformers 5 saves only tokenizer.json)
        shutil.copy(tokenizer_dir / name, folder / "tokenizer" / name)
    return pipe, sample.load_models(folder), folder


def _pipeline_run(pipe, scheduler, prompts, seeds, negative_prompt, steps, guidance, eta):
    """diffusers' final latents and decoded images in [0, 1], with one generator per image as we use them."""
    from diffusers import StableDiffusionPipeline
    p = StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler})
    p.set_progress_bar_config(disable=True)
    with torch.no_grad():
        latents = p(prompts, height=H, width=W, num_inference_steps=steps, guidance_scale=guidance,
                    negative_prompt=[negative_prompt] * len(prompts), eta=eta, output_type="latent",
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        images = p.vae.decode(latents / p.vae.config.scaling_factor).sample
    return latents, (images / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("sampler,eta,guidance,negative_prompt", [
    ("ddim", 0.0, 7.5, ""),
    ("ddim", 0.0, 5.0, "blurry, low quality"),
    ("ddim", 1.0, 7.5, ""),  # per-step noise from each image's own generator, as diffusers draws it
    ("ddim", 0.0, 1.0, ""),  # no guidance: one UNet half only
    ("ddpm", 0.0, 7.5, ""),
    ("euler", 0.0, 7.5, ""),
])
def test_whole_run_equals_stable_diffusion_pipeline(tiny, sampler, eta, guidance, negative_prompt):
    pipe, models, _ = tiny
    steps = 10
    scheduler = {"ddim": lambda: DDIMScheduler(**SD_SCHEDULER), "ddpm": lambda: DDPMScheduler(**DDPM_SCHEDULER),
                 "euler": lambda: EulerDiscreteScheduler(**EULER_SCHEDULER)}[sampler]()
    their_latents, their_images = _pipeline_run(pipe, scheduler, PROMPTS, SEEDS, negative_prompt, steps, guidance, eta)
    ours = sample.generate(models, PROMPTS, SEEDS, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                           height=H, width=W, sampler=sampler, eta=eta, decode=False, progress=False)
    assert ours.shape == their_latents.shape == (4, 4, H // 2, W // 2)
    assert their_latents.abs().max() > 0.5  # a real signal, not everything collapsed to zero
    # Random weights make DDIM's x0 estimate blow up (latents reach 40-60, not SD's ~4), and fp32 rounding grows
    # with them (measured ~2e-6 relative, up to 1.04e-4 absolute on CI): bound the error relative to that scale.
    scale = max(1.0, their_latents.abs().max().item())
    assert (ours - their_latents).abs().max() <= 1e-5 * scale
    images = sample.decode_latents(models, ours)
    assert ((images / 2 + 0.5).clamp(0, 1) - their_images).abs().max() <= 1e-4
    if sampler == "ddim" and eta == 0 and not negative_prompt:
        uint8 = sample.generate(models, PROMPTS, SEEDS, steps=steps, guidance=guidance, height=H, width=W,
                                batch_size=3, progress=False)
        theirs = (their_images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)  # diffusers' numpy_to_pil
        assert uint8.shape == (4, H, W, 3) and uint8.dtype == torch.uint8
        assert (uint8.int() - theirs.int()).abs().max() <= 1  # a 1e-6 difference can cross a rounding edge
        assert (uint8 == theirs).float().mean() > 0.999


def test_negative_prompt_and_guidance_change_the_result(tiny):
    _, models, _ = tiny
    kw = dict(steps=3, height=H, width=W, decode=False, progress=False)
    base = sample.generate(models, PROMPTS[:1], SEEDS[:1], **kw)
    assert (base - sample.generate(models, PROMPTS[:1], SEEDS[:1], negative_prompt="blurry", **kw)
            ).abs().max() > 1e-3
    assert (base - sample.generate(models, PROMPTS[:1], SEEDS[:1], guidance=3.0, **kw)).abs().max() > 1e-3


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("euler", 0.0)])
def test_same_seed_gives_the_same_image_at_any_batch_size(tiny, sampler, eta):
    """Image k comes from (prompt k, seed k) alone: its noise from its own generator, so other batch sizes or
    batch-mates move its pixels by at most one level (kernels round batches of different sizes differently in the
    last bit), and a rerun at the same batch size is bit-identical."""
    _, models, _ = tiny
    kw = dict(steps=4, height=H, width=W, sampler=sampler, eta=eta, progress=False)
    first = sample.generate(models, PROMPTS, SEEDS, batch_size=4, **kw)
    assert torch.equal(first, sample.generate(models, PROMPTS, SEEDS, batch_size=4, **kw))
    assert first.float().std() > 1 and len({img.numpy().tobytes() for img in first}) == len(first)  # real images
    for batch_size in (1, 3):
        other = sample.generate(models, PROMPTS, SEEDS, batch_size=batch_size, **kw)
        assert (other.int() - first.int()).abs().max() <= 1, batch_size
        assert (other == first).float().mean() >= 0.99, batch_size
    # another seed for image 0 changes image 0, and the others stay within a level
    moved = sample.generate(models, PROMPTS, [99] + SEEDS[1:], batch_size=4, **kw)
    assert (moved[0].int() - first[0].int()).abs().float().mean() > 5
    assert (moved[1:].int() - first[1:].int()).abs().max() <= 1


def test_generate_rejects_bad_settings_with_clear_messages(tiny, monkeypatch):
    import dataclasses
    _, models, _ = tiny
    # as if the UNet had SD's four levels: latents must then be multiples of 8, images of 16 with this VAE
    monkeypatch.setattr(models.unet, "config", dataclasses.replace(models.unet.config, channel_mult=(1, 2, 4, 4)))
    ok = dict(steps=2, height=H, width=W, progress=False)
    for kwargs, message in [
        (dict(prompts="a doctor", seeds=[0]), "list of strings"),
        (dict(prompts=["a", "b"], seeds=[0]), "one seed per prompt"),
        (dict(prompts=[], seeds=[]), "at least one prompt"),
        (dict(prompts=["a"], seeds=[0], height=36), "multiples of 8"),
        (dict(prompts=["a"], seeds=[0], height=40), "multiples of 16 for this model"),
        (dict(prompts=["a"], seeds=[0], steps=0), "steps"),
        (dict(prompts=["a"], seeds=[0], guidance=float("nan")), "guidance"),
        (dict(prompts=["a"], seeds=[0], sampler="plms"), "unknown sampler"),
        (dict(prompts=["a"], seeds=[0], eta=-1.0), "eta"),
        (dict(prompts=["a"], seeds=[0], batch_size=0), "batch_size"),
    ]:
        with pytest.raises(ValueError, match=message):
            sample.generate(models, **{**ok, **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# The CLI


def test_cli_writes_images_grid_and_a_readable_record(tiny, tmp_path):
    import json

    from PIL import Image

    _, _, folder = tiny
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a doctor\n\n  a photo of a nurse  \n")
    out = tmp_path / "out"
    sample.main(["--model", str(folder), "--prompts", str(prompts), "--n", "3", "--batch-size", "2", "--steps", "2",
                 "--height", str(H), "--width", str(W), "--seed", "7", "--negative-prompt", "blurry",
                 "--out", str(out)])
    record = json.loads((out / "samples.json").read_text())
    assert record["prompts"] == ["a photo of a doctor"] * 3 + ["a photo of a nurse"] * 3
    assert record["seeds"] == list(range(7, 13))
    assert record["model"] == str(folder.resolve())
    for key, value in dict(sampler="ddim", steps=2, guidance=7.5, eta=0.0, negative_prompt="blurry", height=H,
                           width=W, batch_size=2).items():
        assert record[key] == value, key
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["python"]
    assert record["started"] and record["seconds"] > 0
    pngs = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    assert pngs == record["files"] == [f"{k:05d}.png" for k in range(6)]
    images = [Image.open(out / name) for name in pngs]
    assert all(im.size == (W, H) and im.mode == "RGB" for im in images)
    assert Image.open(out / "grid.png").size == (3 * W, 2 * H)
    # the PNGs are generate()'s images: image 4 alone, from its prompt and seed
    again = sample.generate(sample.load_models(folder), ["a photo of a nurse"], [11], negative_prompt="blurry",
                            steps=2, height=H, width=W, progress=False)
    assert torch.equal(torch.from_numpy(__import__("numpy").asarray(images[4])), again[0])

    # an existing output folder is refused, then replaced with --overwrite
    argv = ["--model", str(folder), "--prompt", "a cat", "--steps", "1", "--height", str(H), "--width", str(W),
            "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code != 0
    sample.main(argv + ["--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "grid.png", "samples.json"]  # no stale images
    assert json.loads((out / "samples.json").read_text())["prompts"] == ["a cat"]


def test_cli_takes_no_progress_as_train_and_reproduce_do(tiny, tmp_path, capsys):
    """train.py and reproduce.py take --no-progress; sample.py refused it ("unrecognized arguments"), so a script that
    passed it to every step stopped here, and without it a job's log filled with bars."""
    _, _, folder = tiny
    argv = ["--model", str(folder), "--prompt", "a cat", "--n", "2", "--steps", "2", "--height", str(H), "--width",
            str(W)]
    sample.main([*argv, "--out", str(tmp_path / "bar")])
    assert "images:" in capsys.readouterr().err
    sample.main([*argv, "--no-progress", "--out", str(tmp_path / "quiet")])
    assert "images:" not in capsys.readouterr().err and (tmp_path / "quiet" / "00001.png").is_file()


@pytest.mark.parametrize("change,message", [
    ({"--height": "36"}, "--height must be a positive multiple of 8"),
    ({"--width": "0"}, "--width must be a positive multiple of 8"),
    ({"--n": "0"}, "--n must be >= 1"),
    ({"--steps": "-3"}, "--steps must be between 1 and 999"),
    ({"--steps": "1000"}, "--steps must be between 1 and 999"),  # SD's first step would be t = 1000, past the end
    ({"--guidance": "lots"}, "invalid float value: 'lots'"),
    ({"--guidance": "inf"}, "--guidance must be a finite number"),
    ({"--batch-size": "0"}, "--batch-size must be >= 1"),
    ({"--sampler": "plms"}, "invalid choice: 'plms'"),
    ({"--eta": "-0.5"}, "--eta must be a number >= 0"),
    ({"--eta": "0.7", "--sampler": "euler"}, "--eta is DDIM's: --sampler euler takes none"),  # ignored, recorded
    ({"--eta": "0.7", "--sampler": "ddpm"}, "--eta is DDIM's: --sampler ddpm takes none"),
    ({"--negative-prompt": "blurry", "--guidance": "1"},  # no unconditional pass to use it: ignored, recorded
     "--negative-prompt is classifier-free guidance's: --guidance 1.0 has none"),
    ({"--model": "/nonexistent/sd"}, "does not exist"),
    ({"--prompts": "/nonexistent/prompts.txt"}, "is not a file"),
    ({"--dtype": "float16"}, "the CPU runs float32"),
    ({"--device": "gpu0"}, "--device"),
    ({"--device": "meta"}, "--device: meta: only cpu and cuda devices run here"),  # a NotImplementedError before
    ({"--device": "mps"}, "--device: mps: only cpu and cuda devices run here"),
])
def test_cli_rejects_bad_arguments_before_loading_weights(tiny, tmp_path, monkeypatch, capsys, change, message):
    _, _, folder = tiny
    args = {"--model": str(folder), "--prompt": "a cat", "--out": str(tmp_path / "out"), "--device": "cpu"}
    if "--prompts" in change:
        del args["--prompt"]
    args.update(change)
    monkeypatch.setattr(sample, "load_models", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(SystemExit) as e:
        sample.main([x for kv in args.items() for x in kv])
    assert e.value.code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_eta_above_one_whose_ddim_step_has_no_real_coefficient(tiny, tmp_path, monkeypatch, capsys):
    """η > 1 asks σ_t² > 1 − ᾱ_prev late in sampling: the step's √(1 − ᾱ_prev − σ_t²) is imaginary."""
    monkeypatch.setattr(sample, "load_models", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(SystemExit) as e:
        sample.main(["--model", str(tiny[2]), "--prompt", "a cat", "--out", str(tmp_path / "out"), "--device", "cpu",
                     "--eta", "1.5"])
    assert e.value.code == 2 and "--eta must be at most 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_exits_nonzero_with_a_message_for_a_folder_that_is_no_checkpoint(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "notsd").mkdir()
    (tmp_path / "notsd" / "readme.txt").write_text("hello")
    root = Path(sample.__file__).parent
    r = subprocess.run([sys.executable, str(root / "sample.py"), "--model", str(tmp_path / "notsd"), "--prompt", "x",
                        "--out", str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True,
                       timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0
    assert "neither a single-file checkpoint nor a diffusers folder" in r.stderr
    assert "vae/" in r.stderr or "unet/" in r.stderr  # says what it looked for
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Faults and bad input: non-finite images, guidance, seeds, --out, --overwrite, prompts files, model configs


def _hook_call(module, request, call, row, value):
    """Make output row `row` of `module`'s call number `call` (counting from 1) equal `value` everywhere."""
    calls = []

    def hook(m, args, out):
        calls.append(1)
        if len(calls) == call:
            out = out.clone()
            out[row] = value
            return out
    handle = module.register_forward_hook(hook)
    request.addfinalizer(handle.remove)  # the models are shared by the module's tests


def test_nan_latents_stop_generation_naming_the_image_and_step(tiny, request):
    _, models, _ = tiny
    # batch 2 (images 2, 3) runs UNet calls 4..6 on rows [uncond 2, uncond 3, cond 2, cond 3]: a NaN in image 3's
    # unconditional noise prediction at its second step
    _hook_call(models.unet, request, call=5, row=1, value=float("nan"))
    with pytest.raises(sample.NonFiniteError, match=r"image 3: NaN or infinite values in the latents after step 2 "
                                                    r"of 3 \(t=\d+\)"):
        sample.generate(models, PROMPTS, SEEDS, steps=3, height=H, width=W, batch_size=2, progress=False)


def test_infinite_pixels_stop_generation_naming_the_image(tiny, request):
    _, models, _ = tiny
    _hook_call(models.vae.decoder, request, call=1, row=1, value=float("inf"))  # one decoder call per batch
    with pytest.raises(sample.NonFiniteError, match=r"image 1: NaN or infinite values in the decoded pixels"):
        sample.generate(models, PROMPTS[:2], SEEDS[:2], steps=1, height=H, width=W, progress=False)


def test_absurd_guidance_and_seeds_are_refused_by_generate(tiny):
    _, models, _ = tiny
    for kwargs, message in [(dict(guidance=1e30), "guidance must lie between -100 and 100"),
                            (dict(guidance=-101.0), "guidance must lie between -100 and 100"),
                            (dict(seeds=[2 ** 64]), "seeds must be integers in 0..2\\*\\*64-1"),
                            (dict(seeds=[-1]), "seeds must be integers")]:
        with pytest.raises(ValueError, match=message):
            sample.generate(models, **{**dict(prompts=["a"], seeds=[0], steps=1, height=H, width=W,
                                              progress=False), **kwargs})


def _nan_unet_copy(folder, tmp_path):
    from safetensors.torch import load_file, save_file
    copy = tmp_path / "nan-sd"
    shutil.copytree(folder, copy)
    path = copy / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    name = sorted(k for k in sd if k.endswith("weight") and sd[k].dim() == 4)[0]
    sd[name] = sd[name].clone()
    sd[name].view(-1)[0] = float("nan")  # one NaN weight
    save_file(sd, path)
    return copy


def test_cli_stops_on_nan_weights_and_writes_no_black_png(tiny, tmp_path):
    _, _, folder = tiny
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        sample.main(["--model", str(_nan_unet_copy(folder, tmp_path)), "--prompt", "a cat", "--n", "2", "--steps",
                     "2", "--height", str(H), "--width", str(W), "--out", str(out), "--device", "cpu"])
    assert "image 0: NaN or infinite values in the latents after step 1 of 2" in str(e.value.code)
    assert not list(out.glob("*.png"))


def _cli_args(folder, out, **change):
    args = {"--model": str(folder), "--prompt": "a cat", "--steps": "1", "--height": str(H), "--width": str(W),
            "--out": str(out), "--device": "cpu", **{f"--{k.replace('_', '-')}": v for k, v in change.items()}}
    return [f"{k}={v}" for k, v in args.items() if v is not None]  # "=": a value may start with "-"


def _refused(argv, monkeypatch, capsys):
    """The message of a CLI run refused before any weights load."""
    monkeypatch.setattr(sample, "load_models", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code != 0
    return capsys.readouterr().err


def test_cli_refuses_bad_out_seed_guidance_and_prompts_before_loading_weights(tiny, tmp_path, monkeypatch, capsys):
    _, _, folder = tiny
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes(b"a photo of a dog\na caf\xe9\n")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = sample.os.access
    monkeypatch.setattr(sample.os, "access", lambda p, mode: Path(p) != read_only and real_access(p, mode))
    out = tmp_path / "out"
    for argv, message in [
        (_cli_args(folder, a_file), f"--out {a_file}: {a_file} is a file, not a folder"),
        (_cli_args(folder, a_file / "sub"), f"--out {a_file / 'sub'}: {a_file} is a file, not a folder"),
        (_cli_args(folder, read_only / "sub"), f"--out {read_only / 'sub'}: {read_only} is not writable"),
        (_cli_args(folder, out, seed=str(2 ** 64)), "--seed must lie in 0..2**64-1"),
        (_cli_args(folder, out, seed=str(2 ** 64 - 2), n="3"), "--seed must lie in 0..2**64-3 for 3 images"),
        (_cli_args(folder, out, seed="-1"), "--seed must lie in 0..2**64-1"),
        (_cli_args(folder, out, guidance="1e30"), "--guidance must lie between -100 and 100"),
        (_cli_args(folder, out, guidance="-1e30"), "--guidance must lie between -100 and 100"),
        (_cli_args(folder, out, prompt=None, prompts=str(latin1)),
         f"--prompts {latin1}, line 2: not UTF-8 text (byte 0xe9 at column 6)"),
        (_cli_args(folder, out, prompt=None, prompts=str(tmp_path)), f"--prompts {tmp_path} is not a file"),
    ]:
        assert message in _refused(argv, monkeypatch, capsys), argv
    assert a_file.read_text() == "mine" and not out.exists() and not (read_only / "sub").exists()


def test_an_out_that_is_a_link_to_nothing_is_refused_before_loading_weights(tiny, tmp_path, monkeypatch, capsys):
    """A link to a disk not mounted, or to a folder removed: mkdir stopped on it after the weights had loaded."""
    _, _, folder = tiny
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "unmounted" / "samples")
    for out in (dangling, dangling / "doctor"):
        err = _refused(_cli_args(folder, out), monkeypatch, capsys)
        assert f"--out {out}: {dangling} is a link to {tmp_path / 'unmounted' / 'samples'}, which does not exist" in err
    assert not (tmp_path / "unmounted").exists()


def test_an_empty_out_is_refused_not_read_as_the_working_directory(tiny, tmp_path, monkeypatch, capsys):
    """--out "$OUT" with OUT unset: Path("") is ".", and the refusal's own advice (--overwrite) wrote into it."""
    _, _, folder = tiny
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        err = _refused(_cli_args(folder, "") + extra, monkeypatch, capsys)
        assert "--out is empty: name the folder to write the images to" in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_prompts_past_the_text_encoders_75_tokens_are_named_in_one_warning(tiny, tmp_path, capsys):
    """The text encoder reads [start] + 75 ids + [end] (diffusers cuts there too, with a warning): the rest of a longer
    prompt changes no image, though samples.json records the prompt whole."""
    _, _, folder = tiny
    prompts = tmp_path / "prompts.txt"
    doctor = "a photo of a doctor " * 15 + "in a hospital"  # 75 tokens, then 3 more
    prompts.write_text("a cat " * 37 + "sitting\n" + doctor + "\n" + "a dog " * 40 + "\n")
    sample.main(_cli_args(folder, tmp_path / "out", prompt=None, prompts=str(prompts)))
    err = capsys.readouterr().err
    assert "warning: 2 prompts are longer than the 75 tokens the text encoder reads, which cuts the rest" in err
    assert "the first: 'a photo of a doctor a photo of a doctor'..." in err
    assert "hospital" not in err and "a cat" not in err and "a dog" not in err
    assert json.loads((tmp_path / "out" / "samples.json").read_text())["prompts"][1] == doctor
    sample.main(_cli_args(folder, tmp_path / "short", prompt="a cat " * 37 + "sitting", negative_prompt="dog " * 80))
    assert "warning: 1 prompt is longer than the 75 tokens" in capsys.readouterr().err  # the negative prompt


def _model_copy(folder, tmp_path, name, path, text):
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    (copy / path).write_text(text)
    return copy


def test_cli_checks_the_model_configs_and_the_size_multiple_before_loading_weights(tiny, tmp_path, monkeypatch,
                                                                                  capsys):
    import json
    _, _, folder = tiny
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    four_levels = {**unet_config, "block_out_channels": [32, 64, 64, 64],
                   "down_block_types": ["CrossAttnDownBlock2D"] + ["DownBlock2D"] * 3,
                   "up_block_types": ["UpBlock2D"] * 3 + ["CrossAttnUpBlock2D"]}
    deep = _model_copy(folder, tmp_path, "deep", "unet/config.json", json.dumps(four_levels))  # VAE 2 x UNet 8
    err = _refused(_cli_args(deep, tmp_path / "out", height="40"), monkeypatch, capsys)
    assert "--height must be a multiple of 16 for this model" in err
    for path, text, message in [
        ("unet/config.json", "[]", "unet/config.json: expected a JSON object"),
        ("vae/config.json", '{"latent_channels": null}', "vae/config.json: field 'latent_channels' must be"),
        ("text_encoder/config.json", "{", "text_encoder/config.json, line 1: not valid JSON"),
        ("scheduler/scheduler_config.json", '{"beta_start": "0.1"}',
         "scheduler_config.json: field 'beta_start' must be a positive number"),
    ]:
        broken = _model_copy(folder, tmp_path, path.replace("/", "-"), path, text)
        assert message in _refused(_cli_args(broken, tmp_path / "out"), monkeypatch, capsys), path
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,message", [
    ({"trained_betas": "0.1"}, r"field 'trained_betas' must be null or a list of num_train_timesteps \(1000\) numbers "
                               r"in \(0, 1\)"),  # a TypeError from torch.tensor before
    ({"trained_betas": [0.01] * 999 + [2.0]}, r"field 'trained_betas' must be null or a list"),  # complex ᾱ before
    ({"trained_betas": [[0.01]] * 1000}, r"field 'trained_betas' must be null or a list"),  # ᾱ of shape (1000, 1)
    ({"num_train_timesteps": 10, "trained_betas": [0.01] * 20},
     r"field 'trained_betas' must be null or a list of num_train_timesteps \(10\)"),
    ({"beta_end": 1.5}, r"field 'beta_end' must be below 1 \(a β is the variance of one step's noise\), got 1.5"),
    ({"rescale_betas_zero_snr": True}, r"rescale_betas_zero_snr true \(a zero terminal SNR\) is not supported"),
])
def test_a_schedule_that_is_no_schedule_is_refused_naming_the_file_and_field(tmp_path, change, message):
    """Each once ran to the end with another ᾱ than the file's, or stopped with a traceback."""
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SD_SCHEDULER, **change}))
    with pytest.raises(sample.weights.CheckpointError, match="scheduler_config.json: " + message):
        loading.read_schedule(tmp_path)


@pytest.mark.parametrize("config", [{"_class_name": "DDIMScheduler"}, {"beta_schedule": "scaled_linear"},
                                    {"beta_schedule": "linear", "beta_end": 0.012}])
def test_a_field_the_scheduler_file_omits_takes_the_default_diffusers_reads_it_with(tmp_path, config):
    """A hand-written scheduler_config.json without beta_schedule, beta_start or beta_end got SD's scaled_linear
    0.00085 .. 0.012 here and diffusers' linear 1e-4 .. 0.02 there: from one folder, ᾱ differing by up to 0.23."""
    from diffusers import DDIMScheduler, PNDMScheduler
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    ours, _ = loading.read_schedule(tmp_path)
    for kind in (DDIMScheduler, PNDMScheduler):  # SD v1.x's folders name PNDM; every such class has these defaults
        theirs = kind.from_config(config).alphas_cumprod.double()  # float32 products: 1e-5 apart at t = 999
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=0), (kind.__name__, (ours - theirs).abs().max().item())


def test_listed_betas_give_the_schedule_they_list(tmp_path):
    (tmp_path / "scheduler").mkdir()
    betas = diffusion.scaled_linear_betas().tolist()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SD_SCHEDULER, "trained_betas": betas}))
    schedule, prediction_type = loading.read_schedule(tmp_path)
    assert torch.equal(schedule, diffusion.sd_schedule()) and prediction_type == "epsilon"


def test_parts_that_do_not_fit_each_other_are_refused_in_one_line_before_anything_is_written(tiny, tmp_path,
                                                                                             monkeypatch, capsys):
    """A text encoder of another width than the UNet reads (another model's text_encoder/ in the folder) stopped
    generate with a ValueError traceback after samples.json was written; one whose vocabulary is smaller than the
    tokenizer's ids with an IndexError from the embedding."""
    import transformers
    _, _, folder = tiny
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    wide = _model_copy(folder, tmp_path, "wide", "text_encoder/config.json", json.dumps({**config, "hidden_size": 48}))
    err = _refused(_cli_args(wide, tmp_path / "out"), monkeypatch, capsys)  # from the configs: no weight is read
    assert f"--model {wide}: the models do not fit each other: UNet context_dim 32" in err
    assert "text encoder width 48" in err and not (tmp_path / "out").exists()
    monkeypatch.undo()
    small = tmp_path / "small"
    shutil.copytree(folder, small)
    shutil.rmtree(small / "text_encoder")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=998, eos_token_id=999, pad_token_id=999)).save_pretrained(
        small / "text_encoder")
    with pytest.raises(SystemExit, match=rf"cannot load --model {re.escape(str(small))}: the tokenizer's ids reach "
                                         r"49407, past the text encoder's vocab_size 1000"):
        sample.main(_cli_args(small, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_steps_past_a_shorter_schedule_are_refused_in_one_line_before_anything_is_written(tiny, tmp_path):
    _, _, folder = tiny
    short = tmp_path / "short"
    shutil.copytree(folder, short)
    config = json.loads((short / "scheduler" / "scheduler_config.json").read_text())
    (short / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "num_train_timesteps": 500}))
    with pytest.raises(SystemExit, match=r"--steps 500: the model's schedule has 500 steps; at most 499"):
        sample.main(_cli_args(short, tmp_path / "out", steps="500"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"steps 500: the model's schedule has 500 steps; at most 499"):
        sample.generate(sample.load_models(short), ["a cat"], [0], steps=500, height=H, width=W, progress=False)


def test_overwrite_deletes_only_what_the_previous_run_listed_and_only_after_every_check(tiny, tmp_path, monkeypatch,
                                                                                       capsys):
    import json
    _, _, folder = tiny
    out = tmp_path / "out"
    sample.main(_cli_args(folder, out, n="3"))
    (out / "mine.png").write_bytes(b"the user's own image")
    (out / "00007.png").write_bytes(b"another of the user's")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # a refused run deletes nothing
    for bad in (dict(seed=str(2 ** 64)), dict(guidance="1e30"), dict(height="36")):
        _refused(_cli_args(folder, out, **bad) + ["--overwrite"], monkeypatch, capsys)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    sample.main(_cli_args(folder, out) + ["--overwrite"])  # one image: 00001.png and 00002.png go, the user's stay
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00007.png", "grid.png", "mine.png", "samples.json"]
    assert (out / "mine.png").read_bytes() == before["mine.png"]
    assert json.loads((out / "samples.json").read_text())["files"] == ["00000.png"]

    # a file the new run would write, but that no samples.json lists, is the user's: refused, kept
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "00000.png").write_bytes(b"the user's own image")
    err = _refused(_cli_args(folder, mine) + ["--overwrite"], monkeypatch, capsys)
    assert f"--out {mine}: {mine / '00000.png'} would be overwritten" in err
    assert (mine / "00000.png").read_bytes() == b"the user's own image"
    # a samples.json that lists anything but this run's own image names is refused, and nothing is deleted
    (tmp_path / "victim.png").write_bytes(b"elsewhere")
    (mine / "samples.json").write_text(json.dumps({"files": ["../victim.png"]}))
    err = _refused(_cli_args(folder, mine) + ["--overwrite"], monkeypatch, capsys)
    assert "samples.json does not list the images of a sample.py run" in err
    assert (tmp_path / "victim.png").exists() and (mine / "00000.png").exists()
    # a link where a file goes, even one to nothing yet, is refused: the image would land where it points
    links = tmp_path / "links"
    links.mkdir()
    for name in ("00000.png", "grid.png"):
        (links / name).symlink_to(tmp_path / f"outside-{name}")
        err = _refused(_cli_args(folder, links) + ["--overwrite"], monkeypatch, capsys)
        assert f"{links / name} would be overwritten" in err and not (tmp_path / f"outside-{name}").exists()
        (links / name).unlink()


def test_a_run_whose_out_another_run_wrote_into_while_it_loaded_is_refused_and_leaves_that_run_whole(tiny, tmp_path,
                                                                                                     monkeypatch):
    """--out was checked before the weights load (seconds to minutes for SD) and not again: a second run started on
    the same empty folder wrote over the first one's images, and its samples.json listed images it had not made."""
    import json
    _, _, folder = tiny
    out, load, calls = tmp_path / "out", sample.load_models, []

    def load_while_another_run_writes(*args, **kwargs):  # run B starts and finishes while run A loads
        calls.append(1)
        if len(calls) == 1:
            sample.main(_cli_args(folder, out, prompt="a dog", n="3", steps="2", progress=None) + ["--no-progress"])
        return load(*args, **kwargs)

    monkeypatch.setattr(sample, "load_models", load_while_another_run_writes)
    with pytest.raises(SystemExit, match=rf"--out {re.escape(str(out))}: it exists and is not empty"):
        sample.main(_cli_args(folder, out, n="2") + ["--no-progress"])
    monkeypatch.undo()
    sample.main(_cli_args(folder, tmp_path / "ref", prompt="a dog", n="3", steps="2") + ["--no-progress"])
    assert json.loads((out / "samples.json").read_text())["prompts"] == ["a dog"] * 3
    for name in ["00000.png", "00001.png", "00002.png"]:  # every image is the one samples.json describes
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_an_out_through_a_missing_folder_and_dotdot_is_refused_before_it_can_overwrite(tiny, tmp_path, monkeypatch,
                                                                                          capsys):
    """--out missing/../mine: Path.exists() says no to it (missing is not there), so the refusal of a non-empty
    folder never ran, and mkdir made missing/ and wrote the images over the user's files in mine/."""
    _, _, folder = tiny
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "grid.png").write_bytes(b"the user's own grid")
    for out in (tmp_path / "missing" / ".." / "mine", tmp_path / "missing" / ".."):
        err = _refused(_cli_args(folder, out) + ["--overwrite"], monkeypatch, capsys)
        assert f"{tmp_path / 'missing'} does not exist, so '..' after it" in err
    assert (mine / "grid.png").read_bytes() == b"the user's own grid" and not (tmp_path / "missing").exists()


def test_overwrite_removes_the_evaluation_of_the_images_it_replaces_and_keeps_a_users_file(tiny, tmp_path,
                                                                                           monkeypatch):
    """evaluate.py OUT writes OUT/evaluation.json: left beside new images, it would report on images no longer there."""
    import evaluate
    _, _, folder = tiny
    out, mine = tmp_path / "out", tmp_path / "mine"
    sample.main(_cli_args(folder, out, n="2"))
    monkeypatch.setattr(evaluate, "evaluate_digits", lambda args: {"n_images": 2, "fd": 0.5})  # no classifier needed
    monkeypatch.setattr(evaluate, "format_result", str)
    evaluate.main([str(out)])
    assert evaluate.is_result(out / "evaluation.json")
    sample.main(_cli_args(folder, out, seed="7") + ["--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "grid.png", "samples.json"]
    # a file of that name that evaluate.py did not write is the user's: kept
    sample.main(_cli_args(folder, mine))
    (mine / "evaluation.json").write_text('{"notes": "my own"}')
    sample.main(_cli_args(folder, mine) + ["--overwrite"])
    assert (mine / "evaluation.json").read_text() == '{"notes": "my own"}'
    # a folder no sample.py run wrote (real images, judged by evaluate.py): its evaluation.json is not of our images
    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (8, 8)).save(real / "photo.png")
    evaluate.main([str(real)])
    sample.main(_cli_args(folder, real) + ["--overwrite"])
    assert evaluate.is_result(real / "evaluation.json") and (real / "photo.png").is_file()


def test_overwrite_keeps_an_evaluation_of_other_images_written_into_its_folder(tiny, tmp_path, monkeypatch):
    """`evaluate.py k2 --out k1/evaluation.json` judged k2's images; sample.py --out k1 --overwrite deleted it as the
    evaluation of k1's old images: the only copy of k2's result."""
    import evaluate
    _, _, folder = tiny
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    sample.main(_cli_args(folder, k1)), sample.main(_cli_args(folder, k2))
    monkeypatch.setattr(evaluate, "evaluate_digits", lambda args: {"n_images": 1, "fd": 0.5})  # no classifier needed
    monkeypatch.setattr(evaluate, "format_result", str)
    evaluate.main([str(k2), "--out", str(k1 / "evaluation.json")])
    sample.main(_cli_args(folder, k1, seed="7") + ["--overwrite"])
    assert json.loads((k1 / "evaluation.json").read_text())["image_dirs"] == [str(k2)]
    # k2's own evaluation, written from one folder by a relative path, then k2 moved and sampled anew from another
    monkeypatch.chdir(tmp_path)
    evaluate.main(["k2"])
    k2.rename(tmp_path / "moved")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    sample.main(_cli_args(folder, tmp_path / "moved", seed="7") + ["--overwrite"])
    assert not (tmp_path / "moved" / "evaluation.json").exists()  # it judged the images replaced: stale, removed


# ---------------------------------------------------------------------------------------------------------------
# Indicator guidance: each image's target, drawn with its own seed, and kept at any batch size


def test_target_groups_are_drawn_per_image_from_the_shares():
    shares, seeds = torch.tensor([0.2, 0.3, 0.5]), list(range(2000))
    targets = guidance.draw_targets(seeds, shares)
    for n, p in zip(torch.bincount(targets, minlength=3).tolist(), shares.tolist()):
        assert abs(n - len(seeds) * p) <= 4 * (len(seeds) * p * (1 - p)) ** 0.5, (n, p)  # 4 binomial sigmas
    # image k's target depends on its seed alone: not on the batch, its size, or the other images
    assert torch.equal(guidance.draw_targets(seeds[5:12], shares), targets[5:12])
    assert guidance.draw_targets([3, 10 ** 9, 7], shares)[[0, 2]].tolist() == targets[[3, 7]].tolist()
    assert guidance.draw_targets([777], shares).item() == targets[777]


def test_guided_images_keep_their_own_targets_at_any_batch_size(tiny, one_thread):
    from ddm import Indicator
    _, models, _ = tiny
    torch.manual_seed(0)
    ind = Indicator((4, H // 2, W // 2), 3, (8,), timestep_dim=8)
    kw = dict(steps=2, height=H, width=W, progress=False)

    def guided(targets, batch_size):
        guide = diffusion.Guidance(ind, torch.tensor(targets), 200.0)
        return sample.generate(models, PROMPTS, SEEDS, batch_size=batch_size, guides=[guide], **kw)

    first = guided([0, 1, 2, 1], 4)
    assert (first[3].int() - guided([0, 1, 2, 0], 4)[3].int()).abs().float().mean() > 5  # the target matters
    for batch_size in (1, 3):
        assert (guided([0, 1, 2, 1], batch_size).int() - first.int()).abs().max() <= 1, batch_size

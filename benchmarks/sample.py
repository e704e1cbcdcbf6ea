"""sample.py against diffusers' StableDiffusionPipeline (DDIMScheduler) on identical weights, CPU fp32.

1. End to end on a tiny random-weight SD (16 images of 32x32, 20 DDIM steps, guidance 7.5, one batch; then one
   image alone): text encoding, the loop, decoding, conversion. At 16 images the UNet's kernels (attention,
   convolutions: the same ones diffusers calls) take most of the time; at one image the per-call overhead shows.
   The machine's state moves this ratio between processes: run it several times.
2. The loop alone: the same run with both UNets replaced by a free stand-in (returns its input), prompt
   embeddings given, no decoding: what each sampler loop costs around the network.
3. Per step at full SD v1.5 UNet size, 32x32 latents (256 px), batch 1 with guidance (the UNet sees 2 rows),
   prompt embeddings given: here the UNet dominates and the loop must add nothing.
Targets: ratio ours/diffusers <= 0.8 for 1, <= 1.0 for 3.
"""
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

import diffusion
import loading
import sample
from benchmarks import unet as unet_bench
from benchmarks.common import interleaved_medians, report
from tools.make_sd_tokenizer import write_sd_tokenizer

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_parts(vae_levels=2):
    """A tiny random-weight SD: UNet 32/64 channels, VAE with `vae_levels` levels, 2-layer 32-wide CLIP."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16,) * vae_levels, layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * vae_levels,
                        up_block_types=("UpDecoderBlock2D",) * vae_levels, norm_num_groups=8)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407))
    return unet.eval(), vae.eval(), text_encoder.eval()


def pipeline(unet, vae, text_encoder, tokenizer_dir):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def end_to_end(tmp, image_counts=(16, 1), steps=20, size=32):
    tokenizer_dir = write_sd_tokenizer(tmp / "tokenizer")
    pipe = pipeline(*tiny_parts(), tokenizer_dir)
    pipe.save_pretrained(tmp / "sd")
    for name in ("vocab.json", "merges.txt"):  # SD's tokenizer files (transformers 5 saves only tokenizer.json)
        shutil.copy(tokenizer_dir / name, tmp / "sd" / "tokenizer" / name)
    models = loading.load_models(tmp / "sd")
    for n in image_counts:
        prompts = ([f"a photo of a {w}" for w in ("doctor", "nurse", "teacher", "pilot")] * n)[:n]
        seeds = list(range(n))

        def ours():
            return sample.generate(models, prompts, seeds, steps=steps, guidance=7.5, height=size, width=size,
                                   batch_size=n, progress=False)

        def ref():
            return pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images

        with torch.inference_mode():
            diff = (ours().float() - torch.from_numpy(ref() * 255).round()).abs().max()
        assert diff <= 1, f"not the same images (max difference {diff} levels)"
        reps = 5 if n > 1 else 15  # one image takes ~0.25 s: more rounds for the same steadiness
        medians = interleaved_medians({"ours": ours, "ref": ref}, warmup=1, reps=reps)
        report(f"tiny SD {n} img {size}px {steps} DDIM steps cfg", medians["ours"], medians["ref"])


class FreeUNet(torch.nn.Module):
    """Our UNet's interface at no cost: ε̂ = x."""
    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # denoise reads the weights' dtype

    def forward(self, x, t, context):
        return x


class FreeDiffusersUNet(UNet2DConditionModel):
    """diffusers' UNet interface (config, dtype, device) at no cost: ε̂ = x."""
    def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        return (sample,)


def loop_only(tmp, n=16, steps=20, size=32):
    unet, vae, text_encoder = tiny_parts()
    free = FreeDiffusersUNet.from_config(unet.config).eval()
    pipe = pipeline(free, vae, text_encoder, write_sd_tokenizer(tmp / "tokenizer-loop"))
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(n, 77, 32, generator=g), torch.randn(n, 77, 32, generator=g)
    x = torch.randn(n, 4, size // 2, size // 2, generator=g)
    schedule, ours_unet = diffusion.sd_schedule(), FreeUNet()

    def ours():
        return diffusion.denoise(ours_unet, x, cond, uncond, schedule, [torch.Generator().manual_seed(0)] * n,
                              steps=steps, guidance=7.5)

    def ref():
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=size, width=size, latents=x,
                    num_inference_steps=steps, guidance_scale=7.5, output_type="latent").images

    with torch.inference_mode():
        torch.testing.assert_close(ours(), ref(), atol=1e-4, rtol=1e-4)
    medians = interleaved_medians({"ours": ours, "ref": ref}, warmup=2, reps=15)
    return report(f"loop only, free UNet, {n} img {steps} steps cfg", medians["ours"], medians["ref"])


def per_step(tmp, steps=3):
    ours_unet, ref_unet = unet_bench.models()  # full-size SD v1.5 UNets sharing one set of random weights
    _, vae, text_encoder = tiny_parts(vae_levels=4)  # unused by the timed loop, but the pipeline wants them
    pipe = pipeline(ref_unet, vae, text_encoder, write_sd_tokenizer(tmp / "tokenizer-full"))
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    x = torch.randn(1, 4, 32, 32, generator=g)
    schedule = diffusion.sd_schedule()

    def ours():
        return diffusion.denoise(ours_unet, x, cond, uncond, schedule, [torch.Generator().manual_seed(0)],
                              steps=steps, guidance=7.5)

    def ref():
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=256, width=256, latents=x,
                    num_inference_steps=steps, guidance_scale=7.5, output_type="latent").images

    with torch.inference_mode():
        torch.testing.assert_close(ours(), ref(), atol=1e-3, rtol=1e-3)
    # 5 reps: with 3, three runs on the shared 2-core machine spread from 0.98 to 1.12
    medians = interleaved_medians({"ours": ours, "ref": ref}, warmup=1, reps=5)
    return report("SD v1.5 UNet per DDIM step, 32x32 cfg", medians["ours"] / steps, medians["ref"] / steps)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        end_to_end(tmp)
        loop_only(tmp)
        per_step(tmp)


if __name__ == "__main__":
    main()

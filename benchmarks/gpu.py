"""On a CUDA GPU, full-size SD v1.5 networks with identical random weights, ours against diffusers (+ peft):

1. UNet parity on the GPU in float32 (TF32 off), 64x64 latents (512 px), batch 2.
2. Sampling: one guided UNet call (the UNet sees 2 rows per image) at 64x64 with float16 weights, no autocast,
   as sample.py runs on CUDA, for 1 and 4 images; and end to end, sample.generate against StableDiffusionPipeline
   (full-size random VAE and text encoder too), 4 images of 512 px, 20 DDIM steps, float16.
3. Training: one step (forward, backward, clip, AdamW) of LoRA rank 8 at 512 px under bf16
   autocast (float32 master weights), batch 1 and 4, with and without gradient checkpointing: ms per step,
   steps/s and peak memory (torch.cuda.max_memory_allocated).
Times are medians of CUDA-synchronised wall clocks over interleaved rounds. On a machine without CUDA it says so.
"""
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import checkpoints
import loading
import lora
import sample
import train
import weights
from benchmarks import unet as unet_bench
from benchmarks.common import fill_random_
from ddm import Indicator, ddm_loss

ARGS = train.build_parser().parse_args(["--data", "-", "--out", "-"])  # train.py's optimizer defaults
CUDA = torch.device("cuda")


def medians(fns, warmup=2, reps=10):
    """Median seconds per call of each fn in {name: fn}, interleaved rounds, the GPU synchronised around each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_gib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def line(title, t, mem=None):
    s = f"{title:<46} ours {t['ours'] * 1e3:8.2f} ms  ref {t['ref'] * 1e3:8.2f} ms  ratio {t['ours'] / t['ref']:5.2f}"
    if mem:
        s += f"  peak GiB ours {mem['ours']:6.2f} ref {mem['ref']:6.2f}"
    print(s, flush=True)


def parity(ours, ref):
    defaults = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator(CUDA).manual_seed(1)
    x, c = torch.randn(2, 4, 64, 64, generator=g, device=CUDA), torch.randn(2, 77, 768, generator=g, device=CUDA)
    t = torch.tensor([10, 900], device=CUDA)
    with torch.no_grad():
        want = ref(x, t, c).sample
        print(f"UNet fp32 64x64 b2 on {torch.cuda.get_device_name()}: max abs diff "
              f"{(ours(x, t, c) - want).abs().max().item():.2e} (output scale {want.abs().max().item():.1f})")
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cuda", dtype=dtype):
                errs = [((m(x, t, c) if m is ours else m(x, t, c).sample).float() - want).norm() / want.norm()
                        for m in (ours, ref)]
            print(f"  autocast {str(dtype)[6:]}: relative error to fp32, ours {errs[0]:.2e}  diffusers {errs[1]:.2e}")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = defaults  # as a user runs


def inference(ours, ref):
    ours, ref = ours.half(), ref.half()
    for images in (1, 4):
        g = torch.Generator(CUDA).manual_seed(2)
        x = torch.randn(2 * images, 4, 64, 64, generator=g, device=CUDA, dtype=torch.float16)
        c = torch.randn(2 * images, 77, 768, generator=g, device=CUDA, dtype=torch.float16)
        t = torch.tensor(500, device=CUDA)

        def run(m):  # float16 weights without autocast, as sample.py and diffusers' fp16 pipelines run
            with torch.inference_mode():
                return m(x, t, c) if m is ours else m(x, t, c).sample
        line(f"UNet call fp16 64x64, {images} img with cfg (b{2 * images})",
             medians({"ours": lambda: run(ours), "ref": lambda: run(ref)}, reps=20))
    return ours.float(), ref.float()


def end_to_end(ours_unet, ref_unet, n=4, steps=20):
    import transformers
    from diffusers import AutoencoderKL

    from benchmarks.sample import pipeline
    from clip_text import TRANSFORMERS5_NAMES, CLIPTextConfig, CLIPTextModel
    from tokenizer import load_tokenizer
    from tools.make_sd_tokenizer import write_sd_tokenizer
    from vae import VAE, VAEConfig, vae_diffusers_config, vae_from_diffusers

    vcfg, tcfg = VAEConfig(), CLIPTextConfig()
    vae_kwargs = {k: v for k, v in vae_diffusers_config(vcfg).items() if not k.startswith("_")}
    ref_vae = fill_random_(AutoencoderKL(**vae_kwargs).to(CUDA), seed=3)
    ours_vae = VAE(vcfg).to(CUDA)
    ours_vae.load_state_dict(vae_from_diffusers(ref_vae.state_dict(), vcfg), strict=True)
    ref_text = fill_random_(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=tcfg.vocab_size, max_position_embeddings=tcfg.max_position, hidden_size=tcfg.width,
        num_hidden_layers=tcfg.layers, num_attention_heads=tcfg.heads, intermediate_size=tcfg.mlp,
        hidden_act="quick_gelu")).to(CUDA), seed=4)
    ours_text = CLIPTextModel(tcfg).to(CUDA)
    ours_text.load_state_dict(weights.rename(ref_text.state_dict(), TRANSFORMERS5_NAMES), strict=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = write_sd_tokenizer(Path(tmp) / "tokenizer")
        pipe = pipeline(ref_unet.half(), ref_vae.half().eval(), ref_text.half().eval(), tok_dir)
        models = loading.Models(unet=ours_unet.half(), vae=ours_vae.half().eval(),
                               text_encoder=ours_text.half().eval(), tokenizer=load_tokenizer(tok_dir),
                               vae_config=vcfg)
    prompts, seeds = ["a photo of a doctor"] * n, list(range(n))

    def run_ours():
        return sample.generate(models, prompts, seeds, steps=steps, height=512, width=512, batch_size=n,
                               progress=False)

    # the pipeline would draw its noise in float16; give it ours (float32 draws, as in sample.py) to compare images
    noise = torch.cat([torch.randn((1, 4, 64, 64), generator=torch.Generator().manual_seed(s)) for s in seeds])
    noise = noise.to(CUDA, torch.float16)

    def run_ref():
        return pipe(prompts, height=512, width=512, num_inference_steps=steps, guidance_scale=7.5, latents=noise,
                    output_type="pt").images

    with torch.inference_mode():
        a, b = run_ours().float(), (run_ref().float() * 255).round().cpu().permute(0, 2, 3, 1)
        print(f"sample.generate vs pipeline fp16: mean |diff| {(a - b).abs().mean():.2f} uint8 levels")
        line(f"end to end fp16, {n} img 512px {steps} DDIM steps cfg", medians({"ours": run_ours, "ref": run_ref},
                                                                             warmup=1, reps=5))
    return ours_unet.float(), ref_unet.float()


def training(ours, ref):
    from peft import LoraConfig
    lora.inject_lora(ours, checkpoints.UNET_LORA_TARGETS, rank=8, alpha=32)
    lora.mark_only_lora_trainable(ours)
    ref.requires_grad_(False)
    ref.add_adapter(LoraConfig(r=8, lora_alpha=32, init_lora_weights="gaussian",
                               target_modules=list(checkpoints.UNET_LORA_TARGETS)))
    ours.train(), ref.train()
    for batch in (1, 4):
        g = torch.Generator(CUDA).manual_seed(5)
        z_t, noise = (torch.randn(batch, 4, 64, 64, generator=g, device=CUDA) for _ in range(2))
        c = torch.randn(batch, 77, 768, generator=g, device=CUDA)
        t = torch.randint(0, 1000, (batch,), generator=g, device=CUDA)
        groups = torch.arange(batch, device=CUDA) % 2
        ind_ours = Indicator((4, 64, 64), 2).to(CUDA)
        ind_ref = copy.deepcopy(ind_ours)

        def make_step(unet, ind):
            params = [p for p in unet.parameters() if p.requires_grad] + list(ind.parameters())
            opt = checkpoints.make_optimizer(params, ARGS) if unet is ours else torch.optim.AdamW(
                params, lr=ARGS.lr, betas=tuple(ARGS.adam_betas), eps=ARGS.adam_eps, weight_decay=ARGS.weight_decay)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    if unet is ours:
                        loss = ddm_loss(ours(z_t, t, c), noise, groups, ind)[0]
                    else:
                        e = ref(z_t, t, c).sample
                        loss = 0.95 * F.mse_loss(e.float(), noise) + 0.05 * F.cross_entropy(ind(e).float(), groups)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, ARGS.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        for checkpointing in (False, True):
            ours.gradient_checkpointing = checkpointing
            (ref.enable_gradient_checkpointing if checkpointing else ref.disable_gradient_checkpointing)()
            fns = {"ours": make_step(ours, ind_ours), "ref": make_step(ref, ind_ref)}
            for fn in fns.values():
                fn()
            mem = {name: peak_gib(fn) for name, fn in fns.items()}
            times = medians(fns, warmup=1, reps=8)
            line(f"train LoRA-8 bf16 512px b{batch} ckpt {'on ' if checkpointing else 'off'}", times, mem)
            print(f"  steps/s ours {1 / times['ours']:.2f}  ref {1 / times['ref']:.2f}", flush=True)
            del fns
            torch.cuda.empty_cache()


def main():
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark needs one (skipped)")
        return
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    ours, ref = unet_bench.models(device=CUDA)  # full-size SD v1.5 UNets sharing one set of random weights
    parity(ours, ref)
    ours, ref = inference(ours, ref)
    ours, ref = end_to_end(ours, ref)
    training(ours, ref)


if __name__ == "__main__":
    main()

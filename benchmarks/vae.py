"""VAE decode, 32x32 latent -> 256x256 image, ours vs diffusers.AutoencoderKL on identical SD v1.5-size weights.

CPU fp32, batch 1. Bar: ratio <= 1.0; aim <= 0.9.
"""
import torch
from diffusers import AutoencoderKL

from benchmarks.common import interleaved_medians, peak_memory_mb, report
from vae import VAE, VAEConfig, vae_diffusers_config, vae_from_diffusers


def main():
    torch.manual_seed(0)
    cfg = VAEConfig()
    ref = AutoencoderKL(**{k: v for k, v in vae_diffusers_config(cfg).items() if not k.startswith("_")}).eval()
    with torch.device("meta"):
        ours = VAE(cfg)
    ours.load_state_dict(vae_from_diffusers(ref.state_dict(), cfg), strict=True, assign=True)
    ours.eval()
    z = torch.randn(1, cfg.z_channels, 32, 32)

    def run_ours():
        return ours.decode(z)

    def run_ref():
        return ref.decode(z).sample

    with torch.inference_mode():
        diff = (run_ours() - run_ref()).abs().max().item()
        _, mem_ours = peak_memory_mb(run_ours)
        _, mem_ref = peak_memory_mb(run_ref)
    t = interleaved_medians({"ours": run_ours, "ref": run_ref}, warmup=1, reps=5)
    report("vae decode 1x4x32x32 -> 256^2 (fp32 CPU)", t["ours"], t["ref"], mem_ours, mem_ref)
    print(f"  max abs diff vs diffusers {diff:.2e}", flush=True)

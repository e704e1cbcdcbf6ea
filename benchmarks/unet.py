"""Our UNet against diffusers' UNet2DConditionModel: full-size SD v1.5, identical weights, CPU fp32, batch 1,
32x32 latent (256 px). Prints the median time ratio ours/diffusers and the peak memory of one forward of each."""
import torch
from diffusers import UNet2DConditionModel

import weights
from benchmarks.common import fill_random_, interleaved_medians, peak_memory_mb, report
from unet import UNet, UNetConfig, unet_diffusers_config, unet_diffusers_names


def models(cfg=UNetConfig(), device="cpu"):
    """Both UNets sharing one set of random weights (common.fill_random_), in eval mode."""
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(unet_diffusers_config(cfg))
        ours = UNet(cfg)
    ref = fill_random_(ref.to_empty(device=device)).eval()
    state = weights.rename(ref.state_dict(), {v: k for k, v in unet_diffusers_names(cfg).items()})
    weights.load_strict(ours, state, "UNet")  # assigns the same tensors: no second copy
    return ours.eval(), ref


def main(warmup=1, reps=5):
    ours, ref = models()
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500])
    fns = {"ours": lambda: ours(x, t, context), "ref": lambda: ref(x, t, context).sample}
    with torch.inference_mode():
        torch.testing.assert_close(fns["ours"](), fns["ref"](), atol=1e-4, rtol=1e-4)
        mem = {}
        for name in ("ours", "ref", "ours", "ref"):  # twice each, keep the second: both after a warm allocator
            mem[name] = peak_memory_mb(fns[name])[1]
    medians = interleaved_medians(fns, warmup=warmup, reps=reps)
    report("UNet SD v1.5 fp32 CPU b1 32x32", medians["ours"], medians["ref"], mem["ours"], mem["ref"])


if __name__ == "__main__":
    main()

"""Our UNet against diffusers' UNet2DConditionModel: full-size SD v1.5, identical weights, CPU fp32, batch 1,
32x32 latent (256 px). Prints the median time ratio ours/diffusers and the peak memory of one forward of each.
Then unet.Conv3x3 against the conv kernel (F.conv2d, what diffusers runs) at the SD shapes where it takes the
im2col matmul, forward and forward + backward."""
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

import weights
from benchmarks.common import fill_random_, interleaved_medians, peak_memory_mb, report
from unet import Conv3x3, UNet, UNetConfig, unet_diffusers_config, unet_diffusers_names


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
    conv3x3()


def conv3x3(shapes=((2, 1280, 8), (2, 2560, 4), (8, 1280, 4), (8, 2560, 8), (8, 2560, 1))):
    """(batch, input channels, map side) -> 1280 channels; batch 2 and 8 are 1 and 4 images with guidance."""
    for B, C, side in shapes:
        conv = Conv3x3(C, 1280)
        x = torch.randn(B, C, side, side, requires_grad=True)
        g = torch.randn(B, 1280, side, side)
        fns = {"ours": lambda: conv(x), "ref": lambda: F.conv2d(x, conv.weight, conv.bias, padding=1)}
        medians = interleaved_medians(fns, warmup=1, reps=7)
        report(f"Conv3x3 {B}x{C}x{side}x{side} forward", medians["ours"], medians["ref"])

        def backward(fn):
            with torch.inference_mode(False), torch.enable_grad():  # interleaved_medians times in inference mode
                return torch.autograd.grad(fn(), (x, conv.weight, conv.bias), g)

        grads = {name: (lambda fn=fn: backward(fn)) for name, fn in fns.items()}
        medians = interleaved_medians(grads, warmup=1, reps=5)
        report(f"Conv3x3 {B}x{C}x{side}x{side} fwd+bwd", medians["ours"], medians["ref"])


if __name__ == "__main__":
    main()

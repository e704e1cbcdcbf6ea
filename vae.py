"""The Stable Diffusion v1.x autoencoder (AutoencoderKL): images <-> latents, from scratch.

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022), Sec. 3.1 and
App. G: a convolutional encoder maps an image x (3, H, W) to a diagonal Gaussian q(z|x) over latents
z (4, H/8, W/8); a decoder maps z back to pixels. Diffusion (and DDM's debiasing) runs entirely on z.
Module names follow the CompVis checkpoint (`first_stage_model.` in the single file), so that file loads with
no renaming; the diffusers `vae/` folder is read through a short generated renaming table (`vae_diffusers_names`).

The scale factor 0.18215 (latents to unit variance) and the [-1, 1] <-> [0, 255] pixel conversions are the
callers' business (sample.py, train.py); nothing in this file applies them or edits its inputs in place.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights
from unet import Upsample  # nearest x2, then a 3x3 conv: the same module in both


@dataclass
class VAEConfig:
    in_channels: int = 3  # RGB
    out_channels: int = 3
    ch: int = 128  # channels at full resolution
    ch_mult: tuple = (1, 2, 4, 4)  # 128/256/512/512; len-1 downsamplings -> factor 8
    num_res_blocks: int = 2  # per level in the encoder; the decoder has one more
    z_channels: int = 4  # latent channels (the encoder emits 2x: mean and log-variance)
    num_groups: int = 32  # GroupNorm groups
    scaling_factor: float = 0.18215  # latent std of SD v1's VAE on its training data; applied by callers only

    @property
    def downsample_factor(self):
        return 2 ** (len(self.ch_mult) - 1)


def Normalize(cfg, channels):
    return nn.GroupNorm(cfg.num_groups, channels, eps=1e-6)  # CompVis Normalize(); 1e-5 drifts ~5e-4 from it


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice plus a skip; `nin_shortcut` (1x1 conv) only when the channel count changes."""

    def __init__(self, cfg, in_ch, out_ch):
        super().__init__()
        self.norm1 = Normalize(cfg, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(cfg, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        # In-place SiLU and add touch only tensors made here (GroupNorm's backward does not need its output).
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))  # dropout is 0 in SD's VAE: omitted
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (only in the mid blocks).

    q/k/v/proj_out are 1x1 convolutions, as stored in the CompVis checkpoint ([C, C, 1, 1]); a 1x1 conv on
    (B, C, H, W) is a linear map on (B, H*W, C), which is how they are applied here (no weight copy: a view).
    """

    def __init__(self, cfg, channels):
        super().__init__()
        self.norm = Normalize(cfg, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (F.linear(h, m.weight.flatten(1), m.bias).unsqueeze(1) for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, H*W, C), one head of width C
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, cfg, channels):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # Pad 0 left/top, 1 right/bottom, as CompVis does; symmetric padding=1 shifts every latent by half a pixel.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution of the encoder (`down.i`) or decoder (`up.i`): res blocks, then an optional resampler."""

    def __init__(self, cfg, in_ch, out_ch, n_blocks, resample=None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cfg, in_ch if j == 0 else out_ch, out_ch) for j in range(n_blocks))
        self.downsample = Downsample(out_ch) if resample == "down" else None
        self.upsample = Upsample(out_ch) if resample == "up" else None

    def forward(self, x):
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """x (B, in, H, W) -> (B, 2*z_channels, H/f, W/f): mean and log-variance, before quant_conv."""

    def __init__(self, cfg):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        L = len(chans)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(cfg, ([cfg.ch] + chans)[i], chans[i], cfg.num_res_blocks, "down" if i < L - 1 else None)
            for i in range(L))
        self.mid = MidBlock(cfg, chans[-1])
        self.norm_out = Normalize(cfg, chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)  # halves H, W except at the last level
        return self.conv_out(F.silu(self.norm_out(self.mid(h)), inplace=True))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> (B, out, h*f, w*f). `up.i` is level i (i = 0 full resolution), run from L-1 down."""

    def __init__(self, cfg):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        L = len(chans)
        self.conv_in = nn.Conv2d(cfg.z_channels, chans[-1], 3, padding=1)
        self.mid = MidBlock(cfg, chans[-1])
        self.up = nn.ModuleList(
            Level(cfg, (chans + [chans[-1]])[i + 1], chans[i], cfg.num_res_blocks + 1, "up" if i > 0 else None)
            for i in range(L))
        self.norm_out = Normalize(cfg, chans[0])
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)  # doubles H, W except at level 0
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)), per latent element. logvar is clamped to [-30, 20] as the reference does."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, z, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite for an untrained or diverging encoder

    @property
    def std(self):
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        """mean + std * eps with eps ~ N(0, I) drawn from `generator` (on the generator's device, like diffusers)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self):
        return self.mean


class VAE(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = cfg = config or VAEConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def _check(self, t, channels, what, factor):  # programming errors: sizes are checked at the boundary
        assert t.ndim == 4 and t.shape[1] == channels and t.shape[2] % factor == 0 and t.shape[3] % factor == 0, \
            f"{what} must be (B, {channels}, H, W) with sides multiples of {factor}, got {tuple(t.shape)}"

    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1], H and W multiples of f (8 in SD) -> DiagonalGaussian over (B, 4, H/f, W/f)."""
        self._check(x, self.config.in_channels, "image", self.config.downsample_factor)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """z (B, 4, h, w), unscaled (already divided by scaling_factor) -> x (B, 3, f·h, f·w), roughly in [-1, 1]."""
        self._check(z, self.config.z_channels, "latent", 1)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, generator=None):
        """Reconstruction through a sampled latent."""
        return self.decode(self.encode(x).sample(generator))


# ---------------------------------------------------------------------------------------------------------------
# Loading: the single file holds CompVis names; the diffusers `vae/` folder renames modules and stores the
# attention's 1x1 convs as [C, C] linear weights.

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
ATTN_NEW = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
ATTN_OLD = {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}


def vae_diffusers_names(cfg, attention=ATTN_NEW):
    """{CompVis module prefix: diffusers module prefix}; invert it for the other direction. With L levels:

    encoder.down.i.block.j      -> encoder.down_blocks.i.resnets.j     (j < num_res_blocks)
    encoder.down.i.downsample   -> encoder.down_blocks.i.downsamplers.0   (i < L-1)
    decoder.up.i.block.j        -> decoder.up_blocks.(L-1-i).resnets.j (j <= num_res_blocks; index REVERSED)
    decoder.up.i.upsample       -> decoder.up_blocks.(L-1-i).upsamplers.0 (i > 0)
    X.mid.block_1/_2, attn_1    -> X.mid_block.resnets.0/1, attentions.0 (attention names: ATTN_NEW or ATTN_OLD)
    ....nin_shortcut, norm_out  -> ...conv_shortcut, conv_norm_out
    """
    L, table = len(cfg.ch_mult), {}

    def resnet(old, new):
        table[old], table[old + ".nin_shortcut"] = new, new + ".conv_shortcut"

    for part in ("encoder", "decoder"):
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        for old, new in attention.items():
            table[f"{part}.mid.attn_1.{old}"] = f"{part}.mid_block.attentions.0.{new}"
        table[f"{part}.norm_out"] = f"{part}.conv_norm_out"
    for i in range(L):
        for j in range(cfg.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        for j in range(cfg.num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{L - 1 - i}.resnets.{j}")
        if i < L - 1:
            table[f"encoder.down.{i}.downsample"] = f"encoder.down_blocks.{i}.downsamplers.0"
        if i > 0:
            table[f"decoder.up.{i}.upsample"] = f"decoder.up_blocks.{L - 1 - i}.upsamplers.0"
    return table


def _is_attention_projection(key):
    return ".mid.attn_1." in key and key.endswith(".weight") and ".attn_1.norm." not in key


def vae_from_diffusers(state_dict, cfg):
    """diffusers AutoencoderKL state dict (new or old attention names) -> CompVis names and 1x1-conv shapes."""
    table = {new: old for old, new in vae_diffusers_names(cfg, ATTN_OLD).items()}
    table.update({new: old for old, new in vae_diffusers_names(cfg, ATTN_NEW).items()})
    return conv_attention(weights.rename(state_dict, table))


def conv_attention(state_dict):
    """Attention projections as the 1x1 convs of CompVis's layout: diffusers stores them as (C, C) linear weights, in
    its folders and in the single files its conversion writes."""
    return {k: (v.reshape(*v.shape, 1, 1) if _is_attention_projection(k) and v.ndim == 2 else v)
            for k, v in state_dict.items()}


def vae_to_diffusers(state_dict, cfg):
    """CompVis-named VAE state dict -> diffusers AutoencoderKL names (new attention names, [C, C] linear weights)."""
    out = {k: (v.flatten(1) if _is_attention_projection(k) and v.ndim == 4 else v) for k, v in state_dict.items()}
    return weights.rename(out, vae_diffusers_names(cfg))


def vae_diffusers_config(cfg):
    """The diffusers `vae/config.json` dict for `cfg`."""
    L = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * L,
        "up_block_types": ["UpDecoderBlock2D"] * L,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.num_groups,
        "sample_size": 512,  # SD v1.5's value; only used by diffusers' tiling
        "scaling_factor": cfg.scaling_factor,
    }


def vae_config_from_diffusers(d):
    """VAEConfig from a diffusers AutoencoderKL config.json dict; ValueError for a variant this file cannot build or
    a field of the wrong type."""
    blocks = weights.config_value(d, "block_out_channels", "ints", [64])
    L = len(blocks)
    problems = []
    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        problems.append(f"_class_name={d['_class_name']!r} (need AutoencoderKL)")
    if weights.config_value(d, "down_block_types", "strs", ["DownEncoderBlock2D"] * L) != ["DownEncoderBlock2D"] * L:
        problems.append(f"down_block_types={d.get('down_block_types')!r}")
    if weights.config_value(d, "up_block_types", "strs", ["UpDecoderBlock2D"] * L) != ["UpDecoderBlock2D"] * L:
        problems.append(f"up_block_types={d.get('up_block_types')!r}")
    if d.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn={d['act_fn']!r}")
    if any(c % blocks[0] for c in blocks):
        problems.append(f"block_out_channels={blocks} (each must be a multiple of the first)")
    for flag in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not weights.config_value(d, flag, "bool", True):
            problems.append(f"{flag}=False")
    if d.get("shift_factor") is not None:
        problems.append(f"shift_factor={d['shift_factor']!r}")
    if problems:
        raise ValueError("unsupported diffusers VAE config: " + "; ".join(problems))
    return VAEConfig(
        in_channels=weights.config_value(d, "in_channels", "int", 3),
        out_channels=weights.config_value(d, "out_channels", "int", 3), ch=blocks[0],
        ch_mult=tuple(c // blocks[0] for c in blocks),
        num_res_blocks=weights.config_value(d, "layers_per_block", "int", 1),
        z_channels=weights.config_value(d, "latent_channels", "int", 4),
        num_groups=weights.norm_groups(d, blocks),
        scaling_factor=weights.config_value(d, "scaling_factor", "number", 0.18215))


def load_vae(path, dtype=torch.float32):
    """The VAE from a single-file checkpoint (`first_stage_model.`), a diffusers folder or its `vae/` subfolder."""
    sd, cfg = weights.read_component(path, subfolder="vae", single_file_prefix="first_stage_model.",
                                     weight_names=WEIGHT_NAMES, dtype=dtype, convert=vae_config_from_diffusers)
    if cfg is None:
        cfg, sd = VAEConfig(), conv_attention(sd)  # every SD v1.x/v2.x single file carries this VAE
    else:
        sd = vae_from_diffusers(sd, cfg)
    with torch.device("meta"):
        model = VAE(cfg)
    return weights.load_strict(model, sd, f"VAE from {path}").eval()

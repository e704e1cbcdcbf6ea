"""The Stable Diffusion v1.x denoising UNet, with the module names of the CompVis checkpoint.

ε̂ = UNet(x_t, t, c) predicts the noise in the latent x_t at timestep t given the text context c (Rombach et al.,
"High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752, Sec. 3.3 and App. E.2).
It is a DDPM UNet (Ho et al. 2020): res blocks with a timestep embedding, down to 1/8 resolution and back up
with skip connections, plus a spatial transformer after the res blocks of the attention levels whose
cross-attention reads c. The Debiasing Diffusion Model (arXiv 2503.12536) trains this network's ε̂ together with
an indicator that reads it (ddm.py).

Attribute names follow the single-file checkpoint (`input_blocks.4.1.transformer_blocks.0.attn2.to_k`), so it
loads with strict=True after stripping `model.diffusion_model.`; the diffusers layout is read through a short
generated renaming table (`unet_diffusers_names`).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import weights


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)  # 320/640/1280/1280 channels at 1, 1/2, 1/4, 1/8 resolution
    num_res_blocks: int = 2  # per level going down; one more going up (it also takes the downsampler's skip)
    attention_levels: tuple = (0, 1, 2)  # levels with a spatial transformer; the middle block always has one
    num_heads: int = 8  # SD v1: 8 heads everywhere (head dim 40/80/160)
    head_dim: int = None  # SD v2: a fixed head dim (64) instead, heads = channels // head_dim
    context_dim: int = 768  # CLIP ViT-L/14 width (SD v2: 1024, OpenCLIP ViT-H)
    transformer_depth: int = 1
    use_linear_proj: bool = False  # SD v2: proj_in/proj_out are Linear, not 1x1 Conv
    num_groups: int = 32
    sample_size: int = 64  # the latent size it was trained at (512 px / 8): sample.py's default; any valid size runs

    def heads(self, channels):
        if self.head_dim is not None:
            return channels // self.head_dim
        return self.num_heads


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features of the timesteps, cos first then sin (CompVis order), in float32: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input and weight dtypes, as CompVis does (no-op casts in float32;
    the weights are cast too, so half-precision weights also run outside autocast)."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).type(x.dtype)


def normalization(channels, groups):
    return GroupNorm32(groups, channels, eps=1e-5)  # torch's default, as CompVis `normalization()`


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels, groups):
        super().__init__()
        self.in_layers = nn.Sequential(normalization(channels, groups), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels, groups), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


def attention(q, k, v, heads):
    """Multi-head attention of (B, T, C) queries on (B, S, C) keys/values, through SDPA (flash kernels on CUDA)."""
    B, T, C = q.shape
    q, k, v = (z.unflatten(-1, (heads, C // heads)).transpose(1, 2) for z in (q, k, v))  # (B, heads, T, head_dim)
    out = F.scaled_dot_product_attention(q, k, v)
    # Without SDPA: w = (q @ k.transpose(-2, -1)) * (C // heads) ** -0.5; out = w.softmax(-1) @ v
    return out.transpose(1, 2).flatten(2)  # (B, T, C)


class CrossAttention(nn.Module):
    """Self-attention (context None) or cross-attention on the text context; q/k/v kept apart as stored."""

    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    """Linear(dim, 2*inner) whose first half is gated by gelu of the second (Shazeer 2020, GLU variants)."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention on the context, GEGLU feed-forward."""

    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


def pointwise(layer, tokens):
    """A 1x1 Conv2d (SD v1) or a Linear (SD v2) applied to (B, T, C) tokens: the same matrix either way."""
    return F.linear(tokens, layer.weight.flatten(1), layer.bias)


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, added to its input."""

    def __init__(self, channels, cfg):
        super().__init__()
        # eps 1e-6: CompVis builds this norm with its Normalize(), not the res blocks' normalization() (1e-5)
        self.norm = nn.GroupNorm(cfg.num_groups, channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if cfg.use_linear_proj else (
            lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, cfg.context_dim, cfg.heads(channels))
            for _ in range(cfg.transformer_depth))
        self.proj_out = proj()

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, H*W, C), a view when channels-last
        h = pointwise(self.proj_in, h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = pointwise(self.proj_out, h)
        return x + h.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential whose res blocks also take the timestep embedding and transformers the context."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        self.gradient_checkpointing = False  # recompute each block in backward: less memory when training
        mc, groups = cfg.model_channels, cfg.num_groups
        emb = 4 * mc  # 1280 in SD
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))

        def block(*layers):
            return TimestepEmbedSequential(*layers)

        self.input_blocks = nn.ModuleList([block(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skips, ch = [mc], mc  # channels of every input block's output, consumed by the output blocks
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb, mult * mc, groups)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg))
                self.input_blocks.append(block(*layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(block(Downsample(ch)))
                skips.append(ch)

        self.middle_block = block(ResBlock(ch, emb, ch, groups), SpatialTransformer(ch, cfg),
                                  ResBlock(ch, emb, ch, groups))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb, mult * mc, groups)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(block(*layers))

        self.out = nn.Sequential(normalization(ch, groups), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def _check(self, x, t, context):  # programming errors: the loaders and sample.py check sizes at the boundary
        cfg, f = self.config, 2 ** (len(self.config.channel_mult) - 1)  # one halving per level but the last
        assert x.ndim == 4 and x.shape[1] == cfg.in_channels, f"latents (B, {cfg.in_channels}, h, w), got {x.shape}"
        assert x.shape[2] % f == 0 and x.shape[3] % f == 0, f"latent sides divisible by {f}, got {x.shape[2:]}"
        assert context.shape[::2] == (x.shape[0], cfg.context_dim), \
            f"context (B, T, {cfg.context_dim}), got {context.shape}"
        assert t.ndim == 0 or t.shape == x.shape[:1], f"timesteps (B={x.shape[0]},) or one, got {t.shape}"

    def forward(self, x, t, context):
        """Predicted noise ε̂ (B, out_channels, h, w) for latents x (B, in_channels, h, w), timesteps t (B,) or
        one for all (a scalar; int or float) and text context (B, T, context_dim)."""
        t = torch.as_tensor(t, device=x.device)
        self._check(x, t, context)
        # One timestep for the whole batch (sampling): embed it once, (1, 4*mc), and let each res block broadcast
        # it. Besides saving work, each image's numbers then do not depend on the batch size: GEMMs of 2 and 8
        # rows round differently in the last bit.
        emb = self.time_embed(timestep_embedding(t.reshape(-1), self.config.model_channels).to(x.dtype))

        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()

        def run(blk, h):
            if checkpoint:
                return torch.utils.checkpoint.checkpoint(blk, h, emb, context, use_reentrant=False)
            return blk(h, emb, context)

        skips, h = [], x
        for blk in self.input_blocks:
            h = run(blk, h)
            skips.append(h)
        h = run(self.middle_block, h)
        for blk in self.output_blocks:
            h = run(blk, torch.cat([h, skips.pop()], dim=1))
        return self.out(h)


# --- loading -----------------------------------------------------------------------------------------------

def unet_diffusers_names(cfg=UNetConfig()):
    """{CompVis module prefix: diffusers module prefix} for every module whose name differs.

    With n = num_res_blocks, level i going down and block j:
      input_blocks.{(n+1)i+j+1}.0 -> down_blocks.i.resnets.j   input_blocks.{(n+1)i+j+1}.1 -> down_blocks.i.attentions.j
      input_blocks.{(n+1)i+n+1}.0.op -> down_blocks.i.downsamplers.0.conv
    and level i going up (i = 0 is the lowest resolution), block j <= n:
      output_blocks.{(n+1)i+j}.0 -> up_blocks.i.resnets.j      output_blocks.{(n+1)i+j}.1 -> up_blocks.i.attentions.j
      output_blocks.{(n+1)i+n}.{1 or 2}.conv -> up_blocks.i.upsamplers.0.conv
    Res block internals are renamed too; transformer internals have the same names in both layouts.
    """
    n, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    table = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "middle_block.1": "mid_block.attentions.0"}
    res = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}

    def resblock(ours, theirs):
        table.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in res.items()})

    resblock("middle_block.0", "mid_block.resnets.0")
    resblock("middle_block.2", "mid_block.resnets.1")
    for i in range(levels):
        attn_down, attn_up = i in cfg.attention_levels, (levels - 1 - i) in cfg.attention_levels
        for j in range(n):
            resblock(f"input_blocks.{(n + 1) * i + j + 1}.0", f"down_blocks.{i}.resnets.{j}")
            if attn_down:
                table[f"input_blocks.{(n + 1) * i + j + 1}.1"] = f"down_blocks.{i}.attentions.{j}"
        if i < levels - 1:
            table[f"input_blocks.{(n + 1) * i + n + 1}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
        for j in range(n + 1):
            resblock(f"output_blocks.{(n + 1) * i + j}.0", f"up_blocks.{i}.resnets.{j}")
            if attn_up:
                table[f"output_blocks.{(n + 1) * i + j}.1"] = f"up_blocks.{i}.attentions.{j}"
        if i < levels - 1:
            table[f"output_blocks.{(n + 1) * i + n}.{2 if attn_up else 1}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    return table


# diffusers config entries this UNet implements only with these values (a missing key means the default).
_DIFFUSERS_FIXED = {
    "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False, "norm_eps": 1e-5,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "dual_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional", "conv_in_kernel": 3, "conv_out_kernel": 3, "class_embed_type": None,
    "addition_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
    "attention_type": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "encoder_hid_dim_type": None, "cross_attention_norm": None, "class_embeddings_concat": False,
    "reverse_transformer_layers_per_block": None,
}


def unet_config_from_diffusers(d):
    """UNetConfig from a diffusers UNet2DConditionModel config.json dict; ValueError listing what we do not build,
    or naming a field of the wrong type."""
    down = weights.config_value(d, "down_block_types", "strs")
    up = weights.config_value(d, "up_block_types", "strs")
    widths = weights.config_value(d, "block_out_channels", "ints")
    # diffusers' `attention_head_dim` is historically the number of heads (per level or for all); null means unset.
    key = "attention_head_dim" if d.get("num_attention_heads") is None else "num_attention_heads"
    heads = weights.config_value(d, key, "ints" if isinstance(d.get(key), list) else "int", 8)
    heads = list(heads) if isinstance(heads, list) else [heads] * len(widths)
    varying, dims = len(set(heads)) > 1, {w // h for w, h in zip(widths, heads)}  # SD 2.x: one head width
    problems = [f"{k}={d[k]!r} (this UNet needs {v!r})" for k, v in _DIFFUSERS_FIXED.items() if d.get(k, v) != v]
    problems += [f"per-level {k}={d[k]}" for k in ("layers_per_block", "transformer_layers_per_block",
                                                    "cross_attention_dim") if isinstance(d.get(k), (list, tuple))]
    if set(down) - {"CrossAttnDownBlock2D", "DownBlock2D"} or [b.replace("Up", "Down") for b in reversed(up)] != down:
        problems.append(f"block types down {down}, up {up}")
    if len(widths) != len(down) or any(w != widths[0] * (w // widths[0]) for w in widths):
        problems.append(f"block_out_channels {widths} (must be multiples of the first, one per down block)")
    if len(heads) != len(widths) or varying and (len(dims) > 1 or any(w % h for w, h in zip(widths, heads))):
        problems.append(f"{key} {heads} for block_out_channels {widths} (must give one head count per level, and "
                        f"where the counts differ, heads of one width)")
    if problems:
        raise ValueError("unsupported diffusers UNet config: " + "; ".join(problems))
    head_dim = dims.pop() if varying else None
    sample_size = d.get("sample_size")
    cfg = UNetConfig(
        in_channels=weights.config_value(d, "in_channels", "int", 4),
        out_channels=weights.config_value(d, "out_channels", "int", 4),
        model_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=weights.config_value(d, "layers_per_block", "int", 2),
        attention_levels=tuple(i for i, b in enumerate(down) if b == "CrossAttnDownBlock2D"),
        num_heads=heads[0] if head_dim is None else UNetConfig.num_heads, head_dim=head_dim,
        context_dim=weights.config_value(d, "cross_attention_dim", "int", 1280),
        transformer_depth=weights.config_value(d, "transformer_layers_per_block", "int", 1),
        use_linear_proj=weights.config_value(d, "use_linear_projection", "bool", False),
        num_groups=weights.norm_groups(d, widths),
        sample_size=64 if sample_size is None else weights.config_value(d, "sample_size", "int"))
    why = config_error(cfg)
    if why:
        raise ValueError(f"block_out_channels and {key}: {why}")
    return cfg


def config_error(cfg):
    """Why UNet(cfg) cannot be built or run, or None: attention at a level it does not have, or channels that its
    heads do not split."""
    if not set(cfg.attention_levels) <= set(range(len(cfg.channel_mult))):
        return (f"attention_levels {list(cfg.attention_levels)} must be levels of channel_mult "
                f"(0..{len(cfg.channel_mult) - 1})")
    for level in sorted({*cfg.attention_levels, len(cfg.channel_mult) - 1}):  # + the middle block
        channels = cfg.model_channels * cfg.channel_mult[level]
        n = cfg.heads(channels)
        if n < 1 or channels % n:
            heads = f"head_dim {cfg.head_dim}" if cfg.head_dim else f"num_heads {cfg.num_heads}"
            return f"{channels} channels at level {level} do not split into {n} heads ({heads})"
    return None


def unet_diffusers_config(cfg=UNetConfig()):
    """The diffusers UNet2DConditionModel config.json dict of this UNet (for exporting a diffusers folder)."""
    levels = range(len(cfg.channel_mult))
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    down = ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels]
    heads = cfg.num_heads if cfg.head_dim is None else [w // cfg.head_dim for w in widths]
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": cfg.sample_size,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": down, "up_block_types": [b.replace("Down", "Up") for b in reversed(down)],
        "block_out_channels": widths, "layers_per_block": cfg.num_res_blocks,
        "attention_head_dim": heads,  # diffusers' name for the number of heads
        "cross_attention_dim": cfg.context_dim, "transformer_layers_per_block": cfg.transformer_depth,
        "use_linear_projection": cfg.use_linear_proj, "norm_num_groups": cfg.num_groups,
        **{k: v for k, v in _DIFFUSERS_FIXED.items() if v is not None},
    }


def _single_file_config(sd):
    """The config of a single-file UNet: SD v1.x, or SD v2.x when its cross-attention reads 1024-wide context."""
    to_k = sd.get("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if to_k is not None and to_k.shape[1] == 1024:  # OpenCLIP ViT-H context: SD 2.x (64-dim heads, linear proj)
        return UNetConfig(context_dim=1024, head_dim=64, use_linear_proj=True)
    return UNetConfig()


WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_unet(path, dtype=torch.float32):
    """The UNet (eval mode) of a single-file checkpoint, a diffusers pipeline folder or its unet/ subfolder."""
    sd, cfg = weights.read_component(
        path, subfolder="unet", single_file_prefix="model.diffusion_model.", dtype=dtype,
        weight_names=WEIGHT_NAMES, convert=unet_config_from_diffusers)
    if cfg is None:
        cfg = _single_file_config(sd)
    else:
        sd = weights.rename(sd, {v: k for k, v in unet_diffusers_names(cfg).items()})
    with torch.device("meta"):
        model = UNet(cfg)
    return weights.load_strict(model, sd, f"UNet from {path}").eval()

"""The CLIP ViT-L/14 text encoder: Stable Diffusion v1.x's prompt conditioning.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (ICML 2021), Sec. 2.4:
the text encoder is a GPT-2-style Transformer (pre-LayerNorm, masked i.e. causal self-attention) over a
lower-cased byte pair encoding of the text with [SOS] and [EOS] tokens around it. Rombach et al., "High-Resolution
Image Synthesis with Latent Diffusion Models" (CVPR 2022), Sec. 3.3: the UNet cross-attends to the encoder's
token features; SD v1 uses the frozen ViT-L/14 text tower and its *last* hidden state after the final LayerNorm,
all 77 positions (B, 77, 768), padding included.

Module names follow transformers' CLIPTextModel, which is what both public layouts store (`text_encoder/` in a
diffusers folder, `cond_stage_model.transformer.` in the single file), so either loads with strict=True and no
renaming. The tokenizer that makes its input ids is tokenizer.py.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408  # 2 x 256 byte symbols + 48,894 BPE merges + start + end
    max_position: int = 77  # 75 text tokens between start and end (CLIP Sec. 2.4 caps the text at 76 + [SOS])
    width: int = 768
    layers: int = 12
    heads: int = 12  # head dim 64
    mlp: int = 3072  # 4 x width
    eos_token_id: int = 49407  # <|endoftext|>; also the padding token
    activation: str = "quick_gelu"  # OpenAI CLIP's x * sigmoid(1.702 x); OpenCLIP towers (SD 2.x) use "gelu"


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # 1.702: the sigmoid approximation of GELU that OpenAI CLIP trained with


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # config.json's hidden_act -> the MLP's activation


class Attention(nn.Module):
    """Multi-head self-attention, causal for text (the image tower's patches all see each other); q/k/v kept apart
    as the checkpoint stores them."""

    def __init__(self, cfg, causal=True):
        super().__init__()
        self.heads = cfg.heads
        self.causal = causal
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, heads, T, head_dim)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # causal: token t sees tokens <= t
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.width)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)). Both CLIP towers are stacks of these;
    `cfg` needs width, heads, mlp and activation."""

    def __init__(self, cfg, causal=True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=1e-5)  # CLIP's LayerNorm default
        self.self_attn = Attention(cfg, causal)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    """Token ids (B, T<=77) -> last hidden state after the final LayerNorm (B, T, width).

    Position ids are an arange computed on the fly (no buffer), so a model built on the meta device takes every
    tensor from the checkpoint; the `position_ids` some files store is ignored by weights.IGNORED.
    """

    def __init__(self, cfg=None):
        super().__init__()
        self.config = cfg = cfg or CLIPTextConfig()
        assert cfg.activation in ACTIVATIONS and cfg.width % cfg.heads == 0, cfg
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(
                token_embedding=nn.Embedding(cfg.vocab_size, cfg.width),
                position_embedding=nn.Embedding(cfg.max_position, cfg.width),  # learned, absolute
            )),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers)))),
            final_layer_norm=nn.LayerNorm(cfg.width, eps=1e-5),
        ))

    def forward(self, input_ids):
        T = input_ids.shape[1]
        assert T <= self.config.max_position, f"{T} tokens, but the text encoder has {self.config.max_position} " \
                                              "positions"
        emb = self.text_model.embeddings
        x = emb.token_embedding(input_ids) + emb.position_embedding(torch.arange(T, device=input_ids.device))
        for layer in self.text_model.encoder.layers:
            x = layer(x)
        return self.text_model.final_layer_norm(x)  # (B, T, width)


# --- loading and export --------------------------------------------------------------------------------------------

WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
# transformers >= 5 dropped CLIPTextModel's `text_model.` level, so files it saves name `embeddings.…`,
# `encoder.…`, `final_layer_norm.…`; SD's published files (transformers 4) keep it. {v5 prefix: ours}; invert it
# to write v5 names (transformers 5 reads both).
TRANSFORMERS5_NAMES = {name: f"text_model.{name}" for name in ("embeddings", "encoder", "final_layer_norm")}


# what a transformers config.json calls these
HF_NAMES = ("hidden_act", "hidden_size", "num_attention_heads", "max_position_embeddings")


def tower_error(cfg, names=("activation", "width", "heads", "max_position")):
    """Why a CLIP tower of `cfg` (the text one here, or clip_image's vision one) cannot be built, or None: an
    activation without a function in ACTIVATIONS, a width its heads do not split, or a text tower of fewer positions
    than a text's start and end tokens. `names`: the fields' names in the file the config came from (HF_NAMES for a
    config.json)."""
    activation, width, heads, positions = names
    if getattr(cfg, "max_position", 2) < 2:
        return f"{positions} must be at least 2 (a text's start and end tokens), got {cfg.max_position}"
    if cfg.activation not in ACTIVATIONS:
        return f"{activation} must be {' or '.join(ACTIVATIONS)}, got {cfg.activation!r}"
    if cfg.width % cfg.heads:
        return f"{width} {cfg.width} must be a multiple of {heads} {cfg.heads}"
    return None


def text_encoder_config_from_hf(d):
    """CLIPTextConfig from a transformers CLIPTextConfig config.json dict (a diffusers `text_encoder/`); ValueError
    for a variant this file cannot build or a field of the wrong type."""
    eps = weights.config_value(d, "layer_norm_eps", "number", 1e-5)
    if eps != 1e-5:
        raise ValueError(f"text encoder config has layer_norm_eps {eps}; only 1e-5 is supported")
    # eos_token_id 2 is transformers' legacy placeholder (SD v1.5's config.json says 2) meaning "the highest id"
    eos = weights.config_value(d, "eos_token_id", "int", 2)
    value = functools.partial(weights.config_value, d, kind="int")  # the sizes below are required
    cfg = CLIPTextConfig(eos_token_id=CLIPTextConfig.eos_token_id if eos == 2 else eos,
                         vocab_size=value("vocab_size"), max_position=value("max_position_embeddings"),
                         width=value("hidden_size"), layers=value("num_hidden_layers"),
                         heads=value("num_attention_heads"), mlp=value("intermediate_size"),
                         activation=weights.config_value(d, "hidden_act", "str", "quick_gelu"))
    why = tower_error(cfg, HF_NAMES)
    if why:
        raise ValueError(why)
    return cfg


def text_encoder_hf_config(cfg):
    """The transformers config.json dict (CLIPTextConfig) for `cfg`, for exporting a diffusers `text_encoder/`."""
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position, "hidden_size": cfg.width,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "intermediate_size": cfg.mlp,
        "hidden_act": cfg.activation, "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "dropout": 0.0,
        "initializer_factor": 1.0, "initializer_range": 0.02, "projection_dim": cfg.width,
        "bos_token_id": cfg.eos_token_id - 1, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.eos_token_id,
        "torch_dtype": "float32",
    }


def load_text_encoder(path, dtype=torch.float32):
    """The text encoder from a single file (`cond_stage_model.transformer.`), a diffusers folder or its
    `text_encoder/` subfolder; strict (names, count and shapes checked), in eval mode."""
    sd, cfg = weights.read_component(path, subfolder="text_encoder", single_file_prefix="cond_stage_model.transformer.",
                                     weight_names=WEIGHT_NAMES, dtype=dtype, convert=text_encoder_config_from_hf)
    sd = weights.rename(sd, TRANSFORMERS5_NAMES)  # a no-op on names that already start with text_model.
    cfg = cfg or CLIPTextConfig()  # single files: SD v1.x
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    return weights.load_strict(model, sd, f"text encoder from {path}").eval()

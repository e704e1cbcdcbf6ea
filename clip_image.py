"""CLIP ViT-L/14's image tower, and both towers joined as a zero-shot classifier of images by text.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (ICML 2021):
- Sec. 2.4: a Vision Transformer over 14 x 14 patches of the 224 px image (a stride-14 convolution), a learned
  class embedding in front, learned positions, one LayerNorm before the text tower's pre-LayerNorm block
  (`clip_text.EncoderLayer`, here without the causal mask); the class token's output is the image's feature.
- Sec. 2.3: each tower's feature is projected (no bias) into a shared 768-d space; the text's is the [EOS]
  token's last hidden state of `clip_text.CLIPTextModel`, the very network SD v1.x conditions on.
- Sec. 3.1.2, zero-shot: logits_ik = exp(t) · cos(image_i, text_k), t = `logit_scale` as loaded (training capped
  it at log 100); a softmax over K class texts ("a photo of a man", "a photo of a woman") classifies an image.

Module names follow transformers' CLIPModel (the `openai/clip-vit-large-patch14` folder); each tower is one
module here, so `text_model.` and `vision_model.` gain one level on loading (`TOWER_NAMES`).
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import weights
from clip_text import (ACTIVATIONS, CLIPTextConfig, CLIPTextModel, EncoderLayer, text_encoder_config_from_hf,
                       HF_NAMES, tower_error)
from tokenizer import Tokenizer

# CLIP's per-channel RGB mean and std of its training images, on [0, 1] pixels (OpenAI's release)
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPVisionConfig:
    image_size: int = 224
    patch_size: int = 14  # 16 x 16 = 256 patches, + the class token = 257 positions
    width: int = 1024
    layers: int = 24
    heads: int = 16  # head dim 64, as in the text tower
    mlp: int = 4096  # 4 x width
    activation: str = "quick_gelu"


@dataclass
class CLIPConfig:
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 768  # the shared image-text space


class VisionEmbeddings(nn.Module):
    """Pixels (B, 3, S, S) -> class token + S/P * S/P patch embeddings, with learned positions (B, 1 + (S/P)^2, C)."""

    def __init__(self, cfg):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.width)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, (S/P)^2, C), row by row
        cls = self.class_embedding.expand(len(patches), 1, -1)
        return torch.cat([cls, patches], 1) + self.position_embedding.weight


class CLIPVisionModel(nn.Module):
    """CLIP-normalized pixels (B, 3, 224, 224) -> the class token's feature after the final LayerNorm (B, width)."""

    def __init__(self, cfg=None):
        super().__init__()
        self.config = cfg = cfg or CLIPVisionConfig()
        assert cfg.activation in ACTIVATIONS and cfg.width % cfg.heads == 0, cfg
        assert cfg.image_size % cfg.patch_size == 0, f"image_size not divisible by patch_size: {cfg}"
        self.vision_model = nn.ModuleDict(dict(
            embeddings=VisionEmbeddings(cfg),
            pre_layrnorm=nn.LayerNorm(cfg.width, eps=1e-5),  # sic: the checkpoint's spelling
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(EncoderLayer(cfg, causal=False)
                                                            for _ in range(cfg.layers)))),
            post_layernorm=nn.LayerNorm(cfg.width, eps=1e-5),
        ))

    def forward(self, pixels):
        S = self.config.image_size
        assert pixels.shape[1:] == (3, S, S), f"pixels must be (batch, 3, {S}, {S}) (preprocess), got {pixels.shape}"
        m = self.vision_model
        x = m.pre_layrnorm(m.embeddings(pixels))
        for layer in m.encoder.layers:
            x = layer(x)
        return m.post_layernorm(x[:, 0])  # (B, width): the class token


class CLIPModel(nn.Module):
    """Both towers and their projections: encode_image, encode_text -> (B, 768); forward -> zero-shot logits."""

    def __init__(self, cfg=None):
        super().__init__()
        self.config = cfg = cfg or CLIPConfig()
        self.text = CLIPTextModel(cfg.text)
        self.vision = CLIPVisionModel(cfg.vision)
        self.text_projection = nn.Linear(cfg.text.width, cfg.projection_dim, bias=False)
        self.visual_projection = nn.Linear(cfg.vision.width, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.empty(()))  # log of the inverse temperature

    def encode_image(self, pixels):
        return self.visual_projection(self.vision(pixels))

    def encode_text(self, input_ids):
        """Projected last hidden state at each row's first end token (the tokenizer puts one after the text)."""
        is_end = input_ids == self.config.text.eos_token_id
        assert is_end.any(1).all(), f"every row of input_ids needs an end token ({self.config.text.eos_token_id})"
        hidden = self.text(input_ids)  # (B, T, width)
        return self.text_projection(hidden[torch.arange(len(hidden)), is_end.int().argmax(1)])

    def logits(self, image_embeds, text_embeds):
        """(N, D), (K, D) -> exp(logit_scale) * cosine similarity (N, K)."""
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        return self.logit_scale.exp() * image_embeds @ text_embeds.T

    def forward(self, pixels, input_ids):
        return self.logits(self.encode_image(pixels), self.encode_text(input_ids))  # (images, texts)


# --- preprocessing -------------------------------------------------------------------------------------------------

def preprocess(images, size=224):
    """Images -> CLIP's input, float (N, 3, size, size), as CLIP's own pipeline: the short side resized to `size`
    (bicubic; the long side to int(size * long / short)), the centre square cropped, [0, 1] pixels normalized by
    MEAN and STD per channel.

    images: a PIL image, or a sequence of PIL images or uint8 arrays (H, W) / (H, W, 3), e.g. an (N, H, W, 3)
    array; any sizes. The resize is PIL's bicubic on uint8 pixels, which transformers' CLIPImageProcessor and
    OpenAI's torchvision transform both call (torch's interpolate(mode="bicubic") differs: a = -0.75, not -0.5, and
    no kernel widening when shrinking unless antialias=True). The crop offset is excess // 2 as in transformers
    (torchvision's CenterCrop rounds excess / 2 to the nearest integer: one pixel further for some odd excesses).
    A folder's preprocessor_config.json is not read: these are OpenAI's constants, not a model's made otherwise."""
    if isinstance(images, Image.Image):
        images = [images]
    out = torch.empty(len(images), 3, size, size)
    for n, image in enumerate(images):
        if not isinstance(image, Image.Image):
            a = np.asarray(image)
            assert a.dtype == np.uint8 and (a.ndim == 2 or a.ndim == 3 and a.shape[2] == 3), \
                f"image {n}: expected a PIL image or a uint8 array (H, W) or (H, W, 3), got {a.dtype} {a.shape}"
            image = Image.fromarray(a)
        img = image.convert("RGB")
        w, h = img.size
        new_long = int(size * max(w, h) / min(w, h))
        img = img.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255  # (3, size, size)
        out[n] = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    return out


# --- loading -------------------------------------------------------------------------------------------------------

WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
TOWER_NAMES = {"text_model": "text.text_model", "vision_model": "vision.vision_model"}  # {file: ours}
VISION_FIELDS = {"image_size": "image_size", "patch_size": "patch_size", "width": "hidden_size",  # ours: HF's
                 "layers": "num_hidden_layers", "heads": "num_attention_heads", "mlp": "intermediate_size"}


def clip_config_from_hf(d, where="config.json"):
    """CLIPConfig from a transformers CLIPConfig config.json dict (its text_config and vision_config; older files
    name them text_config_dict / vision_config_dict); ValueError naming `where`, the section and the field."""
    t, v = (d.get(name, d.get(f"{name}_dict")) for name in ("text_config", "vision_config"))
    for name, section in (("text_config", t), ("vision_config", v)):
        if not isinstance(section, dict):
            raise ValueError(f"{where} has no '{name}': not a transformers CLIPModel config")
    required = [(v, key) for key in VISION_FIELDS.values()] + [(d, "projection_dim")]
    missing = next((key for section, key in required if key not in section), None)
    if missing:
        raise ValueError(f"{where}: missing key {missing!r}")
    parts = {}
    for name, read, section in (("text_config", text_encoder_config_from_hf, t),
                                ("vision_config", vision_config_from_hf, v)):
        try:
            parts[name] = read(section)
        except ValueError as e:
            raise ValueError(f"{where}: {name}: {e}") from None
    try:
        projection_dim = weights.config_value(d, "projection_dim", "int")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return CLIPConfig(text=parts["text_config"], vision=parts["vision_config"], projection_dim=projection_dim)


def vision_config_from_hf(v):
    """CLIPVisionConfig from a transformers vision_config dict; ValueError for a field of the wrong type or a tower
    that CLIPVisionModel does not build."""
    cfg = CLIPVisionConfig(**{ours: weights.config_value(v, theirs, "int") for ours, theirs in VISION_FIELDS.items()},
                           activation=weights.config_value(v, "hidden_act", "str", "quick_gelu"))
    eps, channels = v.get("layer_norm_eps", 1e-5), v.get("num_channels", 3)
    if eps != 1e-5 or channels != 3:
        why = f"must have layer_norm_eps 1e-05 and 3 channels, got {eps} and {channels}"
    elif cfg.image_size % cfg.patch_size:
        why = f"image_size {cfg.image_size} must be a multiple of patch_size {cfg.patch_size}"
    else:
        why = tower_error(cfg, HF_NAMES)
    if why:
        raise ValueError(why)
    return cfg


def load_clip(path, dtype=torch.float32):
    """CLIPModel from a transformers folder (config.json + model.safetensors or pytorch_model.bin, the layout of
    `openai/clip-vit-large-patch14`); strict (names, count and shapes checked), in eval mode."""
    path = Path(path)
    file = next((path / name for name in WEIGHT_NAMES if (path / name).is_file()), None)
    if not path.is_dir():
        why = (f"no CLIP folder at {path}: expected a transformers CLIPModel folder such as "
               "openai/clip-vit-large-patch14 (config.json + model.safetensors)")
    elif file is None:
        why = f"{path} has neither {' nor '.join(WEIGHT_NAMES)}"
    else:
        why = None if (path / "config.json").is_file() else f"{path} has {file.name} but no config.json"
    if why:
        raise FileNotFoundError(why)
    cfg = clip_config_from_hf(weights.read_json(path / "config.json"), path / "config.json")
    sd = weights.rename(weights.read_state_dict(file, "", dtype), TOWER_NAMES)
    with torch.device("meta"):
        model = CLIPModel(cfg)
    return weights.load_strict(model, sd, f"CLIP from {file}").eval()


def load_clip_tokenizer(path, text_config=CLIPTextConfig()):
    """The CLIP folder's own tokenizer (vocab.json + merges.txt, or tokenizer.json), else the shipped one, which is
    CLIP's (OpenAI's bpe_simple_vocab_16e6), padding to the positions of the text tower of `text_config` (77 in
    CLIP); ValueError naming the folder unless that tower reads its ids."""
    path = Path(path)
    own = any((path / name).is_file() for name in ("vocab.json", "tokenizer.json"))
    tokenizer = Tokenizer.from_folder(path) if own else Tokenizer.default()
    tokenizer.max_length = text_config.max_position
    why = tokenizer.fit_error(text_config.vocab_size, text_config.eos_token_id)
    if why:
        raise ValueError(f"{path}: {why}" + ("" if own else " (the folder has no tokenizer files: the shipped CLIP "
                                                           "tokenizer was taken)"))
    return tokenizer

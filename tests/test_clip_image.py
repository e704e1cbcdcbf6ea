"""clip_image.py against transformers' CLIPModel and CLIPImageProcessor (the oracles of CLIP zero-shot evaluation).

The models are random: transformers builds them, perturbs every weight off its init and writes the public folder
layout (config.json + model.safetensors, or a legacy pytorch_model.bin), which `load_clip` reads.
"""
import gc
import json
import re

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

import data
import weights
from clip_image import (STD, TOWER_NAMES, CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, clip_config_from_hf,
                        load_clip, load_clip_tokenizer, preprocess)
from clip_text import CLIPTextConfig, text_encoder_hf_config
from tokenizer import Tokenizer
from tools.make_sd_tokenizer import write_sd_tokenizer

TINY_TEXT = CLIPTextConfig(vocab_size=1000, max_position=77, width=64, layers=2, heads=4, mlp=96, eos_token_id=999)
TINY_VISION = dict(hidden_size=48, intermediate_size=80, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                   patch_size=8)


def reference(config_dict, seed=0, noise=0.1):
    """transformers' CLIPModel from a config.json dict, eager attention, every weight moved off its init."""
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(**config_dict)
    config._attn_implementation = "eager"  # the plain softmax(QK^T)V reference, not another SDPA call
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model


def tiny_config(activation="quick_gelu"):
    text = text_encoder_hf_config(TINY_TEXT) | {"hidden_act": activation}
    return dict(text_config=text, vision_config=TINY_VISION | {"hidden_act": activation}, projection_dim=40)


def tiny_ids(generator):
    ids = torch.randint(0, 999, (3, 77), generator=generator)
    ids[:, 12] = 999  # the end token; row 1 has an earlier one, which is the one pooled
    ids[1, 5] = 999
    return ids


def compare(model, ref, pixels, ids):
    """Max abs differences of image embeddings, text embeddings and zero-shot logits."""
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels)
        diffs = ((model.encode_image(pixels) - ref.get_image_features(pixel_values=pixels).pooler_output),
                 (model.encode_text(ids) - ref.get_text_features(input_ids=ids).pooler_output),
                 (model(pixels, ids) - want.logits_per_image))
    return [d.abs().max().item() for d in diffs]


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_tiny_clip_equals_transformers_embeddings_and_logits(activation, tmp_path, one_thread):
    ref = reference(tiny_config(activation))
    ref.save_pretrained(tmp_path)  # config.json + model.safetensors, as the hub folder
    model = load_clip(tmp_path)
    assert model.config == CLIPConfig(text=CLIPTextConfig(**{**vars(TINY_TEXT), "activation": activation}),
                                      vision=CLIPVisionConfig(image_size=32, patch_size=8, width=48, layers=2,
                                                              heads=4, mlp=80, activation=activation),
                                      projection_dim=40)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    image, text, logits = compare(model, ref, pixels, tiny_ids(g))
    assert image <= 1e-5 and text <= 1e-5 and logits <= 1e-5, (image, text, logits)


def test_legacy_pytorch_model_bin_with_position_ids_loads_the_same_weights(tmp_path, one_thread):
    ref = reference(tiny_config())
    ref.save_pretrained(tmp_path / "new")
    sd = dict(ref.state_dict())  # what transformers 4 wrote: the same names plus both towers' position_ids
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    (tmp_path / "old").mkdir()
    torch.save(sd, tmp_path / "old" / "pytorch_model.bin")
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    a, b = load_clip(tmp_path / "new"), load_clip(tmp_path / "old")
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_wrong_checkpoints_name_the_missing_and_unexpected_tensors(tmp_path):
    ref = reference(tiny_config())
    ref.save_pretrained(tmp_path)
    sd = {k: v for k, v in ref.state_dict().items() if k != "visual_projection.weight"}
    sd["vision_model.encoder.layers.0.attn.q.weight"] = torch.zeros(48, 48)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(weights.CheckpointError, match=r"1 tensors missing \(visual_projection\.weight\), "
                                                      r"1 unexpected \(vision\.vision_model\.encoder\.layers\.0\.attn"):
        load_clip(tmp_path)
    sd = dict(ref.state_dict())
    sd["visual_projection.weight"] = torch.zeros(40, 47)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(weights.CheckpointError, match=r"visual_projection\.weight has shape \(40, 47\)"):
        load_clip(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["vision_config"]["patch_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: missing key 'patch_size'"):
        load_clip(tmp_path)
    with pytest.raises(ValueError, match="no 'vision_config'"):
        clip_config_from_hf({"text_config": {}})
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_clip(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        load_clip(tmp_path)
    with pytest.raises(FileNotFoundError, match="no CLIP folder"):
        load_clip(tmp_path / "nowhere")


@pytest.mark.parametrize("text, message", [
    ("{not json", r"config\.json, line 1: not valid JSON"),
    ("[1, 2]", r"config\.json: expected a JSON object \{\.\.\.\}, got list"),
    ({"vision_config": {"hidden_size": None}}, r"config\.json: vision_config: field 'hidden_size' must be a positive "
                                               r"integer, got null"),
    ({"text_config": {"hidden_size": None}}, r"config\.json: text_config: field 'hidden_size' must be a positive "
                                             r"integer, got null"),
    ({"projection_dim": None}, r"config\.json: field 'projection_dim' must be a positive integer, got null"),
    ({"vision_config": {"hidden_act": None}}, r"config\.json: vision_config: field 'hidden_act' must be a string"),
    ({"text_config": None}, r"config\.json has no 'text_config'"),
    ({"vision_config": {"num_attention_heads": 5}}, r"config\.json: vision_config: hidden_size 48 must be a multiple "
                                                    r"of num_attention_heads 5"),
    ({"vision_config": {"num_channels": 1}}, r"config\.json: vision_config: must have layer_norm_eps 1e-05 and 3 "
                                             r"channels, got 1e-05 and 1$"),
])
def test_a_bad_config_json_is_one_error_naming_the_file_and_field(tmp_path, text, message):
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")  # never read: the config comes first
    if isinstance(text, dict):
        config = tiny_config()
        for key, value in text.items():
            config[key] = {**config[key], **value} if isinstance(value, dict) else value
        text = json.dumps(config)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}/{message}"):
        load_clip(tmp_path)


def test_bad_inputs_are_refused():  # programming errors: evaluate.py's images come through preprocess
    model = CLIPModel(CLIPConfig(text=TINY_TEXT, vision=CLIPVisionConfig(image_size=32, patch_size=8, width=48,
                                                                         layers=1, heads=4, mlp=80)))
    with pytest.raises(AssertionError, match=r"\(batch, 3, 32, 32\).*\[2, 3, 224, 224\]"):
        model.encode_image(torch.zeros(2, 3, 224, 224))
    with pytest.raises(AssertionError, match="end token \\(999\\)"):
        model.encode_text(torch.zeros(2, 77, dtype=torch.long))
    with pytest.raises(AssertionError, match="divisible"):
        CLIPVisionModel(CLIPVisionConfig(image_size=30, patch_size=8))
    with pytest.raises(AssertionError, match="image 1: .*float32"):
        preprocess([np.zeros((5, 5, 3), np.uint8), np.zeros((5, 5, 3), np.float32)])


def digit_photos():
    """Real images in sizes that make CLIP's resize shrink, enlarge and crop both ways: shipped digits, three to an
    RGB image (one per channel), bicubic-upscaled; and one grey digit at its own 28 px."""
    images, _ = data.load_digits()
    photos = [Image.fromarray(images[0])]
    for k, size in enumerate([(64, 48), (300, 225), (225, 300), (500, 333), (227, 231)]):
        channels = [Image.fromarray(images[3 * k + c + 1]).resize(size, Image.BICUBIC) for c in range(3)]
        photos.append(Image.merge("RGB", channels))
    return photos


def test_preprocessing_equals_transformers_clip_image_processor_within_one_grey_level():
    processor = transformers.CLIPImageProcessorPil()  # the PIL backend: what CLIPImageProcessor is without torchvision
    photos = digit_photos()
    ours = preprocess(photos)
    assert ours.shape == (len(photos), 3, 224, 224) and ours.dtype == torch.float32
    for photo, x in zip(photos, ours):
        want = processor(images=photo, return_tensors="pt").pixel_values[0]
        grey_levels = ((x - want) * torch.tensor(STD).view(3, 1, 1) * 255).abs().max().item()
        assert grey_levels <= 1, (photo.size, grey_levels)
    arrays = preprocess(np.stack([np.asarray(p.resize((64, 48))) for p in photos[1:3]]))  # an (N, H, W, 3) batch
    assert torch.equal(arrays, preprocess([p.resize((64, 48)) for p in photos[1:3]]))


def test_tokenizer_comes_from_the_clip_folder_or_else_is_the_shipped_one(tmp_path):
    assert load_clip_tokenizer(tmp_path).encoder == Tokenizer.default().encoder
    transformers.CLIPTokenizer.from_pretrained(str(write_sd_tokenizer(tmp_path / "files"))).save_pretrained(
        tmp_path / "clip")  # transformers 5 writes tokenizer.json only
    assert not (tmp_path / "clip" / "vocab.json").exists()
    assert load_clip_tokenizer(tmp_path / "clip")("a photo of a man").tolist()[0][:6] == [49406, 320, 1125, 539,
                                                                                          320, 786]


# The shape of openai/clip-vit-large-patch14's config.json (transformers 4), legacy token ids included.
VIT_L14_CONFIG = {
    "architectures": ["CLIPModel"], "initializer_factor": 1.0, "logit_scale_init_value": 2.6592,
    "model_type": "clip", "projection_dim": 768,
    "text_config": {"attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
                    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
                    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
                    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
                    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408},
    "vision_config": {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 1024,
                      "image_size": 224, "initializer_factor": 1.0, "initializer_range": 0.02,
                      "intermediate_size": 4096, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
                      "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 24, "patch_size": 14,
                      "projection_dim": 768},
}


def test_full_size_vit_l14_equals_transformers_within_1e_4(tmp_path, two_threads):
    """The released architecture at full size: random fp16 weights on disk (half the temporary file), which both
    models read as fp32. ~3.5 GB of memory at the peak (two fp32 models); the file is deleted before comparing."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIPModel().state_dict().items()}
    assert len(shapes) == 590 and sum(s.numel() for s in shapes.values()) == 427_616_513
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=g) * (0.05 if "norm" in k else 0.02)  # LayerNorm weights near 1
              + ("norm" in k and k.endswith("weight"))).half() for k, s in shapes.items()}
    sd["logit_scale"] = torch.tensor(4.6052).half()  # log 100, the released temperature
    try:
        save_file(weights.rename(sd, {ours: file for file, ours in TOWER_NAMES.items()}),
                  tmp_path / "model.safetensors")
        del sd
        (tmp_path / "config.json").write_text(json.dumps(VIT_L14_CONFIG))
        model = load_clip(tmp_path)
        ref = transformers.CLIPModel.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    finally:
        (tmp_path / "model.safetensors").unlink(missing_ok=True)
    assert model.config == CLIPConfig() and not model.training
    pixels = preprocess(digit_photos()[1:3])
    ids = Tokenizer.default()(["a photo of a man", "a photo of a woman", "a handwritten digit seven"])
    with torch.no_grad():  # each tower once per model: the image tower is the slow part (~80 GFLOPs an image)
        image, text = model.encode_image(pixels), model.encode_text(ids)
        logits = model.logits(image, text)
        want = ref(input_ids=ids, pixel_values=pixels)
    del model, ref
    gc.collect()
    # transformers 5's CLIPModel returns each tower's projected (not yet normalized) embedding as its pooler_output
    diffs = [(image - want.vision_model_output.pooler_output).abs().max().item(),
             (text - want.text_model_output.pooler_output).abs().max().item(),
             (logits - want.logits_per_image).abs().max().item()]
    print(f"ViT-L/14 max abs diff: image embeds {diffs[0]:.2e}, text embeds {diffs[1]:.2e}, logits {diffs[2]:.2e}")
    assert max(diffs) <= 1e-4, diffs

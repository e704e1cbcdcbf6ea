"""vae.py against diffusers.AutoencoderKL (the oracle) on identical weights, in both public weight layouts."""
import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

import weights
from vae import (DiagonalGaussian, VAE, VAEConfig, load_vae, vae_config_from_diffusers, vae_diffusers_config,
                 vae_from_diffusers, vae_to_diffusers)

# A tiny VAE that still has every feature: 3 levels (two asymmetric-pad downsamplings, factor 4), a channel change
# (nin_shortcut), 2/3 res blocks per level, mid attention, GroupNorm with several channels per group.
TINY_DIFFUSERS = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                      up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 32], layers_per_block=2,
                      act_fn="silu", latent_channels=4, norm_num_groups=4, sample_size=32)
TINY = VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=4, num_groups=4)
# SD v1.5's vae/config.json, written out here so the test does not trust vae_diffusers_config.
SD15_DIFFUSERS = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                      up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                      layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512,
                      scaling_factor=0.18215)


def assert_close(ours, ref):
    """max abs diff <= 1e-5 relative to the output's scale (fp32 noise between two correct versions is ~1e-6)."""
    assert ours.shape == ref.shape
    scale = max(1.0, ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-5 * scale, f"max abs diff {diff:.3g} at output scale {scale:.3g}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers model with weights perturbed away from init, pipeline folder holding it under vae/)."""
    torch.manual_seed(0)
    ref = AutoencoderKL(**TINY_DIFFUSERS).eval()
    with torch.no_grad():
        for p in ref.parameters():  # GroupNorm weights leave 1/0 and convs their init, so every term matters
            p.add_(0.1 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("tiny_pipeline")
    ref.save_pretrained(root / "vae")
    return ref, root


def test_config_round_trips_through_diffusers_config(tiny):
    ref, _ = tiny
    assert vae_config_from_diffusers(dict(ref.config)) == TINY
    assert vae_config_from_diffusers(SD15_DIFFUSERS) == VAEConfig()
    d = vae_diffusers_config(VAEConfig())
    assert {k: d[k] for k in SD15_DIFFUSERS} == SD15_DIFFUSERS


@pytest.mark.parametrize("bad", [dict(act_fn="gelu"), dict(down_block_types=["DownBlock2D"] * 3),
                                 dict(use_quant_conv=False), dict(block_out_channels=[16, 24, 32])])
def test_unsupported_diffusers_config_is_a_value_error(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        vae_config_from_diffusers({**TINY_DIFFUSERS, **bad})


def test_encode_matches_diffusers_on_non_square_images(tiny):
    ref, root = tiny
    ours = load_vae(root)
    x = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x0 = x.clone()
    with torch.no_grad():
        q, p = ours.encode(x), ref.encode(x).latent_dist
        assert_close(q.mean, p.mean)
        assert_close(q.logvar, p.logvar)
        assert_close(q.std, p.std)
        assert_close(q.mode(), p.mode())
        assert_close(q.sample(torch.Generator().manual_seed(7)), p.sample(torch.Generator().manual_seed(7)))
    assert q.mean.shape == (2, 4, 6, 10)
    assert torch.equal(x, x0), "encode edited its input"


def test_decode_matches_diffusers_on_non_square_latents(tiny):
    ref, root = tiny
    ours = load_vae(root / "vae")
    z = torch.randn(2, 4, 5, 9, generator=torch.Generator().manual_seed(2))
    z0 = z.clone()
    with torch.no_grad():
        assert_close(ours.decode(z), ref.decode(z).sample)
    assert torch.equal(z, z0), "decode edited its input"


def test_gradients_match_diffusers(tiny):
    """In-place ops on intermediates must not corrupt backward: input and weight gradients equal the oracle's."""
    ref, root = tiny
    ours = load_vae(root)
    x = (torch.rand(1, 3, 16, 12, generator=torch.Generator().manual_seed(5)) * 2 - 1).requires_grad_()
    ours.decode(ours.encode(x).mean).square().mean().backward()
    g_ours, x.grad = x.grad, None
    ref.zero_grad()
    ref.decode(ref.encode(x).latent_dist.mean).sample.square().mean().backward()
    assert_close(g_ours, x.grad)
    assert_close(ours.decoder.up[1].upsample.conv.weight.grad, ref.decoder.up_blocks[1].upsamplers[0].conv.weight.grad)
    assert_close(ours.encoder.down[0].block[0].conv1.weight.grad,
                 ref.encoder.down_blocks[0].resnets[0].conv1.weight.grad)
    assert all(p.grad is not None for p in ours.parameters())
    ref.zero_grad()


def test_export_to_diffusers_names_and_shapes_is_exact(tiny):
    ref, root = tiny
    exported = vae_to_diffusers(load_vae(root).state_dict(), TINY)
    expected = ref.state_dict()
    assert exported.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(exported[k], v), k


def test_old_diffusers_attention_names_load_identical_weights(tiny, tmp_path):
    ref, root = tiny
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in ref.state_dict().items():
        for new, name in old.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{name}.")
        sd[k] = v.contiguous()
    assert any(".query." in k for k in sd) and not any(".to_q." in k for k in sd)
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(ref.config)))
    a, b = load_vae(tmp_path).state_dict(), load_vae(root).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_casts_to_dtype_and_has_no_buffers(tiny):
    _, root = tiny
    m = load_vae(root, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in m.parameters())
    assert not list(m.buffers()) and not m.training


def test_logvar_is_clamped_like_the_reference():
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 2, 2, 2), 100.0), torch.full((1, 2, 2, 2), -100.0)], 1)
    q = DiagonalGaussian(moments)
    assert q.logvar[:, :2].eq(20).all() and q.logvar[:, 2:].eq(-30).all()
    # std = exp(logvar / 2) of the clamped values, by hand: e^10 and e^-15
    assert q.std[:, :2].eq(torch.tensor(22026.465794806718)).all()
    assert torch.allclose(q.std[:, 2:], torch.tensor(3.059023205018258e-07), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(1, 3, 30, 32), (1, 3, 32, 18), (1, 4, 32, 32), (3, 32, 32)])
def test_bad_image_is_refused(shape):
    with pytest.raises(AssertionError, match="image must be"):
        VAE(TINY).encode(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (4, 8, 8)])
def test_bad_latent_is_refused(shape):
    with pytest.raises(AssertionError, match="latent must be"):
        VAE(TINY).decode(torch.zeros(shape))


def test_wrong_models_checkpoint_names_missing_and_unexpected_keys(tiny, tmp_path):
    _, root = tiny
    sd = {"text_model.embeddings.token_embedding.weight": torch.zeros(10, 4), "quant_conv.weight": torch.zeros(1)}
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((root / "vae" / "config.json").read_text())
    with pytest.raises(weights.CheckpointError, match=r"tensors missing \(decoder\..*1 unexpected \(text_model"):
        load_vae(tmp_path)


def test_tiny_weights_under_a_full_size_config_name_the_shape(tiny, tmp_path):
    ref, _ = tiny
    save_file({"first_stage_model." + k: v.contiguous() for k, v in vae_from_diffusers(ref.state_dict(), TINY).items()},
              str(tmp_path / "tiny.safetensors"))
    with pytest.raises(weights.CheckpointError, match="missing|shape"):
        load_vae(tmp_path / "tiny.safetensors")  # a single file always means the SD v1 config


def test_single_file_without_vae_and_missing_path(tmp_path):
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(tmp_path / "unet_only.safetensors"))
    with pytest.raises(weights.CheckpointError, match="first_stage_model"):
        load_vae(tmp_path / "unet_only.safetensors")
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path)  # a folder with no VAE in it


# Shapes of a few tensors in the real `first_stage_model.` part of v1-5-pruned-emaonly.safetensors: the reversed
# decoder index (up.0 is the 128-channel level), 1x1-conv attention, the asymmetric-pad downsample conv.
COMPVIS_SHAPES = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.bias": (512,),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}


def test_full_size_single_file_and_folder_layouts_load_identical_weights(scratch):
    with torch.device("meta"):
        meta = VAE()
    assert sum(p.numel() for p in meta.parameters()) == 83_653_863
    assert len(meta.state_dict()) == 248

    torch.manual_seed(0)
    ref = AutoencoderKL(**SD15_DIFFUSERS).eval()
    ref.save_pretrained(scratch / "pipeline" / "vae")
    folder = load_vae(scratch / "pipeline")

    compvis = vae_from_diffusers(ref.state_dict(), VAEConfig())
    assert {k: tuple(compvis[k].shape) for k in COMPVIS_SHAPES} == COMPVIS_SHAPES
    single = {"first_stage_model." + k: v.contiguous() for k, v in compvis.items()}
    single.update({"model.diffusion_model.out.2.bias": torch.zeros(4), "betas": torch.zeros(1000),
                   "alphas_cumprod": torch.zeros(1000), "model_ema.decay": torch.zeros(())})
    save_file(single, str(scratch / "v1.safetensors"))
    # diffusers' conversion back to one file writes the attention projections as (C, C) linear weights, which
    # diffusers reads as well: they were refused as a shape mismatch against (C, C, 1, 1)
    save_file({k: v.flatten(1) if ".attn_1." in k and v.ndim == 4 else v for k, v in single.items()},
              str(scratch / "v1-linear.safetensors"))
    del single, compvis
    one_file = load_vae(scratch / "v1.safetensors")
    linear = load_vae(scratch / "v1-linear.safetensors").state_dict()
    assert all(torch.equal(v, linear[k]) for k, v in one_file.state_dict().items())
    del linear

    a, b = folder.state_dict(), one_file.state_dict()
    assert len(a) == 248 and a.keys() == b.keys()
    assert {k: tuple(a[k].shape) for k in COMPVIS_SHAPES} == COMPVIS_SHAPES
    for k in a:
        assert torch.equal(a[k], b[k]), k
    r = ref.state_dict()  # spot-check the reversed up index against diffusers' own tensors
    assert torch.equal(a["decoder.up.0.block.2.conv2.weight"], r["decoder.up_blocks.3.resnets.2.conv2.weight"])
    assert torch.equal(a["encoder.mid.attn_1.q.weight"].flatten(1), r["encoder.mid_block.attentions.0.to_q.weight"])

    # Size-specific bugs (a 512-wide head, 32 groups) show in the outputs: one small full-size pass each way.
    x = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        q, p = one_file.encode(x), ref.encode(x).latent_dist
        assert_close(q.mean, p.mean)
        assert_close(q.logvar, p.logvar)
        assert_close(one_file.decode(z), ref.decode(z).sample)

"""unet.py against diffusers.UNet2DConditionModel (the oracle) on identical weights, and its loading and errors."""
import gc
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

import weights
from benchmarks.common import fill_random_
from unet import (GroupNorm32, UNet, UNetConfig, load_unet,
                  unet_config_from_diffusers, unet_diffusers_config, unet_diffusers_names)

TINY = {
    "two_levels_attention_low_only": UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(1,), num_heads=2,
        context_dim=16, num_groups=8),
    "three_levels_depth2_4heads": UNetConfig(
        model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=4,
        context_dim=24, num_groups=4, transformer_depth=2),
    "sd2_style_linear_proj_head_dim": UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), head_dim=8,
        use_linear_proj=True, context_dim=32, num_groups=8),
    "mid_block_attention_only": UNetConfig(
        model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(), num_heads=2,
        context_dim=8, num_groups=4),
}
# Outputs of every residual branch (and conv_in) are shrunk so the activations reaching each GroupNorm have a
# variance near 1e-4, where a 1e-5 vs 1e-6 eps slip moves the output by ~1e-3..1e-1 instead of hiding at ~1e-6.
SMALL = ("conv_in", "conv2", "conv_shortcut", "proj_out", "to_out.0", "ff.net.2")


def to_compvis(state_dict, cfg):
    return weights.rename(state_dict, {v: k for k, v in unet_diffusers_names(cfg).items()})


def reference(cfg, seed=0):
    """A diffusers UNet of `cfg` with every weight perturbed away from its init (norms included)."""
    torch.manual_seed(seed)
    ref = UNet2DConditionModel.from_config(unet_diffusers_config(cfg)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
            if name.rsplit(".", 1)[0].endswith(SMALL):
                p.mul_(0.01)
    return ref


def pair(cfg):
    ref = reference(cfg)
    ours = UNet(cfg).eval()
    ours.load_state_dict(to_compvis(ref.state_dict(), cfg), strict=True)
    return ours, ref


def inputs(cfg, shape=(2, 4, 8, 16)):
    g = torch.Generator().manual_seed(1)
    return torch.randn(shape, generator=g), torch.randn(shape[0], 7, cfg.context_dim, generator=g)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("t", [torch.tensor([1, 999]), torch.tensor([0.5, 500.25])], ids=["int_t", "float_t"])
def test_tiny_configs_match_diffusers(name, t):
    cfg = TINY[name]
    ours, ref = pair(cfg)
    x, context = inputs(cfg)  # batch 2, non-square 8x16
    with torch.no_grad():
        got, want = ours(x, t, context), ref(x, t, context).sample
    assert got.shape == x.shape
    diff = (got - want).abs().max().item()
    print(f"{name} {t.dtype}: max abs diff {diff:.2e}")
    assert diff <= 1e-5


def test_parity_check_detects_a_wrong_group_norm_eps():
    cfg = TINY["three_levels_depth2_4heads"]
    ours, ref = pair(cfg)
    x, context = inputs(cfg)
    t = torch.tensor([10, 600])
    with torch.no_grad():
        want = ref(x, t, context).sample
        for wrong in (1e-5, 1e-6):  # transformer norms at the res blocks' eps, then res blocks at the transformer's
            for m in ours.modules():
                if isinstance(m, torch.nn.GroupNorm) and isinstance(m, GroupNorm32) == (wrong == 1e-6):
                    m.eps = wrong
            assert (ours(x, t, context) - want).abs().max() > 1e-4


def group_norm_in_half_precision(x, groups, weight, bias, eps):
    """A group norm computed in x's own dtype throughout: statistics, normalisation and affine, each rounded."""
    g = x.reshape(x.shape[0], groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = (g - mean).square().mean(-1, keepdim=True)
    y = ((g - mean) / (var + eps).sqrt()).reshape(x.shape)
    return y * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


class GroupNormInputs(torch.overrides.TorchFunctionMode):
    """Records the dtypes of the tensors (input, weight, bias) of every F.group_norm call."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.group_norm:
            self.dtypes.append(tuple(a.dtype for a in (*args, *kwargs.values()) if torch.is_tensor(a)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm32_computes_in_float32_for_half_precision_weights_and_input(dtype):
    torch.manual_seed(0)
    norm = GroupNorm32(4, 8, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-1, 1)
    norm = norm.to(dtype)
    x = (torch.randn(2, 8, 16, 16) * 3 + 20).to(dtype)  # an offset: half-precision statistics lose digits on it
    want = torch.nn.functional.group_norm(x.float(), 4, norm.weight.float(), norm.bias.float(), 1e-5)
    with GroupNormInputs() as seen:
        got = norm(x)  # no autocast: half weights and input, as sampling in float16 runs it
    assert got.dtype == dtype
    assert torch.equal(got, want.to(dtype))  # the float32 result of the same half inputs, rounded once
    in_half = group_norm_in_half_precision(x, 4, norm.weight, norm.bias, 1e-5)
    assert (in_half.float() - want).abs().max() > 1.5 * (got.float() - want).abs().max()  # measured 2.4x, 4.8x
    # The kernel itself gets float32. On CPU, torch 2.13's half-precision group norm also accumulates in float32
    # and rounds once, so outputs alone cannot tell an upcast from none; the call can.
    assert seen.dtypes == [(torch.float32,) * 3]


def test_scalar_timestep_is_embedded_once_and_broadcast_to_the_batch():
    cfg = TINY["mid_block_attention_only"]
    ours, _ = pair(cfg)
    x, context = inputs(cfg)
    rows = []
    ours.time_embed.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    with torch.no_grad():
        one, per_row = ours(x, 500, context), ours(x, torch.tensor([500, 500]), context)
    assert rows == [1, 2]  # one embedding for the batch (sampling), one per row (training's random t)
    torch.testing.assert_close(one, per_row, atol=1e-6, rtol=1e-6)  # a 1-row GEMM may round unlike a 2-row one


def test_gradient_checkpointing_recomputes_every_block_and_gives_the_same_gradients():
    cfg = TINY["mid_block_attention_only"]
    ours, _ = pair(cfg)
    ours.train()
    x, context = inputs(cfg)
    t = torch.tensor([3, 700])
    grads, calls = [], []
    blocks = [*ours.input_blocks, ours.middle_block, *ours.output_blocks]
    for ckpt in (False, True):
        ours.gradient_checkpointing = ckpt
        ours.zero_grad()
        counts = [0] * len(blocks)
        hooks = [b.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
                 for i, b in enumerate(blocks)]
        ours(x, t, context).square().mean().backward()
        for h in hooks:
            h.remove()
        grads.append([p.grad.clone() for p in ours.parameters()])
        calls.append(counts)
    assert calls == [[1] * len(blocks), [2] * len(blocks)]  # each block runs again in backward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_diffusers_config_round_trips(name):
    cfg = TINY[name]
    assert unet_config_from_diffusers(unet_diffusers_config(cfg)) == cfg
    # and the config.json diffusers itself writes (all its keys, defaults included) reads back the same
    assert unet_config_from_diffusers(json.loads(reference(cfg).to_json_string())) == cfg


def test_renaming_table_maps_every_full_size_tensor_both_ways():
    cfg = UNetConfig()
    table = unet_diffusers_names(cfg)
    with torch.device("meta"):
        ours = UNet(cfg).state_dict()
        theirs = UNet2DConditionModel.from_config(unet_diffusers_config(cfg)).state_dict()
    assert len(table) < 200 and len(set(table.values())) == len(table)  # short, generated, invertible
    assert set(to_compvis(theirs, cfg)) == set(ours)
    assert set(weights.rename(ours, table)) == set(theirs)


def test_sdxl_like_and_unsupported_diffusers_configs_are_refused():
    sd15 = unet_diffusers_config(UNetConfig())
    with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
        unet_config_from_diffusers({**sd15, "addition_embed_type": "text_time"})
    with pytest.raises(ValueError, match="transformer_layers_per_block"):
        unet_config_from_diffusers({**sd15, "transformer_layers_per_block": [1, 2, 10]})
    with pytest.raises(ValueError, match="block types"):
        unet_config_from_diffusers({**sd15, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4})


# --- full size ------------------------------------------------------------------------------------------------

def random_full_size_reference():
    """SD v1.5-sized diffusers UNet with the benchmarks' random weights (fan-in-scaled uniform, cheaper than its
    own init)."""
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(unet_diffusers_config(UNetConfig()))
    return fill_random_(ref.to_empty(device="cpu")).eval()


def test_full_size_sd15_folder_and_single_file_load_identical_weights_and_match_diffusers(scratch):
    cfg = UNetConfig()
    ref = random_full_size_reference()
    state = ref.state_dict()
    assert sum(p.numel() for p in ref.parameters()) == 859_520_964 and len(state) == 686
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([981])
    with torch.no_grad():
        want = ref(x, t, context).sample

    ref.save_pretrained(scratch / "pipeline" / "unet")  # diffusers folder layout, its own config.json
    single = {f"model.diffusion_model.{k}": v for k, v in to_compvis(state, cfg).items()}
    # tensors a real single file also carries, which must be ignored or never read
    single.update({"betas": torch.zeros(1000), "alphas_cumprod": torch.zeros(1000), "model_ema.decay": torch.ones(()),
                   "model_ema.num_updates": torch.zeros((), dtype=torch.int32),
                   "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)})
    save_file(single, scratch / "sd15.safetensors")
    del ref, state, single
    gc.collect()

    ours = load_unet(scratch / "pipeline")
    assert not ours.training and ours.config == cfg
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964 and len(ours.state_dict()) == 686
    with torch.no_grad():
        got = ours(x, t, context)
    diff = (got - want).abs().max().item()
    print(f"full-size SD v1.5 8x8: max abs diff {diff:.2e} (output scale {want.abs().max():.2f})")
    assert diff <= 1e-5

    other = load_unet(scratch / "sd15.safetensors")
    a, b = ours.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- bad input ------------------------------------------------------------------------------------------------

def save_tiny_folder(path, cfg, state_dict):
    (path / "unet").mkdir(parents=True)
    save_file(state_dict, path / "unet" / "diffusion_pytorch_model.safetensors")
    (path / "unet" / "config.json").write_text(json.dumps(unet_diffusers_config(cfg)))


def test_missing_and_truncated_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_unet(tmp_path / "nowhere.safetensors")
    save_file({"model.diffusion_model.time_embed.0.weight": torch.zeros(1280, 320)}, tmp_path / "cut.safetensors")
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.CheckpointError, match="cut.safetensors"):
        load_unet(tmp_path / "cut.safetensors")


def test_a_vae_checkpoint_names_missing_and_unexpected_keys(tmp_path):
    vae = {"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3), "decoder.mid.attn_1.q.weight": torch.zeros(2, 2),
           "quant_conv.weight": torch.zeros(8, 8, 1, 1)}
    save_file({f"first_stage_model.{k}": v for k, v in vae.items()}, tmp_path / "vae_only.safetensors")
    with pytest.raises(weights.CheckpointError, match="no tensors under 'model.diffusion_model.'"):
        load_unet(tmp_path / "vae_only.safetensors")
    save_file({f"model.diffusion_model.{k}": v for k, v in vae.items()}, tmp_path / "vae_named.safetensors")
    with pytest.raises(weights.CheckpointError, match=r"686 tensors missing \(input_blocks.*3 unexpected "
                                                      r"\(decoder.mid.attn_1.q.weight, encoder.conv_in.weight"):
        load_unet(tmp_path / "vae_named.safetensors")


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    cfg = TINY["two_levels_attention_low_only"]
    state = reference(cfg).state_dict()
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    state[key] = torch.zeros(64, 20)
    save_tiny_folder(tmp_path, cfg, state)
    with pytest.raises(weights.CheckpointError,
                       match=r"input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight has shape \(64, 20\).*"
                             r"\(64, 16\)"):
        load_unet(tmp_path)


def test_tiny_folder_loads_through_the_public_loader(tmp_path):
    cfg = TINY["sd2_style_linear_proj_head_dim"]
    ref = reference(cfg)
    save_tiny_folder(tmp_path, cfg, ref.state_dict())
    loaded = load_unet(tmp_path / "unet", dtype=torch.bfloat16)
    assert loaded.config == cfg and all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert not list(loaded.buffers())  # nothing non-persistent that a meta-device build would leave empty


def test_bad_latents_context_and_timesteps_are_refused():
    cfg = TINY["three_levels_depth2_4heads"]  # 3 levels: two halvings, so h and w must be divisible by 4
    ours, _ = pair(cfg)
    x, context = inputs(cfg)
    t = torch.tensor([1, 2])
    with pytest.raises(AssertionError, match=r"divisible by 4, got torch.Size\(\[8, 6\]\)"):
        ours(x[..., :6], t, context)
    with pytest.raises(AssertionError, match=r"\(B, 4, h, w\), got torch.Size\(\[2, 3, 8, 16\]\)"):
        ours(x[:, :3], t, context)
    with pytest.raises(AssertionError, match=r"context \(B, T, 24\), got torch.Size\(\[2, 7, 23\]\)"):
        ours(x, t, context[..., :23])
    with pytest.raises(AssertionError, match=r"timesteps \(B=2,\)"):
        ours(x, torch.tensor([1, 2, 3]), context)
    with torch.device("meta"):
        sd = UNet()
    with pytest.raises(AssertionError, match="divisible by 8"):
        sd(torch.zeros(1, 4, 12, 12, device="meta"), torch.tensor([1]), torch.zeros(1, 77, 768, device="meta"))

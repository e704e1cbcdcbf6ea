import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model  # oracle

from unet import UNet, UNetConfig

from ddm import Indicator, ddm_loss
from lora import (LoRALinear, inject_lora, load_lora_state_dict, lora_parameters, lora_state_dict,
                  mark_only_lora_trainable, merge_lora)


class Attention(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        attn = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1)
        return self.to_out(attn @ v)


class Block(nn.Module):
    """attn1 (self) and attn2 (cross) as in a CompVis transformer block, plus decoys whose names only
    *contain* a target (proto_q) or are not Linear layers."""

    def __init__(self, dim=16, context_dim=12):
        super().__init__()
        self.attn1 = Attention(dim, dim)
        self.attn2 = Attention(dim, context_dim)
        self.proto_q = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm(x), self.norm(x))
        return self.proto_q(x + self.attn2(x, context))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.proj = nn.Linear(16, 4 * 2 * 2)  # "eps_hat" of a (4, 2, 2) latent from the mean token

    def forward(self, x, context):
        for b in self.blocks:
            x = b(x, context)
        return self.proj(x.mean(1)).view(-1, 4, 2, 2)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, 16, generator=g), torch.randn(3, 7, 12, generator=g)


def model(seed=0):
    torch.manual_seed(seed)
    return Model()


def randomize_lora(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(m):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_injection_targets_whole_name_components_and_keeps_base_names():
    m = model()
    base_sd = {k: v.clone() for k, v in m.state_dict().items()}
    names = inject_lora(m, targets=("to_q", "to_v", "to_out.0"), rank=4, alpha=8)
    assert names == [f"blocks.{i}.attn{j}.{t}" for i in (0, 1) for j in (1, 2) for t in ("to_q", "to_v", "to_out.0")]
    assert all(isinstance(m.get_submodule(n), LoRALinear) for n in names)
    assert not isinstance(m.blocks[0].proto_q, LoRALinear) and not isinstance(m.blocks[0].attn1.to_k, LoRALinear)
    sd = m.state_dict()
    assert set(sd) - set(base_sd) == {f"{n}.{p}" for n in names for p in ("lora_A", "lora_B")}
    assert set(base_sd) <= set(sd)
    # a base checkpoint still loads by name; only the adapters are "missing"
    res = m.load_state_dict(base_sd, strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) == set(lora_state_dict(m))
    a = m.blocks[1].attn2.to_v
    assert a.lora_A.shape == (4, 12) and a.lora_B.shape == (16, 4) and a.scale == 2.0


def test_injection_errors_are_clear():
    with pytest.raises(AssertionError, match="no nn.Linear module name ends with"):
        inject_lora(model(), targets=("q_proj",))
    with pytest.raises(AssertionError, match="not nn.Linear"):
        inject_lora(model(), targets=("to_out",))  # the Sequential, not to_out.0
    m = model()
    inject_lora(m)
    with pytest.raises(AssertionError, match="already carry"):
        inject_lora(m)
    with pytest.raises(AssertionError, match="rank"):
        inject_lora(model(), rank=0)


def test_fresh_lora_leaves_outputs_unchanged():
    x, c = inputs()
    m = model()
    ref = m(x, c)
    inject_lora(m, targets=("to_q", "to_k", "to_v", "to_out.0"))
    assert all(p.abs().sum() > 0 for n, p in m.named_parameters() if n.endswith("lora_A"))
    assert torch.equal(m(x, c), ref)


def test_merge_matches_unmerged_adapter_and_unmerge_restores():
    x, c = inputs()
    m = model()
    base_w = m.blocks[0].attn1.to_q.weight.detach().clone()
    inject_lora(m)
    randomize_lora(m)
    adapted = m(x, c)
    assert (adapted - model()(x, c)).abs().max() > 1e-3  # the adapter now does something
    lin = m.blocks[0].attn1.to_q
    lin.merge()
    lin.merge()  # idempotent: no double counting
    for mod in m.modules():
        if isinstance(mod, LoRALinear):
            mod.merge()
    torch.testing.assert_close(m(x, c), adapted, atol=1e-6, rtol=1e-5)
    for mod in m.modules():
        if isinstance(mod, LoRALinear):
            mod.unmerge()
    torch.testing.assert_close(m(x, c), adapted, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lin.weight.detach(), base_w, atol=1e-7, rtol=0)


def test_merge_lora_leaves_plain_linear_modules_with_the_base_layout():
    x, c = inputs()
    base = model()
    m = model()
    inject_lora(m)
    randomize_lora(m)
    adapted = m(x, c)
    assert merge_lora(m) is m
    assert not any(isinstance(mod, LoRALinear) for mod in m.modules())
    assert type(m.blocks[0].attn1.to_q) is nn.Linear
    assert m.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(m(x, c), adapted, atol=1e-6, rtol=1e-5)
    base.load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(base(x, c), adapted, atol=1e-6, rtol=1e-5)


def test_only_lora_and_indicator_get_gradients_when_base_is_frozen():
    x, c = inputs()
    m = model()
    names = inject_lora(m)
    assert all(p.requires_grad for p in m.parameters())  # injection alone freezes nothing
    n_trainable = mark_only_lora_trainable(m)
    assert n_trainable == sum(p.numel() for p in lora_parameters(m)) > 0
    ind = Indicator((4, 2, 2), 2, hidden=(8, 8))
    opt = torch.optim.SGD([*lora_parameters(m), *ind.parameters()], lr=0.1)
    for _ in range(2):  # the second step has B != 0, so A gets a gradient too
        opt.zero_grad()
        loss, _ = ddm_loss(m(x, c), torch.randn(3, 4, 2, 2), torch.tensor([0, 1, 1]), ind)
        loss.backward()
        opt.step()
    for n, p in m.named_parameters():
        if n.endswith(("lora_A", "lora_B")):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ind.parameters())
    assert len(lora_parameters(m)) == 2 * len(names)


def test_lora_state_dict_round_trip_and_strict_errors():
    x, c = inputs()
    m = model()
    inject_lora(m)
    randomize_lora(m)
    sd = {k: v.clone() for k, v in lora_state_dict(m).items()}
    # 2 blocks x 2 attentions x (to_q, to_v) x (A, B)
    assert all(k.endswith(("lora_A", "lora_B")) for k in sd) and len(sd) == 16
    other = model()
    inject_lora(other)
    load_lora_state_dict(other, sd)
    assert torch.equal(other(x, c), m(x, c))
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(other, dict(list(sd.items())[1:]))
    with pytest.raises(ValueError, match="unexpected"):
        load_lora_state_dict(other, {**sd, "blocks.0.attn1.to_k.lora_A": sd["blocks.0.attn1.to_q.lora_A"]})
    r4 = model()
    inject_lora(r4, rank=4)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_lora_state_dict(r4, sd)


def test_injection_keeps_dtype_and_works_on_the_meta_device():
    m = model().to(torch.bfloat16)
    inject_lora(m)
    assert m.blocks[0].attn1.to_q.lora_A.dtype == torch.bfloat16
    src = model()
    inject_lora(src)
    randomize_lora(src)
    with torch.device("meta"):
        meta = Model()
    inject_lora(meta)
    assert meta.blocks[0].attn1.to_q.lora_B.is_meta
    meta.load_state_dict({k: v for k, v in src.state_dict().items() if "lora_" not in k}, strict=False, assign=True)
    load_lora_state_dict(meta, lora_state_dict(src))
    assert not any(p.is_meta for p in meta.parameters())
    x, c = inputs()
    assert torch.equal(meta(x, c), src(x, c))


def test_parity_with_peft():
    x, c = inputs()
    ours = model()
    names = inject_lora(ours, targets=("to_q", "to_v", "to_out.0"), rank=4, alpha=32)
    randomize_lora(ours)
    theirs = get_peft_model(model(), LoraConfig(r=4, lora_alpha=32, target_modules=["to_q", "to_v", "to_out.0"]))
    peft_names = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
                        for n, _ in theirs.named_modules() if n.endswith("lora_A.default"))
    assert peft_names == sorted(names)  # the same name matching rule
    with torch.no_grad():
        for n in names:
            mod = theirs.base_model.model.get_submodule(n)
            mod.lora_A["default"].weight.copy_(ours.get_submodule(n).lora_A)
            mod.lora_B["default"].weight.copy_(ours.get_submodule(n).lora_B)
    torch.testing.assert_close(ours(x, c), theirs(x, c), atol=1e-6, rtol=1e-5)
    merged = theirs.merge_and_unload()
    merge_lora(ours)
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, atol=1e-6, rtol=1e-5)

    # same initialisation distribution as peft's default: kaiming-uniform A, zero B
    torch.manual_seed(3)
    a = LoRALinear(64, 32, rank=8).lora_A
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound



def test_injection_on_a_tiny_unet(one_thread):
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(0, 1), num_heads=2,
                     context_dim=16, num_groups=8, num_res_blocks=1)
    net = UNet(cfg).eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 16)
    ref = net(x, t, ctx)
    names = inject_lora(net)
    attn = [n for n, mod in net.named_modules() if n.endswith(("attn1", "attn2"))]
    assert sorted(names) == sorted(f"{a}.{p}" for a in attn for p in ("to_q", "to_v"))
    assert torch.equal(net(x, t, ctx), ref)
    randomize_lora(net)
    adapted = net(x, t, ctx)
    merge_lora(net)
    torch.testing.assert_close(net(x, t, ctx), adapted, atol=1e-5, rtol=1e-4)

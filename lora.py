"""Low-rank adaptation (LoRA) of linear layers, minimal and dependency-free.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685), section 4.1: a frozen
weight W0 (out, in) is adapted by a trainable low-rank product,

    h = W0 x + b + (alpha / r) * B A x,        A: (r, in),  B: (out, r),

A initialised randomly and B at zero, so a fresh adapter changes nothing; after training W = W0 + (alpha/r) B A
is merged into the weight. DDM (Huang et al. 2025) adapts the UNet's `to_q`, `to_v` (and the text encoder's
`q_proj`, `v_proj`) at rank 8, alpha 32. `LoRALinear` keeps the base layer's `weight`/`bias` under their names
(base checkpoints still load by name) and adds `lora_A`, `lora_B`; `inject_lora` leaves requires_grad alone
(`mark_only_lora_trainable` sets it); `merge_lora` folds every adapter in and puts plain nn.Linear back.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights


class LoRALinear(nn.Linear):
    """An `nn.Linear` plus a low-rank update: y = x W^T + b + scale * x A^T B^T, scale = alpha / rank."""

    def __init__(self, in_features, out_features, bias=True, rank=8, alpha=32, device=None, dtype=None):
        assert rank >= 1, f"LoRA rank must be >= 1, got {rank}"
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear, rank=8, alpha=32):
        """Wrap an existing `nn.Linear`, sharing (not copying) its weight and bias; the adapter gets their
        device and dtype."""
        w = linear.weight
        with torch.device("meta"):  # the base tensors are taken over below, so never allocate them twice
            lora = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, rank=rank, alpha=alpha)
        lora.weight, lora.bias = linear.weight, linear.bias
        lora.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=w.dtype))
        lora.lora_B = nn.Parameter(torch.empty(linear.out_features, rank, device=w.device, dtype=w.dtype))
        lora.reset_lora_parameters()
        lora.train(linear.training)
        return lora

    def reset_parameters(self):
        super().reset_parameters()
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()

    def reset_lora_parameters(self):
        # A as nn.Linear's default init (peft and loralib do the same), B = 0 so the adapter starts as a no-op
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self):
        """scale * B A, the adapter as a (out, in) weight update, in the weight's dtype (computed in fp32)."""
        return (self.scale * (self.lora_B.float() @ self.lora_A.float())).to(self.weight.dtype)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:  # the update already lives in self.weight
            return y
        return y + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self):
        """W <- W + scale B A. Idempotent. Exact up to rounding in the weight's dtype."""
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W <- W - scale B A, undoing `merge()` (bitwise only in fp32-exact cases; low precision rounds)."""
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _matches(name, targets):
    # whole dotted components only: "to_q" matches "attn1.to_q" but not "attn1.proto_q"
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def inject_lora(model, targets=("to_q", "to_v"), rank=8, alpha=32):
    """Replace, in place, every `nn.Linear` whose qualified name ends with one of `targets` (whole dotted
    components, e.g. "to_q" or "to_out.0") by a `LoRALinear` sharing its weight. Returns the replaced names.

    Works on models on any device, the meta device included (the adapter is then on meta too and must be loaded,
    e.g. with `load_lora_state_dict`). Does not change any `requires_grad`.
    """
    if isinstance(targets, str):
        targets = (targets,)
    found = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets)]
    assert rank >= 1, f"LoRA rank must be >= 1, got {rank}"
    assert found, f"no nn.Linear module name ends with any of {targets}"
    assert all(type(m) is nn.Linear for _, m in found), \
        f"LoRA targets {targets} match modules that are not nn.Linear or already carry an adapter: {found[:3]}"
    for name, linear in found:
        _set_submodule(model, name, LoRALinear.from_linear(linear, rank=rank, alpha=alpha))
    return [n for n, _ in found]


def is_adapter(name):
    """Whether a parameter name is an adapter's (`...to_q.lora_A`, `...to_q.lora_B`)."""
    return name.endswith((".lora_A", ".lora_B"))


def lora_parameters(model):
    """The adapter parameters (every lora_A and lora_B), for the optimizer."""
    return [p for n, p in model.named_parameters() if is_adapter(n)]


def mark_only_lora_trainable(model):
    """Freeze everything in `model` but the LoRA adapters. Returns the number of trainable parameters."""
    for n, p in model.named_parameters():
        p.requires_grad_(is_adapter(n))
    return sum(p.numel() for p in lora_parameters(model))


def lora_state_dict(model):
    """{name: tensor} of the adapters only (names as in `model.state_dict()`, e.g. `...attn1.to_q.lora_A`)."""
    return {n: t for n, t in model.state_dict().items() if is_adapter(n)}


def load_lora_state_dict(model, state_dict, name="LoRA adapters"):
    """Load adapter tensors strictly (weights.load_strict): exactly the model's lora_A/lora_B, shapes equal. Adapters
    on the meta device take the tensors over; real ones copy them (cast to their dtype)."""
    meta = any(p.is_meta for p in lora_parameters(model))
    return weights.load_strict(model, state_dict, name, assign=meta, only=is_adapter)


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its weight and put a plain `nn.Linear` back in its place, in place; returns the
    model, whose state dict then has the base (adapter-free) layout, e.g. for exporting a merged checkpoint."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
            with torch.device("meta"):
                linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            linear.weight, linear.bias = m.weight, m.bias
            linear.train(m.training)
            _set_submodule(model, name, linear)
    return model

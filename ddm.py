"""The Debiasing Diffusion Model objective and the group-balance metrics used to judge it.

Huang, Tsao, Su, Chiang 2025, "Debiasing Diffusion Model: Enhancing Fairness through Latent Representation
Learning in Stable Diffusion Model" (arXiv 2503.12536). DDM adds an *indicator* I, a small MLP that reads the
UNet's predicted noise, and trains it together with the UNet (or its LoRA) so that group information in the
prediction is learned explicitly rather than absorbed from the data set's imbalance:

    L = w_rec * || eps_hat - eps ||^2  +  w_ind * CE( I(eps_hat), g ),    eps_hat = eps_theta(z_t, t, c)

with eps the noise added to the latent z_0 at timestep t, c the prompt, g the image's group label, and
(w_rec, w_ind) = (0.95, 0.05) in the authors' example. w_ind = 0 is plain Stable Diffusion fine-tuning.
The indicator follows the authors' code: flatten -> Linear -> 1024 -> ReLU -> Linear -> 512 -> ReLU ->
Linear -> K (they fix K = 2; here K comes from the data).

This file owns the whole training objective. train.py computes one micro-batch's `MicroBatch` (the latents, the
noise, the UNet's prediction, ...) and calls `loss(batch, indicator, hp)`, which returns (loss, parts); the loop
logs every part by its name. To try another objective, write a function beside `ddm` and name it in OBJECTIVES
(README, "Change the loss"); `uses_indicator` is the one place that decides whether a run has an indicator.

Metrics (hard group labels from an attribute classifier, or its probabilities):
- fairness discrepancy, FD = || u - p ||_2 with u the uniform distribution over the K groups and p the generated
  images' group proportions (Choi et al. 2020, "Fair Generative Modeling via Weak Supervision", ICML).
  0 when balanced, sqrt((K-1)/K) when every image falls in one group;
- statistical parity difference, SPD = max_k s_k - min_k s_k, with s_k the success rate of prompting group k
  explicitly (share of images the classifier assigns to the requested group);
- the authors' own signal: the mean entropy (nats) of the indicator's softmax over generated images, log K when
  it cannot tell the groups apart.
"""
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class Indicator(nn.Module):
    """MLP from a latent-shaped input (B, *latent_shape), eps_hat for DDM, to group logits (B, K)."""

    def __init__(self, latent_shape, num_groups, hidden=(1024, 512)):
        super().__init__()
        if num_groups < 2:
            raise ValueError(f"the indicator needs at least 2 groups, got num_groups={num_groups}")
        self.latent_shape = tuple(latent_shape)
        self.num_groups = num_groups
        widths = [math.prod(self.latent_shape), *hidden]
        layers = [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_groups))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        if tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(f"indicator built for latents {self.latent_shape}, got an input of shape "
                             f"{tuple(x.shape)} (different training resolution?)")
        return self.net(x)


@dataclass
class MicroBatch:
    """What the training step has at hand for one micro-batch (train.py fills it in; B images)."""
    z0: torch.Tensor  # (B, 4, h, w) clean latents: a VAE posterior sample times the scaling factor
    z_t: torch.Tensor  # (B, 4, h, w) noised latents, sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    t: torch.Tensor  # (B,) timesteps in {0, ..., 999}
    noise: torch.Tensor  # (B, 4, h, w) eps
    pred: torch.Tensor  # (B, 4, h, w) the UNet's output: eps_hat (v_hat for a v-prediction model)
    target: torch.Tensor  # (B, 4, h, w) what pred regresses to: eps (v for a v-prediction model)
    alphas_cumprod: torch.Tensor  # (1000,) abar of the model's noise schedule
    groups: torch.Tensor  # (B,) group index of each image
    group_shares: torch.Tensor  # (K,) the share of each group in the whole training set


def ddm_loss(eps_hat, noise, groups, indicator, w_rec=0.95, w_ind=0.05):
    """L = w_rec * MSE(eps_hat, eps) + w_ind * CE(indicator(eps_hat), groups). Returns (L, parts).

    Both terms are computed in float32 whatever the autocast dtype. The CE gradient reaches the UNet through
    eps_hat, which is the point of DDM. parts = {"rec": MSE, "ind": CE (detached tensors), "acc": the
    indicator's accuracy on this batch}. With w_ind == 0 the indicator is not run at all, L is exactly
    w_rec * MSE, and parts["ind"], parts["acc"] are NaN (not measured).
    """
    if eps_hat.shape != noise.shape:
        raise ValueError(f"eps_hat {tuple(eps_hat.shape)} and noise {tuple(noise.shape)} differ in shape")
    if groups.shape != eps_hat.shape[:1]:
        raise ValueError(f"groups must be ({eps_hat.shape[0]},) labels, got shape {tuple(groups.shape)}")
    rec = F.mse_loss(eps_hat.float(), noise.float())
    if w_ind == 0:
        nan = torch.tensor(float("nan"), device=rec.device)
        return w_rec * rec, {"rec": rec.detach(), "ind": nan, "acc": nan}
    logits = indicator(eps_hat).float()
    ind = F.cross_entropy(logits, groups)
    acc = (logits.argmax(1) == groups).float().mean().detach()
    return w_rec * rec + w_ind * ind, {"rec": rec.detach(), "ind": ind.detach(), "acc": acc}


def ddm(b, indicator, hp):
    """The authors' objective, `ddm_loss` on the UNet's prediction: the indicator reads eps_hat (v_hat for a
    v-prediction model). Without an indicator (w_ind = 0) it is plain fine-tuning, w_rec * MSE."""
    return ddm_loss(b.pred, b.target, b.groups, indicator, hp.w_rec, hp.w_ind if indicator is not None else 0)


OBJECTIVES = {"ddm": ddm}  # --objective NAME -> fn(MicroBatch, indicator or None, hyperparameters) -> (loss, parts)
INDICATOR_OBJECTIVES = {"ddm"}  # objectives with an indicator term, weighted by w_ind


def uses_indicator(objective, w_ind):
    """Whether a run builds, trains, checkpoints and reloads an indicator: decided here and nowhere else."""
    return objective in INDICATOR_OBJECTIVES and w_ind > 0


def loss(b, indicator, hp):
    """One micro-batch's training loss: (loss, parts), parts a dict of named scalars to log. `hp` holds the
    hyperparameters by name (train.py's arguments: hp.objective, hp.w_rec, hp.w_ind, ...)."""
    return OBJECTIVES[hp.objective](b, indicator, hp)


# ------------------------------------------------------------------------------------------------- metrics

def _as_tensor(x, name):
    if isinstance(x, Mapping):
        x = list(x.values())
    t = torch.as_tensor(x).detach().cpu()
    if not torch.is_tensor(x) and t.is_floating_point():  # Python floats: keep their float64 precision
        t = torch.as_tensor(x, dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    return t


def group_proportions(labels, num_groups):
    """Share of samples in each of the K groups, float64 (K,).

    labels: (N,) integer group indices (hard labels), or (N, K) per-sample probabilities (the soft version).
    """
    t = _as_tensor(labels, "labels")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if t.is_floating_point() and t.dim() == 2:
        if t.shape[1] != num_groups:
            raise ValueError(f"probabilities have {t.shape[1]} columns but num_groups={num_groups}")
        t = t.double()
        # 1e-4: float32 softmax rows sum to 1 within ~1e-6; logits passed by mistake miss by far more
        if (t < 0).any() or not torch.allclose(t.sum(1), torch.ones(len(t), dtype=t.dtype), atol=1e-4):
            raise ValueError("each row of probabilities must be non-negative and sum to 1 (softmax them first)")
        return t.mean(0)
    if t.dim() != 1 or t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(f"labels must be (N,) integer group indices or (N, K) probabilities, got {tuple(t.shape)}"
                         f" {t.dtype}")
    t = t.long()
    if t.min() < 0 or t.max() >= num_groups:
        raise ValueError(f"labels must lie in [0, {num_groups}), found {t.min().item()}..{t.max().item()}")
    return torch.bincount(t, minlength=num_groups).double() / len(t)


def _check_distribution(p):
    p = _as_tensor(p, "proportions").double()
    if p.dim() != 1:
        raise ValueError(f"proportions must be a (K,) vector, got shape {tuple(p.shape)}")
    if (p < 0).any() or abs(p.sum().item() - 1) > 1e-4:  # slack for float32 rounding, as above
        raise ValueError(f"proportions must be non-negative and sum to 1, got {p.tolist()}")
    return p


def fairness_discrepancy(p, normalized=False):
    """FD = || uniform - p ||_2 over the K groups (Choi et al. 2020): 0 when balanced, sqrt((K-1)/K) at most
    (all samples in one group). normalized=True divides by that maximum, giving a number in [0, 1]."""
    p = _check_distribution(p)
    k = len(p)
    fd = torch.linalg.vector_norm(torch.full_like(p, 1 / k) - p).item()
    if normalized:
        if k < 2:
            raise ValueError("normalized FD needs at least 2 groups")
        fd /= math.sqrt((k - 1) / k)
    return fd


def statistical_parity_difference(success_rates):
    """SPD = max_k s_k - min_k s_k over the per-group success rates s_k in [0, 1] (a sequence, or a dict
    {group: rate}); 0 when prompting every group works equally often."""
    s = _as_tensor(success_rates, "success_rates").double()
    if s.dim() != 1:
        raise ValueError(f"success_rates must be a (K,) vector, got shape {tuple(s.shape)}")
    if (s < 0).any() or (s > 1).any() or s.isnan().any():
        raise ValueError(f"success rates must lie in [0, 1], got {s.tolist()}")
    return (s.max() - s.min()).item()


def mean_entropy(logits, normalized=False):
    """Mean over samples of the softmax entropy H = -sum_k p_k log p_k, in nats (log K for a uniform softmax,
    0 for a one-hot one). logits: (N, K). normalized=True divides by log K, giving a number in [0, 1]."""
    t = _as_tensor(logits, "logits").double()
    if t.dim() != 2 or t.shape[1] < 1:
        raise ValueError(f"logits must be (N, K), got shape {tuple(t.shape)}")
    p = t.softmax(1)
    h = -torch.xlogy(p, p).sum(1).mean().item()  # xlogy: 0 log 0 = 0 for logits of -inf
    if normalized:
        if t.shape[1] < 2:
            raise ValueError("normalized entropy needs at least 2 groups")
        h /= math.log(t.shape[1])
    return h

"""The Debiasing Diffusion Model objective, our variants beside it, and the group-balance metrics.

Huang, Tsao, Su, Chiang 2025 (arXiv 2503.12536). DDM trains an *indicator* I, a small MLP reading the UNet's
predicted noise, together with the UNet (or its LoRA):

    L = w_rec · ||ε̂ − ε||²  +  w_ind · CE(I(ε̂), g),      ε̂ = ε_θ(z_t, t, c),  (w_rec, w_ind) = (0.95, 0.05)

g is the image's group label, never a word of the prompt c; w_ind = 0 is plain fine-tuning. train.py fills one
MicroBatch per micro-batch and calls `loss(b, indicator, hp)` -> (loss, parts); every part is logged by name. An
objective is one function and one OBJECTIVES entry saying what its indicator reads (README, "Change the loss").

Metrics: FD = ||u − p||₂, u uniform over the K groups and p the generated shares (Choi et al. 2020): 0 balanced,
√((K−1)/K) all in one group. SPD = max_k s_k − min_k s_k over the success rates of prompting each group. The
authors' own signal: the mean entropy of the indicator's softmax on generated images (log K: it cannot tell).
"""
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import diffusion
from unet import timestep_embedding


class Indicator(nn.Module):
    """MLP from a latent-shaped input (B, *latent_shape) to group logits (B, K): the authors' indicator, reading
    eps_hat. With timestep_dim > 0 it also reads the timestep (sinusoidal features concatenated to the flattened
    input): a noise-aware p(g | z_t, t), as classifier guidance needs (ours)."""

    def __init__(self, latent_shape, num_groups, hidden=(1024, 512), timestep_dim=0):
        super().__init__()
        assert num_groups >= 2, f"the indicator needs at least 2 groups, got num_groups={num_groups}"
        self.latent_shape = tuple(latent_shape)
        self.num_groups, self.timestep_dim = num_groups, timestep_dim
        widths = [math.prod(self.latent_shape) + timestep_dim, *hidden]
        layers = [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_groups))
        self.net = nn.Sequential(*layers)

    def forward(self, x, t=None):
        assert tuple(x.shape[1:]) == self.latent_shape, f"indicator of latents {self.latent_shape}, got {x.shape}"
        if self.timestep_dim:
            t = torch.as_tensor(t, device=x.device).expand(len(x))
            x = torch.cat([x.flatten(1), timestep_embedding(t, self.timestep_dim).to(x.dtype)], 1)
        return self.net(x)


@dataclass
class MicroBatch:
    """What the training step has at hand for one micro-batch (train.py fills it in; B images)."""
    z0: torch.Tensor  # (B, 4, h, w) clean latents: a VAE posterior sample times the scaling factor
    z_t: torch.Tensor  # (B, 4, h, w) noised latents, sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    t: torch.Tensor  # (B,) timesteps in {0, ..., T - 1}, T = len(alphas_cumprod) (SD: 1000)
    noise: torch.Tensor  # (B, 4, h, w) eps
    pred: torch.Tensor  # (B, 4, h, w) the UNet's output: eps_hat (v_hat for a v-prediction model)
    target: torch.Tensor  # (B, 4, h, w) what pred regresses to: eps (v for a v-prediction model)
    alphas_cumprod: torch.Tensor  # (T,) abar of the model's noise schedule
    groups: torch.Tensor  # (B,) group index of each image, -1 where the image has no label
    group_shares: torch.Tensor  # (K,) pi_hat: the share of each group among the labelled training images (the
    # data's where labels are missing at random; not where a few are kept per group, as data.py's at least one)
    target_shares: torch.Tensor  # (K,) pi*: the group shares generation should have (--target; uniform)
    labelled_share: float  # the share of the training images that carry a group label (cross_entropy)
    prediction_type: str = "epsilon"  # or "v_prediction"


def ddm_loss(eps_hat, noise, groups, indicator, w_rec=0.95, w_ind=0.05, labelled_share=1.0):
    """L = w_rec * MSE(eps_hat, eps) + w_ind * CE(indicator(eps_hat), groups). Returns (L, parts).

    Both terms are computed in float32 whatever the autocast dtype. The CE gradient reaches the UNet through
    eps_hat, which is the point of DDM. With every image labelled (the paper's setting) the CE is the batch mean;
    otherwise `cross_entropy` says how it counts. parts = {"rec": MSE, "ind": CE (detached tensors), "acc", "bacc":
    the indicator's accuracy and balanced accuracy on this batch}. With w_ind == 0 the indicator is not run at all, L
    is exactly w_rec * MSE, and parts["ind"], parts["acc"] are NaN (not measured), as they are for a batch without a
    labelled image.
    """
    assert eps_hat.shape == noise.shape and groups.shape == eps_hat.shape[:1], "eps_hat, noise, groups differ in shape"
    rec = F.mse_loss(eps_hat.float(), noise.float())
    if w_ind == 0:
        nan = torch.tensor(float("nan"), device=rec.device)
        return w_rec * rec, {"rec": rec.detach(), "ind": nan, "acc": nan}
    logits = indicator(eps_hat).float()
    ind, logged = cross_entropy(logits, groups, labelled_share)  # over the labelled images (group -1: none)
    return w_rec * rec + w_ind * ind, {"rec": rec.detach(), "ind": logged, **accuracies(logits, groups)}


def ddm(b, indicator, hp):
    """The authors' objective, `ddm_loss` on the UNet's prediction: the indicator reads eps_hat (v_hat for a
    v-prediction model). Without an indicator (w_ind = 0) it is plain fine-tuning, w_rec * MSE."""
    return ddm_loss(b.pred, b.target, b.groups, indicator, hp.w_rec, hp.w_ind if indicator is not None else 0,
                    b.labelled_share)


# ---- Our variants. Each is labelled "ours": the paper's objective is `ddm` above. Why they are built this way,
# with sources: docs/reproduction.md.

def predicted_x0(b):
    """x̂_0 of the micro-batch's prediction (DDPM eq. 15; from v̂ for a v-prediction model)."""
    return diffusion.predicted_x0(b.z_t, b.pred, b.t, b.alphas_cumprod, b.prediction_type)


def ddm_x0(b, indicator, hp):
    """The paper's figure (ours to build): the indicator reads the denoised latent x0_hat instead of eps_hat.

        L = w_rec * MSE + w_ind * mean_i( abar_t_i * CE(I(x0_hat_i), g_i) )    (i: the labelled images; cross_entropy)

    x0_hat divides by sqrt(abar_t) (about 15 at t = 999), where it is mostly noise. Weighting each image's CE by
    abar_t, the share of signal in z_t's variance, keeps the CE gradient through x0_hat bounded (it scales as
    sqrt(abar (1 - abar)) <= 1/2) and gives most weight where x0_hat carries the group; no extra knob. abar_t averages
    0.37 over SD's t: at the same --w-ind its CE weighs ~2.7x less than `ddm`'s, and its logged "ind" is the weighted
    CE."""
    rec = F.mse_loss(b.pred.float(), b.target.float())
    if indicator is None:
        return hp.w_rec * rec, {"rec": rec}
    logits = indicator(predicted_x0(b)).float()
    ind, logged = cross_entropy(logits, b.groups, b.labelled_share, weight=b.alphas_cumprod[b.t])
    return hp.w_rec * rec + hp.w_ind * ind, {"rec": rec, "ind": logged, **accuracies(logits, b.groups)}


def importance_weights(q, group_shares, target_shares, clip=10.0):
    """w = sum_g q_g * pi*_g / pi_hat_g per image (q: (B, K) posteriors or one-hot labels), clipped at `clip`.
    Minimising E[w * ||eps_hat - eps||^2] fits the re-balanced data sum_g pi*_g p(x | g) (Choi et al. 2020,
    importance weighting). Not normalised per batch: w has mean 1 over the data when q is calibrated, pi_hat is the
    data's and the clip does not bind; a micro-batch's own mean would make every weight 1 at batch size 1."""
    return (q.float() @ (target_shares / group_shares).float()).clamp(max=clip)


def weighted_mse(b, w):
    """Mean over images of w_i * ||pred_i - target_i||^2 / D."""
    per_image = (b.pred.float() - b.target.float()).pow(2).flatten(1).mean(1)
    return (w * per_image).mean()


def balanced(b, indicator, hp):
    """Ours, the labelled baseline: each image's MSE weighted by pi*_g / pi_hat_g of its group (1 / (K pi_hat_g)
    for a uniform target: every group contributes equally, mean weight 1 over the data). No indicator; unlabelled
    images keep weight 1."""
    r = (b.target_shares / b.group_shares).float()
    w = torch.where(b.groups >= 0, r[b.groups.clamp(min=0)], torch.ones_like(r[:1]))
    rec = weighted_mse(b, w)
    return hp.w_rec * rec, {"rec": rec}


def noise_aware_ce(b, indicator):
    """Class-balanced CE of a noise-aware indicator on (z_t, t), detached from the UNet: it learns p(g | z_t, t)
    from the labelled images and teaches the UNet nothing. Each image's CE is weighted by 1 / (K pi_hat_g) of its
    group (mean 1 over the labelled data): every group counts alike. (logits, CE, its logged value)."""
    logits = indicator(b.z_t.detach(), b.t).float()
    balance = 1 / (len(b.group_shares) * b.group_shares.float())
    return (logits, *cross_entropy(logits, b.groups, b.labelled_share, weight=balance[b.groups.clamp(min=0)]))


def indicator_weighted(b, indicator, hp):
    """Ours: DDM's indicator made to balance. It learns p(g | z_t, t) on the labelled images (noise_aware_ce), and
    its posterior on the clean latent, q = p(. | z0, t = 0), weights every image's MSE by importance_weights.
    Its class-balanced CE makes that a posterior under equal group priors: Bayes' rule puts the data's shares back,
    q ∝ softmax(logits + log pi_hat). Images without a label are weighted all the same: 10% labels are enough."""
    logits, ind, logged = noise_aware_ce(b, indicator)
    with torch.no_grad():
        q = (indicator(b.z0, torch.zeros_like(b.t)).float().log_softmax(1) + b.group_shares.float().log()).softmax(1)
        w = importance_weights(q, b.group_shares, b.target_shares, hp.weight_clip)
    rec = weighted_mse(b, w)
    return hp.w_rec * rec + hp.w_ind * ind, {"rec": rec, "ind": logged, **accuracies(logits, b.groups),
                                             "w_max": w.max()}


def plain_indicator(b, indicator, hp):
    """Ours: plain fine-tuning, plus a noise-aware indicator trained beside it (detached) for guidance at sampling
    (`sample.py --indicator RUN --indicator-guidance S`)."""
    rec = F.mse_loss(b.pred.float(), b.target.float())
    logits, ind, logged = noise_aware_ce(b, indicator)
    return hp.w_rec * rec + hp.w_ind * ind, {"rec": rec, "ind": logged, **accuracies(logits, b.groups)}


def fit_clusters(z0, k, dims=10, iters=100, seed=0):
    """Ours, the label-free indicator: a K-component Gaussian mixture with full covariances and FREE weights on
    the clean latents z0 (N, ...), fit by EM (Bishop 2006, §9.2.2) on their top `dims` principal components from
    k-means++ centres -> (cluster of each latent (N,), mixture weights (K,)). Free weights let a small group keep a
    small cluster; equal-size self-labelling would split the majority. 10 dimensions keep a full covariance (55
    numbers) estimable from a 40-image cluster; 100 EM steps settle the assignments (docs/reproduction.md)."""
    x = z0.flatten(1).double()
    x = x - x.mean(0)
    x = x @ torch.linalg.svd(x, full_matrices=False).Vh[:min(dims, *x.shape)].T  # (N, d)
    n, d = x.shape
    if not 2 <= k <= n:
        raise ValueError(f"k must lie in [2, {n}] (the number of latents), got {k}")
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(n, (1,), generator=gen)]
    while len(centres) < k:  # k-means++: the next centre drawn in proportion to the squared distance to the nearest
        d2 = torch.cdist(x, centres).min(1).values ** 2
        centres = torch.cat([centres, x[torch.multinomial(d2 + 1e-12, 1, generator=gen)]])
    r = F.one_hot(torch.cdist(x, centres).argmin(1), k).double()  # (N, K) responsibilities
    ridge = 1e-3 * x.var(0).mean() * torch.eye(d, dtype=x.dtype)  # keeps a small cluster's covariance invertible
    for _ in range(iters):
        nk = r.sum(0).clamp(min=1e-9)  # M step: weights, means, covariances from the responsibilities
        mu = (r.T @ x) / nk[:, None]
        cov = torch.stack([(r[:, j, None] * (x - mu[j])).T @ (x - mu[j]) / nk[j] for j in range(k)]) + ridge
        log_p = torch.distributions.MultivariateNormal(mu, cov).log_prob(x[:, None])  # E step: (N, K)
        r = (log_p + (nk / n).log()).softmax(1)
    return r.argmax(1), r.mean(0)


def cross_entropy(logits, groups, labelled_share, weight=None):
    """(CE term, its logged value) of a micro-batch of B images, ℓ = labelled_share of the training data:

        term = Σ_i w_i CE_i / (B ℓ)   over its labelled rows i (group -1: none; w_i = weight[i], else 1)

    an unbiased estimate of the mean of w CE over the labelled data, whose denominator is a constant: micro-batches
    and DDP ranks add up to one big batch exactly, at any batch size (a batch's own count or weight sum would give a
    lone image's weight back as 1). With every image labelled it is the batch mean. Logged: Σ_i w_i CE_i over this
    batch's labelled count, NaN (not measured, left out of the step's mean) when it has none."""
    keep = groups >= 0
    w = keep.float() if weight is None else torch.where(keep, weight.float(), 0.0)
    total = (w * F.cross_entropy(logits, groups, ignore_index=-1, reduction="none")).sum()
    logged = total.detach() / keep.sum() if keep.any() else torch.full_like(total, float("nan"))
    return total / (len(groups) * labelled_share), logged


def accuracies(logits, groups):
    """{"acc", "bacc"} of the arg-max on the labelled rows: accuracy, and balanced accuracy (the mean per-group
    recall), which unlike accuracy does not reward answering the majority group. bacc is measured on a batch that
    holds every group (there an unbiased estimate); over the groups present, a batch of one image or of one group
    would give the accuracy. NaN: not measured."""
    keep, nan = groups >= 0, torch.tensor(float("nan"), device=logits.device)
    hit, present = (logits.argmax(1) == groups)[keep].float(), groups[keep].unique()
    recalls = [hit[groups[keep] == g].mean() for g in present]
    return {"acc": hit.mean().detach() if keep.any() else nan,
            "bacc": torch.stack(recalls).mean().detach() if len(present) == logits.shape[1] else nan}


@dataclass(frozen=True)
class Objective:
    """A training objective: fn(MicroBatch, indicator, hp) -> (loss, parts); what its indicator reads: None
    (no indicator), "pred" (ε̂, the authors'), "x0" (x̂₀) or "z_t" ((z_t, t): noise-aware, usable for guidance);
    and the flags of train.py's objective group it reads beyond --w-rec and --w-ind, named as hp spells them
    ("target": b.target_shares, "weight_clip": hp.weight_clip), which train.py refuses for an objective that does
    not read them. A noise-aware indicator is the objective's point: such an objective needs w_ind > 0."""
    fn: Callable
    reads: str = None
    flags: tuple = ()


OBJECTIVES = {  # --objective NAME
    "ddm": Objective(ddm, "pred"), "ddm-x0": Objective(ddm_x0, "x0"),
    "balanced": Objective(balanced, flags=("target",)),
    "indicator-weighted": Objective(indicator_weighted, "z_t", flags=("target", "weight_clip")),
    "plain-indicator": Objective(plain_indicator, "z_t"),
}
TIMESTEP_DIM = 64  # sinusoidal timestep features of a noise-aware indicator


LOGGED = ("step", "loss", "lr", "grad_norm", "time")  # what train.py logs beside an objective's parts


def check_parts(parts, first, objective, step):
    """An objective's part names, checked: a slip in a new objective stops the run where it happens, not as a log
    field written over or a silently mixed sum. Each part a scalar, none named like a field train.py logs itself,
    the same names in the same order as at this process's first micro-batch (`first`; None there), and there on
    every DDP rank (a collective: each rank calls this at the same point): train.py sums them in that order over
    micro-batches and ranks (of a *_max part, takes the largest)."""
    where = f"--objective {objective} at step {step}"
    if first is None and dist.is_initialized() and dist.get_world_size() > 1:  # before any rank can stop alone
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, tuple(parts))
        assert len(set(ranks)) == 1, (f"{where}: the ranks returned the parts {ranks}: every rank must return the "
                                      "same names")
    for name, value in parts.items():
        assert name not in LOGGED, f"{where}: its part {name!r} has the name of a field train.py logs itself"
        assert not torch.as_tensor(value).shape, f"{where}: its part {name!r} is not a scalar"
    assert first in (None, tuple(parts)), (f"{where} returned the parts {tuple(parts)}, where its first micro-batch "
                                           f"returned {first}: return the same part names at every step, NaN where "
                                           "not measured (README, 'Change the loss')")
    return tuple(parts)


def uses_indicator(objective, w_ind):
    """Whether a run builds, trains, checkpoints and reloads an indicator: decided here and nowhere else."""
    return OBJECTIVES[objective].reads is not None and w_ind > 0


def reads_groups(objective, w_ind):
    """Whether a run reads the group labels: all but plain fine-tuning, an objective with an indicator at w_ind = 0
    (`ddm`'s docstring); one without an indicator, as `balanced`, weights its MSE by group."""
    return OBJECTIVES[objective].reads is None or w_ind > 0


def noise_aware(objective):
    return OBJECTIVES[objective].reads == "z_t"


def make_indicator(objective, latent_shape, num_groups, hidden):
    """The indicator a run with this objective trains: the authors' MLP, or its noise-aware form."""
    return Indicator(latent_shape, num_groups, hidden, TIMESTEP_DIM if noise_aware(objective) else 0)


def indicator_metadata(indicator, group_names, attribute=None):
    """What an indicator.safetensors file carries so that it reads unambiguously on its own: its input latent
    shape, whether it reads (z_t, t), its widths, and its groups (of `attribute`, when they name one)."""
    return {"ddm_indicator": "1", "latent_shape": json.dumps(list(indicator.latent_shape)),
            "timestep_dim": str(indicator.timestep_dim), "groups": json.dumps([str(g) for g in group_names]),
            "hidden": json.dumps([m.out_features for m in indicator.net if isinstance(m, nn.Linear)][:-1]),
            "attribute": attribute or ""}


def loss(b, indicator, hp):
    """One micro-batch's training loss: (loss, parts), parts a dict of named scalars to log. `hp` holds the
    hyperparameters by name (train.py's arguments: hp.objective, hp.w_rec, hp.w_ind, ...)."""
    return OBJECTIVES[hp.objective].fn(b, indicator, hp)


def indicator_logits(b, indicator, objective):
    """The indicator's logits on a micro-batch, reading what it reads in training."""
    reads = OBJECTIVES[objective].reads
    return indicator(b.z_t, b.t) if reads == "z_t" else indicator(predicted_x0(b) if reads == "x0" else b.pred)


def parse_target(spec, group_names):
    """pi* (K,) float32 from "uniform" or "NAME=SHARE,NAME=SHARE,..." naming every group once, shares summing to 1."""
    names = [str(g) for g in group_names]
    if spec == "uniform":
        return torch.full((len(names),), 1 / max(len(names), 1))  # no groups: a plain fine-tune of unlabelled data
    shares, items = {}, spec.split(",")
    for item in items:
        name, _, share = (s.strip() for s in item.partition("="))
        if name not in names:
            raise ValueError(f"target {spec!r}: {name!r} is not a group (groups: {', '.join(names)})")
        try:
            shares[name] = float(share)
        except ValueError:
            raise ValueError(f"target {spec!r}: {item!r} is not NAME=SHARE") from None
    p = torch.tensor([shares.get(n, 0.0) for n in names], dtype=torch.float64)
    once = len(items) == len(shares) == len(names)  # a group named twice: which of its shares was meant?
    if not once or (p < 0).any() or not p.isfinite().all() or abs(p.sum().item() - 1) > 1e-6:
        raise ValueError(f"target {spec!r} must give each of the groups {', '.join(names)} one share >= 0, the shares "
                         f"summing to 1")
    return p.float()


# ------------------------------------------------------------------------------------------------- metrics

def group_proportions(labels, num_groups):
    """Share of samples in each of the K groups, float64 (K,): labels (N,) integer group indices (hard), or (N, K)
    per-sample probabilities (soft)."""
    t = torch.as_tensor(labels).detach().cpu()
    assert len(t), "labels are empty"
    if t.is_floating_point() and t.dim() == 2:
        assert t.shape[1] == num_groups and ((t.sum(1) - 1).abs() < 1e-4).all() and (t >= 0).all(), \
            "probabilities need num_groups columns, each row non-negative and summing to 1"
        return t.double().mean(0)
    assert 0 <= t.min() and t.max() < num_groups, f"labels must lie in [0, {num_groups})"
    return torch.bincount(t.long(), minlength=num_groups).double() / len(t)


def fairness_discrepancy(p, normalized=False):
    """FD = || uniform - p ||_2 over the K groups (Choi et al. 2020): 0 when balanced, sqrt((K-1)/K) at most
    (all samples in one group). normalized=True divides by that maximum, giving a number in [0, 1]."""
    p = torch.as_tensor(p, dtype=torch.float64)
    assert p.dim() == 1 and len(p) and (p >= 0).all() and abs(p.sum() - 1) < 1e-4, f"not proportions: {p.tolist()}"
    fd = torch.linalg.vector_norm(p - 1 / len(p)).item()
    return fd / math.sqrt((len(p) - 1) / len(p)) if normalized else fd


def statistical_parity_difference(success_rates):
    """SPD = max_k s_k - min_k s_k over the per-group success rates s_k in [0, 1] (a sequence, or a dict
    {group: rate}); 0 when prompting every group works equally often."""
    s = torch.as_tensor(list(success_rates.values()) if isinstance(success_rates, Mapping) else success_rates,
                        dtype=torch.float64)
    assert s.dim() == 1 and len(s) and (s >= 0).all() and (s <= 1).all(), f"not rates: {s.tolist()}"
    return (s.max() - s.min()).item()


def mean_entropy(logits, normalized=False):
    """Mean over samples of the softmax entropy H = -sum_k p_k log p_k, in nats (log K for a uniform softmax,
    0 for a one-hot one). logits: (N, K). normalized=True divides by log K, giving a number in [0, 1]."""
    t = torch.as_tensor(logits, dtype=torch.float64)
    assert t.dim() == 2 and len(t) and t.shape[1] >= 2, f"logits must be (N, K >= 2), got {tuple(t.shape)}"
    p = t.softmax(1)
    h = -torch.xlogy(p, p).sum(1).mean().item()  # xlogy: 0 log 0 = 0 for logits of -inf
    return h / math.log(t.shape[1]) if normalized else h

"""ddm.py's objectives (ours beside the authors'), their arithmetic against closed forms, partial labels, and
indicator guidance at sampling on a tiny model; the guidance step against its formula on a toy indicator with a
closed-form gradient, under DDIM and Euler."""
import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import ddm
import diffusion

LATENT = (4, 2, 2)


def micro_batch(groups, t=None, pred=None, seed=0, shares=(0.75, 0.25), target=(0.5, 0.5), labelled=None):
    """A micro-batch of len(groups) images; `labelled`: the data's labelled share (default: the batch's, 1 if none)."""
    g = torch.Generator().manual_seed(seed)
    B = len(groups)
    z0, noise = torch.randn(B, *LATENT, generator=g), torch.randn(B, *LATENT, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g) if t is None else torch.as_tensor(t)
    ac = diffusion.sd_schedule().float()
    z_t = diffusion.add_noise(z0, noise, t, ac)
    pred = noise + 0.1 * torch.randn(B, *LATENT, generator=g) if pred is None else pred
    return ddm.MicroBatch(z0=z0, z_t=z_t, t=t, noise=noise, pred=pred, target=noise, alphas_cumprod=ac,
                          groups=torch.tensor(groups), group_shares=torch.tensor(shares),
                          target_shares=torch.tensor(target),
                          labelled_share=labelled or (sum(k >= 0 for k in groups) / B or 1.0))


HP = SimpleNamespace(w_rec=1.0, w_ind=0.5, weight_clip=10.0)


def test_balanced_weights_have_mean_one_over_the_data_and_equalise_the_groups():
    groups = [0, 0, 0, 1]  # the batch is the data: 3 : 1, as the shares say
    b = micro_batch(groups)
    loss, parts = ddm.balanced(b, None, HP)
    per_image = (b.pred - b.target).pow(2).flatten(1).mean(1)
    w = torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0])  # 1 / (K pi_g): 0.5 / 0.75 and 0.5 / 0.25
    assert w.mean() == pytest.approx(1.0)
    assert (w[:3].sum() - w[3]).abs() < 1e-6  # each group's total weight is the same
    torch.testing.assert_close(loss, (w * per_image).mean())
    unlabelled = micro_batch([-1, 0, 0, 1])
    w_u = torch.tensor([1.0, 2 / 3, 2 / 3, 2.0])  # an image without a label keeps weight 1
    torch.testing.assert_close(ddm.balanced(unlabelled, None, HP)[0],
                               (w_u * (unlabelled.pred - unlabelled.target).pow(2).flatten(1).mean(1)).mean())


def test_predicted_x0_matches_the_ddim_step_x0():
    b = micro_batch([0, 1, 0], t=[1, 500, 999])
    x0 = ddm.predicted_x0(b)
    ac = b.alphas_cumprod.double()
    for i, t in enumerate(b.t.tolist()):
        # ddim_step to past the last step gives sqrt(abar_0) x0_hat + sqrt(1 - abar_0) eps: solve it for x0_hat
        x_prev = diffusion.ddim_step(b.z_t[i].double(), b.pred[i].double(), t, -1, ac)
        want = (x_prev - (1 - ac[0]).sqrt() * b.pred[i].double()) / ac[0].sqrt()
        torch.testing.assert_close(x0[i].double(), want, atol=1e-4 * max(1, want.abs().max().item()), rtol=1e-4)
    v = micro_batch([0, 1, 0], t=[1, 500, 999])
    v.prediction_type = "v_prediction"
    v.pred = diffusion.v_target(v.z0, v.noise, v.t, v.alphas_cumprod)  # the exact v gives back z0
    torch.testing.assert_close(ddm.predicted_x0(v), v.z0, atol=1e-5, rtol=1e-5)


def test_predicted_x0_of_a_half_precision_prediction_keeps_the_schedule_exact():
    """Under train.py's bf16 autocast the UNet's ε̂ is bf16, and predicted_x0 cast ᾱ_t to it before taking √(1−ᾱ_t):
    ᾱ_0 = 0.99915 rounded to 1, so x̂_0 = z_t at t = 0 (an error of 0.03 ε̂ where the exact ε̂ gives x_0 back), 25% off
    at t = 5. Only ε̂'s own rounding may show."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, *LATENT, generator=g), torch.randn(6, *LATENT, generator=g)
    t = torch.tensor([0, 1, 5, 10, 500, 999])
    ac = diffusion.sd_schedule()
    z_t = diffusion.add_noise(x0, eps, t, ac)
    for dtype, tol in ((torch.bfloat16, 4e-3), (torch.float16, 5e-4)):
        rounded = eps.to(dtype)  # the prediction as the UNet returns it: exact but for its own rounding
        want = diffusion.predicted_x0(z_t, rounded.float(), t, ac)
        got = diffusion.predicted_x0(z_t, rounded, t, ac).float()
        for k in range(len(t)):
            err = (got[k] - want[k]).abs().max().item()
            assert err <= tol * max(1.0, want[k].abs().max().item()), (dtype, t[k].item(), err)
        v = diffusion.v_target(x0, eps, t, ac).to(dtype)
        got_v = diffusion.predicted_x0(z_t, v, t, ac, "v_prediction").float()
        want_v = diffusion.predicted_x0(z_t, v.float(), t, ac, "v_prediction")
        assert (got_v - want_v).abs().max() <= tol * max(1.0, want_v.abs().max().item()), dtype


def test_ddm_x0_weights_the_ce_by_alpha_bar_so_its_gradient_stays_bounded_at_large_t():
    torch.manual_seed(0)
    ind = ddm.Indicator(LATENT, 2, (8,))
    b = micro_batch([0, 1], t=[999, 999])
    b.pred = b.pred.clone().requires_grad_(True)
    loss, parts = ddm.ddm_x0(b, ind, SimpleNamespace(w_rec=0.0, w_ind=1.0))
    logits = ind(ddm.predicted_x0(b))
    abar = b.alphas_cumprod[b.t]
    torch.testing.assert_close(parts["ind"], (abar * F.cross_entropy(logits, b.groups, reduction="none")).mean())
    grad = torch.autograd.grad(loss, b.pred)[0]
    unweighted = torch.autograd.grad(F.cross_entropy(ind(ddm.predicted_x0(b)), b.groups), b.pred)[0]
    assert grad.abs().max() < 0.01 * unweighted.abs().max()  # abar_999 = 0.0047


def test_ddm_x0_averages_its_ce_over_the_labelled_images_only():
    """An image without a label has no CE: it is not counted as a CE of 0 (which would shrink the term)."""
    torch.manual_seed(0)
    ind = ddm.Indicator(LATENT, 2, (8,))
    b = micro_batch([0, -1, 1, -1])
    _, parts = ddm.ddm_x0(b, ind, SimpleNamespace(w_rec=1.0, w_ind=1.0))
    rows = torch.tensor([0, 2])
    ce = F.cross_entropy(ind(ddm.predicted_x0(b))[rows], b.groups[rows], reduction="none")
    torch.testing.assert_close(parts["ind"], (b.alphas_cumprod[b.t][rows] * ce).mean().float())


def rows_of(b, start, stop):
    """Images start..stop-1 of a micro-batch, as train.py would have drawn them as a micro-batch of their own."""
    per_image = ("z0", "z_t", "t", "noise", "pred", "target", "groups")
    return dataclasses.replace(b, **{k: getattr(b, k)[start:stop] for k in per_image})


@pytest.mark.parametrize("objective", ["ddm", "ddm-x0", "indicator-weighted", "plain-indicator"])
def test_micro_batches_of_partly_labelled_images_add_up_to_one_big_batch(objective):
    """train.py backpropagates loss / grad_accum per micro-batch, and DDP averages the ranks. A CE divided by the
    micro-batch's own labelled count (or class-weight sum) gave an image the weight 1 / (grad_accum x its
    micro-batch's count), an unlabelled micro-batch its full share, and a lone image's class weight cancelled: at
    --batch-size 1 (the default) the class-balanced CE was plain CE, and the indicator's gradient over 8 images was
    12-65% off one batch's. Divided by B times the data's labelled share, the terms add up exactly."""
    b = micro_batch([0, -1, -1, -1, 1, 1, 1, -1], shares=(0.25, 0.75), labelled=0.5)
    b.pred = b.pred.clone().requires_grad_(True)
    torch.manual_seed(0)
    ind = ddm.make_indicator(objective, LATENT, 2, (8,))
    hp = SimpleNamespace(**vars(HP), objective=objective)

    def grads(size):
        losses = [ddm.loss(rows_of(b, k, k + size), ind, hp)[0] for k in range(0, 8, size)]
        return torch.autograd.grad(sum(losses) / len(losses), [b.pred, *ind.parameters()])

    whole = grads(8)
    for size in (4, 2, 1):
        for split, one in zip(grads(size), whole):
            torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-7)


def test_importance_weights_on_a_toy_posterior_equal_the_formula():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.9, 0.1]])
    pi_hat, pi_star = torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5])
    raw = torch.tensor([0.5 / 0.9, 5.0, 0.5 * 0.5 / 0.9 + 0.5 * 5.0, 0.9 * 0.5 / 0.9 + 0.1 * 5.0])
    torch.testing.assert_close(ddm.importance_weights(q, pi_hat, pi_star), raw)
    torch.testing.assert_close(ddm.importance_weights(q, pi_hat, pi_star, clip=2.0), raw.clamp(max=2.0))


def test_importance_weights_do_not_depend_on_how_images_are_split_into_micro_batches():
    """Normalised to mean 1 over each micro-batch, every weight was 1 at --batch-size 1 (train.py's default): the
    objective trained as plain fine-tuning; at 4 images of 9 : 1 data the minority got about half its share. The weight
    is pi*_g / pi_hat_g itself (mean 1 over the data), as in `balanced`, and the clip caps it."""
    q = F.one_hot(torch.tensor([0, 0, 0, 1]), 2).float()
    pi_hat, pi_star = torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5])
    whole = ddm.importance_weights(q, pi_hat, pi_star)
    torch.testing.assert_close(torch.cat([ddm.importance_weights(q[k:k + 1], pi_hat, pi_star) for k in range(4)]),
                               whole)
    torch.testing.assert_close(whole, torch.tensor([0.5 / 0.9] * 3 + [5.0]))


def test_indicator_weighted_trains_its_indicator_on_labelled_images_only_and_weights_every_image():
    torch.manual_seed(0)
    ind = ddm.make_indicator("indicator-weighted", LATENT, 2, (8,))
    assert ind.timestep_dim == ddm.TIMESTEP_DIM
    b = micro_batch([0, -1, 1, -1])
    loss, parts = ddm.indicator_weighted(b, ind, HP)
    grads = torch.autograd.grad(ddm.noise_aware_ce(b, ind)[1], ind.net[1].weight)[0]  # the CE term of the loss
    # the CE is the class-balanced CE over rows 0 and 2 alone, each weighted by 1 / (K pi_hat) of its group
    logits = ind(b.z_t, b.t)
    weight = 1 / (2 * b.group_shares)
    want = (weight[0] * F.cross_entropy(logits[0:1], b.groups[0:1]) + weight[1] * F.cross_entropy(
        logits[2:3], b.groups[2:3])) / 2  # logged over the batch's 2 labelled images
    torch.testing.assert_close(parts["ind"], want.detach())
    b2 = micro_batch([0, -1, 1, -1])
    b2.z_t = b2.z_t.clone()
    b2.z_t[[1, 3]] += 100  # moving the unlabelled images changes nothing in the indicator's gradient
    torch.testing.assert_close(torch.autograd.grad(ddm.noise_aware_ce(b2, ind)[1], ind.net[1].weight)[0], grads)
    q = ind(b.z0, torch.zeros(4, dtype=torch.long)).softmax(1).detach()  # under equal priors (class-balanced CE)
    w = (q @ b.target_shares) / (q @ b.group_shares)  # sum_g pi*_g p(z0 | g) / sum_g pi_hat_g p(z0 | g)
    torch.testing.assert_close(parts["rec"], ((b.pred - b.target).pow(2).flatten(1).mean(1) * w).mean())
    none = micro_batch([-1, -1])  # a batch without labels: CE 0, still a finite loss
    loss, parts = ddm.indicator_weighted(none, ind, HP)
    assert math.isfinite(loss.item()) and math.isnan(parts["ind"]) and math.isnan(parts["bacc"])  # not measured


def test_indicator_weighted_gives_weight_one_where_its_indicator_cannot_tell_the_groups_apart():
    """The class-balanced CE (noise_aware_ce) trains the indicator toward p(g | x) under equal group priors: on images
    that carry no group it learns q = 1/K, not the data's shares. Read as the data's posterior, that q gave each such
    image (1/K) sum_g pi*_g / pi_hat_g (2.78 at 9 : 1) instead of 1: nothing to reweight, yet the MSE was scaled."""
    torch.manual_seed(0)
    n = 1000
    b = micro_batch([int(k % 10 == 0) for k in range(n)], t=[0] * n, shares=(0.9, 0.1))
    b.z0, b.z_t = torch.zeros(n, *LATENT), torch.zeros(n, *LATENT)  # every image alike: no information on its group
    ind = ddm.make_indicator("indicator-weighted", LATENT, 2, (8,))
    opt = torch.optim.Adam(ind.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        ddm.noise_aware_ce(b, ind)[1].backward()
        opt.step()
    q = ind(b.z0, torch.zeros(n, dtype=torch.long)).softmax(1).detach()
    torch.testing.assert_close(q, torch.full((n, 2), 0.5), atol=0.01, rtol=0)  # equal priors, not the shares 0.9 : 0.1
    _, parts = ddm.indicator_weighted(b, ind, HP)
    assert parts["w_max"].item() == pytest.approx(1.0, abs=0.03)
    plain = (b.pred - b.target).pow(2).mean()
    torch.testing.assert_close(parts["rec"], plain, rtol=0.03, atol=0)


@pytest.mark.parametrize("objective", ["ddm", "ddm-x0", "plain-indicator", "indicator-weighted"])
def test_a_batch_without_labels_logs_its_indicator_parts_as_not_measured(objective):
    """The loss stays finite (its CE term is 0), but "ind", "acc" and "bacc" were not measured: NaN, logged null."""
    torch.manual_seed(0)
    ind = ddm.make_indicator(objective, LATENT, 2, (8,))
    loss, parts = ddm.loss(micro_batch([-1, -1]), ind, SimpleNamespace(**vars(HP), objective=objective))
    assert math.isfinite(loss.item())
    assert {k: math.isnan(v) for k, v in parts.items() if k in ("ind", "acc", "bacc")} == \
        {"ind": True, "acc": True, "bacc": True}


class TimeAwareLogits(torch.nn.Module):
    """A toy noise-aware indicator whose posterior moves with t: logits (0, 3·mean(x) + (t − 500)/100)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(3.0))

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).expand(len(x))
        return torch.stack([torch.zeros(len(x)), self.scale * x.flatten(1).mean(1) + (t - 500) / 100], 1)


def test_indicator_weighted_weights_each_image_by_its_clean_latents_posterior_at_t_0():
    """q = p(g | z0, t = 0), whatever t the image was noised at: here p(1 | z0, 0) = sigmoid(3 mean(z0) − 5),
    while at the batch's t (700-999) the same indicator would say group 1 for every image."""
    b = micro_batch([0, -1, 1, -1], t=[900, 700, 999, 800])
    _, parts = ddm.indicator_weighted(b, TimeAwareLogits(), HP)
    q1 = torch.sigmoid(3 * b.z0.flatten(1).mean(1) - 5)  # under equal priors (class-balanced CE)
    raw = 0.5 / ((1 - q1) * 0.75 + q1 * 0.25)  # sum_g pi*_g q_g / sum_g pi_hat_g q_g, below the clip
    per_image = (b.pred - b.target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(parts["rec"], (per_image * raw).mean(), rtol=1e-5, atol=0)


def test_balanced_accuracy_does_not_reward_the_majority():
    logits = torch.tensor([[1.0, 0.0]] * 4)  # always group 0
    parts = ddm.accuracies(logits, torch.tensor([0, 0, 0, 1]))
    assert parts["acc"].item() == 0.75 and parts["bacc"].item() == 0.5


def test_balanced_accuracy_is_not_measured_on_a_batch_that_lacks_a_group():
    """bacc was the mean recall over the groups present: a batch of one image (train.py's default) or of one group's
    labelled images (few labels) read as the accuracy. At 10% labels the log said 0.85 where the batches holding
    both groups said 0.50: the indicator answered the majority. Measured where every group is present (an unbiased
    estimate of the mean recall there), NaN (not measured) elsewhere."""
    always_0 = torch.tensor([[1.0, 0.0]] * 3)
    for groups in ([0, 0, -1], [1], [0, -1, 0]):
        parts = ddm.accuracies(always_0[:len(groups)], torch.tensor(groups))
        assert math.isnan(parts["bacc"].item()) and not math.isnan(parts["acc"].item()), groups
    three = ddm.accuracies(torch.eye(3)[[0, 1, 1]], torch.tensor([0, 1, 1]))  # group 2 absent: its recall unknown
    assert three["acc"].item() == 1.0 and math.isnan(three["bacc"].item())


@pytest.mark.parametrize("spec, message", [
    ("a=0.5,c=0.5", "'c' is not a group"), ("a=0.7,b=0.7", "summing to 1"), ("a=1", "summing to 1"),
    ("a=x,b=1", "not NAME=SHARE"), ("a=-0.5,b=1.5", "share >= 0"),
    # a group given twice took its last share without a word: a = 0.5 here, in training's pi* and guidance's shares
    ("a=0.9,b=0.5,a=0.5", "must give each of the groups a, b one share"),
    (" a=0.5,b=0.5,a =0.5", "must give each of the groups a, b one share")])
def test_a_bad_target_is_refused_naming_it(spec, message):
    with pytest.raises(ValueError, match=message):
        ddm.parse_target(spec, ["a", "b"])
    assert ddm.parse_target("a=0.25,b=0.75", ["a", "b"]).tolist() == [0.25, 0.75]
    assert ddm.parse_target("uniform", [7, 8, 9]).tolist() == pytest.approx([1 / 3] * 3)


def test_indicator_guidance_raises_the_indicator_probability_of_the_target_group(one_thread):
    """A toy: a 'UNet' that predicts zero noise, and an indicator that reads the mean of the latent; guiding toward
    group 1 (mean > 0) and toward group 0 (mean < 0) moves the final latents apart, in the asked direction."""
    torch.manual_seed(0)
    ind = ddm.Indicator(LATENT, 2, (4,), timestep_dim=8)
    with torch.no_grad():
        for p in ind.parameters():
            p.zero_()
        ind.net[-1].bias.zero_()
        # logits = +/- mean(x) through a ReLU pair: (relu(m) - relu(-m)) = m
        ind.net[1].weight[0, :4 * 4] = 1.0 / 16
        ind.net[1].weight[1, :4 * 4] = -1.0 / 16
        ind.net[-1].weight[:, :2] = torch.tensor([[-4.0, 4.0], [4.0, -4.0]])

    class Zero(torch.nn.Module):
        def forward(self, x, t, context):
            return torch.zeros_like(x)

    unet = Zero()
    unet.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))
    ac = diffusion.sd_schedule()
    x = torch.randn(6, *LATENT, generator=torch.Generator().manual_seed(1))
    gens = [torch.Generator().manual_seed(k) for k in range(6)]
    cond = torch.zeros(6, 77, 8)
    out = {}
    for name, groups in (("plain", None), ("to_1", [1] * 6), ("to_0", [0] * 6)):
        guides = [] if groups is None else [diffusion.Guidance(ind, torch.tensor(groups), 3.0)]
        out[name] = diffusion.denoise(unet, x, cond, None, ac, gens, steps=10, guidance=1.0, guides=guides)
    p1 = {k: ind(v, torch.zeros(6, dtype=torch.long)).softmax(1)[:, 1].mean().item() for k, v in out.items()}
    assert p1["to_1"] > p1["plain"] + 0.2 and p1["to_0"] < p1["plain"] - 0.2, p1


def test_null_groups_load_as_unlabelled(tmp_path):
    from PIL import Image
    from data import ImageFolder
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "text": "", "group": g} for i, g in enumerate(["a", None, "b", None])]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ImageFolder(tmp_path, 8)
    assert data.group_names == ["a", "b"] and data.groups == [0, -1, 1, -1]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({**r, "group": None}) + "\n" for r in rows))
    with pytest.raises(ValueError, match="null on every line"):
        ImageFolder(tmp_path, 8)


def test_fit_clusters_lets_a_small_group_keep_its_own_cluster():
    """Free mixture weights (ours, the label-free indicator): a 9 : 1 mix whose majority is spread wide along one
    axis. Equal-size clustering would cut the majority in two; the mixture finds the minority and its share."""
    g = torch.Generator().manual_seed(0)
    major = torch.randn(360, 16, generator=g) * torch.tensor([4.0] + [1.0] * 15)  # wide along axis 0
    minor = torch.randn(40, 16, generator=g) + torch.tensor([0.0, 7.0] + [0.0] * 14)  # 7 away along axis 1
    truth = torch.tensor([0] * 360 + [1] * 40)
    clusters, weights = ddm.fit_clusters(torch.cat([major, minor]).view(400, 4, 2, 2), 2, dims=4)
    small = int(weights.argmin())
    assert ((clusters == small) == (truth == 1)).float().mean() >= 0.99
    assert weights[small].item() == pytest.approx(0.1, abs=0.01) and weights.sum().item() == pytest.approx(1.0)
    again, _ = ddm.fit_clusters(torch.cat([major, minor]).view(400, 4, 2, 2), 2, dims=4)
    assert torch.equal(clusters, again)  # seeded
    with pytest.raises(ValueError, match=r"k must lie in \[2, 360\]"):
        ddm.fit_clusters(major.view(360, 4, 2, 2)[:400], 1)


class ZeroUNet(torch.nn.Module):
    """A 'UNet' that predicts zero noise: the step's ε is the guidance term alone."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, context):
        return torch.zeros_like(x)


class LinearLogits(torch.nn.Module):
    """A noise-aware toy indicator with a closed-form gradient: logits = (1 + t/1000) A x, so
    ∇_x log p(g | x, t) = (1 + t/1000) (A_g − Σ_k p_k A_k), p = softmax((1 + t/1000) A x)."""

    def __init__(self, a):
        super().__init__()
        self.a = torch.nn.Parameter(a)

    def forward(self, x, t):
        c = 1 + torch.as_tensor(t, dtype=x.dtype).expand(len(x)) / 1000
        return c[:, None] * (x.flatten(1) @ self.a.T)

    def gradient(self, x, t, groups):
        a, c = self.a.detach().double(), 1 + t / 1000
        p = (c * x.flatten(1).double() @ a.T).softmax(1)
        return (c * (a[groups] - p @ a)).view(x.shape)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_indicator_guidance_step_is_its_formula_at_each_t_with_mixed_targets(sampler):
    """ε̃ = ε − S·√(1−ᾱ_t)·∇_{x_t} log p(g_k | x_t, t) per image k, the indicator asked at the step's t on the
    variance-preserving x_t (under Euler x_t = x/√(σ²+1), not the Euler state x), each image toward its own target."""
    ind, scale = LinearLogits(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) / 2), 2.0
    targets = torch.tensor([0, 2, 1, 0])
    ac = diffusion.sd_schedule()
    z = torch.randn(4, *LATENT, generator=torch.Generator().manual_seed(1))
    gens = [torch.Generator().manual_seed(k) for k in range(4)]
    out = diffusion.denoise(ZeroUNet(), z, torch.zeros(4, 77, 8), None, ac, gens, steps=2, guidance=1.0,
                            sampler=sampler, guides=[diffusion.Guidance(ind, targets, scale)])
    timesteps = diffusion.ddim_timesteps(2)
    assert timesteps == [501, 1]  # two t, far apart
    sigmas = diffusion.euler_sigmas(timesteps, ac)
    x = z.double() * ((sigmas[0] ** 2 + 1) ** 0.5 if sampler == "euler" else 1)
    for i, t in enumerate(timesteps):
        x_t = x / (sigmas[i] ** 2 + 1) ** 0.5 if sampler == "euler" else x
        eps = 0 - scale * (1 - ac[t]).sqrt() * ind.gradient(x_t, t, targets)
        if sampler == "euler":
            x = x + (sigmas[i + 1] - sigmas[i]) * eps
        else:
            x = diffusion.ddim_step(x, eps, t, ([*timesteps[1:], -1])[i], ac)
    assert (x - z.double()).abs().max() > 0.5  # guidance moved the latents
    torch.testing.assert_close(out.double(), x, atol=1e-5, rtol=1e-5)


def test_the_noise_aware_objectives_add_w_rec_times_their_mse_and_w_ind_times_their_class_balanced_ce():
    """L = w_rec · (weighted) MSE + w_ind · class-balanced CE, each computed here from its formula: a planted
    w_rec/w_ind swap in plain_indicator, or indicator_weighted's CE added without w_ind, passed every other test."""
    hp = SimpleNamespace(w_rec=0.95, w_ind=0.05, weight_clip=10.0)
    b = micro_batch([0, -1, 1, 0])
    rows = torch.tensor([0, 2, 3])  # the labelled images
    per_image = (b.pred - b.target).pow(2).flatten(1).mean(1)

    def balanced_ce(ind):  # over the labelled rows, divided by B times the data's labelled share (a constant)
        w = (1 / (2 * b.group_shares))[b.groups[rows]]
        ce = F.cross_entropy(ind(b.z_t, b.t)[rows], b.groups[rows], reduction="none")
        return (w * ce).sum() / (4 * b.labelled_share)

    torch.manual_seed(0)
    ind = ddm.make_indicator("plain-indicator", LATENT, 2, (8,))
    loss, _ = ddm.plain_indicator(b, ind, hp)
    torch.testing.assert_close(loss, 0.95 * per_image.mean() + 0.05 * balanced_ce(ind))
    loss, _ = ddm.indicator_weighted(b, ind, hp)
    q = ind(b.z0, torch.zeros(4, dtype=torch.long)).softmax(1)  # under equal priors: Bayes puts pi_hat back
    raw = (q @ b.target_shares) / (q @ b.group_shares)
    torch.testing.assert_close(loss, 0.95 * (per_image * raw).mean() + 0.05 * balanced_ce(ind))


def test_fit_clusters_finds_the_same_clusters_wherever_the_latents_sit():
    """The principal components are those of the centred latents. Latents sit far from 0 (SD's have a mean of their
    own): a planted uncentred SVD spent one of the `dims` directions on that mean and lost the minority's axis."""
    g = torch.Generator().manual_seed(0)
    major = torch.randn(360, 16, generator=g) * torch.tensor([4.0] + [1.0] * 15)
    minor = torch.randn(40, 16, generator=g) + torch.tensor([0.0, 7.0] + [0.0] * 14)
    z0 = torch.cat([major, minor]).view(400, 4, 2, 2)
    truth = torch.tensor([0] * 360 + [1] * 40)
    for offset in (0.0, 30.0):
        clusters, weights = ddm.fit_clusters(z0 + offset, 2, dims=2)
        small = int(weights.argmin())
        assert ((clusters == small) == (truth == 1)).float().mean() >= 0.99, offset

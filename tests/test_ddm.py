import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddm import (Indicator, ddm_loss, fairness_discrepancy, group_proportions, mean_entropy,
                 statistical_parity_difference)

LATENT = (4, 4, 4)  # a 32 px image's latent, the authors' training resolution


class TinyEpsNet(nn.Module):
    """A UNet stand-in: conv layers producing eps_hat of the latent's shape."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, z):
        return self.b(F.silu(self.a(z)))


def batch(seed=0, b=6, k=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *LATENT, generator=g), torch.randn(b, *LATENT, generator=g), torch.arange(b) % k


def test_indicator_has_the_authors_mlp_shape():
    ind = Indicator(LATENT, 3)
    linears = [m for m in ind.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 1024), (1024, 512), (512, 3)]
    assert sum(isinstance(m, nn.ReLU) for m in ind.modules()) == 2
    assert ind(torch.randn(5, *LATENT)).shape == (5, 3)
    with pytest.raises(AssertionError, match="latents"):  # a programming error: loaders check the latent shape
        ind(torch.randn(5, 4, 8, 8))
    with pytest.raises(AssertionError, match="at least 2 groups"):
        Indicator(LATENT, 1)


def test_a_noise_aware_indicator_reads_its_timestep_as_sinusoidal_features_beside_the_latent():
    """p(g | z_t, t): the MLP's input is the flattened latent, then cos(t f_i), sin(t f_i) with f_i = 10000^(-i/h),
    h = timestep_dim / 2, for each image's own t or one t for all. A planted t * 0 (every image read as at t = 0)
    passed every test: the guidance tests use toy indicators of their own."""
    torch.manual_seed(0)
    ind = Indicator(LATENT, 3, (16,), timestep_dim=8)
    x, t = torch.randn(4, *LATENT), torch.tensor([0, 10, 500, 999])
    angles = t[:, None].double() * 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    features = torch.cat([x.flatten(1), angles.cos().float(), angles.sin().float()], 1)
    torch.testing.assert_close(ind(x, t), ind.net[1:](features))
    torch.testing.assert_close(ind(x, 500), ind(x, torch.full((4,), 500)))
    assert (ind(x, 999) - ind(x, 0)).abs().max() > 1e-3  # the timestep changes the logits


def test_loss_with_w_ind_zero_is_exactly_weighted_mse_and_skips_the_indicator():
    z, noise, groups = batch()
    net = TinyEpsNet()
    eps_hat = net(z)
    calls = []
    ind = Indicator(LATENT, 3)
    ind.register_forward_hook(lambda *a: calls.append(1))
    total, parts = ddm_loss(eps_hat, noise, groups, ind, w_rec=0.95, w_ind=0.0)
    assert torch.equal(total, 0.95 * F.mse_loss(eps_hat, noise))
    assert torch.equal(ddm_loss(eps_hat, noise, groups, ind, w_rec=1.0, w_ind=0)[0], F.mse_loss(eps_hat, noise))
    assert calls == []
    assert torch.equal(parts["rec"], F.mse_loss(eps_hat, noise).detach()) and not parts["rec"].requires_grad
    assert math.isnan(parts["ind"].item()) and math.isnan(parts["acc"])


def test_loss_is_the_papers_weighted_sum():
    z, noise, groups = batch()
    eps_hat = TinyEpsNet()(z)
    ind = Indicator(LATENT, 3)
    total, parts = ddm_loss(eps_hat, noise, groups, ind, w_rec=0.7, w_ind=0.3)
    logits = ind(eps_hat)
    expected = 0.7 * F.mse_loss(eps_hat, noise) + 0.3 * F.cross_entropy(logits, groups)
    torch.testing.assert_close(total, expected, atol=0, rtol=1e-6)
    torch.testing.assert_close(parts["ind"], F.cross_entropy(logits, groups).detach())
    assert parts["acc"].item() == (logits.argmax(1) == groups).float().mean().item()
    assert not parts["acc"].requires_grad and not parts["ind"].requires_grad  # tensors: no GPU sync per micro-batch
    # by hand: an indicator whose last layer ignores its input and says (0, 1, 0) is right on the two of six
    # images in group 1, and its CE is log(e + 2) − 1 for those and log(e + 2) for the other four
    with torch.no_grad():
        ind.net[-1].weight.zero_()
        ind.net[-1].bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    assert groups.tolist() == [0, 1, 2, 0, 1, 2]
    _, parts = ddm_loss(eps_hat, noise, groups, ind, w_rec=0.7, w_ind=0.3)
    assert parts["acc"].item() == pytest.approx(2 / 6, abs=1e-7)  # a float32 mean
    assert parts["ind"].item() == pytest.approx(math.log(math.e + 2) - 2 / 6, rel=1e-6)


def grads(module):
    return [p.grad for p in module.parameters()]


def test_gradient_reaches_the_noise_predictor_through_both_terms_and_the_indicator():
    z, noise, groups = batch()
    for w_rec, w_ind in [(1.0, 0.0), (0.0, 1.0), (0.95, 0.05)]:
        torch.manual_seed(0)
        net, ind = TinyEpsNet(), Indicator(LATENT, 3)
        total, _ = ddm_loss(net(z), noise, groups, ind, w_rec=w_rec, w_ind=w_ind)
        total.backward()
        assert all(g is not None and g.abs().sum() > 0 for g in grads(net)), (w_rec, w_ind)
        if w_ind == 0:
            assert all(g is None for g in grads(ind))
        else:
            assert all(g is not None and g.abs().sum() > 0 for g in grads(ind)), (w_rec, w_ind)

    # the total's gradient is the weighted sum of the two terms' gradients (nothing detached on the way)
    def net_grad(w_rec, w_ind):
        torch.manual_seed(0)
        net, ind = TinyEpsNet(), Indicator(LATENT, 3)
        ddm_loss(net(z), noise, groups, ind, w_rec=w_rec, w_ind=w_ind)[0].backward()
        return torch.cat([g.flatten() for g in grads(net)])
    torch.testing.assert_close(net_grad(0.95, 0.05), net_grad(0.95, 0.0) + net_grad(0.0, 0.05),
                               atol=1e-7, rtol=1e-5)


def test_loss_is_float32_under_bf16_autocast():
    z, noise, groups = batch()
    net, ind = TinyEpsNet(), Indicator(LATENT, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eps_hat = net(z)
        total, parts = ddm_loss(eps_hat, noise, groups, ind)
    assert eps_hat.dtype == torch.bfloat16
    assert total.dtype == parts["rec"].dtype == parts["ind"].dtype == torch.float32


def test_loss_rejects_mismatched_shapes():
    z, noise, groups = batch()
    ind = Indicator(LATENT, 3)
    with pytest.raises(AssertionError, match="differ in shape"):
        ddm_loss(z, noise[:, :3], groups, ind)
    with pytest.raises(AssertionError, match="groups"):
        ddm_loss(z, noise, groups[:2], ind)


def test_indicator_learns_a_separable_toy_problem(one_thread):
    # group k shifts the predicted noise along a fixed random direction; the indicator must find it
    torch.manual_seed(0)
    k, n = 3, 384
    directions = torch.randn(k, *LATENT)
    groups = torch.randint(0, k, (n,))
    eps_hat = torch.randn(n, *LATENT) + 0.8 * directions[groups]
    ind = Indicator(LATENT, k, hidden=(64, 32))  # the authors' (1024, 512) learns it too, 30x slower on CPU
    with torch.no_grad():
        assert ddm_loss(eps_hat[256:], eps_hat[256:], groups[256:], ind)[1]["acc"] < 0.6  # chance before training
    opt = torch.optim.AdamW(ind.parameters(), lr=1e-3)
    for step in range(300):
        idx = torch.randint(0, 256, (32,))  # train on the first 256, judge on the last 128
        loss, _ = ddm_loss(eps_hat[idx], eps_hat[idx], groups[idx], ind, w_rec=0.95, w_ind=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, parts = ddm_loss(eps_hat[256:], eps_hat[256:], groups[256:], ind)
    assert parts["acc"] > 0.95
    assert parts["ind"] < 0.3


def test_fairness_discrepancy_on_known_proportions():
    for k in (2, 3, 10):
        assert fairness_discrepancy(torch.full((k,), 1 / k, dtype=torch.float64)) == pytest.approx(0, abs=1e-15)
        assert fairness_discrepancy([1 / k] * k) == pytest.approx(0, abs=1e-7)  # float32 rounding of 1/k
        one = torch.zeros(k)
        one[k - 1] = 1
        assert fairness_discrepancy(one) == pytest.approx(math.sqrt((k - 1) / k), abs=1e-12)
        assert fairness_discrepancy(one, normalized=True) == pytest.approx(1, abs=1e-12)
    assert fairness_discrepancy([0.9, 0.1]) == pytest.approx(math.sqrt(2 * 0.4 ** 2), abs=1e-12)
    assert fairness_discrepancy([0.5, 0.25, 0.25]) == pytest.approx(
        math.sqrt((0.5 - 1 / 3) ** 2 + 2 * (0.25 - 1 / 3) ** 2), abs=1e-12)
    for bad in ([], [0.5, 0.6], [1.2, -0.2], [[0.5, 0.5]]):  # not proportions: a programming error, asserted
        with pytest.raises(AssertionError):
            fairness_discrepancy(bad)


def test_group_proportions_hard_and_soft():
    p = group_proportions(torch.tensor([0, 0, 0, 1]), 3)
    assert p.dtype == torch.float64 and p.tolist() == [0.75, 0.25, 0.0]
    assert group_proportions([1, 1], 2).tolist() == [0.0, 1.0]
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    torch.testing.assert_close(group_proportions(probs, 2), torch.tensor([0.6, 0.4], dtype=torch.float64))
    with pytest.raises(AssertionError, match="empty"):
        group_proportions(torch.tensor([], dtype=torch.long), 2)
    with pytest.raises(AssertionError, match=r"\[0, 2\)"):
        group_proportions([0, 2], 2)
    with pytest.raises(AssertionError, match="columns"):
        group_proportions(probs, 3)
    with pytest.raises(AssertionError, match="summing to 1"):
        group_proportions(torch.tensor([[2.0, 1.0]]), 2)


def test_statistical_parity_difference():
    assert statistical_parity_difference([0.8, 0.8, 0.8]) == pytest.approx(0)
    assert statistical_parity_difference([0.9, 0.5, 0.7]) == pytest.approx(0.4)
    assert statistical_parity_difference({"7": 1.0, "8": 0.0}) == pytest.approx(1.0)
    for bad in ([], [0.5, 1.5], [-0.1, 0.2]):
        with pytest.raises(AssertionError):
            statistical_parity_difference(bad)


def test_mean_entropy_on_known_distributions():
    for k in (2, 5):
        assert mean_entropy(torch.zeros(7, k)) == pytest.approx(math.log(k), abs=1e-12)
        assert mean_entropy(torch.zeros(7, k), normalized=True) == pytest.approx(1, abs=1e-12)
        one_hot = torch.full((3, k), float("-inf"))
        one_hot[:, 0] = 0
        assert mean_entropy(one_hot) == 0
    p = torch.tensor([0.2, 0.3, 0.5])
    h = -(p * p.log()).sum().item()
    # mean over samples: one uniform row (log 3) and one row with softmax p
    assert mean_entropy(torch.stack([torch.zeros(3), p.log()])) == pytest.approx((math.log(3) + h) / 2, rel=1e-6)
    with pytest.raises(AssertionError):
        mean_entropy(torch.zeros(0, 3))
    with pytest.raises(AssertionError):
        mean_entropy(torch.zeros(3))

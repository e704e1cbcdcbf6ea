"""Indicator guidance (ours) beyond a fixed scale: trajectory-aware targets decided from each image's own posterior,
the offsets that make them come out in the asked shares, and the scale chosen by the indicator alone ("auto")."""
import dataclasses
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import ddm
import diffusion
import guidance
import loading
import sample
import train
import weights
from ddm import Indicator
from test_train import (FAST, RES, TINY, assert_same_tensors, data_dir, make_data, one_thread,  # noqa: F401
                        sd_dir)  # (fixtures)

PROMPT = "a red square"


def mean_reader(latent_shape, strength=4.0):
    """A noise-aware indicator whose logits are ±strength·mean(x): group 1 is a bright latent, group 0 a dark one."""
    torch.manual_seed(0)
    ind = Indicator(latent_shape, 2, (2,), timestep_dim=8)
    n = ind.net[1].in_features - 8
    with torch.no_grad():
        for p in ind.parameters():
            p.zero_()
        ind.net[1].weight[0, :n], ind.net[1].weight[1, :n] = 1.0 / n, -1.0 / n  # relu(m), relu(-m)
        ind.net[-1].weight.copy_(torch.tensor([[-strength, strength], [strength, -strength]]))
    return ind.requires_grad_(False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    config = tmp_path_factory.mktemp("init") / "tiny.json"
    config.write_text(json.dumps(TINY))
    return loading.models_from_config(config, seed=0)


SETTINGS = dict(steps=4, guidance=1.0, height=RES, width=RES, batch_size=16)


def test_decision_offsets_pick_the_asked_shares_and_never_a_group_of_share_zero():
    log_p = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0)).log_softmax(1)
    for shares in ([0.5, 0.3, 0.2], [0.1, 0.9, 0.0]):
        shares = torch.tensor(shares)
        picked = (log_p - guidance.decision_offsets(log_p, shares)).argmax(1)
        assert torch.allclose(torch.bincount(picked, minlength=3) / 1000, shares, atol=0.005), shares
    # the rows most inclined to a group go to it: at 10% for group 0, about its 100 most likely rows and no other
    two = log_p[:, :2].log_softmax(1)
    picked = (two - guidance.decision_offsets(two, torch.tensor([0.1, 0.9]))).argmax(1) == 0
    margin = two[:, 0] - two[:, 1]
    assert abs(picked.sum().item() - 100) <= 2 and margin[picked].min() > margin[~picked].max()


def test_decision_offsets_pick_the_asked_shares_when_the_posteriors_differ_by_hundredths_of_a_nat():
    """At the decide step a weakly reading indicator's posteriors barely differ between images (the tiny
    plain-indicator run's margins at t = 751: std 0.08 nats). Solved at a fixed 0.02 nats, the soft assignment met
    the shares while the arg-max sent the ambiguous rows to the larger group: 0.75 / 0.25 gave 155 / 45 of 200 at
    margins of std 0.1 nats, 198 / 2 at 0.01, 200 / 0 at 0.001 (no image aimed at the minority, and the auto scale
    never checked it). The arg-max does not change when log p and the offsets scale together: neither may the picks."""
    noise = torch.randn(200, generator=torch.Generator().manual_seed(0))
    for spread in (1e-3, 1e-2, 1e-1, 1.0):
        log_p = torch.stack([spread * noise / 2, -spread * noise / 2], 1).log_softmax(1)
        for shares in ([0.75, 0.25], [0.5, 0.5], [0.05, 0.95]):
            picked = (log_p - guidance.decision_offsets(log_p, torch.tensor(shares))).argmax(1)
            counts = torch.bincount(picked, minlength=2).tolist()
            assert abs(counts[0] - 200 * shares[0]) <= 1, (spread, shares, counts)


def test_decision_offsets_stay_finite_when_every_row_prefers_one_group_by_many_nats():
    """log(mean(softmax(x / 0.02))) underflowed to -inf once every row preferred a group by more than ~15 nats (a
    prompt naming the attribute, a late decide step): the offsets became NaN, recorded as "never targeted", and every
    image aimed at group 0 whatever the shares asked."""
    log_p = torch.stack([torch.zeros(200), 16 + torch.linspace(0, 5, 200)], 1).log_softmax(1)  # group 1 by 16-21
    offsets = guidance.decision_offsets(log_p, torch.tensor([0.5, 0.5]))
    assert offsets.isfinite().all(), offsets
    assert torch.bincount((log_p - offsets).argmax(1), minlength=2).tolist() == [100, 100]


def test_decision_offsets_pick_the_asked_shares_when_the_indicator_is_sure_of_each_image_by_tens_of_nats():
    """A late decide step, or a prompt that names the attribute: each row sure of its own group by ~30-40 nats. Steps
    of 0.02 nats could not reach offsets that far out in 2000 steps, and each round after a miss ran cooler, so
    slower: 60 : 40 rows asked for 50 : 50 gave up to 118 : 82, three groups asked alike 72 / 63 / 65, no warning."""
    g = torch.Generator().manual_seed(0)
    for k, sure in ((2, 30.0), (2, 40.0), (3, 40.0)):
        own = torch.multinomial(torch.tensor([0.6, 0.4, 0.3][:k]), 200, replacement=True, generator=g)
        logits = sure / 4 * torch.randn(200, k, generator=g)
        logits[torch.arange(200), own] += sure
        log_p = logits.log_softmax(1)
        picked = (log_p - guidance.decision_offsets(log_p, torch.full((k,), 1 / k))).argmax(1)
        counts = torch.bincount(picked, minlength=k)
        assert (counts - 200 / k).abs().max() <= 1, (k, sure, counts.tolist())


def test_two_indicators_with_drawn_targets_draw_each_image_s_targets_independently():
    """--decide-at none with one indicator per attribute: every indicator's draw took the same seed, so with equal
    shares the two targets were always alike (no image aimed at green+thick or red+thin)."""
    half = torch.tensor([0.5, 0.5])
    models = SimpleNamespace(alphas_cumprod=diffusion.sd_schedule())
    guides, _ = guidance.guides_for(None, models, "p", list(range(400)), [(None, half), (None, half)], 3.0,
                                    decide_at=None, steps=4)
    mixed = (guides[0].targets != guides[1].targets).double().mean().item()  # about half when independent
    assert 0.4 < mixed < 0.6, mixed
    first = [torch.multinomial(half.double(), 1, generator=torch.Generator().manual_seed(data.derive_seed(
        s, "target"))).item() for s in range(400)]
    assert guides[0].targets.tolist() == first  # the first indicator draws as it did alone: the same images


def test_the_calibration_batch_stops_at_the_x_t_of_the_step_where_denoise_decides_the_targets():
    """denoise(until=T) returns the x_t the UNet reads at the first step with t <= T, the step at which a guided
    run decides its targets (t <= decide_at), so the offsets are set on the posteriors the targets are decided on.
    A planted t < T went one step further (801 -> 601 here) and passed every test."""
    class Recorder(torch.nn.Module):  # a 'UNet' predicting 0.1 x_t, keeping what it read at each t
        def __init__(self):
            super().__init__()
            self.p, self.seen = torch.nn.Parameter(torch.zeros(1)), {}

        def forward(self, x, t, context):
            self.seen[t] = x.clone()
            return 0.1 * x

    ac, z = diffusion.sd_schedule(), torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    kw = dict(cond=torch.zeros(3, 77, 8), uncond=None, alphas_cumprod=ac, generators=[None] * 3, steps=5,
              guidance=1.0)
    full, stopped = Recorder(), Recorder()
    diffusion.denoise(full, z, **kw)
    assert list(full.seen) == diffusion.ddim_timesteps(5) == [801, 601, 401, 201, 1]
    x_t = diffusion.denoise(stopped, z, **kw, until=801)
    assert list(stopped.seen) == [] and torch.equal(x_t, z)  # 801 is the first step: nothing denoised yet
    x_t = diffusion.denoise(stopped, z, **kw, until=700)
    assert list(stopped.seen) == [801] and torch.equal(x_t, full.seen[601])


def test_the_auto_scale_reads_each_final_latent_renoised_to_its_read_step_at_that_step():
    """ending_groups: argmax_g p(g | x_t, t) with x_t = √ᾱ_t z0 + √(1−ᾱ_t) ε_k at t = AUTO_READ_AT, ε_k drawn from
    image k's own seed, the indicator told that t. A planted read at t = 0 (on the re-noised latent) passed every
    test; with this indicator, whose group-1 logit moves with t, it ends every image in group 0."""
    class TimeAware(torch.nn.Module):  # logits (0, mean(x) + (t - 200) / 50): at t = 0 the threshold moves by 4
        def forward(self, x, t):
            t = torch.as_tensor(t, dtype=x.dtype).expand(len(x))
            return torch.stack([torch.zeros(len(x)), x.flatten(1).mean(1) + (t - 200) / 50], 1)

    ac, seeds, t = diffusion.sd_schedule().float(), list(range(40)), guidance.AUTO_READ_AT
    z0 = torch.linspace(-0.5, 0.5, 40)[:, None, None, None].expand(40, 4, 2, 2)  # mean(z0) of either sign
    noise = torch.stack([torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(data.derive_seed(s, "read")))
                         for s in seeds])
    x_t = ac[t].sqrt() * z0 + (1 - ac[t]).sqrt() * noise
    want = (x_t.flatten(1).mean(1) > 0).long()  # t = AUTO_READ_AT: the time term is 0
    assert 10 < want.sum() < 30 and not torch.equal(want, (z0.flatten(1).mean(1) > 0).long())  # the noise counts
    assert torch.equal(guidance.ending_groups(TimeAware(), z0, seeds, ac), want)


def test_the_auto_scale_reads_a_schedule_of_another_length_at_the_same_share_of_it():
    """SD's t = 200 of 1000 steps; on a 100-step schedule an IndexError in add_noise: it reads at t = 20 there."""
    class Reader(torch.nn.Module):
        def forward(self, x, t):
            self.t = t
            return torch.zeros(len(x), 2)

    ac, z0, reader = diffusion.sd_schedule()[::10].contiguous(), torch.zeros(3, 4, 2, 2), Reader()
    assert guidance.ending_groups(reader, z0, [0, 1, 2], ac).tolist() == [0, 0, 0] and reader.t == 20
    guidance.ending_groups(reader, z0, [0, 1, 2], diffusion.sd_schedule())
    assert reader.t == guidance.AUTO_READ_AT == 200


def test_trajectory_aware_targets_give_the_same_image_for_a_seed_at_any_batch_size(models):
    ind = mean_reader(loading.latent_shape(models, RES, RES))
    seeds = [3, 1, 4, 1000]
    guide = diffusion.Guidance(ind, torch.zeros(4, dtype=torch.long), 5.0, decide_at=751,
                               offsets=torch.tensor([0.0, 0.1]))
    kw = dict(SETTINGS, guides=[guide], progress=False)
    four = sample.generate(models, [PROMPT] * 4, seeds, **{**kw, "batch_size": 4})
    for k in range(4):
        one = sample.generate(models, [PROMPT], [seeds[k]], **{**kw, "batch_size": 1, "guides": [guide.rows([k])]})
        assert (one[0].int() - four[k].int()).abs().max() <= 1
    plain = sample.generate(models, [PROMPT] * 4, seeds, **{**kw, "guides": []})
    assert (plain.int() - four.int()).abs().float().mean() > 1  # the guidance did something


def test_auto_scale_is_the_smallest_rung_that_meets_the_targets_and_every_try_is_recorded(models):
    ind = mean_reader(loading.latent_shape(models, RES, RES))
    seeds = list(range(256))
    shares = torch.tensor([0.8, 0.2])  # unguided, the random model makes about as many bright latents as dark
    guides, record = guidance.guides_for(sample.generate, models, PROMPT, seeds, [(ind, shares)], "auto",
                                         calibration=256, **SETTINGS)
    tried = {r["scales"][0]: min(r["hit_rates"][0]) >= guidance.AUTO_HIT for r in record["calibration"]}
    chosen = record["scales"][0]
    assert record["scales"] == [guides[0].scale] and chosen in guidance.AUTO_SCALES and len(tried) > 1
    assert tried[chosen]  # met at the chosen rung (bisection: about log2 of the ladder's length tries) ...
    rung = guidance.AUTO_SCALES.index(chosen)
    assert rung == 0 or tried.get(guidance.AUTO_SCALES[rung - 1]) is False  # ... and not at the rung below it
    assert all(met == (s >= chosen) for s, met in tried.items())
    images = sample.generate(models, [PROMPT] * 256, seeds, **SETTINGS, guides=guides, decode=False, progress=False)
    bright = ind(images, 0).argmax(1).float().mean().item()
    assert abs(bright - 0.2) <= 0.06  # the indicator's own reading of the result meets the shares (2.4 SE)
    unguided = sample.generate(models, [PROMPT] * 256, seeds, **SETTINGS, decode=False, progress=False)
    assert ind(unguided, 0).argmax(1).float().mean().item() > 0.4


def test_the_auto_scale_takes_a_rung_whose_hit_rate_is_exactly_the_bar(monkeypatch):
    """AUTO_HIT of each group's calibration images ending in their target meets the bar: 9 of 10 is enough. Here
    rungs below 5 end 8 of 10 in their target, rung 5 exactly 9 and rungs above it 10: the scale is 5. The hit
    rates were float32 means, 9/10 = 0.89999998 < 0.9, so exactly AUTO_HIT never met the bar and the bisection took
    6 (found when a planted > for >= passed every test)."""
    targets = torch.tensor([0, 1] * 10)
    guide = diffusion.Guidance(None, targets, 0.0)

    def ending(indicator, z0, seeds, alphas_cumprod):  # the group each image ends in, by the scale it was guided at
        misses = 2 if guide.scale < 5 else 1 if guide.scale == 5 else 0
        ends = targets.clone()
        ends[:2 * misses] = 1 - ends[:2 * misses]  # `misses` images of each group end in the other one
        return ends

    monkeypatch.setattr(guidance, "ending_groups", ending)
    record = {}
    assert guidance.auto_scales(lambda guides: None, [guide], [targets], list(range(20)), None, record) == [5.0]
    assert record["hit_reached"] == [True]


@pytest.mark.parametrize("beside_8, taken, together", [(10, [10.0, 8.0], [True, True]),
                                                       (30, [20.0, 8.0], [False, True])])
def test_the_auto_scales_of_two_indicators_are_raised_until_they_meet_the_hit_rate_together(beside_8, taken, together,
                                                                                           monkeypatch):
    """Each rung is judged on a batch guided by every indicator at its rung of that try, so the scales taken may never
    have run together. Here guide 1 needs 8, and guide 0 needs 5 beside a guide 1 under 8 but `beside_8` beside 8:
    the bisection takes (6, 8), never tried, where guide 0 misses. A guide that misses there goes up a rung at a time
    until every guide meets the rate together, or it is at the top; a miss there is recorded (it was only recorded,
    and (6, 8) taken)."""
    targets = torch.tensor([0, 1] * 10)
    guides = [diffusion.Guidance(j, targets, 0.0) for j in (0, 1)]

    def meets(j):
        return guides[1].scale >= 8 if j == 1 else guides[0].scale >= (beside_8 if guides[1].scale >= 8 else 5)

    monkeypatch.setattr(guidance, "ending_groups", lambda j, *_: targets.clone() if meets(j) else 1 - targets)
    record = {}
    assert guidance.auto_scales(lambda g: None, guides, [targets] * 2, list(range(20)), None, record) == taken
    assert {"scales": [6.0, 8.0], "hit_rates": [[0.0, 0.0], [1.0, 1.0]]} in record["calibration"]
    tried = [c["scales"] for c in record["calibration"]]
    assert tried[tried.index([6.0, 8.0]):] == [[s, 8.0] for s in guidance.AUTO_SCALES if 6 <= s <= taken[0]]
    assert record["together"] == together
    one = {}  # one indicator: its rung was tried as it is taken
    guidance.auto_scales(lambda g: None, guides[1:], [targets], list(range(20)), None, one)
    assert "together" not in one and [8.0] in [c["scales"] for c in one["calibration"]]


def test_an_auto_scale_that_meets_the_hit_rate_at_no_rung_says_so(models, capsys):
    """The bisection takes the ladder's top rung untried when every rung below it misses: an indicator that cannot
    read its groups (here a blind one) ended at 20 without a word in samples.json or on the console."""
    blind = mean_reader(loading.latent_shape(models, RES, RES), strength=0.0)
    guides, record = guidance.guides_for(sample.generate, models, PROMPT, list(range(8)),
                                         [(blind, torch.tensor([0.5, 0.5]))], "auto", decide_at=None,
                                         calibration=16, **SETTINGS)  # drawn targets: both groups, one reading
    assert record["scales"] == [guidance.AUTO_SCALES[-1]] and record["hit_reached"] == [False]
    err = capsys.readouterr().err
    assert f"warning: {PROMPT!r}: indicator 1 met the hit rate" in err and "no rung up to 15" in err
    _, record = guidance.guides_for(sample.generate, models, PROMPT, list(range(8)),
                                    [(mean_reader(loading.latent_shape(models, RES, RES)), torch.tensor([0.8, 0.2]))],
                                    "auto", calibration=64, **SETTINGS)
    assert record["hit_reached"] == [True] and "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("decide_at", [guidance.DECIDE_AT, None])
def test_an_auto_scale_that_checked_no_image_of_a_group_says_so(decide_at, models, capsys):
    """The hit rate is taken over the groups the calibration images aim at: at 5% and 8 calibration images none aims
    at the minority, so the scale was chosen on the majority alone (hit_reached true, no word), while 4-5 of 64
    images aimed at the minority at that scale."""
    ind = mean_reader(loading.latent_shape(models, RES, RES))
    guides, record = guidance.guides_for(sample.generate, models, PROMPT, list(range(8)),
                                         [(ind, torch.tensor([0.95, 0.05]))], "auto", decide_at=decide_at,
                                         calibration=8, **SETTINGS)
    assert all(len(r["hit_rates"][0]) == 1 for r in record["calibration"])  # group 0's alone
    assert record["unchecked_groups"] == [[1]]
    err = capsys.readouterr().err
    assert f"warning: {PROMPT!r}: indicator 1: no calibration image aimed at its group 1" in err, err
    assert "--calibration" in err
    _, record = guidance.guides_for(sample.generate, models, PROMPT, list(range(8)),
                                    [(ind, torch.tensor([0.5, 0.5]))], "auto", decide_at=decide_at,
                                    calibration=8, **SETTINGS)
    assert record["unchecked_groups"] == [[]] and "no calibration image" not in capsys.readouterr().err


def test_targets_are_decided_at_the_step_the_sampler_takes_on_a_schedule_of_any_length(models):
    """On a schedule of 500 steps (not SD's 1000) the sampler spaces its timesteps by that length: the offsets are
    set, and the step recorded, where denoise decides the targets, not where a 1000-step spacing would."""
    short = dataclasses.replace(models, alphas_cumprod=models.alphas_cumprod[:500].clone())
    ind = mean_reader(loading.latent_shape(models, RES, RES))
    _, record = guidance.guides_for(sample.generate, short, PROMPT, list(range(8)), [(ind, torch.tensor([0.5, 0.5]))],
                                    1.0, calibration=8, **SETTINGS)
    taken = diffusion.ddim_timesteps(SETTINGS["steps"], 500)  # 376, 251, 126, 1
    assert record["decide_step"] == next(t for t in taken if t <= guidance.DECIDE_AT) == 376


def test_the_decide_step_is_the_same_share_of_a_schedule_of_any_length(models):
    """--decide-at counts SD's 1000 steps, as AUTO_READ_AT does: on 500 steps the decision came at the first step (t =
    451 <= 801, pure noise to the posterior), on 2000 at 40% of the way down instead of 20%."""
    ind = mean_reader(loading.latent_shape(models, RES, RES))
    steps = []
    for n in (500, 1000, 2000):
        alphas_cumprod = diffusion.alphas_cumprod(diffusion.scaled_linear_betas(n))
        schedule = dataclasses.replace(models, alphas_cumprod=alphas_cumprod)
        _, record = guidance.guides_for(sample.generate, schedule, PROMPT, list(range(4)),
                                        [(ind, torch.tensor([0.5, 0.5]))], 1.0, calibration=4,
                                        **{**SETTINGS, "steps": 10})
        steps.append(diffusion.ddim_timesteps(10, n).index(record["decide_step"]))
    assert steps == [1, 1, 1]  # SD at 10 steps: 901, then 801


@pytest.fixture(scope="module")
def runs(sd_dir, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("guided-runs")
    common = ["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "4", "--max-steps", "1", *FAST]
    return {name: train.train([*common, "--out", str(root / name), *extra]) for name, extra in
            (("noise-aware", ["--objective", "plain-indicator", "--w-ind", "1"]), ("none", ["--w-ind", "0"]))}


def test_the_cli_checks_auto_guidance_and_records_what_it_chose(runs, tmp_path, capsys):
    run = runs["noise-aware"]
    argv = ["--model", str(run), "--prompt", PROMPT, "--n", "3", "--steps", "2", "--height", str(RES), "--width",
            str(RES), "--device", "cpu", "--indicator", str(run), "--indicator-guidance", "auto", "--calibration", "8"]
    for bad, message in ((["--calibration", "1"], "--calibration must be >= 2"),
                         (["--decide-at", "1000"], "must be none or a timestep"),
                         (["--decide-at", "0"], "must be none or a timestep 1..999"),
                         (["--indicator-guidance", "lots"], "must be auto or a number >= 0"),
                         # 1e308 ran the calibration batches, then stopped on NaN images: a typo, as CFG's 1e30
                         (["--indicator-guidance", "1e308"], "must be auto or a number >= 0 (at most 100)")):
        with pytest.raises(SystemExit):
            sample.main([*argv, *bad, "--out", str(tmp_path / "never")])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="this run trained no indicator"):
        sample.main([*argv[:-6], "--indicator", str(runs["none"]), "--indicator-guidance", "auto",
                     "--out", str(tmp_path / "never")])
    # a group the targets must never reach: share 0
    sample.main([*argv, "--target", "red=1,blue=0", "--out", str(tmp_path / "red")])
    guidance = json.loads((tmp_path / "red" / "samples.json").read_text())["indicator_guidance"]
    chosen = guidance["prompts"][PROMPT]
    assert guidance["scale"] == "auto" and chosen["scales"] == chosen["calibration"][-1]["scales"]
    assert chosen["offsets"][0][0] is None and chosen["decide_step"] == 501  # blue (group 0): never a target
    assert not (tmp_path / "never").exists()


def test_an_indicator_reads_unambiguously_or_is_refused_in_one_line_before_anything_is_written(runs, sd_dir,
                                                                                                 data_dir, tmp_path):
    """An indicator file carries its latent shape, timestep features, widths and groups; one from another
    resolution, one that reads eps_hat, a file that is no indicator, or one without that record is refused."""
    from safetensors.torch import load_file, save_file
    import checkpoints
    run = runs["noise-aware"]
    exported = checkpoints.latest_checkpoint(run) / "indicator.safetensors"
    ddm_run = train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(tmp_path / "ddm"),
                           "--lora-rank", "4", "--max-steps", "1", *FAST])
    old = tmp_path / "old.safetensors"
    save_file(load_file(exported), old)  # the tensors alone, as files were written before the record
    argv = ["--model", str(run), "--prompt", PROMPT, "--steps", "2", "--width", str(RES), "--device", "cpu",
            "--indicator-guidance", "2", "--out", str(tmp_path / "out")]
    for indicator, height, message in [
            (run, 2 * RES, r"trained on latents \(4, 8, 8\), but these images have latents \(4, 16, 8\)"),
            (exported, 2 * RES, r"trained on latents \(4, 8, 8\)"),
            (checkpoints.latest_checkpoint(ddm_run) / "indicator.safetensors", RES, "reads eps_hat, not"),
            (checkpoints.latest_checkpoint(run) / "unet_lora.safetensors", RES, "not an indicator file"),
            (old, RES, "give the run directory it came from instead")]:
        with pytest.raises(SystemExit, match=message) as e:
            sample.main([*argv, "--height", str(height), "--indicator", str(indicator)])
        assert "\n" not in str(e.value.code) and not (tmp_path / "out").exists(), indicator
    # the exported file and its run guide alike
    for name, indicator in (("file", exported), ("run", run)):
        sample.main([*argv, "--height", str(RES), "--indicator", str(indicator), "--out", str(tmp_path / name)])
    assert (tmp_path / "file" / "00000.png").read_bytes() == (tmp_path / "run" / "00000.png").read_bytes()
    meta = json.loads((tmp_path / "file" / "samples.json").read_text())["indicator_guidance"]["indicators"][0]
    assert meta["groups"] == ["blue", "red"] and meta["attribute"] is None


@pytest.mark.parametrize("field, value, message", [
    ("attribute", None, r"no field 'attribute'"),  # a KeyError traceback
    ("hidden", '"x"', r"field 'hidden' must be a list of integers >= 1, got 'x'"),  # a TypeError from torch.empty
    ("timestep_dim", "x", r"field 'timestep_dim' must be an integer >= 0, got 'x'"),  # a ValueError naming no file
    ("groups", '"ab"', r"field 'groups' must be a list of at least 2 distinct names, got 'ab'"),  # read as a, b
    ("latent_shape", "[4, 8]", r"field 'latent_shape' must be a list of 3 integers >= 1, got \[4, 8\]"),
    ("groups", "[", r"field 'groups' must be a list of at least 2 distinct names, got '\['"),  # not JSON
])
def test_an_indicator_file_with_a_broken_record_is_refused_in_one_line_naming_it(field, value, message, tmp_path):
    indicator = mean_reader((4, RES // 2, RES // 2))
    record = {**ddm.indicator_metadata(indicator, ["g0", "g1"]), field: value}
    path = tmp_path / "ind.safetensors"
    weights.save_tensors(indicator.state_dict(), path, {k: v for k, v in record.items() if v is not None})
    with pytest.raises(ValueError, match=rf"^--indicator {path}: {message}"):
        loading.load_indicator(path, (4, RES // 2, RES // 2))


def test_a_non_finite_image_of_a_guided_run_of_several_prompts_is_named_by_its_number_in_the_run(sd_dir, tmp_path,
                                                                                                  monkeypatch):
    """A guided run generates prompt by prompt: the stop named the image by its number within its prompt's call
    (image 1 for the run's 00003.png)."""
    indicator = mean_reader((4, RES // 2, RES // 2))
    weights.save_tensors(indicator.state_dict(), tmp_path / "ind.safetensors",
                         ddm.indicator_metadata(indicator, ["g0", "g1"]))
    (tmp_path / "prompts.txt").write_text("a red square\na blue square\n")
    decode, calls = sample.decode_latents, []

    def infinite_in_the_second_call(models, z):  # image 1 of the second prompt: image 3 of the run
        out = decode(models, z).clone()
        calls.append(1)
        if len(calls) == 2:
            out[1] = float("inf")
        return out

    monkeypatch.setattr(sample, "decode_latents", infinite_in_the_second_call)
    with pytest.raises(SystemExit, match=r"^error: image 3: NaN or infinite values in the decoded pixels"):
        sample.main(["--model", str(sd_dir), "--prompts", str(tmp_path / "prompts.txt"), "--n", "2", "--steps", "2",
                     "--no-progress", "--indicator", str(tmp_path / "ind.safetensors"), "--indicator-guidance", "3",
                     "--decide-at", "none", "--out", str(tmp_path / "out")])


def test_a_target_without_an_indicator_is_refused_before_anything_is_written(runs, tmp_path, capsys):
    argv = ["--model", str(runs["noise-aware"]), "--prompt", PROMPT, "--steps", "1", "--height", str(RES), "--width",
            str(RES), "--device", "cpu", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        sample.main([*argv, "--target", "red=2"])
    assert e.value.code == 2 and "it needs --indicator" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main([*argv, "--indicator-guidance", "auto"])
    assert "--indicator-guidance needs --indicator" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # a scale sweep's baseline that forgot --indicator: taken and ignored
        sample.main([*argv, "--indicator-guidance", "0"])
    assert "--indicator-guidance needs --indicator" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_calibration_that_no_calibration_batch_reads_is_refused_before_anything_is_written(runs, tmp_path, capsys):
    """--calibration N was taken and ignored without --indicator, and with a fixed scale and --decide-at none (drawn
    targets: no calibration batch runs), where samples.json still recorded it. It is refused there, naming the flag;
    where a batch runs (auto, trajectory-aware targets) or on a scale sweep's baseline (0) it is taken."""
    run = runs["noise-aware"]
    argv = ["--model", str(run), "--prompt", PROMPT, "--steps", "1", "--height", str(RES), "--width", str(RES),
            "--device", "cpu", "--out", str(tmp_path / "never"), "--calibration", "8"]
    guided = ["--indicator", str(run), "--indicator-guidance"]
    for flags, message in (([], "--calibration needs --indicator"),
                           ([*guided, "2", "--decide-at", "none"], "--calibration: --indicator-guidance 2 with "
                                                                   "--decide-at none runs no calibration batch")):
        with pytest.raises(SystemExit) as e:
            sample.main([*argv, *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, err
        assert not (tmp_path / "never").exists()
    for flags in ([*guided, "2"], [*guided, "auto", "--decide-at", "none"], [*guided, "0", "--decide-at", "none"]):
        assert sample.parse_args([*argv, *flags]).calibration == 8
    assert sample.parse_args([*argv[:-2], *guided, "2", "--decide-at", "none"]).calibration == guidance.CALIBRATION


def test_samples_json_records_a_calibration_only_where_one_ran(runs, tmp_path):
    """A fixed scale with --decide-at none runs no calibration batch, yet samples.json recorded the default 200."""
    run = runs["noise-aware"]
    argv = ["--model", str(run), "--prompt", PROMPT, "--n", "2", "--steps", "2", "--height", str(RES), "--width",
            str(RES), "--device", "cpu", "--indicator", str(run)]
    for flags, calibration in ((["--indicator-guidance", "2", "--decide-at", "none"], None),
                               (["--indicator-guidance", "auto", "--calibration", "4"], 4)):
        sample.main([*argv, *flags, "--out", str(tmp_path / flags[1])])
        record = json.loads((tmp_path / flags[1] / "samples.json").read_text())
        assert record["indicator_guidance"]["calibration"] == calibration


def test_a_guided_image_is_the_same_for_its_prompt_and_seed_whatever_seed_the_run_starts_at(sd_dir, tmp_path):
    """Image k depends on (prompt k, seed k) and the settings: the calibration batch took its seeds from the run's
    --seed, so its offsets and auto scale, and every guided image, changed with the run's first seed."""
    indicator = mean_reader((4, RES // 2, RES // 2))
    weights.save_tensors(indicator.state_dict(), tmp_path / "ind.safetensors",
                         ddm.indicator_metadata(indicator, ["g0", "g1"]))
    argv = ["--model", str(sd_dir), "--prompt", PROMPT, "--steps", "4", "--guidance", "1", "--device", "cpu",
            "--indicator", str(tmp_path / "ind.safetensors"), "--indicator-guidance", "auto", "--calibration", "32",
            "--target", "g0=0.8,g1=0.2", "--no-progress"]
    sample.main([*argv, "--seed", "0", "--n", "24", "--out", str(tmp_path / "a")])
    sample.main([*argv, "--seed", "12", "--n", "12", "--out", str(tmp_path / "b")])
    for k in range(12):  # seed 12 + k: image 12 + k of run a, image k of run b
        a, b = (np.asarray(Image.open(tmp_path / run / f"{j:05d}.png")).astype(int)
                for run, j in (("a", 12 + k), ("b", k)))
        assert np.abs(a - b).max() <= 1, f"seed {12 + k}"


@pytest.mark.parametrize("value", ["none", "500", str(guidance.DECIDE_AT)])
def test_a_decide_at_without_an_indicator_is_refused_naming_the_flag(value, runs, tmp_path, capsys):
    """--decide-at sets how guided images get their targets: without --indicator it was taken and ignored."""
    argv = ["--model", str(runs["noise-aware"]), "--prompt", PROMPT, "--steps", "1", "--height", str(RES), "--width",
            str(RES), "--device", "cpu", "--out", str(tmp_path / "never"), "--decide-at", value]
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code == 2 and "--decide-at needs --indicator RUN_OR_FILE" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_an_indicator_without_a_guidance_scale_is_refused_and_an_explicit_zero_samples_unguided(runs, tmp_path,
                                                                                                  capsys):
    """--indicator (and its --target) guide only with --indicator-guidance: without it they were ignored, the images
    unguided without a word; --indicator-guidance 0 says so on purpose (a scale sweep's baseline)."""
    run = runs["noise-aware"]
    argv = ["--model", str(run), "--prompt", PROMPT, "--steps", "1", "--height", str(RES), "--width", str(RES),
            "--device", "cpu", "--indicator", str(run), "--target", "red=1,blue=0"]
    with pytest.raises(SystemExit) as e:
        sample.main([*argv, "--out", str(tmp_path / "never")])
    assert e.value.code == 2 and "--indicator needs --indicator-guidance S|auto" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    sample.main([*argv, "--indicator-guidance", "0", "--out", str(tmp_path / "off")])
    assert json.loads((tmp_path / "off" / "samples.json").read_text())["indicator_guidance"] is None


def test_a_repeated_prompt_under_guidance_writes_every_image_of_every_prompt_in_its_own_file(runs, tmp_path):
    """Files follow the rows of the prompts file: a prompt listed twice (its rows apart) is guided once, and the
    other prompt's images are its own (they went into the repeated prompt's files, two files were never written)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na blue square\n{PROMPT}\n")
    common = ["--model", str(runs["noise-aware"]), "--steps", "2", "--height", str(RES), "--width", str(RES), "--n",
              "2", "--device", "cpu", "--indicator", str(runs["noise-aware"]), "--indicator-guidance", "2",
              "--decide-at", "none"]
    sample.main([*common, "--prompts", str(prompts), "--out", str(tmp_path / "all")])
    record = json.loads((tmp_path / "all" / "samples.json").read_text())
    assert record["prompts"] == [PROMPT] * 2 + ["a blue square"] * 2 + [PROMPT] * 2
    assert all((tmp_path / "all" / name).is_file() for name in record["files"])
    sample.main([*common, "--prompt", "a blue square", "--seed", "2", "--out", str(tmp_path / "blue")])
    for k in (0, 1):  # images 2 and 3 of the first run: seeds 2 and 3 of the blue prompt
        assert np.array_equal(np.asarray(Image.open(tmp_path / "all" / f"{k + 2:05d}.png")),
                              np.asarray(Image.open(tmp_path / "blue" / f"{k:05d}.png")))


def test_a_checkpoint_folder_of_a_run_gives_that_checkpoints_indicator(runs, sd_dir, data_dir, tmp_path):
    """--indicator RUN/checkpoint-N reads that checkpoint's indicator, as --model RUN/checkpoint-N reads its model."""
    run, kept = tmp_path / "run", tmp_path / "kept"
    shutil.copytree(runs["noise-aware"], run)
    shutil.copytree(run / "checkpoint-000001", kept)
    train.train(["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "4", *FAST, "--objective",
                 "plain-indicator", "--w-ind", "1", "--resume", str(run), "--max-steps", "2"])
    shutil.copytree(kept, run / "checkpoint-000001")  # train.py keeps only the newest: put the older one back
    older = loading.load_run(run, checkpoint="checkpoint-000001")
    indicator, names, _, _ = loading.load_indicator(run / "checkpoint-000001", older.info["latent_shape"])
    assert names == ["blue", "red"]
    assert_same_tensors({"indicator": indicator.state_dict()}, {"indicator": older.indicator.state_dict()})
    newest, _, _, _ = loading.load_indicator(run, older.info["latent_shape"])
    assert not all(torch.equal(a, b) for a, b in zip(indicator.state_dict().values(), newest.state_dict().values()))


def test_samples_json_records_the_checkpoint_each_indicator_came_from(runs, tmp_path):
    """samples.json named an indicator by its path alone: a run that trains on keeps only its newest checkpoint, so
    which weights guided a folder of images was recorded nowhere (the model's checkpoint is)."""
    run, export = runs["noise-aware"], tmp_path / "export"
    train.train(["--model", str(run), "--export", str(export)])
    argv = ["--model", str(run), "--prompt", PROMPT, "--steps", "1", "--height", str(RES), "--width", str(RES),
            "--device", "cpu", "--indicator-guidance", "2", "--decide-at", "none"]
    for k, (indicator, checkpoint) in enumerate(((run, "checkpoint-000001"), (run / "checkpoint-000001",
                                                 "checkpoint-000001"), (export, None),
                                                (export / "indicator.safetensors", None))):
        sample.main([*argv, "--indicator", str(indicator), "--out", str(tmp_path / str(k))])
        record = json.loads((tmp_path / str(k) / "samples.json").read_text())["indicator_guidance"]["indicators"]
        assert record[0]["checkpoint"] == checkpoint, indicator


def test_a_runs_indicator_is_read_without_its_base_model(runs, monkeypatch):
    """--indicator RUN reads the indicator of the run's newest checkpoint, the same one load_run gives, without
    loading (and merging) the base model a second time."""
    run = runs["noise-aware"]
    whole = loading.load_run(run)

    def no_base_model(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(loading, "load_models", no_base_model)
    indicator, names, attribute, _ = loading.load_indicator(run, whole.info["latent_shape"])
    assert names == ["blue", "red"] and attribute is None
    assert_same_tensors({"indicator": indicator.state_dict()}, {"indicator": whole.indicator.state_dict()})


def test_an_eps_hat_indicator_is_refused_naming_every_noise_aware_objective_a_reader_registered(tmp_path, monkeypatch):
    """The refusal names the objectives whose indicators guide, read from ddm.OBJECTIVES: one a reader added too."""
    import ddm
    import loading
    import weights
    monkeypatch.setitem(ddm.OBJECTIVES, "my-noise-aware", ddm.Objective(ddm.plain_indicator, "z_t"))
    indicator = ddm.Indicator((4, 8, 8), 2, (16,))  # the authors' form: reads eps_hat
    path = tmp_path / "indicator.safetensors"
    weights.save_tensors(indicator.state_dict(), path, ddm.indicator_metadata(indicator, ["a", "b"]))
    with pytest.raises(ValueError, match=r"reads eps_hat, not \(z_t, t\).*--objective .*my-noise-aware"):
        loading.load_indicator(path, (4, 8, 8))


def test_sample_py_takes_the_size_the_model_was_trained_at_unless_told(sd_dir, data_dir, tmp_path):
    """--height / --width default to a train.py run's --resolution, and for a diffusers folder to its UNet's
    sample_size x the VAE's downsampling (diffusers' default; 512 for SD v1.x): a run trained at 32 px was sampled
    at 512, slowly and at a size it never saw."""
    run = train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(tmp_path / "run"), "--w-ind", "0",
                       "--lora-rank", "4", "--max-steps", "1", *FAST, "--resolution", str(2 * RES)])
    for model, side in ((run, 2 * RES), (sd_dir, RES)):  # sd_dir: UNet sample_size 8, VAE downsampling 2
        out = tmp_path / f"out-{side}"
        sample.main(["--model", str(model), "--prompt", PROMPT, "--steps", "1", "--device", "cpu", "--out", str(out)])
        record = json.loads((out / "samples.json").read_text())
        assert (record["height"], record["width"]) == (side, side)
        assert Image.open(out / "00000.png").size == (side, side)
    sample.main(["--model", str(run), "--prompt", PROMPT, "--steps", "1", "--device", "cpu", "--height", str(RES),
                 "--out", str(tmp_path / "told")])
    assert Image.open(tmp_path / "told" / "00000.png").size == (2 * RES, RES)


def test_an_export_records_the_size_its_run_trained_at(sd_dir, data_dir, tmp_path):
    """The exported UNet's sample_size is the run's --resolution over the VAE's downsampling, so sample.py (and
    diffusers) take the trained size from the export as from the run: it kept the base model's."""
    run = train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(tmp_path / "run"), "--w-ind", "0",
                       "--lora-rank", "4", "--max-steps", "1", *FAST, "--resolution", str(2 * RES),
                       "--export", str(tmp_path / "export")])
    assert loading.model_sides(tmp_path / "export")[1] == loading.model_sides(run)[1] == 2 * RES
    assert loading.model_sides(sd_dir)[1] == RES


def test_an_indicator_named_by_a_model_folder_without_one_says_what_the_folder_is(tmp_path):
    """--indicator EXPORT of a run that trained no indicator (or a pipeline folder) said only "file
    EXPORT/indicator.safetensors not found", as if a path were mistyped."""
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"indicator\.safetensors not found: a model folder without an indicator"):
        loading.load_indicator(tmp_path, (4, 2, 2))


def test_an_export_keeps_its_runs_indicator_which_guides_as_the_run_does(runs, data_dir, tmp_path):
    """An export (train.py --export) wrote the UNet, VAE and text encoder and dropped the indicator: a shared model
    could not be guided, and --indicator EXPORT said only "no run.json". It is written beside them, with its record."""
    run, export = runs["noise-aware"], tmp_path / "export"
    train.train(["--model", str(run), "--export", str(export)])
    argv = ["--model", str(run), "--prompt", PROMPT, "--steps", "2", "--height", str(RES), "--width", str(RES),
            "--device", "cpu", "--indicator-guidance", "2"]
    for name, indicator in (("run", run), ("export", export), ("file", export / "indicator.safetensors")):
        sample.main([*argv, "--indicator", str(indicator), "--out", str(tmp_path / f"guided-by-{name}")])
    pngs = {(tmp_path / f"guided-by-{name}" / "00000.png").read_bytes() for name in ("run", "export", "file")}
    assert len(pngs) == 1
    train.train(["--model", str(runs["none"]), "--export", str(tmp_path / "plain")])  # no indicator: none written
    assert not (tmp_path / "plain" / "indicator.safetensors").exists()
    with pytest.raises(SystemExit, match=r"plain/indicator\.safetensors not found"):  # not "no run.json"
        sample.main([*argv, "--indicator", str(tmp_path / "plain"), "--out", str(tmp_path / "never")])
    # only an export's folder stands for its indicator: not a checkpoint's unfinished or copied folder holding one
    for name in ("checkpoint-000002.tmp", "checkpoint-000001-bak"):
        (tmp_path / name).mkdir()
        shutil.copy(export / "indicator.safetensors", tmp_path / name)
        with pytest.raises(SystemExit, match=r"is not a train\.py run directory \(no run\.json\)"):
            sample.main([*argv, "--indicator", str(tmp_path / name), "--out", str(tmp_path / "never")])
    # the authors' objective trains an indicator of eps_hat: exported too, and refused by guidance as from its run
    ddm_run = train.train(["--model", str(runs["none"]), "--data", str(data_dir), "--out", str(tmp_path / "ddm"),
                           "--lora-rank", "4", "--max-steps", "1", *FAST])
    train.train(["--model", str(ddm_run), "--export", str(tmp_path / "ddm-export")])
    assert loading.load_models(tmp_path / "ddm-export").unet is not None
    with pytest.raises(SystemExit, match="reads eps_hat, not"):
        sample.main([*argv, "--indicator", str(tmp_path / "ddm-export"), "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


def test_a_zero_guidance_scale_checks_its_indicators_and_targets_as_any_other_scale_does(runs, tmp_path):
    """--indicator-guidance 0 (a scale sweep's baseline) applies nothing; a --target that names no group of its
    indicator was still sampled, unguided and without a word, while every other scale of the sweep refused it."""
    run = runs["noise-aware"]
    argv = ["--model", str(run), "--prompt", PROMPT, "--steps", "1", "--height", str(RES), "--width", str(RES),
            "--device", "cpu", "--indicator", str(run), "--target", "green=1", "--out", str(tmp_path / "never")]
    for scale in ("1", "0"):
        with pytest.raises(SystemExit, match="'green' is not a group"):
            sample.main([*argv, "--indicator-guidance", scale])
        assert not (tmp_path / "never").exists()
    with pytest.raises(SystemExit, match="this run trained no indicator"):  # and so is the indicator itself
        sample.main([*argv[:-6], "--indicator", str(runs["none"]), "--indicator-guidance", "0", "--out",
                     str(tmp_path / "never")])


@pytest.mark.parametrize("decide_at", ["500", "none"])
def test_nan_in_a_calibration_batch_is_one_line_naming_the_prompt_and_nothing_is_written(decide_at, runs, sd_dir,
                                                                                         tmp_path):
    """A model gone NaN stopped the calibration batch with a traceback that said "image 0 ... in the decoded
    pixels": nothing was decoded there, and image 0 was a calibration image, none of those asked for."""
    from test_sample import _nan_unet_copy
    out = tmp_path / "out"
    argv = ["--model", str(_nan_unet_copy(sd_dir, tmp_path)), "--prompt", PROMPT, "--n", "2", "--steps", "4",
            "--height", str(RES), "--width", str(RES), "--device", "cpu", "--indicator", str(runs["noise-aware"]),
            "--indicator-guidance", "auto", "--calibration", "4", "--decide-at", decide_at, "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    where = " (NaN weights" if decide_at == "500" else " after step 1 of 4"  # 500: stopped there, not decoded
    assert str(e.value.code).startswith(f"error: the calibration batch of prompt {PROMPT!r}: calibration image 0: "
                                        f"NaN or infinite values in the latents{where}"), e.value.code
    assert not out.exists()


# ---- the guidance term against a closed form: two Gaussian groups, whose every score and posterior are known


class GaussianGroups:
    """x_0 | g ~ N(μ_g, s² I) with μ_g = ∓1: at step t, x_t | g ~ N(√ᾱ μ_g, (ᾱ s² + 1 − ᾱ) I), so p(g | x_t) under
    any priors and the mixture's exact ε are closed forms."""
    shape, s = (4, 1, 1), 0.7
    mu = torch.stack([-torch.ones(shape), torch.ones(shape)]).double().flatten(1)  # (2, 4)
    ac = diffusion.sd_schedule()

    def log_joint(self, x, t, prior):  # log p(x_t | g) + log π_g, up to a constant: the exact posterior's logits
        a = self.ac[int(t)]
        d = x.double().flatten(1)[:, None] - a.sqrt() * self.mu[None]
        return -(d ** 2).sum(-1) / (2 * (a * self.s ** 2 + 1 - a)) + prior.log()

    def reader(self, prior):
        """An indicator whose logits are the exact posterior's under `prior` (equal priors: a class-balanced one)."""
        groups = self

        class Reader(torch.nn.Module):
            def forward(self, x, t):
                return groups.log_joint(x, t, prior).float()
        return Reader()

    def unet(self, prior, prediction_type="epsilon"):
        """A "UNet" whose ε (or v) is the exact one of the mixture with these priors: ε = √(1−ᾱ)(x_t − √ᾱ E[μ | x_t])
        / (ᾱ s² + 1 − ᾱ)."""
        groups = self

        class Exact(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.dtype_anchor = torch.nn.Parameter(torch.zeros(1))  # denoise reads the dtype of its parameters

            def forward(self, x, t, context):
                a = groups.ac[int(t)]
                mean = (groups.log_joint(x, t, prior).softmax(1) @ groups.mu).view(x.shape)
                eps = (1 - a).sqrt() * (x.double() - a.sqrt() * mean) / (a * groups.s ** 2 + 1 - a)
                x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
                return (eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0).float()
        return Exact()

    def sample(self, unet, guides=(), n=8, **settings):
        """n images of `unet` from fixed noise, 20 steps, no CFG."""
        x = torch.randn(n, *self.shape, generator=torch.Generator().manual_seed(0))
        return diffusion.denoise(unet, x, torch.zeros(n, 2, 2), None, self.ac,
                                 [torch.Generator().manual_seed(k) for k in range(n)], steps=20, guidance=1.0,
                                 guides=guides, **settings)


PRIOR = torch.tensor([0.9, 0.1], dtype=torch.float64)  # the mixture's: group 1 is the minority
GROUP_1 = torch.tensor([1e-300, 1.0], dtype=torch.float64)  # group 1 alone


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("euler", 0.0)])
def test_guidance_at_scale_1_by_the_exact_posterior_samples_the_exact_conditional(sampler, eta, prediction_type):
    """∇ log p(x_t | g) = ∇ log p(x_t) + ∇ log p(g | x_t), and ε = −√(1−ᾱ)·∇ log p(x_t): the mixture's ε guided at
    S = 1 by the exact posterior toward group 1 is group 1's own ε, step for step, in every sampler. The other tests
    restate the term ε − S·√(1−ᾱ)·∇; this derives it (its sign, its √(1−ᾱ) and the x_t it reads)."""
    groups, settings = GaussianGroups(), dict(sampler=sampler, eta=eta, prediction_type=prediction_type)
    alone = groups.sample(groups.unet(GROUP_1, prediction_type), **settings)
    guided = groups.sample(groups.unet(PRIOR, prediction_type),
                           [diffusion.Guidance(groups.reader(PRIOR), torch.ones(8, dtype=torch.long), 1.0)], **settings)
    torch.testing.assert_close(guided, alone, atol=1e-5, rtol=1e-5)

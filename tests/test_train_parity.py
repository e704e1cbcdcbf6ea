"""train.py's training step against a reference written with diffusers' and peft's pieces, the way diffusers'
train_text_to_image(_lora) scripts compute the loss:

    z_0 = AutoencoderKL.encode(x).latent_dist.sample() · scaling_factor
    z_t = DDPMScheduler.add_noise(z_0, ε, t),   t ~ U{0, …, num_train_timesteps − 1}
    target = ε, or DDPMScheduler.get_velocity(z_0, ε, t) for v-prediction
    ε̂ = UNet2DConditionModel(z_t, t, CLIPTextModel(caption or "")) with a peft LoRA on to_q / to_v
    L = w_rec · MSE(ε̂, target) + w_ind · CE(indicator(ε̂), group)

A real `train.train` run is watched through torch's global hooks (test_train.StepRecorder); the reference is fed
the same images, captions, posterior draw, noise, timesteps and caption dropout, and the LoRA and indicator
weights the run had at that step. Loss and gradients must agree to float32 rounding.
"""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import train
import weights
from test_train import FAST, StepRecorder, make_data, one_thread, write_tiny_sd  # noqa: F401 (one_thread: autouse)
from unet import unet_diffusers_names

SEED, BATCH, ACCUM, RANK, ALPHA = 3, 2, 2, 4, 8.0  # alpha != rank and != the default 32: the scale alpha/r counts


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{prediction type: tiny SD folder with that scheduler}, and the training images."""
    root = tmp_path_factory.mktemp("parity")
    eps = write_tiny_sd(root / "epsilon", "epsilon")
    v = root / "v_prediction"
    shutil.copytree(eps, v, ignore=shutil.ignore_patterns("scheduler"))
    from diffusers import DDPMScheduler
    DDPMScheduler.from_pretrained(eps, subfolder="scheduler", prediction_type="v_prediction").save_pretrained(
        v / "scheduler")
    return {"epsilon": eps, "v_prediction": v}, make_data(root / "data")


def run_steps(model, data, out, *extra, steps=2):
    """A LoRA run of `steps` steps of ACCUM micro-batches of BATCH images, watched; -> (recorder, log lines)."""
    with StepRecorder() as rec:
        run = train.train(["--model", str(model), "--data", str(data), "--out", str(out), "--lora-rank", str(RANK),
                           "--lora-alpha", str(ALPHA), "--max-steps", str(steps), "--seed", str(SEED), *FAST,
                           "--max-grad-norm", "0", "--grad-accum", str(ACCUM), "--batch-size", str(BATCH), *extra])
    return rec, [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def loop_draws(n_images, step, micro):
    """The one place that knows train.py's randomness protocol (re-point it when that moves): the dataset indices
    of (step, micro) in a one-process run, and the generator its posterior sample, noise, timesteps and caption
    dropout are drawn from, in that order."""
    m = step * ACCUM + micro
    it = iter(data.micro_batch_indices(n_images, BATCH, SEED))
    indices = [next(it) for _ in range(m + 1)][m]
    return indices, torch.Generator().manual_seed(data.derive_seed(SEED, "noise", step, micro, 0))


class Reference:
    """The diffusers / transformers / peft side, built from the same folder."""

    def __init__(self, folder, unet_config):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTokenizer
        self.vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
        self.scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        self.unet.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=True,
                                         target_modules=["to_q", "to_v"]))
        self.unet.train()
        self.to_diffusers = unet_diffusers_names(unet_config)

    def load_trained(self, values):
        """Our recorded LoRA weights into peft's adapters; our indicator's weights into an nn.Sequential of the
        authors' shape. Returns {our name: reference parameter}."""
        params = dict(self.unet.named_parameters())
        ref = {}
        lora = {k.removeprefix("unet."): v for k, v in values.items() if k.startswith("unet.")}
        for ours, theirs in zip(lora, weights.rename(lora, self.to_diffusers)):
            p = params[theirs + ".default.weight"]  # ...to_q.lora_A -> ...to_q.lora_A.default.weight
            with torch.no_grad():
                p.copy_(lora[ours])
            ref["unet." + ours] = p
        assert len(ref) == sum(".lora_" in n for n in params) > 0
        ind = {k.removeprefix("indicator.net."): v for k, v in values.items() if k.startswith("indicator.")}
        layers = [nn.Flatten()]  # Flatten, then (Linear, ReLU) pairs at odd indices, the last Linear without ReLU
        for i in sorted({int(k.split(".")[0]) for k in ind}):
            out_features, in_features = ind[f"{i}.weight"].shape
            layers += [nn.Linear(in_features, out_features), nn.ReLU()]
        self.indicator = nn.Sequential(*layers[:-1])
        self.indicator.load_state_dict(ind, strict=True)
        ref.update({f"indicator.net.{k}": p for k, p in self.indicator.named_parameters()})
        return ref

    def micro_batch_loss(self, pixels, captions, groups, gen, caption_dropout, w_rec, w_ind):
        with torch.no_grad():
            z0 = self.vae.encode(pixels).latent_dist.sample(generator=gen) * self.vae.config.scaling_factor
            noise = torch.randn(z0.shape, generator=gen)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(z0),), generator=gen)
            drop = torch.rand(len(z0), generator=gen) < caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop)]
            length = self.text_encoder.config.max_position_embeddings  # 77
            ids = self.tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                                 return_tensors="pt").input_ids
            context = self.text_encoder(ids)[0]
            noisy = self.scheduler.add_noise(z0, noise, t)
            target = noise if self.scheduler.config.prediction_type == "epsilon" else \
                self.scheduler.get_velocity(z0, noise, t)
        pred = self.unet(noisy, t, context).sample
        loss = w_rec * F.mse_loss(pred.float(), target.float())
        if w_ind:
            loss = loss + w_ind * F.cross_entropy(self.indicator(pred).float(), groups)
        return loss, int(drop.sum())


def reference_step(folder, data, recorder, step, caption_dropout, w_rec, w_ind):
    """(loss, {our name: gradient}, captions dropped) of step `step` (0-based) as the reference computes it, from
    the weights the run had then; the loss is the mean over the step's micro-batches, as train.py logs it."""
    ref = Reference(folder, recorder.modules["unet"].config)
    params = ref.load_trained(recorder.values(step))
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    group_index = {g: k for k, g in enumerate(sorted({r["group"] for r in rows}))}
    total, dropped = 0.0, 0
    for micro in range(ACCUM):
        indices, gen = loop_draws(len(rows), step, micro)
        pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(data / rows[i]["file_name"]).convert("RGB"),
                                                          dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
                              for i in indices])
        groups = torch.tensor([group_index[rows[i]["group"]] for i in indices])
        loss, d = ref.micro_batch_loss(pixels, [rows[i]["text"] for i in indices], groups, gen, caption_dropout,
                                       w_rec, w_ind)
        (loss / ACCUM).backward()
        total, dropped = total + loss.item() / ACCUM, dropped + d
    return total, {k: p.grad for k, p in params.items() if p.grad is not None}, dropped


def assert_grads_close(ours, theirs, rel=2e-5):
    """Each gradient tensor within `rel` of its own largest reference entry (measured: <= 6e-6, float32 rounding
    between two implementations of the same arithmetic; the adapters' A gradients are ~100x smaller than B's)."""
    assert ours.keys() == theirs.keys()
    for k, g in theirs.items():
        scale = g.abs().max().item()
        assert scale > 0, f"{k}: the reference gradient is zero, the comparison would prove nothing"
        diff = (ours[k] - g).abs().max().item()
        assert diff <= rel * scale, f"{k}: max gradient difference {diff:.3g} at gradient scale {scale:.3g}"


@pytest.mark.parametrize("caption_dropout", [0.0, 0.5], ids=["captions", "caption_dropout"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_step_equals_the_diffusers_peft_reference(prediction_type, caption_dropout, folders, tmp_path):
    sds, data = folders
    recorder, log = run_steps(sds[prediction_type], data, tmp_path / "run", "--caption-dropout", str(caption_dropout))
    step = 1  # the second step: its LoRA B is no longer zero, so every adapter weight gets a gradient
    loss, grads, dropped = reference_step(sds[prediction_type], data, recorder, step, caption_dropout, 0.95, 0.05)
    if caption_dropout:
        assert 0 < dropped < ACCUM * BATCH  # the case tests something: some captions dropped, some kept
    assert log[step]["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    ours = recorder.grads(step)
    assert any(k.startswith("indicator.") for k in ours) and any(k.endswith("lora_A") for k in ours)
    assert_grads_close(ours, grads)


def test_indicator_gradient_reaches_the_unet_as_exactly_the_ce_terms_gradient(folders, tmp_path):
    """DDM's mechanism: the CE's gradient flows through ε̂ into the UNet. One DDM step's LoRA gradient minus one
    plain step's (same draws, same weights) must be the reference's gradient of w_ind · CE alone, tensor by
    tensor; a detached indicator input leaves a difference of 0 and fails by the CE term's whole size."""
    sds, data = folders
    runs = {name: run_steps(sds["epsilon"], data, tmp_path / name, "--w-ind", w_ind, steps=1)[0]
            for name, w_ind in (("ddm", "0.05"), ("plain", "0"))}
    grads = {name: r.grads(0) for name, r in runs.items()}
    _, ce, _ = reference_step(sds["epsilon"], data, runs["ddm"], 0, 0.0, 0.0, 0.05)  # the DDM run's indicator
    assert all(g.abs().max() == 0 for k, g in ce.items() if k.endswith("lora_A"))  # step 0: B = 0, so A gets none
    ce = {k: g for k, g in ce.items() if k.endswith("lora_B")}
    difference = {k: grads["ddm"][k] - grads["plain"][k] for k in ce}
    assert_grads_close(difference, ce, rel=1e-3)  # a difference of two gradients ~100x larger: cancellation
    ce_norm = torch.cat([g.flatten() for g in ce.values()]).norm()
    plain_norm = torch.cat([grads["plain"][k].flatten() for k in ce]).norm()
    assert ce_norm > 0.01 * plain_norm  # the CE term is no rounding-level effect here (measured 0.034)

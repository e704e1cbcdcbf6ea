"""train.py end to end on tiny models: the loss falls, resume is exact, torchrun's ranks agree, the export loads in
diffusers with our outputs, LoRA trains only adapters, w_ind = 0 is plain fine-tuning, bad input stops early; and
single steps watched through torch's global hooks (StepRecorder): clipping and AdamW's weight decay, cached
posteriors, gradient checkpointing. The Trainer built without torchrun: π̂ from the labelled images, the indicator's
learning rate, each rank's shard and noise seed; sample.py --indicator with a run or its exported file.
test_train_parity.py checks the step's loss and gradients against diffusers."""
import collections
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

import checkpoints
import data
import ddm
import diffusion
import guidance
import loading
import rundir
import sample
import train
import weights
from clip_text import CLIPTextModel
from data import ImageFolder
from ddm import Indicator
from unet import ResBlock, UNet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from make_sd_tokenizer import write_sd_tokenizer  # noqa: E402

RES = 16  # pixels; the tiny VAE downsamples by 2, the tiny UNet once more: latents 4 x 8 x 8
TINY = {  # the same shapes as the diffusers models of `sd_dir`
    "unet": {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
             "num_heads": 2, "context_dim": 32, "num_groups": 8},
    "vae": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "num_groups": 8},
    "text_encoder": {"width": 32, "layers": 2, "heads": 2, "mlp": 64},
}
FAST = ["--resolution", str(RES), "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--checkpoint-every", "0",
        "--indicator-hidden", "64", "32", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models run faster on one thread (no hand-offs between threads), and the test machine is shared.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_data(folder, groups=None, n=8):
    """n 16x16 images, even ones reddish ("a red square"), odd ones bluish; `groups` overrides the labels."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        a = rng.integers(0, 60, (RES, RES, 3)).astype(np.uint8)
        a[..., 0 if i % 2 == 0 else 2] += 180
        Image.fromarray(a).save(folder / f"{i}.png")
        group = groups[i] if groups else ["red", "blue"][i % 2]
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a {['red', 'blue'][i % 2]} square",
                                 "group": group}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "d")


def write_tiny_sd(root, prediction_type=None):
    """A tiny random SD pipeline folder written by diffusers/transformers themselves; with `prediction_type`, also
    the scheduler/ folder of SD's DDPM schedule predicting that."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=2).save_pretrained(root / "unet")
        AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                      sample_size=RES).save_pretrained(root / "vae")
        CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=77)).save_pretrained(
            root / "text_encoder")
    write_sd_tokenizer(root / "tokenizer")
    if prediction_type:
        DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type=prediction_type).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny random SD pipeline folder written by diffusers/transformers themselves."""
    return write_tiny_sd(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def full_run(sd_dir, data_dir, tmp_path_factory):
    """Full fine-tune (UNet + text encoder) of the diffusers folder, 6 steps."""
    out = tmp_path_factory.mktemp("runs") / "full"
    return train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(out), "--lora-rank", "0",
                        "--train-text-encoder", "--max-steps", "6", *FAST])


@pytest.fixture(scope="module")
def lora_run(sd_dir, data_dir, tmp_path_factory):
    """LoRA rank 4 on UNet and text encoder, 4 steps, a checkpoint every 2."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    return train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(out), "--lora-rank", "4",
                        "--train-text-encoder", "--max-steps", "4", *FAST, "--checkpoint-every", "2"])


def denoising_loss(models, data_dir):
    """Mean ε-MSE on every image at five fixed timesteps with fixed noise: a deterministic loss to compare."""
    data = ImageFolder(data_dir, RES)
    pixels = torch.stack([data[i]["pixels"] for i in range(len(data))])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z0 = models.vae.encode(pixels).mean * models.vae_config.scaling_factor
        context = models.text_encoder(models.tokenizer([data[i]["text"] for i in range(len(data))]))
        losses = []
        for t in (50, 250, 500, 750, 950):
            noise = torch.randn(z0.shape, generator=g)
            t = torch.full((len(z0),), t)
            losses.append(F.mse_loss(models.unet(diffusion.add_noise(z0, noise, t, models.alphas_cumprod), t, context),
                                     noise).item())
    return sum(losses) / len(losses)


def checkpoint_files(run_dir):
    ckpt = checkpoints.latest_checkpoint(run_dir)
    return {f.name: load_file(f) for f in sorted(ckpt.glob("*.safetensors"))}


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for file in a:
        assert a[file].keys() == b[file].keys(), file
        for name in a[file]:
            assert torch.equal(a[file][name], b[file][name]), f"{file}: {name} differs"


def log_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def assert_images_have_content(images, scale=255):
    """Generated images (B, H, W, 3), values in [0, scale]: finite, none of them flat, and not all alike."""
    x = torch.as_tensor(np.asarray(images)).double().flatten(1)
    assert torch.isfinite(x).all()
    spread = x.max(1).values - x.min(1).values
    assert (spread > 0.05 * scale).all(), f"flat images: value ranges {spread.tolist()} of {scale}"
    if len(x) > 1:
        assert (x - x[0]).abs().amax(1)[1:].min() > 0.05 * scale, "images that should differ are (nearly) equal"


class StepRecorder:
    """What a `train.train` run inside this `with` block did, seen through torch's global hooks only: the networks
    it called (the last UNet, text encoder and indicator), calls counted by module class (a pre-hook, so a call
    counts even when a checkpoint's recomputation stops early inside the module), and at every optimizer step the
    trained parameters' values before the update and their gradients after clipping, by name ("unet.<name>",
    "text_encoder.<name>", "indicator.<name>")."""

    def __init__(self):
        self.modules, self.calls, self.steps = {}, collections.Counter(), []

    def __enter__(self):
        self._handles = [register_module_forward_pre_hook(self._on_call),
                         register_module_forward_hook(self._on_forward),
                         register_optimizer_step_pre_hook(self._on_step)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _on_call(self, module, args):
        self.calls[type(module)] += 1

    def _on_forward(self, module, args, output):
        for name, cls in (("unet", UNet), ("text_encoder", CLIPTextModel), ("indicator", Indicator)):
            if isinstance(module, cls):
                self.modules[name] = module

    def _on_step(self, optimizer, args, kwargs):
        names = {id(p): f"{prefix}.{n}" for prefix, m in self.modules.items() for n, p in m.named_parameters()}
        self.steps.append({names[id(p)]: (p.detach().clone(), p.grad.detach().clone())
                           for group in optimizer.param_groups for p in group["params"]})

    def grads(self, step=-1):
        return {k: g for k, (_, g) in self.steps[step].items()}

    def values(self, step=-1):
        return {k: v for k, (v, _) in self.steps[step].items()}


# ----------------------------------------------------------------------------------------------------------------


def test_fine_tune_reduces_the_loss_and_the_run_directory_loads_for_sampling(full_run, sd_dir, data_dir):
    before = denoising_loss(loading.load_models(sd_dir), data_dir)
    trained = loading.load_models(full_run)  # a run directory as sample.py --model takes it
    after = denoising_loss(trained, data_dir)
    assert after < 0.9 * before, (before, after)
    log = log_lines(full_run)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert set(log[0]) >= {"step", "loss", "rec", "ind", "acc", "lr", "time"}
    assert all(np.isfinite(r["loss"]) and 0 <= r["acc"] <= 1 for r in log)
    info = json.loads((full_run / "run.json").read_text())
    assert info["base"] == str(sd_dir.resolve()) and info["config"]["group_names"] == ["blue", "red"]
    images = sample.generate(trained, ["a red square", "a blue square"], [0, 1], steps=2, height=RES, width=RES,
                             progress=False)
    assert images.shape == (2, RES, RES, 3) and images.dtype == torch.uint8
    assert_images_have_content(images)
    again = sample.generate(trained, ["a blue square"], [1], steps=2, height=RES, width=RES, progress=False)
    assert torch.equal(again[0], images[1])  # image k depends on (prompt k, seed k) only


def test_killed_and_resumed_run_equals_the_uninterrupted_run_bit_for_bit(lora_run, sd_dir, data_dir, tmp_path):
    out = tmp_path / "resumed"
    common = ["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "4", "--train-text-encoder", *FAST,
              "--checkpoint-every", "2"]
    train.train([*common, "--out", str(out), "--max-steps", "2"])
    # What a kill during step 3's checkpoint leaves behind: a half-written checkpoint and a log line past the last
    # complete checkpoint. Neither may count.
    (out / "checkpoint-000003.tmp").mkdir()
    (out / "checkpoint-000003.tmp" / "unet_lora.safetensors").write_bytes(b"half a file")
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
        f.write('{"step": 4, "lo')  # and a line cut off half-way
    train.train([*common, "--resume", str(out), "--max-steps", "4"])

    assert_same_tensors(checkpoint_files(out), checkpoint_files(lora_run))
    opt = [torch.load(checkpoints.latest_checkpoint(r) / "optimizer.pt", weights_only=True)["optimizer"]
           for r in (out, lora_run)]
    assert opt[0]["state"].keys() == opt[1]["state"].keys() and len(opt[0]["state"]) > 0
    for k in opt[0]["state"]:
        for name, value in opt[0]["state"][k].items():
            assert torch.equal(value, opt[1]["state"][k][name]), (k, name)
    drop_time = [{k: v for k, v in r.items() if k != "time"} for r in log_lines(out)]
    assert drop_time == [{k: v for k, v in r.items() if k != "time"} for r in log_lines(lora_run)]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-000004"]


def test_lora_trains_only_the_adapters_and_the_indicator(lora_run, sd_dir):
    base = loading.load_models(sd_dir)
    run = loading.load_run(lora_run, merge=False)
    for name, model in (("unet", run.models.unet), ("text_encoder", run.models.text_encoder)):
        adapters = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
        assert adapters and any(v.abs().max() > 0 for k, v in adapters.items() if k.endswith("lora_B")), name
        plain = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
        assert_same_tensors({name: plain}, {name: getattr(base, name).state_dict()})
        targets = checkpoints.UNET_LORA_TARGETS if name == "unet" else checkpoints.TEXT_LORA_TARGETS
        assert {k.split(".")[-2] for k in adapters} == set(targets)
    files = checkpoint_files(lora_run)
    assert set(files) == {"unet_lora.safetensors", "text_encoder_lora.safetensors", "indicator.safetensors"}
    state = torch.load(checkpoints.latest_checkpoint(lora_run) / "optimizer.pt", weights_only=True)["optimizer"]
    n_trained = sum(len(f) for f in files.values())  # the optimizer holds exactly the saved tensors
    assert len(state["state"]) == n_trained == sum(len(g["params"]) for g in state["param_groups"])
    assert all(s["exp_avg"].abs().max() > 0 for s in state["state"].values())  # ... and each got gradients


def test_w_ind_zero_is_plain_fine_tuning_blind_to_the_groups(sd_dir, data_dir, tmp_path):
    scrambled = make_data(tmp_path / "scrambled_data", groups=["a", "a", "b", "b", "a", "b", "b", "a"])
    common = ["--model", str(sd_dir), "--lora-rank", "0", "--max-steps", "2", *FAST]
    runs = {name: train.train([*common, "--data", str(d), "--out", str(tmp_path / name), "--w-ind", w])
            for name, d, w in (("plain", data_dir, "0"), ("scrambled", scrambled, "0"), ("ddm", data_dir, "0.05"))}
    plain, scrambled, ddm = (checkpoint_files(runs[n]) for n in ("plain", "scrambled", "ddm"))
    assert_same_tensors(plain, scrambled)  # the group labels cannot matter when w_ind = 0
    assert "indicator.safetensors" not in plain and "indicator.safetensors" in ddm  # no untrained indicator kept
    assert loading.load_run(runs["plain"]).indicator is None and loading.load_run(runs["ddm"]).indicator is not None
    assert not torch.equal(plain["unet.safetensors"]["out.2.weight"], ddm["unet.safetensors"]["out.2.weight"])
    for r in log_lines(runs["plain"]):
        assert r["ind"] is None and r["acc"] is None
        assert r["loss"] == pytest.approx(0.95 * r["rec"], rel=1e-6)
    assert all(r["ind"] is not None for r in log_lines(runs["ddm"]))


def test_plain_fine_tuning_takes_an_unlabelled_folder_and_its_run_resumes_loads_and_samples(sd_dir, data_dir,
                                                                                              tmp_path):
    """w_ind = 0 reads no label, so a folder whose every "group" is null trains it (it was refused: "DDM needs at least
    two labelled groups"), to the weights the labelled folder gives; run.json records no groups. An objective that
    reads the groups (an indicator, or weights by group) still refuses that folder, with the same message."""
    unlabelled = make_data(tmp_path / "unlabelled_data", groups=[None] * 8)
    common = ["--model", str(sd_dir), "--lora-rank", "0", "--max-steps", "2", *FAST]
    runs = [train.train([*common, "--data", str(d), "--out", str(tmp_path / name), "--w-ind", "0"])
            for name, d in (("labelled", data_dir), ("unlabelled", unlabelled))]
    assert_same_tensors(*map(checkpoint_files, runs))
    train.train([*common, "--data", str(unlabelled), "--resume", str(runs[1]), "--w-ind", "0", "--max-steps", "3"])
    run = loading.load_run(runs[1])
    assert run.step == 3 and run.indicator is None and run.group_names == []
    images = sample.generate(run.models, ["a red square", "a blue square"], [0, 1], steps=2, height=RES, width=RES,
                             progress=False)
    assert_images_have_content(images)
    for flags in (["--w-ind", "0.05"], ["--objective", "balanced", "--w-ind", "0"]):
        with pytest.raises(ValueError, match=r"field 'group' is null on every line; DDM needs at least two labelled"):
            train.train([*common, "--data", str(unlabelled), "--out", str(tmp_path / "refused"), *flags])
        assert not (tmp_path / "refused").exists()
    # a resume that forgets --w-ind 0 is told so, not that its data lack labels; one that trains nothing is no resume
    resume = [*common, "--data", str(unlabelled), "--resume", str(runs[1]), "--max-steps", "3"]
    with pytest.raises(ValueError, match=r"started with w_ind=0\.0, now w_ind=0\.05"):
        train.train(resume)
    train.train([*resume, "--w-ind", "0"])
    assert [r["step"] for r in json.loads((runs[1] / "run.json").read_text())["resumes"]] == [2]
    # nor does a plain fine-tune need --attribute over labels by attribute, one value each, or none
    for name, group in (("one_value", {"colour": "red", "size": 1}), ("no_value", {"colour": None})):
        folder = make_data(tmp_path / name, groups=[group] * 8)
        run = train.train([*common, "--data", str(folder), "--out", str(tmp_path / f"run_{name}"), "--w-ind", "0"])
        assert loading.load_run(run).group_names == []


def test_export_loads_in_diffusers_with_our_outputs(full_run, lora_run, data_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    for run, merge in ((full_run, True), (lora_run, False)):
        export = train.train(["--model", str(run), "--export", str(tmp_path / run.name)])
        pipe = StableDiffusionPipeline.from_pretrained(export)
        ours = loading.load_run(run, merge=merge).models  # the LoRA run unmerged: the export must hold the merge
        g = torch.Generator().manual_seed(0)
        x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
        t = torch.tensor([10, 700])
        ids = ours.tokenizer(["a red square", "a blue square!"])
        with torch.no_grad():
            diffs = {
                "unet": pipe.unet(x, t, context).sample - ours.unet(x, t, context),
                "text": pipe.text_encoder(ids).last_hidden_state - ours.text_encoder(ids),
                "vae": pipe.vae.decode(x).sample - ours.vae.decode(x),
            }
        for name, d in diffs.items():
            assert d.abs().max() <= 1e-5, (run.name, name, d.abs().max().item())
        assert pipe.tokenizer(["a red square", "a blue square!"], padding="max_length", max_length=77).input_ids \
            == ids.tolist()
        assert pipe.tokenizer.model_max_length == 77
    images = [pipe(["a red square", "a blue square"], num_inference_steps=2, height=RES, width=RES, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images for _ in range(2)]
    assert images[0].shape == (2, RES, RES, 3)
    assert_images_have_content(images[0], scale=1.0)
    assert np.array_equal(images[0], images[1])  # equal seeds, equal images
    with pytest.raises(FileExistsError, match="exists"):
        train.train(["--model", str(lora_run), "--export", str(tmp_path / lora_run.name)])
    with pytest.raises(FileExistsError, match="exists"):  # refused before training, not after it
        train.train(["--model", str(lora_run), "--data", str(data_dir), "--out",
                     str(tmp_path / "never-written"), "--export", str(tmp_path / lora_run.name)])
    assert not (tmp_path / "never-written").exists()
    around = tmp_path / "nothere" / ".." / lora_run.name  # the folder, through one that does not exist yet
    with pytest.raises(FileExistsError, match="exists"):  # was taken, and failed once training was done
        train.train(["--model", str(lora_run), "--data", str(data_dir), "--out", str(tmp_path / "never-written"),
                     "--max-steps", "1", *FAST, "--export", str(around)])
    assert not (tmp_path / "never-written").exists()
    with pytest.raises(ValueError, match=r"--data is required \(or --model PATH --export DIR alone, without --out"):
        train.train(["--model", str(lora_run), "--export", str(tmp_path / "e2"), "--out", str(tmp_path / "o2")])
    assert not (tmp_path / "e2").exists() and not (tmp_path / "o2").exists()  # a conversion would have ignored --out


def test_an_export_records_the_model_and_step_it_was_written_from(lora_run, sd_dir, tmp_path):
    """A diffusers folder said nothing of where it came from: which run, which of its checkpoints, which step. Its
    export.json names them (a plain model: its path alone)."""
    train.train(["--model", str(lora_run), "--export", str(tmp_path / "newest")])
    train.train(["--model", str(lora_run / "checkpoint-000004"), "--export", str(tmp_path / "named")])
    train.train(["--model", str(sd_dir), "--export", str(tmp_path / "plain")])
    assert json.loads((tmp_path / "newest" / "export.json").read_text()) == json.loads(
        (tmp_path / "named" / "export.json").read_text()) == {
        "model": str(lora_run.resolve()), "checkpoint": "checkpoint-000004", "step": 4}
    assert json.loads((tmp_path / "plain" / "export.json").read_text()) == {
        "model": str(sd_dir.resolve()), "checkpoint": None, "step": None}


def test_a_text_encoder_with_fewer_positions_trains_samples_and_exports_at_its_length(sd_dir, data_dir, tmp_path):
    """reproduce.py's tiny text encoder has 16 positions, not SD's 77: texts are padded to the positions the text
    encoder has, in training, sampling and the export (whose tokenizer_config diffusers reads)."""
    from transformers import CLIPTokenizer
    config = tmp_path / "short.json"
    config.write_text(json.dumps({"unet": TINY["unet"], "text_encoder": {**TINY["text_encoder"], "max_position": 16}}))
    run = train.train(["--init-config", str(config), "--vae", str(sd_dir), "--data", str(data_dir), "--out",
                       str(tmp_path / "short"), "--max-steps", "1", *FAST])
    models = loading.load_models(run)
    assert models.tokenizer(["a red square"]).shape == (1, 16)
    images = sample.generate(models, ["a red square"], [0], steps=2, height=RES, width=RES, progress=False)
    assert images.shape == (1, RES, RES, 3)
    export = train.train(["--model", str(run), "--export", str(tmp_path / "export")])
    assert CLIPTokenizer.from_pretrained(export / "tokenizer").model_max_length == 16
    assert torch.equal(loading.load_models(export).tokenizer(["a red square"]), models.tokenizer(["a red square"]))


def test_from_scratch_run_with_validation_images_is_a_base_for_another_run(sd_dir, data_dir, tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({k: v for k, v in TINY.items() if k != "vae"}))  # the VAE comes from --vae
    scratch = train.train(["--init-config", str(config), "--vae", str(sd_dir), "--data", str(data_dir), "--out",
                           str(tmp_path / "scratch"), "--max-steps", "2", *FAST, "--cache-latents",
                           "--caption-dropout", "0.5", "--validation-prompt", "a red square", "--validation-n", "2",
                           "--validation-steps", "2"])
    info = json.loads((scratch / "run.json").read_text())
    assert info["base"] == "base" and info["config"]["lora_rank"] == 0 and info["config"]["train_text_encoder"]
    assert set(checkpoint_files(scratch)) == {"unet.safetensors", "text_encoder.safetensors", "indicator.safetensors"}
    from_scratch = loading.load_models(scratch / "base")  # the initial models; the VAE is the one --vae named
    assert_same_tensors({"vae": from_scratch.vae.state_dict()}, {"vae": loading.load_models(sd_dir).vae.state_dict()})
    validation = np.stack([np.asarray(Image.open(scratch / "validation" / "step_000002" / f"{k:02d}.png"))
                           for k in range(2)])
    assert validation.shape == (2, RES, RES, 3)
    assert_images_have_content(validation)
    # ... and they are what the saved final weights generate for seeds 0 and 1
    final = sample.generate(loading.load_models(scratch), ["a red square"] * 2, [0, 1], steps=2, height=RES, width=RES,
                            progress=False)
    assert np.array_equal(final.numpy(), validation)

    tuned = train.train(["--model", str(scratch), "--data", str(data_dir), "--out", str(tmp_path / "tuned"),
                         "--lora-rank", "4", "--max-steps", "1", *FAST])
    base, run = loading.load_models(scratch), loading.load_run(tuned, merge=False)
    plain = {k: v for k, v in run.models.unet.state_dict().items() if ".lora_" not in k}
    assert_same_tensors({"unet": plain}, {"unet": base.unet.state_dict()})
    tuned_models = loading.load_models(tuned)
    images = [sample.generate(tuned_models, ["a blue square"] * 2, [3, 4], steps=2, height=RES, width=RES,
                              progress=False) for _ in range(2)]
    assert images[0].shape == (2, RES, RES, 3)
    assert_images_have_content(images[0])
    assert torch.equal(images[0], images[1])


def test_an_empty_validation_prompt_draws_unconditional_validation_images(sd_dir, data_dir, tmp_path):
    """--validation-prompt "" asks for images of the empty prompt (what --caption-dropout trains), not for none."""
    run = train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(tmp_path / "run"), "--max-steps",
                       "1", *FAST, "--validation-prompt", "", "--validation-n", "1", "--validation-steps", "2"])
    assert [p.name for p in (run / "validation" / "step_000001").iterdir()] == ["00.png"]


@pytest.mark.parametrize("objective", ["ddm", "indicator-weighted"])  # the second logs a maximum (w_max)
def test_torchrun_two_processes_end_with_equal_weights(objective, sd_dir, data_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--model", str(sd_dir), "--data", str(data_dir), "--out", str(out),
           "--lora-rank", "4", "--max-steps", "2", "--cache-latents", "--objective", objective, *FAST]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads((out / "run.json").read_text())["config"]["world_size"] == 2
    state = json.loads((checkpoints.latest_checkpoint(out) / "state.json").read_text())
    ranks = state["rank_fingerprints"]
    assert len(ranks) == 2 and ranks[0] == ranks[1]  # each rank hashed its own weights
    assert ranks[0] == checkpoints.fingerprint(checkpoint_files(out))  # ... and they are the saved ones
    assert [line["step"] for line in log_lines(out)] == [1, 2]
    assert all(line.get("w_max", 1) == pytest.approx(1, abs=1e-6) for line in log_lines(out))  # equal shares: w = 1


def torchrun_with_part(name, part, sd_dir, data_dir, tmp_path, steps):
    """train.py on two torchrun ranks under --objective `name`: the authors' parts plus `part` (a dict entry, source
    run on each rank, RANK set) -> (the finished process, the run directory)."""
    script = tmp_path / "objective.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {str(ROOT)!r})
import ddm, torch, train
def objective(b, indicator, hp):
    loss, parts = ddm.ddm(b, indicator, hp)
    return loss, {{**parts, {part}}}
ddm.OBJECTIVES[{name!r}] = ddm.Objective(objective, "pred")
train.main()
""")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "--model", str(sd_dir), "--data", str(data_dir), "--out", str(out), "--objective", name,
           "--lora-rank", "4", "--max-steps", str(steps), "--cache-latents", *FAST]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300), out


def test_torchrun_ranks_whose_objective_names_other_parts_stop_naming_both(sd_dir, data_dir, tmp_path):
    """README, "Change the loss": every rank sums the same parts in the same order. A part named after the rank
    used to be added to the other rank's part of another name, and the log showed the mixed sum under rank 0's."""
    r, out = torchrun_with_part("by-rank", '"rank" + os.environ["RANK"]: b.t.float().mean()', sd_dir, data_dir,
                                tmp_path, steps=2)
    assert r.returncode != 0 and not log_lines(out)
    assert re.search(r"--objective by-rank at step 1: the ranks returned the parts \[\(.*'rank0'\), \(.*'rank1'\)\]: "
                     r"every rank must return the same names", r.stderr), r.stderr[-4000:]


@pytest.mark.parametrize("rank0, rank1, logged", [("5.0", "2.0", 5.0), ("nan", "2.0", 2.0)])
def test_torchrun_logs_a_maximum_part_as_the_largest_any_rank_measured(rank0, rank1, logged, sd_dir, data_dir,
                                                                        tmp_path):
    """A part named *_max is the largest over ranks (a mean would log 3.5), and a rank that did not measure it (NaN)
    is left out: gloo's MAX kept rank 0's NaN, so the log said null or 2.0 by which rank had measured it."""
    part = f'"probe_max": torch.tensor(float({rank0!r} if os.environ["RANK"] == "0" else {rank1!r}))'
    r, out = torchrun_with_part("rank-max", part, sd_dir, data_dir, tmp_path, steps=1)
    assert r.returncode == 0, r.stderr[-4000:]
    assert [line["probe_max"] for line in log_lines(out)] == [logged]


def test_a_finished_run_and_a_conversion_say_where_they_wrote(sd_dir, data_dir, tmp_path, capsys):
    """With --no-progress (a script, a job's log) train.py ended without a word: not where the run is, nor the
    step it reached; a conversion (--model RUN --export DIR) wrote its folder in silence too."""
    out, export = tmp_path / "run", tmp_path / "export"
    train.main(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(out), "--max-steps", "2", *FAST])
    assert capsys.readouterr().out == f"trained to step 2: {out}\n"
    train.main(["--model", str(out), "--export", str(export)])
    assert capsys.readouterr().out == f"exported {out} to {export}\n"


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(sd_dir, data_dir, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"at step \d+") as e:
        train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(out), "--lora-rank", "0",
                     "--max-steps", "20", *FAST, "--lr", "1e30", "--checkpoint-every", "1"])
    bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    assert bad >= 2 and f"checkpoint-{bad - 1:06d}" in str(e.value)
    assert checkpoints.latest_checkpoint(out).name == f"checkpoint-{bad - 1:06d}"
    assert [r["step"] for r in log_lines(out)] == list(range(1, bad))
    assert not list(out.glob("*.tmp"))


def write_meta(folder, lines):
    (folder / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.mark.parametrize("problem, message", [
    ("unreadable", r"line 3: field 'file_name': cannot read image .*2\.png"),
    ("missing_file", r"line 2: field 'file_name': image .*gone\.png does not exist"),
    ("missing_group", r"line 4: missing field 'group'"),
    ("one_group", r"field 'group' takes only the value 'red'"),
    ("resolution", r"--resolution must be a positive multiple of 8 .*got 12"),
])
def test_bad_input_stops_before_training_naming_file_line_field(problem, message, sd_dir, data_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    rows = [json.loads(line) for line in (data_dir / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        (bad / row["file_name"]).write_bytes((data_dir / row["file_name"]).read_bytes())
    if problem == "unreadable":
        (bad / "2.png").write_bytes(b"not a png")
    if problem == "missing_file":
        rows[1]["file_name"] = "gone.png"
    if problem == "missing_group":
        del rows[3]["group"]
    if problem == "one_group":
        rows = [{**r, "group": "red"} for r in rows]
    write_meta(bad, rows)
    out = tmp_path / "out"
    resolution = ["--resolution", "12"] if problem == "resolution" else []
    with pytest.raises(ValueError, match=message):
        train.train(["--model", str(sd_dir), "--data", str(bad), "--out", str(out), *FAST, *resolution])
    assert not out.exists()


def test_resume_with_another_configuration_is_refused_naming_the_field(lora_run, sd_dir, data_dir, tmp_path):
    before = sorted(p.name for p in lora_run.iterdir())
    common = ["--model", str(sd_dir), "--train-text-encoder", *FAST, "--checkpoint-every", "2", "--max-steps", "6"]
    with pytest.raises(ValueError, match=r"started with lora_rank=4, now lora_rank=8"):
        train.train([*common, "--data", str(data_dir), "--resume", str(lora_run), "--lora-rank", "8"])
    other = make_data(tmp_path / "other")  # a copy of the data elsewhere is the same data; with one image changed:
    Image.fromarray(255 - np.asarray(Image.open(other / "0.png"))).save(other / "0.png")
    with pytest.raises(ValueError, match=r"the data in .*other changed since the run started \(moved from .*; the "
                                         r"images' contents differ\)"):
        train.train([*common, "--data", str(other), "--resume", str(lora_run), "--lora-rank", "4"])
    assert sorted(p.name for p in lora_run.iterdir()) == before
    with pytest.raises(FileExistsError, match="not empty"):
        train.train([*common, "--data", str(data_dir), "--out", str(lora_run), "--lora-rank", "4"])


def test_a_knob_an_older_run_did_not_record_takes_its_default_on_resume(lora_run, sd_dir, data_dir, tmp_path, capsys):
    """A flag added to the objective group later: an older run's run.json lacks it. Its default is what that run
    trained with, so the resume goes on and says so once; another value is still refused."""
    import shutil
    run = tmp_path / "old"
    shutil.copytree(lora_run, run)
    info = json.loads((run / "run.json").read_text())
    del info["config"]["weight_clip"], info["config"]["target"]
    (run / "run.json").write_text(json.dumps(info))
    common = ["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "4", "--train-text-encoder", *FAST,
              "--checkpoint-every", "2", "--resume", str(run)]
    with pytest.raises(ValueError, match=r"started with weight_clip=10\.0 \(the default: run\.json records none\), "
                                         r"now weight_clip=3\.0"):
        train.train([*common, "--max-steps", "5", "--weight-clip", "3"])
    capsys.readouterr()
    train.train([*common, "--max-steps", "5"])
    err = capsys.readouterr().err
    assert err.count("records no target, weight_clip") == 1 and "taking their defaults" in err
    assert [r["step"] for r in log_lines(run)][-1] == 5


def test_each_resume_is_recorded_in_run_json_with_the_flags_it_changed(lora_run, sd_dir, data_dir, tmp_path):
    """run.json's args are the first start's; each resume appends its step, time, torch version and the flags that
    differ from the start's (new values), by rank 0 alone, and leaves every other field as it was."""
    run = tmp_path / "resumed"
    shutil.copytree(lora_run, run)  # stopped at its checkpoint-000004
    before = json.loads((run / "run.json").read_text())
    common = ["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "4", "--train-text-encoder", *FAST,
              "--resume", str(run)]
    args = train.build_parser().parse_args([*common, "--checkpoint-every", "1", "--max-steps", "5"])
    train.check_args(args)
    train.Trainer(args, 1, 1, torch.device("cpu"))  # rank 1 of a (pretended) group writes nothing
    assert json.loads((run / "run.json").read_text()) == before
    train.train([*common, "--checkpoint-every", "1", "--max-steps", "5"])
    train.train([*common, "--checkpoint-every", "2", "--max-steps", "6"])  # back to the start's --checkpoint-every
    after = json.loads((run / "run.json").read_text())
    resumes = after.pop("resumes")
    assert after == before
    assert [(r["step"], r["torch"], r["args"]) for r in resumes] == [
        (4, torch.__version__, {"checkpoint_every": 1, "max_steps": 5}), (5, torch.__version__, {"max_steps": 6})]
    assert all(time.strptime(r["time"], "%Y-%m-%d %H:%M:%S") for r in resumes)
    assert [r["step"] for r in log_lines(run)] == [1, 2, 3, 4, 5, 6]


def test_a_resume_on_another_cpu_thread_count_is_recorded_and_warned_of(lora_run, sd_dir, data_dir, tmp_path,
                                                                          capsys):
    """On the CPU a run resumed on another number of threads differs from one run in the last bits (the kernels sum
    in another order), and nothing recorded the thread count: the start and each resume record it, and a resume on
    another count says so."""
    run = tmp_path / "resumed"
    shutil.copytree(lora_run, run)
    started = json.loads((run / "run.json").read_text())["versions"]["threads"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(started + 1)
        train.train(["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "4", "--train-text-encoder",
                     *FAST, "--resume", str(run), "--max-steps", "5"])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((run / "run.json").read_text())["resumes"][-1]["threads"] == started + 1
    assert (f"warning: {started + 1} CPU threads, where the run started on {started}: on the CPU a resume is bit-exact "
            "only on the same number") in capsys.readouterr().err


def test_a_resume_is_recorded_once_it_trains_and_a_path_spelled_otherwise_is_no_change(lora_run, sd_dir, data_dir,
                                                                                        tmp_path, monkeypatch):
    """A resume that fails after its checks (here: reading its checkpoint) adds nothing to run.json, and a retry is
    recorded once; --data spelled otherwise (the same folder, compared resolved) is not a changed flag."""
    run = tmp_path / "resumed"
    shutil.copytree(lora_run, run)
    before = json.loads((run / "run.json").read_text())
    argv = ["--model", str(sd_dir), "--data", f"{data_dir}/", "--lora-rank", "4", "--train-text-encoder", *FAST,
            "--resume", str(run), "--max-steps", "5", "--checkpoint-every", "2"]

    def broken(*args, **kwargs):
        raise weights.CheckpointError("checkpoint-000004/unet_lora.safetensors: broken")

    with monkeypatch.context() as m:
        m.setattr(train.checkpoints, "load_checkpoint", broken)
        with pytest.raises(weights.CheckpointError, match="broken"):
            train.train(argv)
    assert json.loads((run / "run.json").read_text()) == before
    train.train(argv)
    assert [(r["step"], r["args"]) for r in json.loads((run / "run.json").read_text())["resumes"]] == [
        (4, {"max_steps": 5})]


def test_the_flags_a_resume_may_change_are_those_its_message_names():
    """'only --max-steps, checkpoint/validation/hardware flags may change': no flag of those help groups is one a
    resume must repeat (--cache-latents was under hardware, and a resume refused its change)."""
    groups = {g.title: [a.dest for a in g._group_actions] for g in train.build_parser()._action_groups}
    free = groups["hardware"] + groups["outputs"] + ["max_steps"]
    assert not set(free) & set(rundir.RESUME_FIELDS) and "validation_prompt" in free and "device" in free


def test_cli_reports_bad_arguments_without_a_traceback(data_dir, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(data_dir), "--out", str(tmp_path / "x")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "give exactly one of --model" in r.stderr and "Traceback" not in r.stderr


def test_a_resume_without_the_runs_arguments_is_told_to_give_them_again(tmp_path):
    """docs/real-sd.md: "--resume alone is refused: give the same arguments again". It was refused as "--data is
    required (or --model PATH --export DIR alone, ... to convert a model)", which named no resume."""
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"^--resume {re.escape(str(run))}: give the arguments the run started with "
                                         r"again \(--data is missing"):
        train.train(["--resume", str(run)])
    assert not run.exists()

@pytest.mark.parametrize("flags, message", [
    (["--weight-clip", "-1"], r"--weight-clip must be a number > 0, got -1\.0"),  # every weight 1: plain fine-tuning
    (["--weight-clip", "0"], r"--weight-clip must be a number > 0, got 0\.0"),
    (["--weight-clip", "nan"], r"--weight-clip must be a finite number, got nan"),
    (["--indicator-hidden", "64", "0"], r"--indicator-hidden must be >= 1, got 0"),  # a constant indicator
    (["--lora-alpha", "nan"], r"--lora-alpha must be a finite number, got nan"),
    (["--lora-alpha", "0"], r"--lora-alpha must be a number > 0, got 0\.0"),
    (["--adam-betas", "1.5", "0.9"], r"--adam-betas must lie in \[0, 1\), got 1\.5"),
    (["--adam-betas", "0.9", "1"], r"--adam-betas must lie in \[0, 1\), got 1\.0"),
    (["--adam-eps", "0"], r"--adam-eps must be a number > 0, got 0\.0"),
    (["--indicator-lr", "0"], r"--indicator-lr must be a number > 0, got 0\.0"),  # not "0: take --lr"
    (["--w-rec", "inf"], r"--w-rec must be a finite number, got inf"),
    (["--w-ind", "inf"], r"--w-ind must be a finite number, got inf"),
    (["--validation-guidance", "inf"], r"--validation-guidance must be a finite number, got inf"),
    (["--objective", "plain-indicator", "--w-ind", "0"],
     r"--w-ind must be a number > 0 with --objective plain-indicator .*got 0\.0"),
    (["--objective", "indicator-weighted", "--w-ind", "0"],
     r"--w-ind must be a number > 0 with --objective indicator-weighted .*got 0\.0"),
    # read by some objectives only: with another, recorded in run.json as the run's configuration but not applied
    (["--target", "red=0.3,blue=0.7"], r"--target applies only with --objective balanced or indicator-weighted; "
                                       r"--objective ddm does not read it"),
    (["--objective", "balanced", "--w-ind", "0", "--weight-clip", "3"],
     r"--weight-clip applies only with --objective indicator-weighted; --objective balanced does not read it"),
    (["--objective", "balanced", "--w-ind", "0.9"],  # no indicator: a balanced run recorded 0.9 and trained alike
     r"--w-ind applies only to an objective with an indicator; --objective balanced trains none \(--w-ind 0\)"),
    (["--w-ind", "0", "--indicator-lr", "1e-3"],
     r"--indicator-lr applies only to a run that trains an indicator; --objective ddm with --w-ind 0\.0 trains none"),
    (["--lora-rank", "0", "--lora-alpha", "16"],
     r"--lora-alpha applies only with LoRA \(--lora-rank > 0\); --lora-rank 0 trains the whole weights"),
    (["--validation-every", "100"], r"--validation-every needs --validation-prompt \(no validation images without "
                                    r"one\)"),  # there is no default prompt
    (["--validation-n", "8"], r"--validation-n needs --validation-prompt"),
    # taken and not applied: the cached posteriors are read from memory by no DataLoader; a new run reads its data
    (["--cache-latents", "--num-workers", "4"], r"--num-workers applies only without --cache-latents"),
    (["--allow-data-change"], r"--allow-data-change applies only with --resume"),
    # a missing folder, then "..": the refusal of a non-empty --out saw nothing there, and the run wrote over it
    (["--out", "/no-such-folder/../tmp"], r"--out /no-such-folder/\.\./tmp: /no-such-folder does not exist, so '\.\.'"),
])
def test_a_flag_that_would_change_the_method_or_fail_later_is_refused_before_anything_loads(flags, message, data_dir,
                                                                                           tmp_path):
    """Checked at parse time, naming the flag: this --model does not exist and --out is never created."""
    with pytest.raises(ValueError, match=message):
        train.train(["--model", str(tmp_path / "no-model"), "--data", str(data_dir), "--out", str(tmp_path / "never"),
                     *FAST, *flags])
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("flags, flag", [
    (["--vae", "other-vae"], "--vae"),  # the export would keep --model's own VAE
    (["--mixed-precision", "fp16"], "--mixed-precision"),  # the export is float32
    (["--lora-rank", "4"], "--lora-rank"),
    (["--w-ind", "0"], "--w-ind"),  # the run's indicator is exported all the same
    (["--resolution", "64"], "--resolution"),
    (["--resolution", "12"], "--resolution"),  # named as not applying, not as a value to fix
    (["--seed", "-1"], "--seed"),
])
def test_a_conversion_refuses_a_flag_it_would_ignore(flags, flag, tmp_path):
    """--model PATH --export DIR writes --model as it is: another flag given with it was accepted and not applied (an
    fp16 or other-VAE export that is neither); it is named before anything loads, as --out is."""
    with pytest.raises(ValueError, match=rf"^{flag} does not apply to a conversion \(--model PATH --export DIR"):
        train.train(["--model", str(tmp_path / "no-model"), "--export", str(tmp_path / "export"), "--no-progress",
                     *flags])
    assert not (tmp_path / "export").exists()


def test_a_resolution_the_model_cannot_halve_often_enough_is_refused_naming_the_flag(sd_dir, data_dir, tmp_path):
    """Three UNet halvings after the VAE's one: sides must be multiples of 16, which 24 is not."""
    config = tmp_path / "deep.json"
    config.write_text(json.dumps({**TINY, "unet": {**TINY["unet"], "channel_mult": [1, 2, 2, 2]}, "vae": None}))
    with pytest.raises(ValueError, match=r"^--resolution must be a multiple of 16 for this model .*got 24$"):
        train.train(["--init-config", str(config), "--vae", str(sd_dir), "--data", str(data_dir), "--out",
                     str(tmp_path / "never"), *FAST, "--resolution", "24"])
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("key, change, message", [
    ("text_encoder", {"activation": "relu"}, r"text_encoder: activation must be quick_gelu or gelu, got 'relu'"),
    ("text_encoder", {"heads": 3}, r"text_encoder: width 32 must be a multiple of heads 3"),
    ("unet", {"num_groups": 5}, r"unet: .*divisible by num_groups"),  # torch's GroupNorm says why
    ("unet", {"num_heads": 3}, r"unet: 64 channels at level 1 do not split into 3 heads"),
    ("unet", {"attention_levels": [2]}, r"unet: attention_levels \[2\] must be levels of channel_mult \(0..1\)"),
])
def test_an_init_config_that_builds_no_model_is_one_line_naming_the_file_and_the_part(key, change, message,
                                                                                         sd_dir, data_dir, tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({**TINY, key: {**TINY[key], **change}, "vae": None}))
    with pytest.raises(ValueError, match=rf"^--init-config {re.escape(str(config))}: {message}"):
        train.train(["--init-config", str(config), "--vae", str(sd_dir), "--data", str(data_dir), "--out",
                     str(tmp_path / "never"), *FAST])
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda c: {**c, "scheduler": {"prediction_type": "v_prediction"}}, r"unknown keys \['scheduler'\]"),
    (lambda c: {**c, "unet": []}, r"unet must be an object of fields, got list"),
    (lambda c: {**c, "text_encoder": {**c["text_encoder"], "heads": 0}},
     r"text_encoder: heads must be an integer >= 1, got 0"),
    (lambda c: {**c, "unet": {**c["unet"], "head_dim": 0}}, r"unet: head_dim must be null or an integer >= 1, got 0"),
    (lambda c: {**c, "text_encoder": {**c["text_encoder"], "width": "32"}},
     r"text_encoder: width must be an integer >= 1, got '32'"),
    (lambda c: {**c, "unet": {**c["unet"], "model_channels": None}},
     r"unet: model_channels must be an integer >= 1, got None"),
    (lambda c: {**c, "unet": {**c["unet"], "num_res_blocks": -1}},
     r"unet: num_res_blocks must be an integer >= 0, got -1"),
    (lambda c: {**c, "unet": {**c["unet"], "channel_mult": [], "attention_levels": []}},
     r"unet: channel_mult must be a non-empty list of integers >= 1, got \[\]"),
    (lambda c: {**c, "unet": {**c["unet"], "attention_levels": [-1]}},
     r"unet: attention_levels must be a list of integers >= 0, got \[-1\]"),
    (lambda c: {**c, "vae": {**c["vae"], "scaling_factor": "x"}},
     r"vae: scaling_factor must be a number > 0, got 'x'"),
    (lambda c: {**c, "text_encoder": {**c["text_encoder"], "vocab_size": 10}},
     r"text_encoder: vocab_size must be at least 49408 \(the ids of CLIP's tokenizer\), got 10"),
    (lambda c: {**c, "text_encoder": {**c["text_encoder"], "use_bias": True}},
     r"text_encoder has unknown fields \['use_bias'\]"),
    (lambda c: {**c, "text_encoder": {**c["text_encoder"], "max_position": 1}},  # train.py then failed in the tokenizer
     r"text_encoder: max_position must be at least 2 \(a text's start and end tokens\), got 1"),
])
def test_an_init_config_field_of_the_wrong_kind_is_one_line_before_anything_is_written(edit, message, data_dir,
                                                                                      tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps(edit(TINY)))
    with pytest.raises(ValueError, match=rf"^--init-config {re.escape(str(config))}: {message}"):
        train.train(["--init-config", str(config), "--data", str(data_dir), "--out", str(tmp_path / "never"), *FAST])
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("drop, vae, message", [
    ("unet", False, r"missing the 'unet' config$"),
    ("text_encoder", False, r"missing the 'text_encoder' config$"),
    ("vae", False, r"missing the 'vae' config \(or pass --vae PATH\)$"),
    (None, True, r"'vae' config and --vae .*: choose one$"),
])
def test_an_init_config_missing_a_model_or_giving_the_vae_twice_is_one_line_naming_the_file(drop, vae, message,
                                                                                             sd_dir, data_dir,
                                                                                             tmp_path):
    config = tmp_path / "parts.json"
    config.write_text(json.dumps({k: v for k, v in TINY.items() if k != drop}))
    with pytest.raises(ValueError, match=rf"^--init-config {re.escape(str(config))}.*{message}"):
        train.train(["--init-config", str(config), *(["--vae", str(sd_dir)] if vae else []), "--data", str(data_dir),
                     "--out", str(tmp_path / "never"), *FAST])
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match=message):  # where the file is read, before any run directory is looked at
        loading.read_init_config(config, sd_dir if vae else None)


@pytest.mark.parametrize("key, change, message", [
    ("unet", {"num_res_blocks": 0}, r"unet: .*field 'layers_per_block' must be a positive integer, got 0"),
    ("unet", {"transformer_depth": 0}, r"unet: .*field 'transformer_layers_per_block' must be a positive integer"),
    ("vae", {"num_res_blocks": 0}, r"vae: .*field 'layers_per_block' must be a positive integer, got 0"),
    ("text_encoder", {"layers": 0}, r"text_encoder: .*field 'num_hidden_layers' must be a positive integer, got 0"),
    # diffusers' widths start at the first level's: another net read back, and the run could not load its base/
    ("unet", {"channel_mult": [2, 4]}, r"unet: .*would read back another net: .*channel_mult \(2, 4\) as \(1, 2\)"),
    ("vae", {"ch_mult": [2, 4]}, r"vae: .*would read back another net: .*ch_mult \(2, 4\) as \(1, 2\)"),
])
def test_an_init_config_its_base_folder_cannot_hold_is_refused_before_anything_is_written(key, change, message,
                                                                                          data_dir, tmp_path):
    """A from-scratch run keeps its initial models in base/, a diffusers folder (as --export writes): a config that
    builds a net here, but whose diffusers folder does not read back, trained to the end and then could not be
    loaded for the export, sampling or a resume."""
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({**TINY, key: {**TINY[key], **change}}))
    with pytest.raises(ValueError, match=rf"^--init-config {re.escape(str(config))}: {message}"):
        train.train(["--init-config", str(config), "--data", str(data_dir), "--out", str(tmp_path / "never"), *FAST,
                     "--max-steps", "1", "--export", str(tmp_path / "export")])
    assert not (tmp_path / "never").exists() and not (tmp_path / "export").exists()


@pytest.mark.parametrize("change", [{"head_dim": 8}, {"attention_levels": [1, 1]}, {"channel_mult": [1, 2],
                                                                                   "attention_levels": [1, 0]}])
def test_an_init_config_that_reads_back_as_the_same_net_in_other_words_is_taken(change, tmp_path):
    """The read-back check compared the configs field by field: a head_dim (which makes num_heads unread), levels
    listed twice or out of order were refused though base/ reads back the same net."""
    config = tmp_path / "same.json"
    config.write_text(json.dumps({**TINY, "unet": {**TINY["unet"], **change}}))
    loading.models_from_config(config)


def test_a_from_scratch_run_resumes_on_the_init_config_it_was_started_with_even_one_now_refused(sd_dir, data_dir,
                                                                                                 tmp_path):
    """A resume takes its models from the run's base/: the --init-config is only compared with run.json, so one that
    an older version accepted (a key it ignored, here) still resumes; a new run with it is refused."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({k: v for k, v in TINY.items() if k != "vae"}))
    run = train.train(["--init-config", str(config), "--vae", str(sd_dir), "--data", str(data_dir), "--out",
                       str(tmp_path / "run"), "--max-steps", "1", *FAST, "--checkpoint-every", "1"])
    older = {"note": "an older version ignored this key", **json.loads(config.read_text())}
    config.write_text(json.dumps(older))
    info = json.loads((run / "run.json").read_text())
    info["config"]["init_config"] = older
    (run / "run.json").write_text(json.dumps(info))
    train.train(["--init-config", str(config), "--vae", str(sd_dir), "--data", str(data_dir), "--resume", str(run),
                 "--max-steps", "2", *FAST, "--checkpoint-every", "1"])
    assert json.loads((run / "checkpoint-000002" / "state.json").read_text())["step"] == 2
    with pytest.raises(ValueError, match=r"unknown keys \['note'\]"):
        train.train(["--init-config", str(config), "--vae", str(sd_dir), "--data", str(data_dir), "--out",
                     str(tmp_path / "new"), "--max-steps", "1", *FAST])


def test_cli_refuses_a_device_this_machine_lacks_in_one_line(data_dir, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(tmp_path / "no-model"), "--data",
                        str(data_dir), "--out", str(tmp_path / "x"), "--device", "tpu:9"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "argument --device" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "x").exists()


def test_a_cuda_device_index_this_machine_lacks_is_refused_naming_the_flag(monkeypatch, capsys):
    """--device cuda:2 on a machine (or under a CUDA_VISIBLE_DEVICES) with two GPUs: torch.cuda.set_device used to
    stop it with a RuntimeError traceback ("invalid device ordinal")."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert train.build_parser().parse_args(["--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit) as e:
        train.build_parser().parse_args(["--device", "cuda:2"])
    assert e.value.code == 2
    assert re.search(r"argument --device: cuda:2: this machine has 2 CUDA devices \(cuda:0 to cuda:1\)",
                     capsys.readouterr().err)


def test_a_loss_term_added_in_ddm_py_alone_trains_and_is_logged(sd_dir, data_dir, tmp_path, monkeypatch):
    """The extension point: a new objective is a function in ddm.OBJECTIVES; train.py needs no edit."""
    def toy(b, indicator, hp):  # the authors' loss + 0.1 * mean(eps_hat^2)
        loss, parts = ddm.ddm(b, indicator, hp)
        extra = b.pred.float().pow(2).mean()
        return loss + 0.1 * extra, {**parts, "pred_sq": extra.detach()}

    monkeypatch.setitem(ddm.OBJECTIVES, "toy", ddm.Objective(toy, reads="pred"))  # one entry: its indicator reads ε̂
    common = ["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "0", "--max-steps", "2", *FAST]
    runs = {name: train.train([*common, "--out", str(tmp_path / name), "--objective", name]) for name in ("toy", "ddm")}
    log = log_lines(runs["toy"])
    assert [r["step"] for r in log] == [1, 2] and all(r["pred_sq"] > 0 for r in log)
    for r in log:  # the logged parts add up to the logged loss: the term really is in the trained loss
        assert r["loss"] == pytest.approx(0.95 * r["rec"] + 0.05 * r["ind"] + 0.1 * r["pred_sq"], rel=1e-5)
    assert "pred_sq" not in log_lines(runs["ddm"])[0]
    assert json.loads((runs["toy"] / "run.json").read_text())["config"]["objective"] == "toy"
    toy_w, ddm_w = (checkpoint_files(runs[n])["unet.safetensors"]["out.2.weight"] for n in ("toy", "ddm"))
    assert not torch.equal(toy_w, ddm_w)
    assert set(checkpoint_files(runs["toy"])) == {"unet.safetensors", "indicator.safetensors"}
    with pytest.raises(ValueError, match=r"started with objective='toy', now objective='ddm'"):
        train.train([*common, "--resume", str(runs["toy"]), "--objective", "ddm", "--max-steps", "3"])


def test_an_objective_whose_part_names_change_between_micro_batches_stops_the_run_naming_both(sd_dir, data_dir,
                                                                                            tmp_path, monkeypatch):
    """README, "Change the loss": the same part names at every step, because the step adds them up over micro-batches
    and DDP ranks in order. One process used to log whatever came (and torchrun died in gloo, or summed two parts
    into one); and a part named like a field train.py logs itself ("step") overwrote it in log.jsonl."""
    def flaky(b, indicator, hp):  # a part only where the first image is labelled "red"
        loss, parts = ddm.ddm(b, indicator, hp)
        return loss, {**parts, "red_first": b.t.float().mean()} if b.groups[0] == 0 else parts

    def named_step(b, indicator, hp):
        loss, parts = ddm.ddm(b, indicator, hp)
        return loss, {**parts, "step": b.t.float().mean()}

    monkeypatch.setitem(ddm.OBJECTIVES, "flaky", ddm.Objective(flaky, "pred"))
    monkeypatch.setitem(ddm.OBJECTIVES, "named-step", ddm.Objective(named_step, "pred"))
    common = ["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "0", "--max-steps", "4", *FAST,
              "--batch-size", "1"]  # one image per micro-batch: red, blue, ... in the shuffled order
    with pytest.raises(AssertionError, match=r"--objective flaky at step \d+ returned the parts \(.*\), where its "
                                             r"first micro-batch returned \(.*\): .*same part names"):
        train.train([*common, "--out", str(tmp_path / "flaky"), "--objective", "flaky"])
    with pytest.raises(AssertionError, match=r"--objective named-step at step 1: its part 'step' has the name of a "
                                             r"field train\.py logs itself"):
        train.train([*common, "--out", str(tmp_path / "step"), "--objective", "named-step"])


def test_a_part_not_measured_in_a_micro_batch_is_logged_as_the_mean_of_the_micro_batches_that_measured_it(
        sd_dir, data_dir, tmp_path, monkeypatch):
    """A NaN part (ddm.cross_entropy's logged value: no labelled image in that micro-batch) is left out of the
    step's mean, not counted as 0: "probe" measured 3.0 in one micro-batch of two logs 3.0, not 1.5 (a planted count
    of every micro-batch survived), and one measured in none logs NaN (null in log.jsonl)."""
    values = iter([float("nan"), 3.0, float("nan"), float("nan")])

    def probe(b, indicator, hp):
        rec = F.mse_loss(b.pred.float(), b.target.float())
        return rec, {"rec": rec.detach(), "probe": torch.tensor(next(values))}

    monkeypatch.setitem(ddm.OBJECTIVES, "probe", ddm.Objective(probe))
    t = trainer(sd_dir, data_dir, tmp_path / "run", "--objective", "probe", "--grad-accum", "2")
    t.ddp = t.model
    first, _ = t.step()
    assert first["probe"] == 3.0 and math.isfinite(first["rec"]) and first["loss"] == first["rec"]
    second, _ = t.step()
    assert math.isnan(second["probe"])


def test_a_flag_an_objective_names_that_is_no_flag_of_train_py_is_refused_naming_it(monkeypatch):
    """README: a knob is named in the entry's `flags`; named as on the command line ("--small-eps-weight") instead
    of as hp spells it, every run of every objective stopped with an AttributeError traceback."""
    monkeypatch.setitem(ddm.OBJECTIVES, "knob", ddm.Objective(ddm.ddm, "pred", flags=("small-eps-weight",)))
    args = train.build_parser().parse_args(["--model", "m", "--data", "d", "--out", "o", "--objective", "ddm"])
    with pytest.raises(ValueError, match=r"ddm\.OBJECTIVES\['knob'\]\.flags names 'small-eps-weight', which is no "
                                         r"flag of train\.py's objective group"):
        train.check_args(args)


def test_samples_json_records_the_checkpoint_of_the_run_it_sampled(lora_run, sd_dir, tmp_path):
    """A run keeps only its newest checkpoint: once it trained on, "model": the run directory no longer said which
    weights made the images."""
    argv = ["--prompt", "a red square", "--n", "1", "--steps", "1", "--height", str(RES), "--width", str(RES)]
    for model, checkpoint in ((lora_run, "checkpoint-000004"), (sd_dir, None)):
        sample.main(["--model", str(model), *argv, "--out", str(tmp_path / model.name)])
        assert json.loads((tmp_path / model.name / "samples.json").read_text())["checkpoint"] == checkpoint


def test_at_one_image_a_micro_batch_the_log_has_no_balanced_accuracy_rather_than_the_accuracy(sd_dir, data_dir,
                                                                                                 tmp_path):
    """At --batch-size 1 (the default) each micro-batch's balanced accuracy over the groups present was its one
    image's hit: the log's bacc equalled acc on every line."""
    run = train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(tmp_path / "r"), "--lora-rank",
                       "4", "--max-steps", "2", *FAST, "--batch-size", "1"])
    assert all(r["bacc"] is None and r["acc"] is not None for r in log_lines(run))


def test_the_logged_largest_importance_weight_is_the_steps_largest_not_a_mean_over_micro_batches(sd_dir, tmp_path,
                                                                                                 monkeypatch):
    """w_max was each micro-batch's largest weight averaged over the step: at one image a micro-batch, the mean
    weight, so a weight at --weight-clip in one micro-batch of four showed as a quarter of it."""
    calls = []

    def counted(q, *args):  # the k-th micro-batch's weights are all k
        calls.append(1)
        return torch.full((len(q),), float(len(calls)))

    monkeypatch.setattr(ddm, "importance_weights", counted)
    labelled = make_data(tmp_path / "d", groups=["red", "blue"] * 4)
    run = train.train(["--model", str(sd_dir), "--data", str(labelled), "--out", str(tmp_path / "iw"),
                       "--objective", "indicator-weighted", "--lora-rank", "4", "--max-steps", "1", *FAST,
                       "--batch-size", "1", "--grad-accum", "4"])
    assert [r["w_max"] for r in log_lines(run)] == [4.0]


def test_partial_labels_train_the_indicator_weighted_objective_and_its_indicator_guides_sampling(sd_dir, tmp_path):
    partial = make_data(tmp_path / "partial", groups=["red", None, "blue", None, "red", None, "blue", None])
    common = ["--model", str(sd_dir), "--data", str(partial), "--lora-rank", "4", "--max-steps", "2", *FAST]
    run = train.train([*common, "--out", str(tmp_path / "iw"), "--objective", "indicator-weighted"])
    log = log_lines(run)
    # equal labelled shares and a uniform target: every weight is sum_g q_g * 1 = 1 (it was >= 1 as a batch's max
    # of weights normalised to mean 1; now the value itself, up to float rounding); bacc is measured only on
    # micro-batches that hold both groups (null on a step with none)
    assert all(r["w_max"] == pytest.approx(1, abs=1e-6) and r["ind"] > 0 for r in log)
    assert all(r["bacc"] is None or 0 <= r["bacc"] <= 1 for r in log)
    assert checkpoints.latest_checkpoint(run).joinpath("indicator.safetensors").is_file()
    out = tmp_path / "guided"
    sample_args = ["--model", str(run), "--prompt", "a red square", "--n", "4", "--steps", "2", "--height", str(RES),
                   "--width", str(RES), "--indicator", str(run), "--target", "red=0.25,blue=0.75"]
    sample.main([*sample_args, "--indicator-guidance", "2", "--decide-at", "none", "--out", str(out)])
    record = json.loads((out / "samples.json").read_text())
    guidance = record["indicator_guidance"]  # what was applied: targets drawn per image from the shares, scale 2
    [targets] = guidance["prompts"]["a red square"]["target_groups"]
    assert len(targets) == 4 and set(targets) <= {"red", "blue"}
    assert guidance["prompts"]["a red square"]["scales"] == [2]
    assert guidance["scale"] == 2.0 and guidance["indicators"][0]["target"] == "red=0.25,blue=0.75"
    guided = np.stack([np.asarray(Image.open(out / f)) for f in record["files"]])
    sample.main([*sample_args, "--indicator-guidance", "0", "--out", str(tmp_path / "unguided")])
    assert json.loads((tmp_path / "unguided" / "samples.json").read_text())["indicator_guidance"] is None
    unguided = np.stack([np.asarray(Image.open(tmp_path / "unguided" / f)) for f in record["files"]])
    assert np.isfinite(guided).all() and guided.std() > 1 and not np.array_equal(guided, unguided)
    for bad, message in ((["--indicator-guidance", "-1"], "must be a number >= 0"),
                         (["--target", "green=1", "--indicator-guidance", "1"], "'green' is not a group")):
        with pytest.raises(SystemExit) as e:
            sample.main([*sample_args, *bad, "--out", str(tmp_path / "never")])
        assert message in str(e.value) or e.value.code == 2
    ddm_run = train.train([*common, "--out", str(tmp_path / "ddm"), "--objective", "ddm"])
    with pytest.raises(SystemExit, match="reads eps_hat, not"):
        sample.main([*sample_args[:-4], "--indicator", str(ddm_run), "--indicator-guidance", "1",
                     "--out", str(tmp_path / "never2")])
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--objective", "no-such-objective"])


def test_plain_indicator_trains_the_unet_exactly_as_plain_fine_tuning(sd_dir, data_dir, tmp_path):
    """Its indicator reads detached inputs and is clipped on its own, so the UNet cannot tell it is there: the
    guidance rows of the reproduction sample the plain fine-tunes themselves."""
    common = ["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "0", "--max-steps", "2", *FAST]
    plain = train.train([*common, "--out", str(tmp_path / "plain"), "--w-ind", "0"])
    guided = train.train([*common, "--out", str(tmp_path / "pi"), "--objective", "plain-indicator", "--w-ind", "1"])
    a, b = checkpoint_files(plain), checkpoint_files(guided)
    assert_same_tensors({"unet": a["unet.safetensors"]}, {"unet": b["unet.safetensors"]})
    assert "indicator.safetensors" in b and all(r["ind"] > 0 for r in log_lines(guided))


# ---- one step of the loop, observed from outside -----------------------------------------------------------------


def data_order(n, batch_size, seed, rank, world, count):
    """The one call into train.py's data order (re-point it when that moves): the dataset indices of this rank's
    first `count` micro-batches."""
    it = iter(data.micro_batch_indices(n, batch_size, seed, 0, rank, world))
    return [next(it) for _ in range(count)]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_shares_that_cover_each_epoch(world):
    n, batch, seed = 13, 2, 5
    per_epoch = n // (batch * world)  # global micro-batches per epoch; the remainder of the permutation is dropped
    ranks = [data_order(n, batch, seed, r, world, 2 * per_epoch) for r in range(world)]
    one_process = data_order(n, batch * world, seed, 0, 1, 2 * per_epoch)
    for m in range(2 * per_epoch):  # global micro-batch m is the one-process batch of world x batch, split by rank
        assert sum((ranks[r][m] for r in range(world)), []) == one_process[m]
    for epoch in range(2):
        seen = [i for r in range(world) for b in ranks[r][epoch * per_epoch:(epoch + 1) * per_epoch] for i in b]
        assert len(seen) == len(set(seen)) == per_epoch * batch * world  # disjoint, nothing read twice
        assert set(seen) <= set(range(n))
    assert one_process[:per_epoch] != one_process[per_epoch:]  # a new permutation every epoch


def test_load_run_applies_the_runs_lora_alpha(sd_dir, data_dir, tmp_path):
    run = train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(tmp_path / "run"),
                       "--lora-rank", "4", "--lora-alpha", "6", "--max-steps", "1", *FAST])
    adapters = load_file(checkpoints.latest_checkpoint(run) / "unet_lora.safetensors")
    base = loading.load_models(sd_dir).unet.state_dict()
    merged = loading.load_models(run).unet.state_dict()  # through load_run, LoRA merged
    names = sorted({k.rsplit(".", 1)[0] for k in adapters})
    assert names and json.loads((run / "run.json").read_text())["config"]["lora_alpha"] == 6
    for name in names:  # W = W0 + (alpha / r) B A (Hu et al. 2021, §4.1), alpha = 6, r = 4
        delta = 6 / 4 * adapters[f"{name}.lora_B"] @ adapters[f"{name}.lora_A"]
        assert delta.abs().max() > 1e-5  # a wrong alpha would move W by more than the tolerance below
        torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + delta, atol=2e-7, rtol=0)


def test_cached_latents_train_the_same_step_as_encoding_each_batch(sd_dir, data_dir, tmp_path):
    grads, logs = {}, {}
    for cache in (False, True):
        with StepRecorder() as rec:
            run = train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(tmp_path / str(cache)),
                               "--lora-rank", "4", "--max-steps", "1", *FAST] + ["--cache-latents"] * cache)
        grads[cache], logs[cache] = rec.grads(0), log_lines(run)[0]
    # the cache encodes the images in other batches than the loop does: float32 rounding apart, the same step
    assert logs[True]["loss"] == pytest.approx(logs[False]["loss"], rel=1e-5)
    assert grads[True].keys() == grads[False].keys()
    for k, g in grads[False].items():
        torch.testing.assert_close(grads[True][k], g, atol=1e-4 * g.abs().max().item(), rtol=0)


def test_export_writes_the_schedule_and_prediction_type_the_model_trained_with(sd_dir, tmp_path):
    from diffusers import DDPMScheduler
    schedules = {"sd_epsilon": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                 "sd_v": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction"),
                 "ddpm_linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)}
    for name, config in schedules.items():
        base = tmp_path / name
        base.mkdir()
        for part in ("unet", "vae", "text_encoder", "tokenizer"):
            (base / part).symlink_to(sd_dir / part, target_is_directory=True)
        DDPMScheduler(num_train_timesteps=1000, **config).save_pretrained(base / "scheduler")
        export = train.train(["--model", str(base), "--export", str(tmp_path / f"{name}_export")])
        trained = loading.load_models(base)  # the schedule train.py trains this base with
        exported = DDPMScheduler.from_pretrained(export, subfolder="scheduler")
        assert exported.config.prediction_type == trained.prediction_type == config.get("prediction_type", "epsilon")
        assert (exported.alphas_cumprod.double() - trained.alphas_cumprod).abs().max() < 1e-6, name
        again = loading.load_models(export)  # ... and our own loader reads the export back the same
        assert again.prediction_type == trained.prediction_type
        assert (again.alphas_cumprod - trained.alphas_cumprod).abs().max() < 1e-12, name
        written = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
        if name.startswith("sd"):  # SD v1.5's own schedule is written as its published config says, no listed betas
            assert written.get("trained_betas") is None, name
            assert (written["beta_schedule"], written["beta_start"], written["beta_end"],
                    written["num_train_timesteps"]) == ("scaled_linear", 0.00085, 0.012, 1000), name


@pytest.mark.parametrize("n", [500, 2000])
def test_training_draws_the_timesteps_of_the_models_own_schedule(n, sd_dir, data_dir, tmp_path):
    """A scheduler_config.json of another num_train_timesteps reads (and sample.py, --export follow it), but training
    drew t from SD's 0..999: an IndexError traceback at 500 steps, half the schedule never trained at 2000."""
    from diffusers import DDPMScheduler
    base = tmp_path / "base"
    base.mkdir()
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (base / part).symlink_to(sd_dir / part, target_is_directory=True)
    DDPMScheduler(num_train_timesteps=n, beta_schedule="scaled_linear", beta_start=0.00085,
                  beta_end=0.012).save_pretrained(base / "scheduler")
    models = loading.load_models(base)
    args = train.build_parser().parse_args([])
    inputs = train.micro_batch_inputs(torch.zeros(256, 4, 8, 8), torch.ones(256, 4, 8, 8), ["a red square"] * 256,
                                      models, args, torch.Generator().manual_seed(0), "cpu")
    assert 0 <= inputs["t"].min() and inputs["t"].max() < n and inputs["t"].max() >= 0.9 * n
    run = train.train(["--model", str(base), "--data", str(data_dir), "--out", str(tmp_path / "run"), "--max-steps",
                       "1", *FAST])
    assert loading.load_run(run).step == 1


def test_export_keeps_the_pad_token_of_an_sd2_tokenizer_folder(sd_dir, tmp_path):
    """SD v2.x's tokenizer folder pads with "!" (id 0): the export's tokenizer_config.json names it, so diffusers pads
    the exported model's prompts as the model was trained, not with <|endoftext|>."""
    from transformers import CLIPTokenizer
    base = tmp_path / "sd2"
    base.mkdir()
    for part in ("unet", "vae", "text_encoder"):
        (base / part).symlink_to(sd_dir / part, target_is_directory=True)
    shutil.copytree(sd_dir / "tokenizer", base / "tokenizer")
    (base / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    trained = loading.load_models(base).tokenizer(["a red square!"])
    assert trained[0, :8].tolist() == [49406, 320, 736, 3999, 0, 49407, 0, 0]
    export = train.train(["--model", str(base), "--export", str(tmp_path / "export")])
    assert CLIPTokenizer.from_pretrained(export / "tokenizer").pad_token_id == 0
    assert torch.equal(loading.load_models(export).tokenizer(["a red square!"]), trained)


def test_gradient_checkpointing_recomputes_the_unet_blocks_in_backward(sd_dir, data_dir, tmp_path):
    calls, grads = {}, {}
    for ckpt in (False, True):
        with StepRecorder() as rec:
            train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(tmp_path / str(ckpt)),
                         "--lora-rank", "0", "--max-steps", "1", *FAST, "--grad-accum", "1"]
                        + ["--gradient-checkpointing"] * ckpt)
        calls[ckpt], grads[ckpt] = rec.calls[ResBlock], rec.grads(0)
    # The whole UNet is trained, so backward needs every block: each res block runs again (with LoRA, blocks before
    # the first adapter need no backward and are not recomputed)
    assert calls[False] > 0 and calls[True] == 2 * calls[False]
    for k, g in grads[False].items():
        torch.testing.assert_close(grads[True][k], g, atol=1e-6 * g.abs().max().item(), rtol=0)


def test_clipping_and_weight_decay_each_change_one_step_as_adamw_says(sd_dir, data_dir, tmp_path):
    lr, wd, eps = 1e-2, 0.5, 1e-8
    common = ["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "4", "--max-steps", "1", *FAST,
              "--lr", str(lr), "--adam-eps", str(eps)]
    with StepRecorder() as free:
        train.train([*common, "--out", str(tmp_path / "free"), "--max-grad-norm", "0", "--weight-decay", "0"])
    def norms(grads):  # clipping is per network: the UNet (and text encoder) apart from the indicator
        return {net: torch.cat([v.flatten() for k, v in grads.items() if k.startswith(net)]).norm().item()
                for net in ("unet.", "indicator.")}

    raw = norms(free.grads(0))
    max_norm = raw["unet."] / 4
    with StepRecorder() as rec:
        run = train.train([*common, "--out", str(tmp_path / "run"), "--max-grad-norm", str(max_norm),
                           "--weight-decay", str(wd)])
    # clipping: each network's gradient keeps its direction at no more than max_norm (torch scales by
    # max_norm / (norm + 1e-6) when the norm exceeds it); the log keeps the UNet's raw norm
    assert log_lines(run)[0]["grad_norm"] == pytest.approx(raw["unet."], rel=1e-5)
    g = rec.grads(0)
    coef = {net: min(1.0, max_norm / (n + 1e-6)) for net, n in raw.items()}
    assert coef["unet."] == pytest.approx(0.25, rel=1e-4)
    for net, n in norms(g).items():
        assert n == pytest.approx(raw[net] * coef[net], rel=1e-5), net
    for k, v in free.grads(0).items():
        c = coef["unet."] if k.startswith("unet.") else coef["indicator."]
        torch.testing.assert_close(g[k], v * c, atol=1e-6 * v.abs().max().item(), rtol=1e-5)
    # AdamW's first step (Loshchilov & Hutter 2019, Alg. 2; m̂ = g, v̂ = g²): p ← p (1 − lr·wd) − lr g / (|g| + eps)
    saved = {f"unet.{k}": v for k, v in load_file(checkpoints.latest_checkpoint(run) / "unet_lora.safetensors").items()}
    saved.update({f"indicator.{k}": v for k, v in
                  load_file(checkpoints.latest_checkpoint(run) / "indicator.safetensors").items()})
    assert saved.keys() == g.keys()
    for k, p0 in rec.values(0).items():
        expected = p0 * (1 - lr * wd) - lr * g[k] / (g[k].abs() + eps)
        torch.testing.assert_close(saved[k], expected, atol=1e-7, rtol=1e-5)
    decayed = [k for k, p0 in rec.values(0).items() if k.endswith("lora_A")]  # A != 0 and, at step 1, g_A = 0:
    assert decayed and all(torch.equal(g[k], torch.zeros_like(g[k])) for k in decayed)  # only the decay moves A


# ---- partial labels, the indicator's learning rate, and each rank's share: the Trainer built without torchrun ------


def trainer(sd_dir, folder, out, *extra, rank=0, world=1):
    args = train.build_parser().parse_args(["--model", str(sd_dir), "--data", str(folder), "--out", str(out),
                                            "--lora-rank", "4", *FAST, *extra])
    train.check_args(args)
    return train.Trainer(args, rank, world, torch.device("cpu"))


@pytest.fixture(scope="module")
def partial_trainer(sd_dir, tmp_path_factory):
    """indicator-weighted on 3 red, 1 blue and 4 unlabelled images, the indicator at its own learning rate."""
    tmp = tmp_path_factory.mktemp("partial")
    folder = make_data(tmp / "data", groups=["red", None, "blue", None, "red", None, "red", None])
    return trainer(sd_dir, folder, tmp / "run", "--objective", "indicator-weighted", "--indicator-lr", "0.25")


def test_group_shares_count_the_labelled_images_only(partial_trainer):
    assert partial_trainer.data.group_names == ["blue", "red"]
    shares = partial_trainer.model.constants["group_shares"]
    torch.testing.assert_close(shares, torch.tensor([0.25, 0.75]))  # 1 blue, 3 red; the 4 unlabelled in neither


def test_indicator_lr_reaches_the_indicators_parameter_group(partial_trainer):
    net, ind = partial_trainer.optimizer.param_groups
    assert net["lr"] == 1e-3 and ind["lr"] == 0.25
    assert {id(p) for p in ind["params"]} == {id(p) for p in partial_trainer.indicator.parameters()}
    assert not {id(p) for p in net["params"]} & {id(p) for p in ind["params"]}


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_reads_its_own_shard_with_its_own_noise_seed(sd_dir, tmp_path, monkeypatch, rank):
    """Rank r of 2, built and stepped in this process (no process group: the barrier and the all-reduce of the
    logged means are stubbed), reads the images data.micro_batch_indices gives rank r and draws its noise from
    derive_seed(seed, "noise", step, micro, r). Captions name the images, so the batch read is visible."""
    folder = make_data(tmp_path / "data")
    lines = [{**json.loads(line), "text": f"image {i}"}
             for i, line in enumerate((folder / "metadata.jsonl").read_text().splitlines())]
    write_meta(folder, lines)
    monkeypatch.setattr(train, "_barrier", lambda world: None)
    monkeypatch.setattr(train.dist, "all_reduce", lambda tensor: None)
    t = trainer(sd_dir, folder, tmp_path / "run", "--grad-accum", "1", "--seed", "3", "--cache-latents", rank=rank,
                world=2)
    seen, inputs = [], train.micro_batch_inputs

    def recorded(mean, std, texts, models, args, generator, device):
        seen.append((texts, generator.initial_seed()))
        return inputs(mean, std, texts, models, args, generator, device)

    monkeypatch.setattr(train, "micro_batch_inputs", recorded)
    t.ddp = t.model
    for _ in range(2):
        t.step()
    shard = iter(data.micro_batch_indices(8, 2, 3, 0, rank, 2))
    assert seen == [([f"image {i}" for i in next(shard)], data.derive_seed(3, "noise", step, 0, rank))
                    for step in range(2)]


# ---- sample.py --indicator: a run's indicator, or its indicator.safetensors, and the --target shares -------------


@pytest.fixture(scope="module")
def indicator_run(sd_dir, data_dir, tmp_path_factory):
    """plain-indicator, 1 step: a noise-aware indicator over the groups blue (0) and red (1)."""
    return train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out",
                        str(tmp_path_factory.mktemp("runs") / "pi"), "--objective", "plain-indicator", "--w-ind", "1",
                        "--max-steps", "1", *FAST])


def sampled(out, *argv):
    sample.main(["--prompt", "a red square", "--n", "3", "--steps", "2", "--height", str(RES), "--width", str(RES),
                 "--out", str(out), *argv])
    record = json.loads((out / "samples.json").read_text())
    return np.stack([np.asarray(Image.open(out / f)) for f in record["files"]]), record


def drawn_targets(record):
    """The target group of each image, as samples.json records targets drawn per image (--decide-at none)."""
    return record["indicator_guidance"]["prompts"]["a red square"]["target_groups"][0]


def test_sample_with_an_exported_indicator_file_equals_sampling_with_its_run(indicator_run, tmp_path):
    exported = tmp_path / "indicator.safetensors"  # the file as the run's checkpoint saves it
    exported.write_bytes((checkpoints.latest_checkpoint(indicator_run) / "indicator.safetensors").read_bytes())
    common = ["--model", str(indicator_run), "--indicator-guidance", "20", "--decide-at", "none"]
    by_run, run_record = sampled(tmp_path / "run", *common, "--indicator", str(indicator_run))
    by_file, file_record = sampled(tmp_path / "file", *common, "--indicator", str(exported))
    unguided, _ = sampled(tmp_path / "none", "--model", str(indicator_run))
    assert np.abs(by_run.astype(int) - unguided).mean() > 1  # the guidance acts
    np.testing.assert_array_equal(by_file, by_run)
    assert drawn_targets(file_record) == drawn_targets(run_record)  # the file carries the run's group names
    assert file_record["indicator_guidance"]["indicators"][0]["groups"] == ["blue", "red"]


def test_sample_draws_the_targets_from_the_target_shares(indicator_run, tmp_path):
    seeds = list(range(6))
    assert set(guidance.draw_targets(seeds, torch.tensor([0.5, 0.5])).tolist()) == {0, 1}  # uniform: both groups
    _, record = sampled(tmp_path / "out", "--model", str(indicator_run), "--indicator", str(indicator_run),
                        "--n", "6", "--seed", "0", "--target", "blue=0,red=1", "--indicator-guidance", "0.01",
                        "--decide-at", "none")
    assert drawn_targets(record) == ["red"] * 6

"""train.py end to end on tiny models: the loss falls, resume is exact, torchrun's ranks agree, the export loads in
diffusers with our outputs, LoRA trains only adapters, w_ind = 0 is plain fine-tuning, bad input stops early."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import checkpoints
import ddm
import sample
import train
from data import ImageFolder

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


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny random SD pipeline folder written by diffusers/transformers themselves."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    root = tmp_path_factory.mktemp("sd")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=2).save_pretrained(root / "unet")
        AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                      sample_size=RES).save_pretrained(root / "vae")
        CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=77)).save_pretrained(
            root / "text_encoder")
    write_sd_tokenizer(root / "tokenizer")
    return root


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
            losses.append(F.mse_loss(models.unet(sample.add_noise(z0, noise, t, models.alphas_cumprod), t, context),
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


# ----------------------------------------------------------------------------------------------------------------


def test_fine_tune_reduces_the_loss_and_the_run_directory_loads_for_sampling(full_run, sd_dir, data_dir):
    before = denoising_loss(sample.load_models(sd_dir), data_dir)
    trained = sample.load_models(full_run)  # a run directory as sample.py --model takes it
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
    base = sample.load_models(sd_dir)
    run = sample.load_run(lora_run, merge=False)
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
    assert sample.load_run(runs["plain"]).indicator is None and sample.load_run(runs["ddm"]).indicator is not None
    assert not torch.equal(plain["unet.safetensors"]["out.2.weight"], ddm["unet.safetensors"]["out.2.weight"])
    for r in log_lines(runs["plain"]):
        assert r["ind"] is None and r["acc"] is None
        assert r["loss"] == pytest.approx(0.95 * r["rec"], rel=1e-6)
    assert all(r["ind"] is not None for r in log_lines(runs["ddm"]))


def test_export_loads_in_diffusers_with_our_outputs(full_run, lora_run, data_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    for run, merge in ((full_run, True), (lora_run, False)):
        export = train.train(["--model", str(run), "--export", str(tmp_path / run.name)])
        pipe = StableDiffusionPipeline.from_pretrained(export)
        ours = sample.load_run(run, merge=merge).models  # the LoRA run unmerged: the export must hold the merge
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
    image = pipe("a red square", num_inference_steps=2, height=RES, width=RES, output_type="np").images
    assert image.shape == (1, RES, RES, 3)
    with pytest.raises(FileExistsError, match="exists"):
        train.train(["--model", str(lora_run), "--export", str(tmp_path / lora_run.name)])
    with pytest.raises(FileExistsError, match="exists"):  # refused before training, not after it
        train.train(["--model", str(lora_run), "--data", str(data_dir), "--out",
                     str(tmp_path / "never-written"), "--export", str(tmp_path / lora_run.name)])
    assert not (tmp_path / "never-written").exists()


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
    from_scratch = sample.load_models(scratch / "base")  # the initial models; the VAE is the one --vae named
    assert_same_tensors({"vae": from_scratch.vae.state_dict()}, {"vae": sample.load_models(sd_dir).vae.state_dict()})
    for k in range(2):
        assert Image.open(scratch / "validation" / "step_000002" / f"{k:02d}.png").size == (RES, RES)

    tuned = train.train(["--model", str(scratch), "--data", str(data_dir), "--out", str(tmp_path / "tuned"),
                         "--lora-rank", "4", "--max-steps", "1", *FAST])
    base, run = sample.load_models(scratch), sample.load_run(tuned, merge=False)
    plain = {k: v for k, v in run.models.unet.state_dict().items() if ".lora_" not in k}
    assert_same_tensors({"unet": plain}, {"unet": base.unet.state_dict()})
    images = sample.generate(sample.load_models(tuned), ["a blue square"], [3], steps=2, height=RES, width=RES,
                             progress=False)
    assert images.shape == (1, RES, RES, 3)


def test_torchrun_two_processes_end_with_equal_weights(sd_dir, data_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--model", str(sd_dir), "--data", str(data_dir), "--out", str(out),
           "--lora-rank", "4", "--max-steps", "2", "--cache-latents", *FAST]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads((out / "run.json").read_text())["config"]["world_size"] == 2
    state = json.loads((checkpoints.latest_checkpoint(out) / "state.json").read_text())
    ranks = state["rank_fingerprints"]
    assert len(ranks) == 2 and ranks[0] == ranks[1]  # each rank hashed its own weights
    assert ranks[0] == checkpoints.fingerprint(checkpoint_files(out))  # ... and they are the saved ones
    assert [line["step"] for line in log_lines(out)] == [1, 2]


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
    other = make_data(tmp_path / "other")
    with pytest.raises(ValueError, match=r"started with data="):
        train.train([*common, "--data", str(other), "--resume", str(lora_run), "--lora-rank", "4"])
    assert sorted(p.name for p in lora_run.iterdir()) == before
    with pytest.raises(FileExistsError, match="not empty"):
        train.train([*common, "--data", str(data_dir), "--out", str(lora_run), "--lora-rank", "4"])


def test_cli_reports_bad_arguments_without_a_traceback(data_dir, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(data_dir), "--out", str(tmp_path / "x")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "give exactly one of --model" in r.stderr and "Traceback" not in r.stderr


def test_a_loss_term_added_in_ddm_py_alone_trains_and_is_logged(sd_dir, data_dir, tmp_path, monkeypatch):
    """The extension point: a new objective is a function in ddm.OBJECTIVES; train.py needs no edit."""
    def toy(b, indicator, hp):  # the authors' loss + 0.1 * mean(eps_hat^2)
        loss, parts = ddm.ddm(b, indicator, hp)
        extra = b.pred.float().pow(2).mean()
        return loss + 0.1 * extra, {**parts, "pred_sq": extra.detach()}

    monkeypatch.setitem(ddm.OBJECTIVES, "toy", toy)
    monkeypatch.setattr(ddm, "INDICATOR_OBJECTIVES", ddm.INDICATOR_OBJECTIVES | {"toy"})
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


def test_partial_labels_train_the_indicator_weighted_objective_and_its_indicator_guides_sampling(sd_dir, tmp_path):
    partial = make_data(tmp_path / "partial", groups=["red", None, "blue", None, "red", None, "blue", None])
    common = ["--model", str(sd_dir), "--data", str(partial), "--lora-rank", "4", "--max-steps", "2", *FAST]
    run = train.train([*common, "--out", str(tmp_path / "iw"), "--objective", "indicator-weighted"])
    log = log_lines(run)
    assert all(r["w_max"] >= 1 and 0 <= r["bacc"] <= 1 and r["ind"] > 0 for r in log)
    assert checkpoints.latest_checkpoint(run).joinpath("indicator.safetensors").is_file()
    out = tmp_path / "guided"
    sample_args = ["--model", str(run), "--prompt", "a red square", "--n", "4", "--steps", "2", "--height", str(RES),
                   "--width", str(RES), "--indicator", str(run), "--target", "red=0.25,blue=0.75"]
    sample.main([*sample_args, "--indicator-guidance", "2", "--out", str(out)])
    record = json.loads((out / "samples.json").read_text())
    assert len(record["target_groups"]) == 4 and set(record["target_groups"]) <= {"red", "blue"}
    assert record["indicator_guidance"] == 2.0
    guided = np.stack([np.asarray(Image.open(out / f)) for f in record["files"]])
    sample.main([*sample_args, "--indicator-guidance", "0", "--out", str(tmp_path / "unguided")])
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
        train.parse_args(["--objective", "no-such-objective"])


def test_plain_indicator_trains_the_unet_exactly_as_plain_fine_tuning(sd_dir, data_dir, tmp_path):
    """Its indicator reads detached inputs and is clipped on its own, so the UNet cannot tell it is there: the
    guidance rows of the reproduction sample the plain fine-tunes themselves."""
    common = ["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "0", "--max-steps", "2", *FAST]
    plain = train.train([*common, "--out", str(tmp_path / "plain"), "--w-ind", "0"])
    guided = train.train([*common, "--out", str(tmp_path / "pi"), "--objective", "plain-indicator", "--w-ind", "1"])
    a, b = checkpoint_files(plain), checkpoint_files(guided)
    assert_same_tensors({"unet": a["unet.safetensors"]}, {"unet": b["unet.safetensors"]})
    assert "indicator.safetensors" in b and all(r["ind"] > 0 for r in log_lines(guided))

"""A train.py run directory and the diffusers export: everything training writes to disk and reads back.

    run.json             the arguments, the configuration a resume must repeat (train.RESUME_FIELDS), the model
                         configs, the group names, the base model (an absolute path, or "base" for a from-scratch run)
    base/                from-scratch runs only: the initial random models as a diffusers folder
    checkpoint-000500/   the latest checkpoint (written as checkpoint-000500.tmp/, then renamed; the older one is
                         deleted only afterwards): unet[_lora].safetensors, text_encoder[_lora].safetensors when the
                         text encoder is trained, indicator.safetensors when the objective has one (ddm.uses_indicator),
                         optimizer.pt (AdamW and fp16 loss-scaler state, read back with weights_only=True),
                         state.json (step, elapsed time, per-rank weight hashes)
    log.jsonl            one line per step: step, loss, every part the objective reports, lr, grad_norm, time
    validation/step_000500/00.png …     with --validation-prompt

`sample.load_run` reads a run back (its base model, the trained tensors, the indicator); `export_diffusers` writes
any models as a diffusers StableDiffusionPipeline folder.
"""
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import lora
import weights
from clip_text import text_encoder_hf_config
from ddm import uses_indicator
from unet import unet_diffusers_config, unet_diffusers_names
from vae import vae_diffusers_config, vae_to_diffusers

UNET_LORA_TARGETS = ("to_q", "to_v")  # the authors' LoRA targets in the UNet attention
TEXT_LORA_TARGETS = ("q_proj", "v_proj")  # ... and in the CLIP text encoder


def write_json(path, obj):
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def save_tensors(tensors, path):
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def read_run_json(run_dir):
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a train.py run directory (no run.json)")
    return json.loads(path.read_text())


def base_path(run_dir, info):
    """The model a run started from: its own base/ folder (from scratch) or the --model it fine-tuned."""
    return Path(run_dir) / "base" if info["base"] == "base" else Path(info["base"])


def write_run(run_dir, config, models, latent_shape, args):
    """A new run directory: base/ for a from-scratch run, and run.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    from_scratch = config["init_config"] is not None
    if from_scratch:
        export_diffusers(models, run_dir / "base")
    write_json(run_dir / "run.json", {
        "format": "ddm-run/1", "config": config, "base": "base" if from_scratch else config["model"],
        "latent_shape": list(latent_shape), "prediction_type": models.prediction_type, "args": args,
        "model_configs": {k: dataclasses.asdict(getattr(models, k).config) for k in ("unet", "vae", "text_encoder")},
        "versions": {"torch": torch.__version__}, "created": time.strftime("%Y-%m-%d %H:%M:%S")})


def check_run_dir(run_dir, config, resume):
    """(latest checkpoint, base model) of a run to resume, after checking that it was started with this
    configuration; (None, None) for a new run, whose directory must be empty or absent."""
    if not resume:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(f"--out {run_dir} exists and is not empty; choose a new directory or --resume it")
        return None, None
    info = read_run_json(run_dir)
    for field, value in config.items():
        stored = info["config"].get(field, "ddm" if field == "objective" else None)  # runs before --objective
        if stored != value:
            raise ValueError(f"--resume {run_dir}: the run was started with {field}={stored!r}, now {field}="
                             f"{value!r}; resume with the same arguments (only --max-steps, checkpoint/validation/"
                             f"hardware flags may change)")
    return latest_checkpoint(run_dir), base_path(run_dir, info)


def open_log(run_dir, step):
    """log.jsonl in append mode, without the lines a crash left past the checkpoint at `step` (or cut half-way)."""
    path = run_dir / "log.jsonl"
    old = path.read_text().splitlines() if path.exists() else []
    if old and not old[-1].endswith("}"):
        old.pop()
    path.write_text("".join(line + "\n" for line in old if json.loads(line)["step"] <= step))
    return open(path, "a")


def log_step(log, record):
    """One line of log.jsonl; NaN (a part not measured) is written as null."""
    log.write(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}) + "\n")
    log.flush()


# ----------------------------------------------------------------------------------------------------------------
# What is trained, and what a checkpoint holds


def setup_trainable(models, lora_rank, lora_alpha, train_text_encoder):
    """Inject LoRA adapters (rank > 0) or leave the weights whole, and set requires_grad accordingly."""
    models.vae.requires_grad_(False)
    for model, targets, trained in ((models.unet, UNET_LORA_TARGETS, True),
                                    (models.text_encoder, TEXT_LORA_TARGETS, train_text_encoder)):
        if trained and lora_rank > 0:
            lora.inject_lora(model, targets, rank=lora_rank, alpha=lora_alpha)
            lora.mark_only_lora_trainable(model)
        else:
            model.requires_grad_(trained)


def checkpoint_parts(unet, text_encoder, indicator, config):
    """[(file name, model, LoRA rank)] a checkpoint holds: what is trained (adapters only with LoRA)."""
    suffix, rank = ("_lora" if config["lora_rank"] > 0 else ""), config["lora_rank"]
    parts = [(f"unet{suffix}.safetensors", unet, rank)]
    if config["train_text_encoder"]:
        parts.append((f"text_encoder{suffix}.safetensors", text_encoder, rank))
    if uses_indicator(config.get("objective", "ddm"), config["w_ind"]):  # runs before objectives: "ddm"
        parts.append(("indicator.safetensors", indicator, 0))
    return parts


def checkpoint_tensors(unet, text_encoder, indicator, config):
    """{file name: state dict} of a checkpoint: the adapters with LoRA, all the weights without."""
    return {file: lora.lora_state_dict(model) if rank > 0 else model.state_dict()
            for file, model, rank in checkpoint_parts(unet, text_encoder, indicator, config)}


def fingerprint(tensors):
    """sha256 of checkpoint_tensors(...), file by file and name by name: equal iff the weights are equal."""
    h = hashlib.sha256()
    for file in sorted(tensors):
        for name in sorted(tensors[file]):
            h.update(f"{file}/{name}".encode())
            h.update(tensors[file][name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def latest_checkpoint(run_dir):
    """The newest complete checkpoint directory (a *.tmp one was interrupted and does not count), or None."""
    done = [p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and not p.name.endswith(".tmp")]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def save_checkpoint(run_dir, step, tensors, optimizer, scaler, extra):
    """checkpoint-STEP.tmp/ filled and fsynced, renamed to checkpoint-STEP/, then older checkpoints deleted."""
    final = run_dir / f"checkpoint-{step:06d}"
    tmp = run_dir / f"checkpoint-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for file, state_dict in tensors.items():
        save_tensors(state_dict, tmp / file)
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=1) + "\n")
    for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, final)
    for old in run_dir.glob("checkpoint-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load_whole(model, state_dict, name):
    """Copy all of a model's tensors from a checkpoint (in place, keeping the tensors' layout), strictly."""
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    bad = [k for k in expected.keys() & state_dict.keys() if expected[k].shape != state_dict[k].shape]
    if missing or unexpected or bad:
        raise weights.CheckpointError(f"{name}: {len(missing)} tensors missing {missing[:5]}, {len(unexpected)} "
                                      f"unexpected {unexpected[:5]}, shapes differ for {sorted(bad)[:5]}")
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint_weights(ckpt, unet, text_encoder, indicator, config):
    """Copy a checkpoint's trained tensors into models built (and LoRA-injected) as the run built them."""
    for file, model, rank in checkpoint_parts(unet, text_encoder, indicator, config):
        state_dict = load_file(ckpt / file)
        if rank > 0:
            lora.load_lora_state_dict(model, state_dict)
        else:
            _load_whole(model, state_dict, str(ckpt / file))


def load_checkpoint(ckpt, unet, text_encoder, indicator, config, optimizer, scaler):
    """Resume from a checkpoint: the trained tensors, the optimizer and loss-scaler state; returns (step, elapsed)."""
    load_checkpoint_weights(ckpt, unet, text_encoder, indicator, config)
    device = next(p.device for group in optimizer.param_groups for p in group["params"])
    state = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    progress = json.loads((ckpt / "state.json").read_text())
    return progress["step"], progress["elapsed"]


# ----------------------------------------------------------------------------------------------------------------
# Export as a diffusers folder

SCHEDULER_CONFIG = {  # SD v1.5's scheduler/scheduler_config.json (PNDM with these values; DDIM reads them too)
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "beta_end": 0.012, "trained_betas": None, "prediction_type": "epsilon",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
    "timestep_spacing": "leading",
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.21.0",  # informational: loaders read the classes
    "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def scheduler_config(models):
    """SD v1.5's scheduler config with the model's prediction type; a model trained on another schedule gets that
    schedule's betas listed (trained_betas, β_t = 1 − ᾱ_t/ᾱ_{t−1}), which diffusers and read_schedule take first."""
    config = {**SCHEDULER_CONFIG, "prediction_type": models.prediction_type}
    c = SCHEDULER_CONFIG  # the scaled-linear schedule this config names: β_t = linspace(√β_start, √β_end, n)²
    sd = torch.cumprod(1 - torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, c["num_train_timesteps"],
                                          dtype=torch.float64) ** 2, 0)
    ac = models.alphas_cumprod.detach().double().cpu()
    if ac.shape != sd.shape or not torch.equal(ac, sd):
        betas = 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
        config.update(num_train_timesteps=len(ac), trained_betas=betas.tolist())
    return config


def write_tokenizer(tokenizer, folder):
    """An SD tokenizer/ folder (vocab.json, merges.txt, tokenizer_config.json) that CLIPTokenizer reads."""
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.encoder, ensure_ascii=False), encoding="utf-8")
    merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    end = tokenizer.decoder[tokenizer.end_id]
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.max_length, "do_lower_case": True,
        "bos_token": tokenizer.decoder[tokenizer.start_id], "eos_token": end, "unk_token": end, "pad_token": end})


def export_diffusers(models, out_dir):
    """Write `models` (LoRA merged) as a diffusers StableDiffusionPipeline folder, atomically (DIR.tmp, rename)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"--export {out_dir} exists; choose a new folder")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    parts = {"unet": (models.unet, "diffusion_pytorch_model.safetensors"),
             "vae": (models.vae, "diffusion_pytorch_model.safetensors"),
             "text_encoder": (models.text_encoder, "model.safetensors")}
    for name, (model, filename) in parts.items():
        if any(isinstance(m, lora.LoRALinear) for m in model.modules()):
            raise ValueError(f"export needs merged models: the {name} still has LoRA adapters (lora.merge_lora)")
        sd, cfg = {k: v.float() for k, v in model.state_dict().items()}, model.config
        if name == "unet":
            sd, config = weights.rename(sd, unet_diffusers_names(cfg)), unet_diffusers_config(cfg)
        elif name == "vae":
            sd, config = vae_to_diffusers(sd, cfg), vae_diffusers_config(cfg)
        else:
            config = text_encoder_hf_config(cfg)
        (tmp / name).mkdir(parents=True)
        save_tensors(sd, tmp / name / filename)
        write_json(tmp / name / "config.json", config)
    write_tokenizer(models.tokenizer, tmp / "tokenizer")
    (tmp / "scheduler").mkdir()
    write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config(models))
    write_json(tmp / "model_index.json", MODEL_INDEX)
    os.replace(tmp, out_dir)
    return out_dir

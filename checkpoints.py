"""A train.py checkpoint and the diffusers export: the weights training writes to disk and reads back.

    checkpoint-000500/   the latest checkpoint in a run directory (rundir.py), written as checkpoint-000500.tmp/,
                         read back, renamed, and only then the older one deleted: unet[_lora], text_encoder[_lora]
                         (when trained) and indicator (when the objective has one) .safetensors, optimizer.pt,
                         state.json (step, time, rank hashes)

Only these names are touched: a user's checkpoint-000500-bak/ or notes beside them stay as they are. A resume takes
the newest checkpoint that reads whole, naming any broken one it passes over; no NaN or infinite tensor is ever
written. `export_diffusers` writes models as a diffusers pipeline folder, and a run's indicator beside them.
"""
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

import cli
import diffusion
import lora
import weights
from clip_text import WEIGHT_NAMES as TEXT_ENCODER_FILES
from clip_text import text_encoder_config_from_hf, text_encoder_hf_config
from ddm import uses_indicator
from unet import WEIGHT_NAMES as UNET_FILES
from unet import unet_config_from_diffusers, unet_diffusers_config, unet_diffusers_names
from vae import WEIGHT_NAMES as VAE_FILES
from vae import vae_config_from_diffusers, vae_diffusers_config, vae_to_diffusers

UNET_LORA_TARGETS = ("to_q", "to_v")  # the authors' LoRA targets in the UNet attention
TEXT_LORA_TARGETS = ("q_proj", "v_proj")  # ... and in the CLIP text encoder
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d{6,})(\.tmp)?")  # exactly what save_checkpoint writes
INDICATOR_FILE = "indicator.safetensors"  # the indicator of a checkpoint, beside the UNet's file
CHECKPOINT_FILES = {"state.json", "optimizer.pt", INDICATOR_FILE, "unet.safetensors", "unet_lora.safetensors",
                    "text_encoder.safetensors", "text_encoder_lora.safetensors"}  # save_checkpoint's, in any run
ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq"}  # per parameter, in optimizer.pt (make_optimizer: no amsgrad)
# the three models of a diffusers folder, each in its subfolder: (weight file names, config -> its config.json, back)
COMPONENTS = {"unet": (UNET_FILES, unet_diffusers_config, unet_config_from_diffusers),
              "vae": (VAE_FILES, vae_diffusers_config, vae_config_from_diffusers),
              "text_encoder": (TEXT_ENCODER_FILES, text_encoder_hf_config, text_encoder_config_from_hf)}


def find_components(path):
    """{subfolder: weights.find_component of it} of the model at `path`: a diffusers folder, or one single file."""
    return {sub: weights.find_component(path, subfolder=sub, weight_names=c[0]) for sub, c in COMPONENTS.items()}


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------
# What is trained, and what a checkpoint holds


def make_optimizer(params, args):
    """AdamW with the authors' settings (from train.py's args). fused=True: one kernel for all parameters instead of
    a Python loop over them (PyTorch's CPU default), ~20% of a tiny model's LoRA step; the same update rule."""
    return torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.adam_betas), eps=args.adam_eps,
                             weight_decay=args.weight_decay, fused=True)


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
    if uses_indicator(config["objective"], config["w_ind"]):
        parts.append((INDICATOR_FILE, indicator, 0))
    return parts


def checkpoint_files(config):
    """The .safetensors files a checkpoint of a run with this configuration holds."""
    return [file for file, _, _ in checkpoint_parts(None, None, None, config)]


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


def _checkpoint_dirs(run_dir):
    """[(step, folder, finished)] of the folders save_checkpoint writes, oldest first: checkpoint-NNNNNN, and
    checkpoint-NNNNNN.tmp (finished False) that an interrupted save left. No other name: checkpoint-000002-bak/
    or checkpoint-mine/ is the user's. CheckpointError for one of these names that is a symbolic link: passed over,
    the run would start again from an older step (or step 0); read, it would be replaced and deleted through."""
    found = []
    for p in Path(run_dir).iterdir():
        m = CHECKPOINT_NAME.fullmatch(p.name)
        if m:
            refuse_link(p)
            if p.is_dir():
                found.append((int(m[1]), p, m[2] is None))
    return sorted(found)


def refuse_link(folder):
    """CheckpointError when a checkpoint folder is a symbolic link (train.py writes, replaces and deletes its own)."""
    if folder.is_symlink():
        raise weights.CheckpointError(f"{folder} is a symbolic link; train.py writes, replaces and deletes its "
                                      f"checkpoint folders itself: put the folder itself there, or move the link away")


def finished_name(name):
    """Whether `name` is a checkpoint folder's name as save_checkpoint leaves it (not an interrupted *.tmp)."""
    m = CHECKPOINT_NAME.fullmatch(name)
    return bool(m) and m[2] is None


def latest_checkpoint(run_dir):
    """The newest complete checkpoint directory (a *.tmp one was interrupted and does not count), or None."""
    done = [p for _, p, finished in _checkpoint_dirs(run_dir) if finished]
    return done[-1] if done else None


def _non_finite(tensors, optimizer_state=None):
    """'FILE: NAME' of the first tensor holding NaN or ±inf in {file: state dict} (and the optimizer's state), or
    None."""
    named = [(f"{file}: {name}", t) for file, sd in tensors.items() for name, t in sd.items()]
    if optimizer_state is not None:
        named += [(f"optimizer.pt: state {i} {name}", t) for i, s in optimizer_state["state"].items()
                  for name, t in s.items()]
    return next((name for name, t in named if torch.is_tensor(t) and t.is_floating_point()
                 and not torch.isfinite(t).all()), None)


def _read_optimizer(path, device, mmap=False):
    """optimizer.pt's {"optimizer", "scaler"}; CheckpointError naming the file when it does not read."""
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # cut short (no zip directory), another format, ...: all name the file
        raise weights.CheckpointError(f"cannot read {path}: {str(e).split('. ')[0]}") from e
    why = _optimizer_error(state)
    if why:
        raise weights.CheckpointError(f"{path}: {why}")
    return state


def _optimizer_error(state):
    """Why `state` is not what train.py writes to optimizer.pt (AdamW's state for parameters of its groups), or None."""
    if not isinstance(state, dict) or not {"optimizer", "scaler"} <= state.keys():
        return "not a train.py optimizer.pt"
    try:
        saved = state["optimizer"]
        params = {i for group in saved["param_groups"] for i in group["params"]}
        for i, s in saved["state"].items():
            if i not in params:
                return f"state {i} belongs to no parameter of its groups"
            if set(s) != ADAMW_STATE:
                return f"state {i} holds {sorted(s)}, not AdamW's {sorted(ADAMW_STATE)}"
    except (KeyError, TypeError, AttributeError):
        return "not a train.py optimizer.pt (no AdamW state dict)"
    return None


def _load_optimizer(optimizer, saved, path):
    """Load optimizer.pt's AdamW state into `optimizer`; CheckpointError naming the file when it does not fit the
    parameters (torch's own load checks the group sizes only)."""
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError) as e:
        raise weights.CheckpointError(f"{path}: {e}") from None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        for name, t in optimizer.state.get(p, {}).items():
            if name != "step" and t.shape != p.shape:
                raise weights.CheckpointError(f"{path}: state {i} {name} has shape {tuple(t.shape)}, its parameter "
                                              f"{tuple(p.shape)}")


def read_checkpoint(ckpt, files, optimizer_device=None):
    """A checkpoint folder read whole: {"path", "step", "elapsed", "tensors": {file: state dict}, "optimizer":
    optimizer.pt's dict, only when read onto `optimizer_device`}. CheckpointError (or FileNotFoundError) naming
    the file that is missing, cut short, holds a tensor that is not finite, or (state.json) a step the folder's name
    does not."""
    ckpt = Path(ckpt)
    state = weights.read_json(ckpt / "state.json")
    if not isinstance(state.get("step"), int) or not isinstance(state.get("elapsed"), (int, float)):
        raise weights.CheckpointError(f"{ckpt / 'state.json'}: needs an integer 'step' and a number 'elapsed'")
    named = CHECKPOINT_NAME.fullmatch(ckpt.name)
    if named and int(named[1]) != state["step"]:  # the weights of one step, the log and data order of another
        raise weights.CheckpointError(f"{ckpt / 'state.json'}: step {state['step']}, but the folder is {ckpt.name}")
    tensors = {file: weights.read_state_dict(ckpt / file) for file in files}
    bad = _non_finite(tensors)
    if bad:
        raise weights.CheckpointError(f"{ckpt}/{bad} is not finite")
    optimizer = None if optimizer_device is None else _read_optimizer(ckpt / "optimizer.pt", optimizer_device)
    return {"path": ckpt, "step": state["step"], "elapsed": state["elapsed"], "tensors": tensors,
            "optimizer": optimizer}


def newest_checkpoint(run_dir, files, optimizer_device=None, say=True):
    """read_checkpoint of the newest checkpoint that reads, passing over broken ones and naming them on stderr;
    None for a run without checkpoints; CheckpointError naming every broken file when none reads."""
    broken = []
    for path in reversed([p for _, p, finished in _checkpoint_dirs(run_dir) if finished]):
        try:
            ckpt = read_checkpoint(path, files, optimizer_device)
        except (ValueError, OSError) as e:  # CheckpointError is a ValueError
            broken.append(str(e))
            continue
        if broken and say:
            print(f"warning: {'; '.join(broken)}; falling back to {path.name}", file=sys.stderr)
        return ckpt
    if broken:
        raise weights.CheckpointError(f"{'; '.join(broken)}; no checkpoint of {run_dir} reads (move the broken one "
                                      f"away to start again from step 0)")
    return None


def _check_read_back(tmp, tensors):
    """Read a checkpoint just written back whole; CheckpointError unless every tensor is as written."""
    try:
        back = read_checkpoint(tmp, list(tensors))
        _read_optimizer(tmp / "optimizer.pt", "cpu", mmap=True)  # its structure; the tensors stay on disk
        for file, sd in tensors.items():
            got = back["tensors"][file]
            differs = [k for k in sd if k not in got or not torch.equal(got[k], sd[k].detach().cpu())]
            if differs or got.keys() != sd.keys():
                raise weights.CheckpointError(f"{tmp / file}: tensor {(differs or ['names'])[0]} differs")
    except (ValueError, OSError) as e:
        raise weights.CheckpointError(f"{tmp.name[:-4]} does not read back as written, so it was not kept (the older "
                                      f"checkpoints are): {e}") from e


def save_checkpoint(run_dir, step, tensors, optimizer, scaler, extra, metadata=None):
    """checkpoint-STEP.tmp/ filled, fsynced and read back whole, renamed to checkpoint-STEP/, and only then the
    older checkpoints deleted. A NaN or infinite tensor is never written: FloatingPointError naming it.
    `metadata`: {file: {key: str}} stored in those safetensors files (the indicator's, ddm.indicator_metadata)."""
    state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None}
    bad = _non_finite(tensors, state["optimizer"])
    if bad:
        raise FloatingPointError(f"{bad} is not finite at step {step}: no checkpoint written")
    final = run_dir / f"checkpoint-{step:06d}"
    tmp = run_dir / f"checkpoint-{step:06d}.tmp"
    why = foreign_error(run_dir, lambda s: s == step)  # rundir.open_run asked before training; the folder may be new
    if why:
        raise weights.CheckpointError(why)
    shutil.rmtree(tmp, ignore_errors=True)  # an interrupted save of this step
    with weights.writing(tmp):
        tmp.mkdir()
    try:
        for file, state_dict in tensors.items():
            weights.save_tensors(state_dict, tmp / file, (metadata or {}).get(file))
        weights.save_torch(state, tmp / "optimizer.pt")
        weights.write_text(tmp / "state.json", json.dumps({"step": step, **extra}, indent=1) + "\n")
        for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
            _fsync(f)
        _check_read_back(tmp, tensors)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # a broken checkpoint of this step that the resume passed over
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(run_dir)
    for old in [p for _, p, _ in _checkpoint_dirs(run_dir) if p != final]:
        theirs = foreign_files(old)  # a run or export saved under a checkpoint's name, a file put in a checkpoint
        if theirs:
            print(f"note: {old} is kept: it holds {theirs[0].name}, which a checkpoint does not", file=sys.stderr)
        else:
            shutil.rmtree(old, ignore_errors=True)
    return final


def foreign_files(folder):
    """The entries of a checkpoint-named folder that save_checkpoint does not write (any but its files): such a
    folder is the user's (a run, an export saved under that name), never deleted as an old or broken checkpoint."""
    return [p for p in sorted(folder.iterdir()) if p.name not in CHECKPOINT_FILES or not p.is_file() or p.is_symlink()]


def foreign_error(run_dir, saves):
    """Why train.py cannot save its steps in `run_dir`, or None: a checkpoint-named folder of a step it saves
    (`saves(step)` is true) that holds a file no checkpoint does is the user's, not train.py's to replace."""
    for step, folder, _ in _checkpoint_dirs(run_dir):
        theirs = foreign_files(folder) if saves(step) else []
        if theirs:
            return (f"{folder} holds {theirs[0].name}, which a checkpoint does not: it is not train.py's to replace; "
                    f"move it away to save step {step} there")
    return None


def load_checkpoint_weights(ckpt, unet, text_encoder, indicator, config):
    """Copy a checkpoint's trained tensors (read_checkpoint) into models built (and LoRA-injected) as the run built
    them."""
    for file, model, rank in checkpoint_parts(unet, text_encoder, indicator, config):
        if rank > 0:
            lora.load_lora_state_dict(model, ckpt["tensors"][file], str(ckpt["path"] / file))
        else:
            weights.load_strict(model, ckpt["tensors"][file], str(ckpt["path"] / file), assign=False)


def load_checkpoint(ckpt, unet, text_encoder, indicator, config, optimizer, scaler):
    """Resume from a checkpoint (read_checkpoint with the optimizer): the trained tensors, the optimizer and
    loss-scaler state; returns (step, elapsed, its folder), or (0, 0.0, None) for ckpt None (a run from step 0)."""
    if ckpt is None:
        return 0, 0.0, None
    load_checkpoint_weights(ckpt, unet, text_encoder, indicator, config)
    _load_optimizer(optimizer, ckpt["optimizer"]["optimizer"], ckpt["path"] / "optimizer.pt")
    if scaler is not None and ckpt["optimizer"]["scaler"]:
        scaler.load_state_dict(ckpt["optimizer"]["scaler"])
    return ckpt["step"], ckpt["elapsed"], ckpt["path"]


# ----------------------------------------------------------------------------------------------------------------
# Export as a diffusers folder

SCHEDULER_CONFIG = {  # SD v1.5's scheduler/scheduler_config.json (PNDM with these values; DDIM reads them too)
    "_class_name": "PNDMScheduler", "num_train_timesteps": diffusion.N_TRAIN_TIMESTEPS,
    "beta_schedule": "scaled_linear", "beta_start": diffusion.BETA_START, "beta_end": diffusion.BETA_END,
    "trained_betas": None, "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": diffusion.STEPS_OFFSET, "clip_sample": False, "timestep_spacing": "leading",
}
MODEL_INDEX_FILE = "model_index.json"  # what makes a folder a diffusers pipeline (and a train.py export)
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
    ac, sd = models.alphas_cumprod.detach().double().cpu(), diffusion.sd_schedule()
    if ac.shape != sd.shape or not torch.equal(ac, sd):
        betas = 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
        config.update(num_train_timesteps=len(ac), trained_betas=betas.tolist())
    return config


def schedule_record(alphas_cumprod):
    """What run.json records of the schedule a run trains on: its length and ᾱ at every tenth of it (to 9 digits,
    which every machine rounds alike), enough to tell another schedule (loading.check_schedule)."""
    ac = alphas_cumprod.detach().double().cpu()
    return {"timesteps": len(ac), "alphas_cumprod": [float(f"{a:.9g}") for a in ac[::max(len(ac) // 10, 1)].tolist()]}


def write_tokenizer(tokenizer, folder):
    """An SD tokenizer/ folder (vocab.json, merges.txt, tokenizer_config.json) that CLIPTokenizer reads."""
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.encoder, ensure_ascii=False), encoding="utf-8")
    merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    end = tokenizer.decoder[tokenizer.end_id]
    weights.write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.max_length, "do_lower_case": True,
        "bos_token": tokenizer.decoder[tokenizer.start_id], "eos_token": end, "unk_token": end,
        "pad_token": tokenizer.decoder[tokenizer.pad_id]})  # <|endoftext|>, or SD v2.x's "!"


def check_export(out_dir, run_dir=None):
    """Refuse an export folder that exists, or whose DIR.tmp does: neither was written by this export (None: no
    export); one in the run directory `run_dir`, whose names train.py writes; one named like a weight file; or one
    that cannot be made, where its nearest existing folder is a file or not writable."""
    if out_dir is None:
        return
    out_dir = Path(os.path.normpath(out_dir))  # "new/../x" is x: the export makes "new" first, then writes x
    inside = run_dir is not None and Path(run_dir).absolute() in (out_dir.absolute(), *out_dir.absolute().parents)
    for p in () if inside else (out_dir, out_dir.with_name(out_dir.name + ".tmp")):
        if p.exists() or p.is_symlink():
            raise FileExistsError(f"--export {out_dir}: {p} exists; choose a new folder, or move it away")
    single = out_dir.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # what other tools read
    why = ("it lies in the run directory, whose files train.py writes; give a folder outside it" if inside else
           "it writes a diffusers folder, not one file; give a folder name" if single else
           cli.folder_error(out_dir.absolute()))
    if why:
        raise weights.WriteError(f"--export {out_dir}: {why}")


def export_diffusers(models, out_dir, source=None, indicator=None, indicator_metadata=None):
    """Write `models` (LoRA merged) as a diffusers StableDiffusionPipeline folder, atomically (DIR.tmp, rename); a
    run's `indicator` goes beside them as INDICATOR_FILE with its record (sample.py --indicator reads it back), and
    `source` (the model, checkpoint and step it was written from) as export.json (None for a run's base/, which
    run.json describes)."""
    out_dir = Path(out_dir)
    check_export(out_dir)
    assert not any(isinstance(m, lora.LoRALinear) for name in COMPONENTS for m in getattr(models, name).modules()), \
        "export needs merged models (lora.merge_lora)"
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    with weights.writing(tmp):
        tmp.mkdir(parents=True)  # fails if it appeared since check_export: then it is not ours to delete
    try:
        with weights.writing(tmp):  # what is written below without a name of its own (folders) is named by the export's
            _write_diffusers(models, tmp)
            if source is not None:
                weights.write_json(tmp / "export.json", source)
            if indicator is not None:
                weights.save_tensors(indicator.state_dict(), tmp / INDICATOR_FILE, indicator_metadata)
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_diffusers(models, tmp):
    for name, (files, write_config, _) in COMPONENTS.items():
        model = getattr(models, name)
        sd, cfg = {k: v.float() for k, v in model.state_dict().items()}, model.config
        if name == "unet":
            sd = weights.rename(sd, unet_diffusers_names(cfg))
        elif name == "vae":
            sd = vae_to_diffusers(sd, cfg)
        (tmp / name).mkdir()
        weights.save_tensors(sd, tmp / name / files[0])
        weights.write_json(tmp / name / "config.json", write_config(cfg))
    write_tokenizer(models.tokenizer, tmp / "tokenizer")
    (tmp / "scheduler").mkdir()
    weights.write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config(models))
    weights.write_json(tmp / MODEL_INDEX_FILE, MODEL_INDEX)

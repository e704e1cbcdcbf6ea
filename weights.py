"""Reading Stable Diffusion v1.x weights from either public layout, strictly.

The same weights are published two ways:
  single file   v1-5-pruned-emaonly.safetensors (or .ckpt): every model in one file, each under a prefix
                (`model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.`);
  diffusers     a folder with unet/, vae/, text_encoder/, tokenizer/, each holding a config.json.
Each model file (unet.py, vae.py, clip_text.py) says where its tensors live and, where the two layouts name them
differently, gives a renaming table; this file only finds, reads, renames and checks tensors.

Models are built on the meta device and take the checkpoint's tensors by assignment, so a 3.4 GB UNet never
exists twice in memory.
"""
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

# Tensors a single-file checkpoint carries that no model here loads: the DDPM schedule buffers (recomputed in
# float64 by the sampler), the EMA copy, and CLIP's `position_ids` (an arange, stored by some files only).
IGNORED = re.compile(
    r"(^|\.)(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_\w+|posterior_\w+|log_one_minus_alphas_cumprod)$"
    r"|^model_ema\.|(^|\.)position_ids$"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose tensors do not match the model."""


def read_state_dict(path, prefix="", dtype=None):
    """Tensors of one file whose names start with `prefix`, with the prefix stripped.

    .safetensors is read lazily (only the asked keys); .ckpt/.pt/.bin only through
    `torch.load(weights_only=True)`, which refuses to unpickle arbitrary objects. Floating tensors are cast to
    `dtype` when given.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    cast = (lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return {k[len(prefix):]: cast(f.get_tensor(k)) for k in f.keys() if k.startswith(prefix)}
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # mmap needs the zip format; the legacy pickle format loads without it
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files, wrong formats, pickles of objects: all name the path
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # CompVis .ckpt wraps everything
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return {k[len(prefix):]: cast(v) for k, v in obj.items() if k.startswith(prefix) and torch.is_tensor(v)}


def read_component(path, *, subfolder, single_file_prefix, weight_names, dtype=None):
    """One model's tensors from a single file, a diffusers pipeline folder, or that folder's `subfolder`.

    Returns (state_dict, config): `config` is the diffusers/transformers config.json as a dict, or None for a
    single-file checkpoint (whose names are CompVis names, stripped of `single_file_prefix`).
    """
    path = Path(path)
    if path.is_file():
        sd = read_state_dict(path, single_file_prefix, dtype)
        if not sd:
            raise CheckpointError(f"{path} has no tensors under '{single_file_prefix}'")
        return sd, None
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint file or folder at {path}")
    for folder in (path / subfolder, path):
        for name in weight_names:
            if (folder / name).is_file():
                config = folder / "config.json"
                if not config.is_file():
                    raise FileNotFoundError(f"{folder} has {name} but no config.json")
                return read_state_dict(folder / name, "", dtype), json.loads(config.read_text())
    raise FileNotFoundError(
        f"{path} is neither a single-file checkpoint nor a diffusers folder: looked for "
        f"{subfolder}/{{{','.join(weight_names)}}} and {{{','.join(weight_names)}}} inside it")


def rename(state_dict, table):
    """Rename keys by their longest module prefix found in `table` ({old_prefix: new_prefix}, no trailing dot).

    One table serves both directions: pass `{v: k for k, v in table.items()}` to go back.
    """
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            new = table.get(".".join(parts[:i]))
            if new is not None:
                key = ".".join([new] + parts[i:])
                break
        out[key] = value
    return out


def _examples(keys, n=5):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_strict(model, state_dict, name="model"):
    """Load `state_dict` into `model` (usually built on the meta device) by assignment, checking everything.

    Ignored tensors (IGNORED) are dropped; any other missing or unexpected tensor, or a shape mismatch, raises
    CheckpointError naming the counts and the first few keys, or the tensor and both shapes.
    """
    state_dict = {k: v for k, v in state_dict.items() if not IGNORED.search(k)}
    expected = model.state_dict()
    missing, unexpected = expected.keys() - state_dict.keys(), state_dict.keys() - expected.keys()
    if missing or unexpected:
        raise CheckpointError(
            f"{name}: the checkpoint does not match the model: {len(missing)} tensors missing"
            + (f" ({_examples(missing)})" if missing else "")
            + f", {len(unexpected)} unexpected" + (f" ({_examples(unexpected)})" if unexpected else "")
            + f"; the model has {len(expected)} tensors, the checkpoint {len(state_dict)}")
    for k, v in state_dict.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{name}: tensor {k} has shape {tuple(v.shape)} in the checkpoint but "
                                  f"{tuple(expected[k].shape)} in the model")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model

"""Reading Stable Diffusion v1.x weights from either public layout, strictly; writing files atomically.

The same weights are published two ways:
  single file   v1-5-pruned-emaonly.safetensors (or .ckpt): every model in one file, each under a prefix
                (`model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.`);
  diffusers     a folder with unet/, vae/, text_encoder/, tokenizer/, each holding a config.json.
Each model file (unet.py, vae.py, clip_text.py) says where its tensors live and, where the two layouts name them
differently, gives a renaming table; this file only finds, reads, renames and checks tensors.

Models are built on the meta device and take the checkpoint's tensors by assignment, so a 3.4 GB UNet never
exists twice in memory. Every JSON, report and metadata file the code writes goes through `write_atomic` (PATH.tmp,
then a rename; checkpoints are whole folders renamed into place, the training log is appended a line at a time),
and a failed write is one WriteError naming the path.
"""
import contextlib
import errno
import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# Tensors a single-file checkpoint carries that no model here loads: the DDPM schedule buffers (recomputed in
# float64 by the sampler), the EMA copy, and CLIP's `position_ids` (an arange, stored by some files only).
IGNORED = re.compile(
    r"(^|\.)(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_\w+|posterior_\w+|log_one_minus_alphas_cumprod)$"
    r"|^model_ema\.|(^|\.)position_ids$"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose tensors do not match the model."""


def existing_file(path, what="file"):
    """`path` as a Path; FileNotFoundError "WHAT PATH not found" unless it is a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    return path


def read_json(path):
    """The JSON object (a dict) in a file such as a config.json; CheckpointError naming the file, and the line
    where there is one, for a file that cannot be read or holds anything else."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        why = f"cannot read {path}: {e.strerror or e}"
    except UnicodeDecodeError as e:
        why = f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
    except json.JSONDecodeError as e:
        why = f"{path}, line {e.lineno}: not valid JSON ({e.msg})"
    except ValueError as e:  # a number Python will not convert: an integer of over 4300 digits
        why = f"{path}: not valid JSON ({e})"
    else:
        why = None if isinstance(obj, dict) else f"{path}: expected a JSON object {{...}}, got {type(obj).__name__}"
    if why:
        raise CheckpointError(why)
    return obj


def is_int(v, low=1):
    """An integer >= low, and not JSON's true or false (Python's bool is an int)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def is_number(v, positive=False):
    """An int or a float, not a bool; with `positive`, a finite one > 0."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (not positive or math.isfinite(v) and v > 0)


def is_ints(v, low=1):
    """A list of integers >= low (`is_int`); an empty one too."""
    return isinstance(v, list) and all(is_int(x, low) for x in v)


# The kinds of value a model's config.json field may hold: (what the error says, the check).
KINDS = {
    "int": ("a positive integer", is_int),
    "number": ("a positive number", lambda v: is_number(v, positive=True)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "ints": ("a non-empty list of positive integers", lambda v: is_ints(v) and len(v) > 0),
    "strs": ("a non-empty list of strings", lambda v: isinstance(v, list) and v and all(isinstance(x, str) for x in v)),
}
REQUIRED = object()


def config_value(config, key, kind, default=REQUIRED):
    """config[key] checked to be of `kind` (a key of KINDS), or `default` where the key is absent; ValueError naming
    the key, the expected kind and the value found (null included) otherwise."""
    if key not in config:
        if default is REQUIRED:
            raise ValueError(f"missing field '{key}'")
        return default
    what, ok = KINDS[kind]
    if not ok(config[key]):
        raise ValueError(f"field '{key}' must be {what}, got {json.dumps(config[key])}")
    return config[key]


def norm_groups(config, widths):
    """A diffusers config's norm_num_groups (32 where absent), checked to split the channels of every level, `widths`;
    ValueError naming the level otherwise (torch would say only "num_channels must be divisible by num_groups")."""
    groups = config_value(config, "norm_num_groups", "int", 32)
    for level, channels in enumerate(widths):
        if channels % groups:
            raise ValueError(f"field 'norm_num_groups' {groups} does not split the {channels} channels of "
                             f"block_out_channels[{level}]")
    return groups


def read_config(path, convert):
    """A model's config.json as `convert(dict)` (e.g. a diffusers config -> our dataclass), with any error in it
    reported as a CheckpointError naming the file."""
    config = read_json(path)
    try:
        return convert(config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_state_dict(path, prefix="", dtype=None):
    """Tensors of one file whose names start with `prefix`, with the prefix stripped.

    .safetensors is read lazily (only the asked keys); .ckpt/.pt/.bin only through
    `torch.load(weights_only=True)`, which refuses to unpickle arbitrary objects. Floating tensors are cast to
    `dtype` when given.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is {'a folder' if path.is_dir() else 'not a regular file'}, not a checkpoint")
    cast = (lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t)
    try:
        if is_safetensors(path):  # opened here: safetensors reports any failure to open as "No such file"
            with safe_open(str(path), framework="pt") as f:
                return {k[len(prefix):]: cast(f.get_tensor(k)) for k in f.keys() if k.startswith(prefix)}
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # mmap needs the zip format; the legacy pickle format loads without it
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # unreadable (the system's reason) or truncated files, wrong formats, pickles of objects
        raise CheckpointError(f"cannot read checkpoint {path}: {_load_error(e)}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # CompVis .ckpt wraps everything
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return {k[len(prefix):]: cast(v) for k, v in obj.items() if k.startswith(prefix) and torch.is_tensor(v)}


def is_safetensors(path):
    """Whether the file holds safetensors, by its first bytes (an 8-byte header length, then the header's JSON): not
    by its name, as the Hugging Face cache keeps files as blobs named by their hash. CheckpointError if empty."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:  # what a failed download or a full disk leaves; torch.load's reason would be an empty EOFError
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (0 bytes)")
    return head[8:] == b"{"


def _load_error(e):
    """Why a weight file did not read, in one line: the system's reason, or where torch.load(weights_only=True)
    refuses it (its message is a page of advice on unpickling the file unsafely), the object the file pickles, or
    else the unpickler's own reason."""
    text = str(e)
    if "Weights only load failed" not in text:
        return getattr(e, "strerror", None) or text
    found = re.search(r"GLOBAL (\S+) (was not an allowed|whose module)", text)
    if found:  # e.g. the callbacks a Lightning .ckpt keeps beside its state_dict
        return (f"it pickles a {found[1]}, and only tensors, dicts and lists are unpickled here (torch.load "
                f"weights_only=True): save its state dict alone, or as .safetensors")
    return f"not a PyTorch checkpoint ({text.split('Check the documentation')[0].strip().splitlines()[-1]})"


def read_metadata(path):
    """The string metadata of a .safetensors file ({} for other formats); CheckpointError naming an unreadable one."""
    path = existing_file(path)
    try:
        if not is_safetensors(path):
            return {}
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except CheckpointError:
        raise
    except Exception as e:  # unreadable, truncated or foreign files: safetensors raises several types
        raise CheckpointError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def find_component(path, *, subfolder, weight_names):
    """Where one model lives -> (weight file, its config.json or None): `path` itself if it is a file (a single-file
    checkpoint), else the first of `weight_names` in the diffusers folder's `subfolder`, or in `path` itself."""
    path = Path(path)
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint file or folder at {path}")
    for folder in (path / subfolder, path):
        for name in weight_names:
            if (folder / name).exists():
                if not (folder / "config.json").exists():
                    raise FileNotFoundError(f"{folder} has {name} but no config.json")
                return folder / name, folder / "config.json"
    hint = ""
    if (path / subfolder).is_dir():  # a download cut short, or diffusers' variant files (*.fp16.safetensors) alone
        hint = f"; {subfolder}/ holds {_examples([p.name for p in (path / subfolder).iterdir()], 6) or 'nothing'}"
    elif (path / "config.json").is_file():
        hint = (f"; {path} holds a config.json of its own: it is one model's folder; give the folder of the whole "
                "model (a diffusers folder or a single file)")
    names = ",".join(weight_names)
    raise FileNotFoundError(f"{path} is neither a single-file checkpoint nor a diffusers folder: looked for "
                            f"{subfolder}/{{{names}}} and {{{names}}} inside it{hint}")


def read_component(path, *, subfolder, single_file_prefix, weight_names, convert, dtype=None):
    """One model's tensors from a single file, a diffusers pipeline folder, or that folder's `subfolder`.

    Returns (state_dict, config): `config` is `convert` of the diffusers/transformers config.json, read before the
    tensors, or None for a single-file checkpoint (whose names are CompVis names, stripped of `single_file_prefix`).
    """
    weight_file, config_file = find_component(path, subfolder=subfolder, weight_names=weight_names)
    if config_file is None:
        sd = read_state_dict(weight_file, single_file_prefix, dtype)
        if not sd:
            raise CheckpointError(f"{weight_file} has no tensors under '{single_file_prefix}': not a single-file "
                                  "checkpoint of a whole SD v1.x model")
        return sd, None
    config = read_config(config_file, convert)
    return read_state_dict(weight_file, "", dtype), config


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


def load_strict(model, state_dict, name="model", assign=True, only=None):
    """Load `state_dict` into `model`, checking everything: the one strict loader of the codebase.

    Ignored tensors (IGNORED) are dropped; any other missing or unexpected tensor, a shape mismatch, or integers for
    floats raises CheckpointError naming the counts and the first few keys, or the tensor and both shapes or dtypes.
    assign=True takes the tensors over (a model built on the meta device); False copies them into the model's own,
    which keeps an optimizer's references. `only(key)`: the part of the model this state dict holds (LoRA adapters).
    """
    state_dict = {k: v for k, v in state_dict.items() if not IGNORED.search(k)}
    expected = {k: v for k, v in model.state_dict().items() if only is None or only(k)}
    missing, unexpected = expected.keys() - state_dict.keys(), state_dict.keys() - expected.keys()
    if missing or unexpected:
        raise CheckpointError(
            f"{name}: the checkpoint does not match the model: {len(missing)} tensors missing"
            + (f" ({_examples(missing)})" if missing else "")
            + f", {len(unexpected)} unexpected" + (f" ({_examples(unexpected)})" if unexpected else "")
            + f"; the model has {len(expected)} tensors, the checkpoint {len(state_dict)}")
    for k, v in state_dict.items():
        want = expected[k]
        if v.shape != want.shape:
            why = (f"shape mismatch: tensor {k} has shape {tuple(v.shape)} in the checkpoint but {tuple(want.shape)} "
                   "in the model")
        elif want.is_floating_point() and not v.is_floating_point():  # quantized weights: torch copies int8 as floats
            why = f"tensor {k} is {v.dtype} in the checkpoint, but {want.dtype} in the model (quantized: not read here)"
        else:
            continue
        raise CheckpointError(f"{name}: {why}")
    model.load_state_dict(state_dict, strict=only is None, assign=assign)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Writing: every failure named by its path


class WriteError(OSError):
    """A write that failed: "no space left on PATH", or "cannot write PATH: reason"."""


@contextlib.contextmanager
def writing(path):
    """Any failed write in this block as one WriteError naming `path`. torch's writer reports a full disk as
    "RuntimeError: [enforce fail at inline_container.cc]" with the OSError as its context, safetensors as
    "SafetensorError: ... (os error 28)"; both are read back to their errno here."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, RuntimeError, SafetensorError) as e:
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError) and not isinstance(e, SafetensorError):
            raise  # a RuntimeError that is not about the disk
        found = re.search(r"os error (\d+)", str(e))
        code = cause.errno if isinstance(cause, OSError) else int(found[1]) if found else None
        why = (f"no space left on {path}" if code == errno.ENOSPC else
               f"cannot write {path}: {os.strerror(code) if code else e}")
        raise WriteError(why) from e


def write_text(path, text):
    with writing(path):
        Path(path).write_text(text, encoding="utf-8")


def write_atomic(path, content):
    """Write a file atomically: PATH.tmp, then a rename, so a reader sees the old file or the new one, never half
    of one; a failed write leaves no PATH.tmp behind. `content`: the text, or a function that writes a path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_symlink():  # written through, a link would put the content wherever it points
        tmp.unlink()
    try:
        content(tmp) if callable(content) else write_text(tmp, content)
        with writing(path):
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def lock_file(path, wait=None):
    """A descriptor holding an exclusive flock on `path` (created; a symbolic link there is refused, ELOOP). Where
    another process holds it: None, or with `wait` (a function, told first) the lock once it is free."""
    import fcntl  # POSIX only, and only here: sample.py imports this file on any system
    with writing(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if wait is None:
            os.close(fd)
            return None
        wait()
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def save_tensors(tensors, path, metadata=None):
    """A safetensors file of CPU copies of `tensors`, with string `metadata` beside {"format": "pt"}."""
    with writing(path):
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
                  metadata={"format": "pt", **(metadata or {})})


def save_torch(obj, path):
    """torch.save through a Python file, so that a failed write carries its OSError (torch's own writer drops it)."""
    with writing(path), open(path, "wb") as f:
        torch.save(obj, f)

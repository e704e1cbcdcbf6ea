"""Checks at the command-line boundary, shared by every script: number ranges, --device, one-line errors.

Each script checks its flags right after parsing, before it reads a weight or writes a file, and a bad value stops it
with one line naming the flag (`range_error`). What only a model or the data can tell is checked once they are read,
still before anything is written: sample.py's --target against the indicators' groups, train.py's --resolution against
the model's size multiple, data.py's --k against the number of images. Inside, the code trusts what passed here.
"""
import argparse
import math
import os
import sys
from pathlib import Path

import torch


def repeated(items):
    """The first item that an earlier one repeats, or None."""
    return next((x for k, x in enumerate(items) if x in items[:k]), None)


def out_of_range(value, lo=None, hi=None, strict=False, open_hi=False):
    """Why `value` lies outside [lo, hi] ((lo, ... with strict, ..., hi) with open_hi), as "must ...", or None. A
    float must be finite."""
    is_float = isinstance(value, float)
    if is_float and not math.isfinite(value):
        return "must be a finite number"
    below = lo is not None and (value <= lo if strict else value < lo)
    above = hi is not None and (value >= hi if open_hi else value > hi)
    if not below and not above:
        return None
    fmt = "g" if is_float else ""  # an int bound in full: 2**64 - 1, not 1.84467e+19
    if hi is not None and (strict or open_hi):
        return f"must lie in {'(' if strict else '['}{lo:{fmt}}, {hi:{fmt}}{')' if open_hi else ']'}"
    if hi is not None:
        return f"must {'lie' if is_float else 'be'} between {lo:{fmt}} and {hi:{fmt}}"
    return f"must be {'a number ' if is_float else ''}{'>' if strict else '>='} {lo:{fmt}}"


def range_error(args, ranges):
    """"--flag must ..., got value" for the first flag whose value (or any of its values) is out of range, or
    None; ranges: {dest: (lo, hi) or (lo, hi, strict) or (lo, hi, strict, open_hi)}. A flag that is None (not
    given, no default) passes."""
    for dest, spec in ranges.items():
        values = getattr(args, dest)
        for v in values if isinstance(values, list) else [values]:
            why = v is not None and out_of_range(v, *spec)
            if why:
                return f"--{dest.replace('_', '-')} {why}, got {v}"
    return None


def side_error(flag, value, multiple=None):
    """Why an image side `value` of --flag does not fit, or None: a positive multiple of 8 (the VAE downsamples by
    8), and with `multiple` (loading.side_multiple of a model) a multiple of that."""
    if value <= 0 or value % 8:
        return f"--{flag} must be a positive multiple of 8 (the VAE downsamples by 8), got {value}"
    if multiple and value % multiple:
        return (f"--{flag} must be a multiple of {multiple} for this model (the VAE and the UNet downsample by that "
                f"much together), got {value}")
    return None


def dotdot_error(path):
    """Why `path` cannot be checked before files are written there, or None: a '..' after a folder that does not
    exist. Nothing through a missing folder exists for Path.exists(), yet once mkdir has made it, '..' leads back
    to a folder that may hold files, which every check of what is there would have missed."""
    parts = Path(path).parts
    missing = next((Path(*parts[:k]) for k, part in enumerate(parts) if part == ".." and not os.path.lexists(
        Path(*parts[:k]))), None)
    return missing and f"{missing} does not exist, so '..' after it cannot be followed: name the folder without it"


def folder_error(path):
    """Why files cannot be written at `path`, its missing folders made as needed, or None: a '..' after a missing
    folder (dotdot_error), or the nearest of it and its parents that exists is a link to nothing, a file, or a folder
    that is not writable."""
    why = dotdot_error(path)
    if why:
        return why
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
    if existing.is_symlink() and not existing.exists():  # mkdir would stop on it, after the weights load
        return f"{existing} is a link to {os.readlink(existing)}, which does not exist"
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def device_arg(spec):
    """argparse type of --device: a torch.device that this machine has."""
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    n = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type not in ("cpu", "cuda"):  # mps, meta, ...: untested here, and meta holds no numbers
        why = f"{spec}: only cpu and cuda devices run here"
    elif device.type == "cuda" and not torch.cuda.is_available():
        why = "cuda asked for, but no CUDA device is available"
    elif device.type == "cuda" and device.index is not None and device.index >= n:  # set_device: "invalid ordinal"
        why = f"{spec}: this machine has {n} CUDA device{'s' * (n != 1)} (cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})"
    else:
        return device
    raise argparse.ArgumentTypeError(why)


def one_line_errors(main, prog, errors=(ValueError, OSError)):
    """Run main(); an expected error (bad input, a file that cannot be read or written) exits with one line."""
    try:
        return main()
    except errors as e:
        sys.exit(f"{prog}: error: {e}")

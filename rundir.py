"""A train.py run directory: one writer, its configuration, its data, its log.

    train.lock           the fcntl lock of the one train.py writing the run (the file holds its pid)
    run.json             the first start's arguments, the configuration a resume must repeat (RESUME_FIELDS and the
                         objective's flags), the model configs, group names, base model (a run directory's: with the
                         checkpoint it started from; either: with its weights' fingerprint), the data's fingerprint;
                         `resumes`: each resume's step, time, torch and the flags it changed
    base/                from-scratch runs only: the initial random models as a diffusers folder
    checkpoint-000500/   the latest checkpoint (checkpoints.py writes and reads it)
    log.jsonl            one line per step: step, loss, every part the objective reports, lr (--lr), grad_norm
                         (the UNet's and trained text encoder's, before clipping; not the indicator's), time
    validation/step_000500/00.png …     with --validation-prompt

`open_run` checks a directory for a new run or a resume before anything is written; `write_run` starts one;
`open_log` goes on with its log (and records a resume); loading.load_run reads one back.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

import cli
import weights
from checkpoints import (checkpoint_files, export_diffusers, find_components, finished_name, foreign_error,
                         latest_checkpoint, newest_checkpoint, refuse_link, schedule_record)
from ddm import OBJECTIVES, uses_indicator

# The configuration a --resume must repeat (with every flag of the objective group): changing any of these mid-run
# would train a different model.
RESUME_FIELDS = ("model", "init_config", "vae", "data", "num_images", "group_names", "resolution", "batch_size",
                 "grad_accum", "world_size", "lr", "indicator_lr", "weight_decay", "adam_betas", "adam_eps",
                 "max_grad_norm", "lora_rank", "lora_alpha", "train_text_encoder", "caption_dropout", "cache_latents",
                 "seed")
LOCK_FILE = "train.lock"
DATA_CHANGES = {"metadata.jsonl": "metadata.jsonl differs",  # data_fingerprint's keys, what a change of each means
                "images": "the images' names, sizes or modification times differ",
                "contents": "the images' contents differ"}  # said only when names, sizes and times agree


def run_dir_of(out, resume):
    """The run directory that --out (a new run) or --resume names; ValueError for neither, two different ones, or a
    '..' after a missing folder (cli.dotdot_error)."""
    path = resume or out
    dotdot = path and cli.dotdot_error(path)
    why = ("--out RUN_DIR is required (or --resume RUN_DIR)" if not path else
           f"--out {out} and --resume {resume} name different run directories"
           if out and resume and Path(out).resolve() != Path(resume).resolve() else
           dotdot and f"--{'resume' if resume else 'out'} {path}: {dotdot}")
    if why:
        raise ValueError(why)
    return Path(path)


@contextlib.contextmanager
def locked_run_dir(run_dir, new):
    """Hold an exclusive lock on RUN_DIR/train.lock for the whole run: a second train.py (a new run or a resume) on
    the same directory is refused, naming the holder's pid. A new run's directory is created here, and removed again
    (with the folders created for it) if the run ends before it wrote run.json."""
    run_dir, path = Path(run_dir), Path(run_dir) / LOCK_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir} is a file, not a run directory")
    if path.is_symlink():  # truncating it would write into the file it points to, wherever that is
        raise FileExistsError(f"{path} is a symbolic link; train.py locks a plain file of its own there: remove "
                              f"the link")
    if not path.exists():  # a folder that is not a run directory (yet) is touched only when it is empty
        if new:
            _check_new(run_dir)
        else:
            read_run_json(run_dir)  # a run directory, readable
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()] if new else []  # deepest first
    with weights.writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    while True:
        fd = weights.lock_file(path)  # a link made since: ELOOP
        if fd is None:
            holder = "unknown"
            with contextlib.suppress(OSError):  # the holder may end, and remove it, meanwhile
                holder = path.read_text(errors="replace").strip() or holder
            raise FileExistsError(f"{run_dir} is in use by another train.py (pid {holder}); wait for it to end, "
                                  f"or choose another directory")
        if path.exists() and os.path.samestat(os.fstat(fd), path.stat()):
            break
        os.close(fd)  # the holder removed the file as it ended, after we opened it: lock the new one
    try:
        with weights.writing(path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield run_dir
    finally:
        if new and not (run_dir / "run.json").exists():  # nothing of a run: leave nothing (a retry starts clean)
            path.unlink(missing_ok=True)
            for p in created:
                with contextlib.suppress(OSError):
                    p.rmdir()
        os.close(fd)


def _check_new(run_dir):
    """FileExistsError unless a new run's directory is absent or empty (but for the lock of a run that never wrote
    run.json); one inside a run (its checkpoint-N) names that run to --resume, which takes the run directory; a run
    that saved no checkpoint is said to be one a user may delete."""
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        parent, run = run_dir.absolute().parent, (run_dir / "run.json").exists()  # parent of --out . too, as in run_of
        if run and not any(finished_name(p.name) for p in run_dir.iterdir()):
            why = ("holds a run that saved no checkpoint: --resume it with the flags it started with, or delete it to "
                   "start again with others")
        elif run or (parent / "run.json").exists():
            why = "exists and is not empty; choose a new directory or --resume " + (
                "it" if run else f"{parent}, the run it is in")
        else:  # the user's own folder: nothing to resume
            why = "exists and is not empty and is no run directory; choose a new directory"
        raise FileExistsError(f"--out {run_dir} {why}")


# the config fields a run's models and indicator are rebuilt from (loading.load_run): (what it must be, the check)
MODEL_FIELDS = {"lora_rank": ("an integer >= 0", lambda v: weights.is_int(v, 0)),
                "lora_alpha": ("a number", weights.is_number),
                "train_text_encoder": ("true or false", lambda v: isinstance(v, bool)),
                "group_names": ("a list", lambda v: isinstance(v, list)), "w_ind": ("a number", weights.is_number),
                "indicator_hidden": ("a list of integers >= 1", weights.is_ints),
                "objective": ("an objective this checkout's ddm.OBJECTIVES defines",  # a reader's own, added elsewhere
                              lambda v: isinstance(v, str) and v in OBJECTIVES),
                "resolution": ("an integer >= 8", lambda v: weights.is_int(v, 8))}  # sample.py's default side


def read_run_json(run_dir):
    """run.json, its fields checked as far as loading a run reads them; CheckpointError naming the field."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a train.py run directory (no run.json)")
    info = weights.read_json(path)
    for key, kind, what in (("config", dict, "an object"), ("base", str, "a string")):
        if not isinstance(info.get(key), kind):
            raise weights.CheckpointError(f"{path}: field '{key}' must be {what}")
    config, started = info["config"], info.get("base_checkpoint")  # started: joined onto the base run's path
    config.setdefault("objective", "ddm")  # runs from before --objective trained the authors' loss
    bad = next((key for key, (_, ok) in MODEL_FIELDS.items() if not ok(config.get(key))), None)
    shape = info.get("latent_shape")  # what a run's indicator is built on (loading._run_indicator)
    if bad:
        why = f"config field '{bad}' must be {MODEL_FIELDS[bad][0]}, got {config.get(bad)!r}"
    elif not (weights.is_ints(shape) and len(shape) == 3):
        why = (f"field 'latent_shape' must be a list of 3 integers >= 1 (the latents' channels, height, width), "
               f"got {shape!r}")
    elif uses_indicator(config["objective"], config["w_ind"]) and len(config["group_names"]) < 2:  # one logit a group
        why = (f"config field 'group_names' must name at least 2 groups (the run trained an indicator), got "
               f"{config['group_names']!r}")
    elif info["base"] != "base" and info["base"] != config.get("model"):  # a fine-tune's base is its --model
        why = f"field 'base' {info['base']} is not the model the run fine-tunes, config.model {config.get('model')}"
    elif started is not None and not (isinstance(started, str) and finished_name(started)):
        why = f"field 'base_checkpoint' must be null or a checkpoint folder's name, got {started!r}"
    elif not isinstance(info.get("base_fingerprint", {}), (dict, type(None))):
        why = f"field 'base_fingerprint' must be null or an object, got {info['base_fingerprint']!r}"
    else:
        return info
    raise weights.CheckpointError(f"{path}: {why}")


def open_run(args, data, world_size, init_config, device, say):
    """(run directory, configuration, checkpoint to resume or None, base model or None) of train.py's `args`,
    checked by check_run_dir before anything is written."""
    if len(data) < args.batch_size * world_size:
        raise ValueError(f"{args.data} has {len(data)} images, fewer than --batch-size {args.batch_size} x "
                         f"{world_size} processes")
    run_dir, config = run_dir_of(args.out, args.resume), run_config(args, data, world_size, init_config)
    ckpt, base = check_run_dir(run_dir, config, data, args, device, say)
    if ckpt and ckpt["step"] > args.max_steps:  # a resume cannot go back: it would end at once (and export this step)
        why = (f"--max-steps {args.max_steps} is below step {ckpt['step']}, where the run is ({ckpt['path']}); a "
               f"resume goes on from there: give --max-steps {ckpt['step']} or more")
    else:  # a folder of the user's where the run would save a step: said now, not after training up to it
        every, start = args.checkpoint_every, ckpt["step"] if ckpt else 0
        why = args.resume and foreign_error(run_dir, lambda s: start < s <= args.max_steps and (
            every and s % every == 0 or s == args.max_steps))
    if why:
        raise ValueError(why)
    return run_dir, config, ckpt, base


def lora_rank(args):
    """--lora-rank, or its default: 8 for a fine-tune, 0 (the whole weights) from scratch."""
    return (0 if args.init_config is not None else 8) if args.lora_rank is None else args.lora_rank


def unread_flag_error(args, defaults):
    """Why a flag of train.py's `args` would not be applied, or None (each message says why). A new run's flag that
    its objective does not read is refused too: run.json would record it as the run's configuration (a resume's flags
    are compared with its run.json instead). `defaults`: every flag's default, by dest."""
    if args.data is None:  # --model PATH --export DIR (train.check_args): writes --model as it is, reads no other flag
        return next((f"--{k.replace('_', '-')} does not apply to a conversion (--model PATH --export DIR writes "
                     "--model as it is)" for k, v in vars(args).items()
                     if k not in ("model", "export", "progress") and v != defaults.get(k, v)), None)
    if args.vae and not args.init_config:
        return "--vae only applies with --init-config"
    for dest in ("validation_every", "validation_n", "validation_steps", "validation_guidance"):
        if args.validation_prompt is None and getattr(args, dest) != defaults[dest]:
            return f"--{dest.replace('_', '-')} needs --validation-prompt (no validation images without one)"
    if args.cache_latents and args.num_workers != defaults["num_workers"]:
        return ("--num-workers applies only without --cache-latents (the cached posteriors are read from memory, not "
                "by a DataLoader)")
    if args.resume:
        return None
    if args.allow_data_change:
        return "--allow-data-change applies only with --resume (a new run reads its data as it is)"
    for dest in dict.fromkeys(flag for o in OBJECTIVES.values() for flag in o.flags):  # ddm.Objective.flags
        readers = [name for name, o in OBJECTIVES.items() if dest in o.flags]
        if dest not in args.objective_fields:
            return (f"ddm.OBJECTIVES[{readers[0]!r}].flags names {dest!r}, which is no flag of train.py's objective "
                    f"group ({', '.join(args.objective_fields)}): name a flag there as hp spells it (--small-eps "
                    f"is 'small_eps')")
        if getattr(args, dest) != defaults[dest] and args.objective not in readers:
            return (f"--{dest.replace('_', '-')} applies only with --objective {' or '.join(readers)}; "
                    f"--objective {args.objective} does not read it")
    if OBJECTIVES[args.objective].reads is None and args.w_ind not in (0, defaults["w_ind"]):
        return (f"--w-ind applies only to an objective with an indicator; --objective {args.objective} trains none "
                "(--w-ind 0)")
    if lora_rank(args) == 0 and args.lora_alpha != defaults["lora_alpha"]:
        return "--lora-alpha applies only with LoRA (--lora-rank > 0); --lora-rank 0 trains the whole weights"
    if args.indicator_lr is not None and not uses_indicator(args.objective, args.w_ind):
        return (f"--indicator-lr applies only to a run that trains an indicator; --objective {args.objective} with "
                f"--w-ind {args.w_ind} trains none")
    return None


def run_config(args, data, world_size, init_config):
    """The values a resume must match, with paths made absolute and the init config (its JSON) inlined."""
    c = {k: getattr(args, k, None) for k in RESUME_FIELDS + tuple(args.objective_fields)}
    c.update(model=str(Path(args.model).resolve()) if args.model else None, init_config=init_config,
             vae=str(Path(args.vae).resolve()) if args.vae else None, data=str(Path(args.data).resolve()),
             num_images=len(data), group_names=list(data.group_names), world_size=world_size)
    return c


def data_fingerprint(data):
    """What an exact resume needs unchanged in an ImageFolder: sha256 of metadata.jsonl, of every image's path, size
    and modification time, and of every image's bytes. The bytes cost 0.75 s for 30,000 files of 20 KB (600 MB,
    warm page cache, 2 CPU cores), 5% of the 12-15 s ImageFolder takes to decode them all when it opens the folder."""
    images, contents = hashlib.sha256(), hashlib.sha256()
    for f in data.files:
        st = f.stat()
        images.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        contents.update(hashlib.sha256(f.read_bytes()).digest())
    return {"metadata.jsonl": hashlib.sha256((data.root / "metadata.jsonl").read_bytes()).hexdigest(),
            "images": images.hexdigest(), "contents": contents.hexdigest()}


def run_of(path):
    """(run directory, checkpoint folder name or None) when `path` is a train.py run directory or a finished
    checkpoint's folder name in one, else None. CheckpointError for such a folder that is a symbolic link."""
    path = Path(path)
    if (path / "run.json").is_file():
        return path, None
    folder = path.absolute()  # ".": the name of the folder it stands for
    if not (finished_name(folder.name) and (folder.parent / "run.json").is_file()):
        return None
    refuse_link(folder)
    return folder.parent, folder.name


def base_path(run_dir, info):
    """The model a run started from: its own base/ folder (from scratch), the --model it fine-tuned, or, when that
    was a run directory, the checkpoint folder in it that the run started from (loaded by name). CheckpointError
    when the weights there are not those the run started on: other weights at that path (model_fingerprint), or
    the checkpoint gone (the run trained on since: train.py keeps only the newest checkpoint)."""
    if info["base"] == "base":
        return Path(run_dir) / "base"
    base, started = Path(info["base"]), info.get("base_checkpoint")  # None: not a run, or run.json older than this
    stored = info.get("base_fingerprint")  # None: run.json older than the fingerprint (of a run's checkpoint)
    folder = base if started is None else checkpoint_folder(base, started)
    model, at = (base, "") if started is None else (folder.parent, f" at its {started}")  # what --model named
    if not folder.is_dir() and started is not None and model.is_dir():
        now = latest_checkpoint(model)
        why = (f"it now holds {now.name if now else 'no checkpoint'}: it trained on since, and the weights this run "
               f"started from are gone; put {started} back there, or fine-tune {model} anew")
    elif not os.path.lexists(model):
        why = ("it does not exist (moved or deleted): put it back there, or write where it is now in the field 'base' "
               "and in config.model")
    else:
        now = stored and model_fingerprint(folder)
        differ = [name for name in sorted({**stored, **now}) if stored.get(name) != now.get(name)] if stored else []
        if not differ:
            return folder
        files = differ if started is None else [str(folder / name) for name in differ]  # a checkpoint's: by path
        why = (f"its weights changed since the run started ({', '.join(files)} differs): put the model it fine-tuned "
               f"back there, fine-tune {model} anew, or, for the same weights in another file, delete the field "
               "'base_fingerprint'")
    raise weights.CheckpointError(f"{Path(run_dir) / 'run.json'}: the run fine-tunes {model}{at}, but {why}")


def checkpoint_folder(model, name):
    """The checkpoint folder `name` of the run --model named: the run directory, or that checkpoint folder itself."""
    model = Path(model)
    return model if model.name == name and not (model / "run.json").is_file() else model / name


FINGERPRINT = "sampled-1"  # names what `sampled` reads: a change to it takes a new name, so older runs can be told


def model_fingerprint(path):
    """{weight file: "size scheme sha256" of the pieces `sampled` reads} of each file a model at `path` loads from
    (a diffusers folder's UNet, VAE and text encoder, one single file, or a run's checkpoint folder's weights): a
    few MB, where hashing SD's 4 GB whole would take seconds at every load. A guard against other weights at the
    same path, not a checksum."""
    checkpoint = finished_name(Path(path).name) and (Path(path) / "state.json").is_file()  # as save_checkpoint wrote
    files = Path(path).glob("*.safetensors") if checkpoint else {file for file, _ in find_components(path).values()}
    out = {}
    for f in sorted(files):
        size, h = f.stat().st_size, hashlib.sha256()
        with open(f, "rb") as file:
            for offset, length in sampled(file, size):
                file.seek(offset)
                h.update(file.read(length))
        out[str(f.relative_to(path)) if Path(path).is_dir() else f.name] = f"{size} {FINGERPRINT} {h.hexdigest()}"
    return out


def sampled(file, size):
    """(offset, length) of the pieces model_fingerprint hashes: a safetensors file's header and the first 4 KiB of
    every tensor (a fine-tune, or a LoRA merged in, changes every element of each tensor it trains); 64 pieces of
    64 KiB spread evenly over a file of another format, or one whose header does not read."""
    n, spans = int.from_bytes(file.read(8), "little"), None
    if n <= size - 8:
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):  # not a safetensors header
            spans = [tuple(t["data_offsets"]) for name, t in json.loads(file.read(n)).items() if name != "__metadata__"]
    if spans is not None and all(len(s) == 2 and all(type(v) is int for v in s) and 0 <= s[0] <= s[1] for s in spans):
        return [(0, 8 + n)] + [(8 + n + a, min(b - a, 4096)) for a, b in spans]
    return [(size * i // 64, 64 * 1024) for i in range(64)]


def write_run(run_dir, config, models, latent_shape, args, data):
    """A new run directory: base/ for a from-scratch run, and run.json. A failed write leaves neither behind."""
    from_scratch = config["init_config"] is not None
    configs = {k: dataclasses.asdict(getattr(models, k).config) for k in ("unet", "vae", "text_encoder")}
    with weights.writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        if from_scratch:
            export_diffusers(models, run_dir / "base")
        weights.write_json(run_dir / "run.json", {
            "format": "ddm-run/1", "config": config, "base": "base" if from_scratch else config["model"],
            "base_checkpoint": models.checkpoint,  # of a run directory's --model: the one its weights came from
            "base_fingerprint": None if from_scratch else model_fingerprint(
                checkpoint_folder(config["model"], models.checkpoint) if models.checkpoint else config["model"]),
            "latent_shape": list(latent_shape), "prediction_type": models.prediction_type,
            "schedule": schedule_record(models.alphas_cumprod), "args": args,
            "model_configs": configs,
            "data": data_fingerprint(data),
            "versions": {"torch": torch.__version__, "threads": torch.get_num_threads()},  # CPU sums: by thread count
            "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    except BaseException:
        if from_scratch:  # the directory was empty: base/ is ours
            shutil.rmtree(run_dir / "base", ignore_errors=True)
        raise


def check_run_dir(run_dir, config, data, args, device, say):
    """(checkpoint to resume, as read_checkpoint returns it, or None; base model) of a run started with this
    configuration and this data (an ImageFolder, compared by data_fingerprint: moved or copied with the same bytes,
    it is the same data); (None, None) for a new run, whose directory must be empty or absent (a train.lock aside).
    A field an older run did not record takes its value in args.objective_defaults (the parser's: what that run
    trained with before the flag existed)."""
    if args.resume is None:
        _check_new(run_dir)
        return None, None
    info = read_run_json(run_dir)
    # what record_resume reads, and the data's fingerprint (below)
    for key, kind, what in (("args", dict, "an object"), ("resumes", list, "a list"), ("data", dict, "an object")):
        if not isinstance(info.get(key, kind()), kind):
            raise weights.CheckpointError(f"{run_dir / 'run.json'}: field '{key}' must be {what}")
    older = sorted(f for f in config if f not in info["config"])
    # group_names last: they follow from the data and flags (--attribute), and a changed flag is the thing to name
    for field, value in sorted(config.items(), key=lambda kv: kv[0] == "group_names"):
        stored = info["config"].get(field, args.objective_defaults.get(field))
        if stored == value or field == "data":  # a folder moved: its files are compared below
            continue
        fix = (f"the data in {config['data']} changed since the run started: restore it, or fine-tune the run on the "
               f"new data as a new run (--model {run_dir})" if field in ("num_images", "group_names")  # same flags
               else "resume with the same arguments (only --max-steps, checkpoint/validation/hardware flags may "
               "change)")
        raise ValueError(f"--resume {run_dir}: the run was started with {field}={stored!r}"
                         + (" (the default: run.json records none)" if field in older else "")
                         + f", now {field}={value!r}; {fix}")
    if older and say:
        print(f"note: {run_dir / 'run.json'} records no {', '.join(older)} (an older run): taking their defaults",
              file=sys.stderr)
    was = info["config"].get("data")
    # the data as the run last went on with it: recorded by a resume that allowed a change (record_resume), or at start
    allowed = [r for r in info.get("resumes", []) if isinstance(r, dict) and isinstance(r.get("data"), dict)]
    since = f"the resume at step {allowed[-1].get('step')} that allowed a change" if allowed else "the run started"
    changed = data_change(allowed[-1]["data"] if allowed else info.get("data"), data_fingerprint(data), was,
                          config["data"])
    if changed and not args.allow_data_change:
        raise ValueError(f"--resume {run_dir}: the data in {config['data']} changed since {since} ({changed}); an "
                         f"exact resume needs the same data: restore it, or pass --allow-data-change to go on with "
                         f"the data as it is now")
    if say and (changed or was != config["data"]):
        print(f"warning: the data changed since {since} ({changed}); going on with it" if changed else
              f"note: the run started on the data in {was}; it is in {config['data']} now, its files the same",
              file=sys.stderr)
    ckpt = newest_checkpoint(run_dir, checkpoint_files(config), optimizer_device=device, say=say)
    return ckpt, base_path(run_dir, info)


def data_change(stored, now, was, where):
    """What changed in the data since the run started, or "": `stored` and `now` its data_fingerprint then (None: a
    run before the fingerprint; without "contents": before the content hash) and now, `was` and `where` its folder
    then and now. With metadata.jsonl and every image's bytes the same it is the same data, wherever it is now; a
    folder elsewhere whose bytes were not recorded cannot be told from other data."""
    moved = f"moved from {was}; " if was != where else ""
    if not stored:
        return moved and f"{moved}run.json records no fingerprint of its files to compare"
    if "contents" in stored and all(stored[k] == now[k] for k in ("metadata.jsonl", "contents")):
        return ""
    differ = [k for k in DATA_CHANGES if k in stored and stored[k] != now[k]
              and not (k == "images" and moved and "contents" in stored)]  # its paths differ: its bytes tell
    said = " and ".join(DATA_CHANGES[k] for k in differ if not (k == "contents" and "images" in differ))
    return said and moved + said


def open_log(run_dir, step, args, config, data):
    """log.jsonl in append mode, without the lines a crash left past the checkpoint at `step` (or cut half-way), and
    without its validation images of those steps (made again, maybe fewer or of another prompt). A resume with steps
    to train gets here once every check passed and every model is built: `record_resume` first."""
    path = run_dir / "log.jsonl"
    old = path.read_text().splitlines() if path.exists() else []
    if old and not old[-1].endswith("}"):
        old.pop()
    kept = []
    for n, line in enumerate(old, start=1):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}, line {n}: not a log record (a JSON object with a 'step')") from None
    if args.resume and step < args.max_steps:
        record_resume(run_dir, step, vars(args), config, data)
    weights.write_atomic(path, "".join(kept))
    for image in (run_dir / "validation").glob("step_*/*.png"):  # save_pngs' 00.png, ... of a step past `step`
        validated = image.parent.name.removeprefix("step_")
        if image.stem.isdecimal() and validated.isdecimal() and int(validated) > step:
            image.unlink()
    with weights.writing(path):
        return open(path, "a")


def record_resume(run_dir, step, args, config, data):
    """Append to run.json's `resumes` the step a resume goes on from, when, on which torch, and the new values of the
    flags `args` that differ from the first start's. Not listed: the `config` a resume repeats (compared resolved by
    check_run_dir, so `--data ./d` is no change), --out and --resume, the parser's own objective_fields/defaults, and
    flags the first start did not record (an older version's). With --allow-data-change, the fingerprint of `data`
    too: later resumes are compared with the data the run went on with."""
    info = weights.read_json(run_dir / "run.json")  # as written: read_run_json fills in defaults
    skip = {*config, "out", "resume", "objective_fields", "objective_defaults"}
    changed = {k: v for k, v in args.items() if k not in skip and info.get("args", {}).get(k, v) != v}
    if config["data"] != info["config"]["data"]:  # moved (check_run_dir): where this resume read it
        changed["data"] = config["data"]
    resume = {"step": step, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "args": changed}
    started = info.get("versions", {}).get("threads")  # None: run.json older than the record
    if started not in (None, resume["threads"]):  # the kernels sum in another order: the last bits differ
        print(f"warning: {resume['threads']} CPU threads, where the run started on {started}: on the CPU a resume is "
              "bit-exact only on the same number", file=sys.stderr)
    if args["allow_data_change"]:
        resume["data"] = data_fingerprint(data)
    info.setdefault("resumes", []).append(resume)
    weights.write_json(run_dir / "run.json", info)


def log_step(log, record):
    """One line of log.jsonl; NaN (a part not measured) is written as null."""
    with weights.writing(log.name):
        log.write(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()})
                  + "\n")
        log.flush()

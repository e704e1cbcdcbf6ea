"""Fine-tune Stable Diffusion v1.x with the Debiasing Diffusion Model objective, or train a tiny one from scratch.

Huang, Tsao, Su, Chiang 2025, "Debiasing Diffusion Model" (arXiv 2503.12536): the UNet's predicted noise ε̂ feeds
an indicator that must recognise each training image's group, and both are trained on

    L = w_rec · ||ε̂ − ε||²  +  w_ind · CE(indicator(ε̂), g)          (ddm.ddm_loss; w_ind = 0: plain fine-tune)

One micro-batch, as `DDMModel.forward` and `micro_batch_inputs` do it:
    z_0 = vae.encode(x).sample() · 0.18215        the frozen VAE's posterior, sampled
    t ~ U{0, …, 999},  ε ~ N(0, I),  z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε       (sample.add_noise, SD's scaled-linear ᾱ)
    ε̂ = unet(z_t, t, text_encoder(prompt)),  L as above.

    python train.py --model sd-v1-5/ --data DIR --out runs/ddm [--w-rec .95 --w-ind .05 --lora-rank 8 ...]
    torchrun --nproc_per_node N train.py ...                  (DistributedDataParallel; same script, same flags)
    python train.py --init-config tiny.json --data DIR --out runs/base      (random init: trains from scratch)
    python train.py ... --resume runs/ddm                     (the same flags again; continues bit-exactly)
    python train.py --model runs/ddm --export sd-ddm/         (a merged diffusers folder; also after training)
    from train import train; run_dir = train(["--model", ..., "--data", ..., "--out", ...])     (importable)

Defaults follow the authors' script: AdamW (lr 1e-5 constant, betas 0.9/0.999, eps 1e-8, weight decay 1e-2) over
the UNet's LoRA (rank 8, alpha 32 on attention to_q/to_v; q_proj/v_proj of the text encoder with
--train-text-encoder) and the indicator, gradient accumulation 4, VAE frozen. Deliberate differences: gradients
are clipped by their global *norm* (--max-grad-norm; the authors clip by value under that name), K groups come from
the data (they fix K = 2), and with --lora-rank 0 the whole UNet (and text encoder) is trained instead.
--init-config CONFIG.json ({"unet": {UNetConfig fields}, "vae": {...}, "text_encoder": {...}}) builds randomly
initialised models (seeded by --seed; --vae PATH takes a trained VAE instead) and trains them with this same loop:
LoRA off and the text encoder trained unless asked otherwise.

Determinism. A *step* is one optimizer update over --grad-accum micro-batches of --batch-size images per process.
The data order of epoch e is a permutation seeded by (seed, e); global micro-batch m = step·grad_accum + micro
takes the next world_size·batch_size images, rank r its r-th share. The posterior sample, noise, timesteps and
caption dropout of a micro-batch come from a generator seeded by (seed, step, micro, rank). Nothing depends on
what ran before except the weights and the optimizer state, which the checkpoint holds, so on CPU a run killed
and resumed ends bit for bit where an uninterrupted one does.

Run directory (rank 0 writes; `load_run` and `sample.load_models(RUN_DIR)` read it):
    run.json             arguments, the configuration a resume must match (`RESUME_FIELDS`), model configs,
                         group names, the base model (absolute path, or "base" for a from-scratch run)
    base/                from-scratch runs only: the initial random models as a diffusers folder
    checkpoint-000500/   the latest checkpoint (written as checkpoint-000500.tmp/, then renamed; the older one is
                         deleted only afterwards): unet.safetensors or unet_lora.safetensors,
                         text_encoder[_lora].safetensors when trained, indicator.safetensors when w_ind > 0
                         (CompVis / transformers names), optimizer.pt (AdamW and fp16 loss-scaler state, read back with
                         torch.load(weights_only=True)), state.json (step, elapsed time, per-rank weight hashes)
    log.jsonl            one line per step: step, loss, rec, ind, acc, lr, grad_norm, time (s since the run began)
    validation/step_000500/00.png …     with --validation-prompt
A NaN/inf loss stops the run naming the step, before the optimizer applies it; the last checkpoint stays as it was.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import lora
import sample
import weights
from clip_text import CLIPTextConfig, CLIPTextModel, Tokenizer, text_encoder_hf_config
from data import ImageFolder
from ddm import Indicator, ddm_loss
from unet import UNet, UNetConfig, unet_diffusers_config, unet_diffusers_names
from vae import VAE, VAEConfig, load_vae, vae_diffusers_config, vae_to_diffusers

UNET_LORA_TARGETS = ("to_q", "to_v")  # the authors' LoRA targets in the UNet attention
TEXT_LORA_TARGETS = ("q_proj", "v_proj")  # ... and in the CLIP text encoder
N_TRAIN_TIMESTEPS = 1000  # SD's DDPM schedule length; t ~ U{0, ..., 999}
# The configuration a --resume must repeat: changing any of these mid-run would train a different model.
RESUME_FIELDS = ("model", "init_config", "vae", "data", "num_images", "group_names", "resolution", "batch_size",
                 "grad_accum", "world_size", "lr", "weight_decay", "adam_betas", "adam_eps", "max_grad_norm",
                 "w_rec", "w_ind", "lora_rank", "lora_alpha", "train_text_encoder", "indicator_hidden",
                 "caption_dropout", "cache_latents", "seed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune Stable Diffusion v1.x with the DDM objective (arXiv "
                                            "2503.12536), or train a tiny one from scratch.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="diffusers SD folder, single-file checkpoint, or a train.py run directory")
    g.add_argument("--init-config", help="JSON {unet, vae, text_encoder} of configs: random init, from scratch")
    g.add_argument("--vae", help="with --init-config: take this trained VAE (any --model layout) instead")
    g.add_argument("--data", help="folder with metadata.jsonl (file_name, text, group) and the images")
    g.add_argument("--out", help="new run directory")
    g.add_argument("--resume", help="continue this run directory (give the same arguments again)")
    g.add_argument("--export", help="write the merged model as a diffusers folder here (after training; with "
                                    "--model and no --data: export that model only)")
    g = p.add_argument_group("objective")
    g.add_argument("--w-rec", type=float, default=0.95, help="weight of the denoising MSE")
    g.add_argument("--w-ind", type=float, default=0.05, help="weight of the indicator CE (0: plain fine-tune)")
    g.add_argument("--indicator-hidden", type=int, nargs="+", default=[1024, 512], help="indicator MLP widths")
    g = p.add_argument_group("what is trained")
    g.add_argument("--lora-rank", type=int, default=None, help="LoRA rank, 0 = train all weights "
                                                               "(default 8; 0 with --init-config)")
    g.add_argument("--lora-alpha", type=float, default=32.0)
    g.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="also train the text encoder (default: off; on with --init-config)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--resolution", type=int, default=512, help="training images are resized/cropped to this")
    g.add_argument("--batch-size", type=int, default=1, help="images per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    g.add_argument("--max-steps", type=int, default=1000, help="optimizer steps in total")
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--adam-betas", type=float, nargs=2, default=[0.9, 0.999])
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradients' global L2 norm; 0 = off")
    g.add_argument("--caption-dropout", type=float, default=0.0,
                   help="share of captions replaced by '' (needed for guidance when training from scratch)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("hardware")
    g.add_argument("--device", help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), help="autocast (default bf16 on CUDA)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet blocks in backward")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--cache-latents", action="store_true",
                   help="encode every image once before training and keep the VAE posteriors in memory")
    g = p.add_argument_group("outputs")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (and at the end)")
    g.add_argument("--validation-prompt", help="generate images from this prompt every --validation-every steps")
    g.add_argument("--validation-every", type=int, default=0, help="0: only at the end")
    g.add_argument("--validation-n", type=int, default=4, help="images per validation (seeds 0..n-1)")
    g.add_argument("--validation-steps", type=int, default=25, help="DDIM steps for validation images")
    g.add_argument("--validation-guidance", type=float, default=7.5)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar")
    return p.parse_args(argv)


def check_args(args):
    """Argument errors that need no file: ValueError naming the flag."""
    if args.data is None:
        if args.export and args.model and not args.resume:
            return
        raise ValueError("--data is required (or --model PATH --export DIR alone to convert a model)")
    if (args.model is None) == (args.init_config is None) and not args.resume:
        raise ValueError("give exactly one of --model (fine-tune) and --init-config (from scratch)")
    if args.vae and not args.init_config:
        raise ValueError("--vae only applies with --init-config")
    if not args.out and not args.resume:
        raise ValueError("--out RUN_DIR is required (or --resume RUN_DIR)")
    if args.out and args.resume and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ValueError(f"--out {args.out} and --resume {args.resume} name different run directories")
    if args.resolution <= 0 or args.resolution % 8:
        raise ValueError(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), "
                         f"got {args.resolution}")
    for flag in ("batch_size", "grad_accum", "max_steps", "validation_n", "validation_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("lr", "weight_decay", "max_grad_norm", "w_rec", "w_ind", "checkpoint_every", "validation_every",
                 "num_workers"):
        if not getattr(args, flag) >= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.lora_rank is not None and args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0, got {args.lora_rank}")
    if not 0 <= args.caption_dropout <= 1:
        raise ValueError(f"--caption-dropout must lie in [0, 1], got {args.caption_dropout}")


# ----------------------------------------------------------------------------------------------------------------
# Models: the base (loaded or randomly initialised), what is trained, and the module DDP wraps


def read_init_config(path):
    """(the file's JSON dict, {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig}) from a JSON
    file; a config the file leaves out is None."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--init-config {path}: cannot read it as JSON ({e})") from None
    out = {}
    for key, cls in (("unet", UNetConfig), ("vae", VAEConfig), ("text_encoder", CLIPTextConfig)):
        fields = raw.get(key)
        if fields is None:
            out[key] = None
            continue
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"--init-config {path}: {key} has unknown fields {unknown}; {cls.__name__} has "
                             f"{sorted(known)}")
        out[key] = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    return raw, out


def build_from_scratch(init_config, vae_path, seed):
    """Randomly initialised UNet / text encoder (and VAE unless `vae_path`), seeded, CLIP's tokenizer."""
    _, cfgs = read_init_config(init_config)
    if vae_path and cfgs["vae"] is not None:
        raise ValueError(f"--init-config {init_config} has a 'vae' config and --vae {vae_path} was given: "
                         "choose one")
    for key in ("unet", "text_encoder") + (() if vae_path else ("vae",)):
        if cfgs[key] is None:
            raise ValueError(f"--init-config {init_config}: missing the '{key}' config"
                             + (" (or pass --vae PATH)" if key == "vae" else ""))
    with torch.random.fork_rng(devices=[]):  # seeds the init without touching the caller's global RNG
        torch.manual_seed(seed)
        unet, text_encoder = UNet(cfgs["unet"]), CLIPTextModel(cfgs["text_encoder"])
        vae = load_vae(vae_path) if vae_path else VAE(cfgs["vae"])
    return sample.Models(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=Tokenizer.default(),
                         vae_config=vae.config)


def check_compatible(models, resolution):
    """The three models must fit each other and the resolution; ValueError naming the fields otherwise."""
    u, v, c = models.unet.config, models.vae_config, models.text_encoder.config
    if u.context_dim != c.width:
        raise ValueError(f"UNet context_dim {u.context_dim} != text encoder width {c.width}")
    if u.in_channels != v.z_channels or u.out_channels != v.z_channels:
        raise ValueError(f"UNet in/out channels {u.in_channels}/{u.out_channels} != VAE z_channels {v.z_channels}")
    f, fu = 2 ** (len(v.ch_mult) - 1), 2 ** (len(u.channel_mult) - 1)  # VAE and UNet downsampling factors
    if resolution % (f * fu):
        raise ValueError(f"--resolution {resolution} must be a multiple of {f * fu} for this model (VAE "
                         f"downsamples by {f}, the UNet by {fu} more)")
    return (v.z_channels, resolution // f, resolution // f)


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


def trained_state(model, lora_rank):
    """The tensors a checkpoint keeps for one trained model: its adapters, or all of it."""
    return lora.lora_state_dict(model) if lora_rank > 0 else model.state_dict()


def load_trained_state(model, state_dict, lora_rank, name):
    """Copy a checkpoint's tensors into `model` (in place, keeping its tensors' layout), strictly."""
    if lora_rank > 0:
        return lora.load_lora_state_dict(model, state_dict)
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    bad = [k for k in expected.keys() & state_dict.keys() if expected[k].shape != state_dict[k].shape]
    if missing or unexpected or bad:
        raise weights.CheckpointError(f"{name}: {len(missing)} tensors missing {missing[:5]}, {len(unexpected)} "
                                      f"unexpected {unexpected[:5]}, shapes differ for {sorted(bad)[:5]}")
    model.load_state_dict(state_dict, strict=True)


class DDMModel(nn.Module):
    """The networks that are trained (what DistributedDataParallel wraps); forward = one micro-batch's DDM loss."""

    def __init__(self, unet, text_encoder, indicator, train_text_encoder, w_rec, w_ind):
        super().__init__()
        self.unet, self.text_encoder, self.indicator = unet, text_encoder, indicator
        self.train_text_encoder, self.w_rec, self.w_ind = train_text_encoder, w_rec, w_ind

    def forward(self, z_t, t, target, input_ids, groups):
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            context = self.text_encoder(input_ids)  # (B, 77, width)
        eps_hat = self.unet(z_t, t, context)
        return ddm_loss(eps_hat, target, groups, self.indicator, self.w_rec, self.w_ind)


# ----------------------------------------------------------------------------------------------------------------
# Data order and per-micro-batch randomness, both functions of (seed, position) only


def derive_seed(*key):
    """A 63-bit seed from a tuple such as (seed, "noise", step, micro, rank), by hashing: distinct keys give
    unrelated streams (unlike seed + step, where run A's step 1 would replay run B's step 0)."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 1


class MicroBatchIndices:
    """Dataset indices of every micro-batch of this rank, from global micro-batch `start` on, forever.

    Epoch e is a permutation seeded by (seed, e), cut into world_size·batch_size chunks (the incomplete rest is
    dropped); rank r takes the r-th batch_size share of each chunk, as DistributedSampler does.
    """

    def __init__(self, n, batch_size, seed, start=0, rank=0, world_size=1):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world_size = rank, world_size
        self.per_epoch = n // (batch_size * world_size)

    def __iter__(self):
        m, epoch, perm = self.start, None, None
        while True:
            e, k = divmod(m, self.per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, "epoch", e)))
            first = (k * self.world_size + self.rank) * self.batch_size
            yield perm[first:first + self.batch_size].tolist()
            m += 1


def encode_dataset(vae, data, batch_size, device):
    """(mean, std) of the VAE posterior of every image, in fixed chunks (so identical on every run)."""
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            pixels = torch.stack([data[j]["pixels"] for j in range(i, min(i + batch_size, len(data)))])
            posterior = vae.encode(pixels.to(device))
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def micro_batch_inputs(posterior_mean, posterior_std, texts, models, args, generator, device):
    """(z_t, t, target, input_ids) of one micro-batch; every random draw from `generator`, in a fixed order."""
    eps_vae = torch.randn(posterior_mean.shape, generator=generator).to(device)
    z0 = (posterior_mean + posterior_std * eps_vae) * models.vae_config.scaling_factor  # posterior sample, scaled
    noise = torch.randn(z0.shape, generator=generator).to(device)
    t = torch.randint(0, N_TRAIN_TIMESTEPS, (z0.shape[0],), generator=generator).to(device)
    drop = (torch.rand(z0.shape[0], generator=generator) < args.caption_dropout).tolist()
    input_ids = models.tokenizer(["" if d else s for s, d in zip(texts, drop)]).to(device)
    z_t = sample.add_noise(z0, noise, t, models.alphas_cumprod)
    target = noise if models.prediction_type == "epsilon" else sample.v_target(z0, noise, t, models.alphas_cumprod)
    return z_t, t, target, input_ids


# ----------------------------------------------------------------------------------------------------------------
# Run directory: configuration, checkpoints, loading


def run_config(args, data, world_size):
    """The values a resume must match (RESUME_FIELDS), with paths made absolute and the init config inlined."""
    c = {k: getattr(args, k, None) for k in RESUME_FIELDS if hasattr(args, k)}
    c.update(model=str(Path(args.model).resolve()) if args.model else None,
             init_config=read_init_config(args.init_config)[0] if args.init_config else None,
             vae=str(Path(args.vae).resolve()) if args.vae else None, data=str(Path(args.data).resolve()),
             num_images=len(data), group_names=list(data.group_names), world_size=world_size)
    return c


def _write_json(path, obj):
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _save_tensors(tensors, path):
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def latest_checkpoint(run_dir):
    """The newest complete checkpoint directory (a *.tmp one was interrupted and does not count), or None."""
    done = [p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and not p.name.endswith(".tmp")]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def checkpoint_parts(unet, text_encoder, indicator, config):
    """[(file name, model, LoRA rank)] a checkpoint holds: what is trained (adapters only with LoRA)."""
    suffix, rank = ("_lora" if config["lora_rank"] > 0 else ""), config["lora_rank"]
    parts = [(f"unet{suffix}.safetensors", unet, rank)]
    if config["train_text_encoder"]:
        parts.append((f"text_encoder{suffix}.safetensors", text_encoder, rank))
    if config["w_ind"] > 0:  # a plain run (w_ind = 0) never trains its indicator: nothing to save
        parts.append(("indicator.safetensors", indicator, 0))
    return parts


def checkpoint_tensors(unet, text_encoder, indicator, config):
    """{file name: state dict} of a checkpoint."""
    return {file: trained_state(model, rank) for file, model, rank in
            checkpoint_parts(unet, text_encoder, indicator, config)}


def fingerprint(tensors):
    """sha256 of checkpoint_tensors(...), file by file and name by name: equal iff the weights are equal."""
    h = hashlib.sha256()
    for file in sorted(tensors):
        for name in sorted(tensors[file]):
            h.update(f"{file}/{name}".encode())
            h.update(tensors[file][name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(run_dir, step, tensors, optimizer, scaler, extra):
    """checkpoint-STEP.tmp/ filled and fsynced, renamed to checkpoint-STEP/, then older checkpoints deleted."""
    final = run_dir / f"checkpoint-{step:06d}"
    tmp = run_dir / f"checkpoint-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for file, state_dict in tensors.items():
        _save_tensors(state_dict, tmp / file)
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


def load_checkpoint_weights(ckpt, unet, text_encoder, indicator, config):
    """Copy a checkpoint's trained tensors into models built (and LoRA-injected) as the run built them."""
    for file, model, rank in checkpoint_parts(unet, text_encoder, indicator, config):
        load_trained_state(model, load_file(ckpt / file), rank, str(ckpt / file))


@dataclasses.dataclass
class Run:
    """A trained run: `models` for sample.generate (LoRA merged unless asked not to), its indicator and groups."""
    models: sample.Models
    indicator: Indicator  # None for a plain run (w_ind = 0): it never trained one
    group_names: list
    step: int
    info: dict  # run.json


def read_run_json(run_dir):
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a train.py run directory (no run.json)")
    return json.loads(path.read_text())


def base_path(run_dir, info):
    return Path(run_dir) / "base" if info["base"] == "base" else Path(info["base"])


def load_run(run_dir, device="cpu", dtype=torch.float32, merge=True):
    """The models of a run directory's latest checkpoint: its base model plus the trained weights."""
    run_dir = Path(run_dir)
    info = read_run_json(run_dir)
    config = info["config"]
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} holds no finished checkpoint yet")
    models = sample.load_models(base_path(run_dir, info))
    setup_trainable(models, config["lora_rank"], config["lora_alpha"], config["train_text_encoder"])
    indicator = Indicator(info["latent_shape"], len(config["group_names"]), config["indicator_hidden"])
    load_checkpoint_weights(ckpt, models.unet, models.text_encoder, indicator, config)
    for m in (models.unet, models.text_encoder, indicator):
        if merge:
            lora.merge_lora(m)
        m.requires_grad_(False).to(device, dtype).eval()
    models.vae.to(device, dtype)
    step = json.loads((ckpt / "state.json").read_text())["step"]
    return Run(models, indicator if config["w_ind"] > 0 else None, config["group_names"], step, info)


# ----------------------------------------------------------------------------------------------------------------
# Export as a diffusers folder

SCHEDULER_CONFIG = {  # SD v1.5's scheduler/scheduler_config.json (PNDM with these values; DDIM reads them too)
    "_class_name": "PNDMScheduler", "num_train_timesteps": N_TRAIN_TIMESTEPS, "beta_schedule": "scaled_linear",
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
    ac = models.alphas_cumprod.detach().double().cpu()
    if not torch.equal(ac, sample.sd_schedule()):
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
    _write_json(folder / "tokenizer_config.json", {
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
        _save_tensors(sd, tmp / name / filename)
        _write_json(tmp / name / "config.json", config)
    write_tokenizer(models.tokenizer, tmp / "tokenizer")
    (tmp / "scheduler").mkdir()
    _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config(models))
    _write_json(tmp / "model_index.json", MODEL_INDEX)
    os.replace(tmp, out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# Training


def make_optimizer(params, args):
    """AdamW with the authors' settings (from args). fused=True: one kernel for all parameters instead of a Python
    loop over them (PyTorch's CPU default), ~20% of a tiny model's LoRA step; the same update rule."""
    return torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.adam_betas), eps=args.adam_eps,
                             weight_decay=args.weight_decay, fused=True)


def setup_distributed(device_arg):
    """(rank, world_size, device, created): torchrun's environment, or a single process."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    device = torch.device(device_arg or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:  # a plain --device cuda: this process's GPU under torchrun, else the first
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    created = world > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device, created


def save_validation_images(models, args, run_dir, step):
    images = sample.generate(models, [args.validation_prompt] * args.validation_n, list(range(args.validation_n)),
                             steps=args.validation_steps, guidance=args.validation_guidance,
                             height=args.resolution, width=args.resolution, progress=False)
    folder = run_dir / "validation" / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image.numpy()).save(folder / f"{k:02d}.png")


def train(argv=None):
    """Run train.py with these command-line arguments (a list of str, or parsed args); returns the run directory."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    check_args(args)
    if args.data is None:  # --model PATH --export DIR: conversion only
        return export_diffusers(sample.load_models(args.model), args.export)
    rank, world, device, created_group = setup_distributed(args.device)
    try:
        return _train(args, rank, world, device)
    finally:
        if created_group:
            dist.destroy_process_group()


def _barrier(world):
    if world > 1:
        dist.barrier()


def _train(args, rank, world, device):
    # ---- everything that can be wrong is checked before anything is written
    data = ImageFolder(args.data, args.resolution)  # validates every metadata line and image
    if args.export and Path(args.export).exists():  # not only after hours of training
        raise FileExistsError(f"--export {args.export} exists; choose a new folder")
    run_dir = Path(args.resume or args.out)
    if args.resume:
        info = read_run_json(run_dir)
        stored = info["config"]
    from_scratch = args.init_config is not None
    if args.lora_rank is None:
        args.lora_rank = 0 if from_scratch else 8
    if args.train_text_encoder is None:
        args.train_text_encoder = from_scratch
    config = run_config(args, data, world)
    if args.resume:
        for field in RESUME_FIELDS:
            if stored.get(field) != config.get(field):
                raise ValueError(f"--resume {run_dir}: the run was started with {field}={stored.get(field)!r}, "
                                 f"now {field}={config.get(field)!r}; resume with the same arguments (only "
                                 f"--max-steps, checkpoint/validation/hardware flags may change)")
        ckpt = latest_checkpoint(run_dir)
        base = base_path(run_dir, info)
    else:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(f"--out {run_dir} exists and is not empty; choose a new directory or --resume it")
        ckpt, base = None, None
    if len(data) < args.batch_size * world:
        raise ValueError(f"{args.data} has {len(data)} images, fewer than --batch-size {args.batch_size} x "
                         f"{world} processes")

    models = (sample.load_models(base) if base is not None
              else build_from_scratch(args.init_config, args.vae, args.seed) if from_scratch
              else sample.load_models(args.model))
    latent_shape = check_compatible(models, args.resolution)
    _barrier(world)  # every rank has checked the run directory before rank 0 creates it
    if rank == 0 and not args.resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        if from_scratch:
            export_diffusers(models, run_dir / "base")
        configs = {k: dataclasses.asdict(getattr(models, m).config)
                   for k, m in (("unet", "unet"), ("vae", "vae"), ("text_encoder", "text_encoder"))}
        _write_json(run_dir / "run.json", {
            "format": "ddm-run/1", "config": config, "base": "base" if from_scratch else config["model"],
            "latent_shape": list(latent_shape), "model_configs": configs, "prediction_type": models.prediction_type,
            "args": {k: v for k, v in vars(args).items()}, "versions": {"torch": torch.__version__},
            "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    _barrier(world)

    # ---- what is trained, and its optimizer
    with torch.random.fork_rng(devices=[]):  # LoRA A and indicator init from the seed, caller's RNG untouched
        torch.manual_seed(derive_seed(args.seed, "init"))
        setup_trainable(models, args.lora_rank, args.lora_alpha, args.train_text_encoder)
        indicator = Indicator(latent_shape, len(data.group_names), args.indicator_hidden)
    indicator.requires_grad_(args.w_ind > 0)  # with w_ind = 0 it never runs: plain fine-tuning
    model = DDMModel(models.unet, models.text_encoder, indicator, args.train_text_encoder, args.w_rec, args.w_ind)
    model.to(device)
    models.vae.to(device).eval()
    models.alphas_cumprod = models.alphas_cumprod.to(device)
    models.unet.train()
    models.unet.gradient_checkpointing = args.gradient_checkpointing
    models.text_encoder.train(args.train_text_encoder)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args)
    precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    amp_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext

    step, elapsed = 0, 0.0
    if ckpt is not None:
        load_checkpoint_weights(ckpt, models.unet, models.text_encoder, indicator, config)
        state = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        progress = json.loads((ckpt / "state.json").read_text())
        step, elapsed = progress["step"], progress["elapsed"]
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model

    # ---- data: posteriors cached once, or a DataLoader over the same index stream
    indices = MicroBatchIndices(len(data), args.batch_size, args.seed, step * args.grad_accum, rank, world)
    if args.cache_latents:
        cache = encode_dataset(models.vae, data, args.batch_size, device)
        batches = ({"index": torch.tensor(idx), "text": [data.texts[i] for i in idx],
                    "group": torch.tensor([data.groups[i] for i in idx])} for idx in indices)
    else:
        batches = iter(torch.utils.data.DataLoader(data, batch_sampler=indices, num_workers=args.num_workers,
                                                   pin_memory=device.type == "cuda"))

    # ---- the loop
    log_path = run_dir / "log.jsonl"
    if rank == 0:  # drop lines a crash left behind the checkpoint, so the log matches the weights
        old = log_path.read_text().splitlines() if log_path.exists() else []
        if old and not old[-1].endswith("}"):  # a line the crash cut off half-way
            old.pop()
        log_path.write_text("".join(line + "\n" for line in old if json.loads(line)["step"] <= step))
    log = open(log_path, "a") if rank == 0 else None
    bar = tqdm(total=args.max_steps, initial=step, desc="train", unit="step", disable=rank != 0 or not args.progress)
    t_start = time.time() - elapsed
    last_saved = ckpt
    try:
        while step < args.max_steps:
            sums = torch.zeros(4, device=device)  # loss, rec, ind, acc summed over micro-batches
            for micro in range(args.grad_accum):
                batch = next(batches)
                gen = torch.Generator().manual_seed(derive_seed(args.seed, "noise", step, micro, rank))
                with torch.no_grad():
                    if args.cache_latents:
                        mean, std = cache[0][batch["index"].to(device)], cache[1][batch["index"].to(device)]
                    else:
                        posterior = models.vae.encode(batch["pixels"].to(device, non_blocking=True))
                        mean, std = posterior.mean, posterior.std
                    z_t, t, target, input_ids = micro_batch_inputs(mean, std, batch["text"], models, args, gen, device)
                sync = world == 1 or micro == args.grad_accum - 1  # DDP all-reduces only on the last micro-batch
                with (nullcontext() if sync else ddp.no_sync()):
                    with autocast():
                        loss, parts = ddp(z_t, t, target, input_ids, batch["group"].to(device))
                    loss = loss / args.grad_accum
                    (scaler.scale(loss) if scaler else loss).backward()
                sums += torch.stack([loss.detach() * args.grad_accum, parts["rec"].float(),
                                     torch.as_tensor(parts["ind"], device=device).float(),
                                     torch.as_tensor(parts["acc"], device=device).float()])
            if world > 1:
                dist.all_reduce(sums)
            loss, rec, ind, acc = (sums / (args.grad_accum * world)).tolist()
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss} at step {step + 1}; training stopped before applying it. The last good "
                    f"checkpoint is {last_saved or 'none (no checkpoint written yet)'}")
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = (nn.utils.clip_grad_norm_(params, args.max_grad_norm).item() if args.max_grad_norm > 0
                         else None)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            record = {"step": step, "loss": loss, "rec": rec, "ind": ind, "acc": acc, "lr": args.lr,
                      "grad_norm": grad_norm, "time": round(time.time() - t_start, 3)}
            if rank == 0:
                log.write(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v
                                      for k, v in record.items()}) + "\n")
                log.flush()
                bar.set_postfix_str(f"loss {loss:.4f} rec {rec:.4f} ind {ind:.3f} acc {acc:.2f}", refresh=False)
                bar.update()
            final = step == args.max_steps
            if (args.checkpoint_every and step % args.checkpoint_every == 0) or final:
                tensors = checkpoint_tensors(models.unet, models.text_encoder, indicator, config)
                fingerprints = None
                if final and world > 1:  # every rank computes its own: they must all be equal
                    fingerprints = [None] * world
                    dist.all_gather_object(fingerprints, fingerprint(tensors))
                if rank == 0:
                    last_saved = save_checkpoint(run_dir, step, tensors, optimizer, scaler,
                                                 {"elapsed": time.time() - t_start, "loss": loss,
                                                  "rank_fingerprints": fingerprints})
                _barrier(world)
            if args.validation_prompt and ((args.validation_every and step % args.validation_every == 0) or final):
                if rank == 0:
                    models.unet.eval(), models.text_encoder.eval()
                    save_validation_images(models, args, run_dir, step)
                    models.unet.train(), models.text_encoder.train(args.train_text_encoder)
                _barrier(world)
    finally:
        bar.close()
        if log:
            log.close()
    if args.export and rank == 0:
        export_diffusers(load_run(run_dir).models, args.export)
    _barrier(world)
    return run_dir


def main(argv=None):
    try:
        train(argv)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        sys.exit(f"train.py: error: {e}")


if __name__ == "__main__":
    main()

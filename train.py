"""Fine-tune Stable Diffusion v1.x with the Debiasing Diffusion Model objective, or train a tiny one from scratch.

One micro-batch (`micro_batch_inputs`, then `DDMModel`; Huang et al., arXiv 2503.12536), ddm.py owning the loss:
    z_0 = vae.encode(x).sample() · 0.18215,   t ~ U{0, …, 999},   ε ~ N(0, I),   z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε
    ε̂ = unet(z_t, t, text_encoder(prompt)),   (L, parts) = ddm.loss(MicroBatch(z_0, z_t, t, ε, ε̂, ...), indicator)

    python train.py --model sd-v1-5/ --data DIR --out runs/ddm [--objective ddm --w-ind .05 --lora-rank 8 ...]
    torchrun --nproc_per_node N train.py ...                  (DistributedDataParallel; same script, same flags)
    python train.py --init-config tiny.json --data DIR --out runs/base      (random init: trains from scratch)
    python train.py ... --resume runs/ddm                     (the same flags again; continues bit-exactly)
    python train.py --model runs/ddm --export sd-ddm/         (merged diffusers folder + indicator; also after training)

Defaults follow the authors' script: AdamW (lr 1e-5, wd 1e-2), LoRA rank 8 / alpha 32 on to_q, to_v, gradient
accumulation 4. Ours: global-norm clipping (UNet with text encoder; the indicator apart), K groups from the data,
draws seeded by (seed, step, micro, rank): on CPU a killed and resumed run ends bit for bit where one run does.
"""
import argparse
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import checkpoints
import cli
import ddm
import diffusion
import loading
import rundir
import sample
import weights
from data import ImageFolder, derive_seed, encode_dataset, micro_batch_indices, micro_batches


# ----------------------------------------------------------------------------------------------------------------
# The training step: one micro-batch's inputs, then the loss of the networks that are trained


def micro_batch_inputs(posterior_mean, posterior_std, texts, models, args, generator, device):
    """{z0, z_t, t, noise, target, input_ids} of one micro-batch; every draw from `generator`, in a fixed order."""
    eps_vae = torch.randn(posterior_mean.shape, generator=generator).to(device)
    z0 = (posterior_mean + posterior_std * eps_vae) * models.vae_config.scaling_factor  # posterior sample, scaled
    noise = torch.randn(z0.shape, generator=generator).to(device)
    t = torch.randint(0, len(models.alphas_cumprod), (z0.shape[0],), generator=generator).to(device)  # SD: 0..999
    drop = (torch.rand(z0.shape[0], generator=generator) < args.caption_dropout).tolist()
    input_ids = models.tokenizer(["" if d else s for s, d in zip(texts, drop)]).to(device)
    z_t = diffusion.add_noise(z0, noise, t, models.alphas_cumprod)
    target = noise if models.prediction_type == "epsilon" else diffusion.v_target(z0, noise, t, models.alphas_cumprod)
    return {"z0": z0, "z_t": z_t, "t": t, "noise": noise, "target": target, "input_ids": input_ids}


class DDMModel(nn.Module):
    """The networks that are trained (what DistributedDataParallel wraps); forward = one micro-batch's loss.
    `constants`: the MicroBatch fields that never change (ᾱ, the shares π̂, π* and ℓ, the prediction type)."""

    def __init__(self, unet, text_encoder, indicator, args, constants):
        super().__init__()
        self.unet, self.text_encoder, self.indicator, self.args = unet, text_encoder, indicator, args
        self.constants = constants

    def micro_batch(self, inputs, groups):
        """The ddm.MicroBatch of these inputs: the text encoder, then the UNet's prediction."""
        with torch.set_grad_enabled(self.args.train_text_encoder and torch.is_grad_enabled()):
            context = self.text_encoder(inputs["input_ids"])  # (B, 77, width)
        pred = self.unet(inputs["z_t"], inputs["t"], context)
        return ddm.MicroBatch(**{k: v for k, v in inputs.items() if k != "input_ids"}, pred=pred, groups=groups,
                              **self.constants)

    def forward(self, inputs, groups):
        return ddm.loss(self.micro_batch(inputs, groups), self.indicator, self.args)


# ----------------------------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """One training run: everything is checked and built in __init__, then `run` loops over `step`."""

    def __init__(self, args, rank, world, device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        # ---- everything that can be wrong is checked before anything is written
        # a resume reads the labels it finds: its flags are compared with run.json's (a --w-ind 0 forgotten is named)
        self.data = data = ImageFolder(args.data, args.resolution, attribute=args.attribute,  # every line and image
                                       need_groups=ddm.reads_groups(args.objective, args.w_ind) and not args.resume)
        self.target_shares = ddm.parse_target(args.target, data.group_names).to(device)
        checkpoints.check_export(args.export, args.out or args.resume)  # not only after hours of training
        from_scratch = args.init_config is not None
        args.lora_rank = rundir.lora_rank(args)
        args.train_text_encoder = from_scratch if args.train_text_encoder is None else args.train_text_encoder
        # a resume only compares the JSON with run.json (its models come from base/): what an older version accepted
        read = weights.read_json if args.resume else lambda path: loading.read_init_config(path, args.vae)[0]
        init_config = read(args.init_config) if from_scratch else None
        self.run_dir, self.config, ckpt, base = rundir.open_run(args, data, world, init_config, device, rank == 0)
        self.models = models = (loading.models_from_config(args.init_config, args.vae, args.seed)
                                if from_scratch and base is None else loading.load_models(base or args.model))
        if args.resume:  # a resume trains on from the run's base: on the schedule the run started with
            loading.check_schedule(models, self.run_dir, rundir.read_run_json(self.run_dir))
        why = cli.side_error("resolution", args.resolution,
                             loading.side_multiple(models.unet.config, models.vae_config))
        if why:
            raise ValueError(why)
        latent_shape = loading.latent_shape(models, args.resolution, args.resolution)
        _barrier(world)  # every rank has checked the run directory before rank 0 creates it
        if rank == 0 and not args.resume:
            rundir.write_run(self.run_dir, self.config, self.models, latent_shape, vars(args), data)
        _barrier(world)
        self.build(latent_shape)
        self.step_count, elapsed, self.last_saved = checkpoints.load_checkpoint(
            ckpt, models.unet, models.text_encoder, self.indicator, self.config, self.optimizer, self.scaler)
        self.t_start, self.parts = time.time() - elapsed, None  # parts: the objective's part names (ddm.check_parts)
        indices = micro_batch_indices(len(data), args.batch_size, args.seed, self.step_count * args.grad_accum, rank,
                                      world)
        cache = encode_dataset(models.vae, data, args.batch_size, device) if args.cache_latents else None
        self.batches = micro_batches(data, indices, cache, args.num_workers, pin_memory=device.type == "cuda")

    def build(self, latent_shape):
        """What is trained (LoRA or whole weights, the indicator if the objective has one), its optimizer, AMP."""
        args, models, device = self.args, self.models, self.device
        with torch.random.fork_rng(devices=[]):  # LoRA A and indicator init from the seed, caller's RNG untouched
            torch.manual_seed(derive_seed(args.seed, "init"))
            checkpoints.setup_trainable(models, args.lora_rank, args.lora_alpha, args.train_text_encoder)
            self.indicator = (ddm.make_indicator(args.objective, latent_shape, len(self.data.group_names),
                                                 args.indicator_hidden)
                              if ddm.uses_indicator(args.objective, args.w_ind) else None)
        models.alphas_cumprod = models.alphas_cumprod.to(device)
        counts = torch.tensor([self.data.groups.count(k) for k in range(len(self.data.group_names))])  # -1: no label
        constants = {"alphas_cumprod": models.alphas_cumprod, "prediction_type": models.prediction_type,
                     "group_shares": (counts / counts.sum()).float().to(device),
                     "labelled_share": counts.sum().item() / len(self.data), "target_shares": self.target_shares}
        self.model = DDMModel(models.unet, models.text_encoder, self.indicator, args, constants).to(device)
        models.vae.to(device).eval(), models.unet.train(), models.text_encoder.train(args.train_text_encoder)
        models.unet.gradient_checkpointing = args.gradient_checkpointing
        net = [p for m in (models.unet, models.text_encoder) for p in m.parameters() if p.requires_grad]
        ind = list(self.indicator.parameters()) if self.indicator is not None else []
        self.params, self.networks = net + ind, (net, ind)  # clipped apart; the indicator at its own --indicator-lr
        groups = [{"params": net}] + [{"params": ind, "lr": args.indicator_lr or args.lr}] * bool(ind)
        self.optimizer = checkpoints.make_optimizer(groups, args)
        precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
        self.amp_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)  # off: a no-op

    def step(self):
        """One optimizer update over grad_accum micro-batches; the loss and parts, means over them and the ranks (of a
        part named *_max, the largest)."""
        args, device, models, ddp, sums, maxima = self.args, self.device, self.models, self.ddp, {}, {}
        for micro in range(args.grad_accum):
            batch = next(self.batches)
            gen = torch.Generator().manual_seed(derive_seed(args.seed, "noise", self.step_count, micro, self.rank))
            with torch.no_grad():
                if "mean" in batch:  # --cache-latents
                    mean, std = batch["mean"], batch["std"]
                else:
                    posterior = models.vae.encode(batch["pixels"].to(device, non_blocking=True))
                    mean, std = posterior.mean, posterior.std
                inputs = micro_batch_inputs(mean, std, batch["text"], models, args, gen, device)
            sync = self.world == 1 or micro == args.grad_accum - 1  # DDP all-reduces on the last micro-batch only
            with nullcontext() if sync else ddp.no_sync():
                with torch.autocast(device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext():
                    loss, parts = ddp(inputs, batch["group"].to(device))
                self.scaler.scale(loss / args.grad_accum).backward()
            self.parts = ddm.check_parts(parts, self.parts, args.objective, self.step_count + 1)
            for name, value in {"loss": loss, **parts}.items():  # a NaN part was not measured: not counted
                value = torch.as_tensor(value, device=device).detach().float()
                if name.endswith("_max"):  # a maximum: the step's largest; not measured (NaN): -inf, below any value
                    maxima[name] = torch.fmax(maxima.get(name, value.new_tensor(-math.inf)), value)
                    continue
                unmeasured = value.isnan() & (name != "loss")  # a NaN loss is a failure: counted, it stops the run
                sums[name] = sums.get(name, 0) + torch.stack([torch.where(unmeasured, 0.0, value), ~unmeasured])
        totals = torch.stack(list(sums.values()))  # (parts, 2): sum and count; the same parts in order on every rank
        if self.world > 1:
            dist.all_reduce(totals)
            for peak in maxima.values():  # the same parts in order on every rank, as above
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        means = dict(zip(sums, (totals[:, 0] / totals[:, 1]).tolist()))  # 0/0: NaN, logged as null
        means.update({name: peak.item() if peak > -math.inf else math.nan for name, peak in maxima.items()})
        if not math.isfinite(means["loss"]):
            self.stop(f"loss is {means['loss']}", "before applying it")
        self.scaler.unscale_(self.optimizer)
        # per network (the indicator never throttles the UNet); --max-grad-norm 0: max_norm inf, scaling by 1.0 exactly
        norms = [nn.utils.clip_grad_norm_(params, args.max_grad_norm or math.inf).item() for params in self.networks]
        if not self.scaler.is_enabled() and not all(map(math.isfinite, norms)):
            self.stop(f"gradient norm is {next(n for n in norms if not math.isfinite(n))}", "before applying it")
        self.scaler.step(self.optimizer)  # fp16: skips a step whose gradients are not finite, lowers the scale
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.stack([p.detach().isfinite().all() for p in self.params]).all():
            self.stop("the weights are not finite after the update", "without saving them")
        self.step_count += 1
        return means, norms[0]

    def stop(self, problem, what):
        raise FloatingPointError(f"{problem} at step {self.step_count + 1}; training stopped {what}. The last good "
                                 f"checkpoint is {self.last_saved or 'none (no checkpoint written yet)'}")

    def save(self, final):
        """A checkpoint from rank 0; at the end of a DDP run every rank's weight hash goes into state.json."""
        tensors = checkpoints.checkpoint_tensors(self.models.unet, self.models.text_encoder, self.indicator,
                                                 self.config)
        fingerprints = [None] * self.world if final and self.world > 1 else None  # each rank's own: all equal
        if fingerprints:
            dist.all_gather_object(fingerprints, checkpoints.fingerprint(tensors))
        if self.rank == 0:
            self.last_saved = checkpoints.save_checkpoint(
                self.run_dir, self.step_count, tensors, self.optimizer, self.scaler,
                {"elapsed": time.time() - self.t_start, "rank_fingerprints": fingerprints},
                {checkpoints.INDICATOR_FILE: self.indicator and ddm.indicator_metadata(
                    self.indicator, self.data.group_names, self.args.attribute)})
        _barrier(self.world)

    def validate(self):
        args, models = self.args, self.models
        if self.rank == 0:
            models.unet.eval(), models.text_encoder.eval()
            n, side = args.validation_n, args.resolution
            images = sample.generate(models, [args.validation_prompt] * n, list(range(n)), steps=args.validation_steps,
                                     guidance=args.validation_guidance, height=side, width=side, progress=False)
            sample.save_pngs(images, self.run_dir / "validation" / f"step_{self.step_count:06d}")
            models.unet.train(), models.text_encoder.train(args.train_text_encoder)
        _barrier(self.world)

    def run(self):
        args, rank = self.args, self.rank
        self.ddp = nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        log = nullcontext() if rank else rundir.open_log(self.run_dir, self.step_count, args, self.config, self.data)
        bar = tqdm(total=args.max_steps, initial=self.step_count, desc="train", unit="step",
                   disable=rank != 0 or not args.progress)
        with log, bar:
            while self.step_count < args.max_steps:
                means, grad_norm = self.step()
                step, final = self.step_count, self.step_count == args.max_steps
                if rank == 0:
                    rundir.log_step(log, {"step": step, **means, "lr": args.lr, "grad_norm": grad_norm,
                                          "time": round(time.time() - self.t_start, 3)})
                    bar.set_postfix_str(" ".join(f"{k} {v:.4g}" for k, v in means.items()), refresh=False)
                    bar.update()
                if (args.checkpoint_every and step % args.checkpoint_every == 0) or final:
                    self.save(final)
                if args.validation_prompt is not None and (
                        (args.validation_every and step % args.validation_every == 0) or final):
                    self.validate()
        if rank == 0:
            tqdm.write(f"trained to step {self.step_count}: {self.run_dir}")  # between the bars of a caller's loop
            if args.export:
                tqdm.write(f"exported {self.run_dir} to {loading.export_model(self.run_dir, args.export)}")
        _barrier(self.world)
        return self.run_dir


# ----------------------------------------------------------------------------------------------------------------
# Command line and entry point


def add_objective_flags(p):
    """The objective's flags: every one is part of the run's configuration (run.json, checked on resume)."""
    g = p.add_argument_group("objective (ddm.py): every flag here is part of the run's configuration")
    objective = [
        g.add_argument("--objective", choices=sorted(ddm.OBJECTIVES), default="ddm", help="ddm.OBJECTIVES"),
        g.add_argument("--w-rec", type=float, default=0.95, help="weight of the denoising MSE"),
        g.add_argument("--w-ind", type=float, default=0.05, help="weight of the indicator CE (0: no indicator)"),
        g.add_argument("--indicator-hidden", type=int, nargs="+", default=[1024, 512], help="indicator MLP widths"),
        g.add_argument("--target", default="uniform", help="pi*: uniform or NAME=SHARE,... (balanced, ind.-weighted)"),
        g.add_argument("--weight-clip", type=float, default=10.0, help="importance-weight cap (indicator-weighted)"),
        g.add_argument("--attribute", help="groups by attribute in the data: the one to use, or A+B (intersections)"),
    ]
    p.set_defaults(objective_fields=[a.dest for a in objective],
                   objective_defaults={a.dest: a.default for a in objective})


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="diffusers SD folder, single-file checkpoint, train.py run or its checkpoint-N/")
    g.add_argument("--init-config", help="JSON {unet, vae, text_encoder} of configs: random init, from scratch")
    g.add_argument("--vae", help="with --init-config: this trained VAE instead (SD folder, its vae/ or one file)")
    g.add_argument("--data", help="folder with metadata.jsonl (file_name, text, group) and the images")
    g.add_argument("--out", help="new run directory")
    g.add_argument("--resume", help="continue this run directory (give the same arguments again)")
    g.add_argument("--export", help="a diffusers folder of the merged model and indicator (no --data: --model's)")
    g.add_argument("--allow-data-change", action="store_true", help="--resume over changed --data (then not exact)")
    add_objective_flags(p)
    g = p.add_argument_group("what is trained")
    g.add_argument("--lora-rank", type=int, help="LoRA rank, 0 = train all weights (default 8; 0 with --init-config)")
    g.add_argument("--lora-alpha", type=float, default=32.0)
    g.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction,
                   help="also train the text encoder (default: off; on with --init-config)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--resolution", type=int, default=512, help="training images are resized/cropped to this")
    g.add_argument("--batch-size", type=int, default=1, help="images per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    g.add_argument("--max-steps", type=int, default=1000, help="optimizer steps in total")
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--indicator-lr", type=float, help="the indicator's learning rate (default: --lr)")
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--adam-betas", type=float, nargs=2, default=[0.9, 0.999])
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradient norms (indicator apart); 0 = off")
    g.add_argument("--caption-dropout", type=float, default=0.0, help="share of captions made '' (for CFG)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cache-latents", action="store_true", help="encode every image once; posteriors in memory")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", type=lambda spec: str(cli.device_arg(spec)),  # checked, and kept as text for run.json
                   help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), help="autocast (default bf16 on CUDA)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet blocks in backward")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("outputs")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (and at the end)")
    g.add_argument("--validation-prompt", help="generate images from this prompt every --validation-every steps")
    g.add_argument("--validation-every", type=int, default=0, help="0: only at the end")
    g.add_argument("--validation-n", type=int, default=4, help="images per validation (seeds 0..n-1)")
    g.add_argument("--validation-steps", type=int, default=25, help="DDIM steps for validation images")
    g.add_argument("--validation-guidance", type=float, default=7.5)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar")
    return p


RANGES = {**dict.fromkeys(("batch_size", "grad_accum", "max_steps", "validation_n"), (1, None)),
          **dict.fromkeys(("lr", "weight_decay", "max_grad_norm", "w_rec", "w_ind", "checkpoint_every",
                           "validation_every", "num_workers", "lora_rank"), (0, None)),
          # > 0: each read another method below (--indicator-lr 0 became --lr, --weight-clip -1 makes every importance
          # weight -1, --lora-alpha 0 scales the LoRA update to 0, --adam-eps 0 divides by 0 where a gradient is 0)
          **dict.fromkeys(("indicator_lr", "lora_alpha", "weight_clip", "adam_eps"), (0, None, True)),
          "indicator_hidden": (1, None),  # a width 0 is a constant indicator
          "adam_betas": (0.0, 1.0, False, True),  # torch's AdamW: 0 <= beta < 1
          "caption_dropout": (0.0, 1.0),
          "validation_steps": sample.RANGES["steps"], "validation_guidance": sample.RANGES["guidance"]}


def check_args(args):
    """Argument errors that need no file: ValueError naming the flag (the first one found)."""
    defaults = vars(build_parser().parse_args([]))
    if args.data is None and args.export and args.model and not args.resume and args.out is None:
        why = rundir.unread_flag_error(args, defaults)  # a conversion: any other flag is named before its value
    elif args.data is None:
        why = (f"--resume {args.resume}: give the arguments the run started with again (--data is missing; its "
               "run.json's 'args' holds them)" if args.resume else
               "--data is required (or --model PATH --export DIR alone, without --out, to convert a model)")
    elif (args.model is None) == (args.init_config is None) and not args.resume:
        why = "give exactly one of --model (fine-tune) and --init-config (from scratch)"
    elif not 0 <= args.seed < 2 ** 64:  # torch.Generator's range (--init-config seeds one with it)
        why = f"--seed must lie in 0..2**64-1, got {args.seed}"
    elif ddm.noise_aware(args.objective) and args.w_ind == 0:
        why = (f"--w-ind must be a number > 0 with --objective {args.objective} (its noise-aware indicator is what "
               f"it trains), got {args.w_ind}")
    else:
        why = (cli.side_error("resolution", args.resolution) or cli.range_error(args, RANGES)
               or rundir.unread_flag_error(args, defaults))
    if why:
        raise ValueError(why)
    if args.data is not None:  # a conversion writes no run directory
        rundir.run_dir_of(args.out, args.resume)  # one of them, or both naming the same directory


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


def _barrier(world):
    if world > 1:
        dist.barrier()


def train(argv=None):
    """Run train.py with these command-line arguments (a list of str, or parsed args); returns the run directory."""
    args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_args(argv)
    check_args(args)
    if args.data is None:  # --model PATH --export DIR: conversion only
        out = loading.export_model(args.model, args.export)
        tqdm.write(f"exported {args.model} to {out}")
        return out
    rank, world, device, created_group = setup_distributed(args.device)
    try:
        with rundir.locked_run_dir(args.resume or args.out, new=not args.resume) if rank == 0 else nullcontext():
            return Trainer(args, rank, world, device).run()
    finally:
        if created_group:
            dist.destroy_process_group()


def main(argv=None):  # OSError: FileNotFoundError, weights.WriteError
    cli.one_line_errors(lambda: train(argv), "train.py", (ValueError, OSError, FloatingPointError))


if __name__ == "__main__":
    main()

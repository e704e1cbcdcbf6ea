"""Loading what sampling and training run on: SD v1.x models, a train.py run directory, an indicator.

  load_models(path)    a diffusers folder, a single-file checkpoint, a run directory or its checkpoint -> Models
  load_run(run_dir)    a run's base model plus its newest (or a named) checkpoint, LoRA merged; its indicator, groups
  load_indicator(path) the noise-aware indicator of a run (its checkpoint, its export), or an indicator.safetensors
  export_model         train.py --export: a model as a diffusers folder, a run's indicator beside it
  models_from_config   seeded random models from an --init-config JSON (train.py's from-scratch runs)
`model_sides` reads and checks every config file of a model before any weight loads, so a broken one costs no
loading (a run's base model is checked against its fingerprint too: a few MB read).
"""
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

import checkpoints
import diffusion
import lora
import rundir
import weights
from clip_text import CLIPTextConfig, CLIPTextModel, load_text_encoder, tower_error
from ddm import OBJECTIVES, Indicator, indicator_metadata, make_indicator, noise_aware, uses_indicator
from tokenizer import Tokenizer, load_tokenizer
from unet import UNet, UNetConfig, config_error, load_unet
from vae import VAE, VAEConfig, load_vae


@dataclass
class Models:
    """Everything generation needs: the three networks, the tokenizer, and the schedule they were trained with."""
    unet: UNet
    vae: VAE
    text_encoder: CLIPTextModel
    tokenizer: Tokenizer
    vae_config: VAEConfig
    alphas_cumprod: torch.Tensor = field(default_factory=diffusion.sd_schedule)
    prediction_type: str = "epsilon"  # "v_prediction" for SD 2.x-v checkpoints
    checkpoint: str = None  # load_run's: the run's checkpoint folder the weights came from (a fine-tune records it)

    def __post_init__(self):
        # texts are padded to the positions the text encoder has: 77 in every SD, fewer in a tiny model (reproduce.py)
        self.tokenizer.max_length = self.text_encoder.config.max_position


def read_schedule(path):
    """(ᾱ, prediction_type) from a diffusers folder's scheduler/scheduler_config.json (its trained_betas, or its
    named schedule); SD v1.x's otherwise. The sampler's own settings stay SD v1.x's whatever the file says:
    "leading" spacing, steps_offset 1, and ᾱ[0] past the last DDIM step (set_alpha_to_one false). A file that
    asks for another ᾱ than these build (rescale_betas_zero_snr, a β outside (0, 1)) is refused."""
    config = Path(path) / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return diffusion.sd_schedule(), "epsilon"
    return weights.read_config(config, _schedule_from_config)


def _schedule_from_config(c):
    """A field the file omits takes the default diffusers' schedulers read it with (DDPM's linear 1e-4 .. 0.02), not
    SD's: every SD folder names its own, and the same folder must give the same ᾱ in both."""
    n = weights.config_value(c, "num_train_timesteps", "int", diffusion.N_TRAIN_TIMESTEPS)
    kind = weights.config_value(c, "beta_schedule", "str", "linear")
    make = {"scaled_linear": diffusion.scaled_linear_betas, "linear": diffusion.linear_betas}
    prediction_type = weights.config_value(c, "prediction_type", "str", "epsilon")
    if kind not in make or prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"beta_schedule {kind!r} with prediction_type {prediction_type!r} is not supported "
                         "(scaled_linear or linear; epsilon or v_prediction)")
    if weights.config_value(c, "rescale_betas_zero_snr", "bool", False):  # diffusers rescales ᾱ so that ᾱ_T = 0
        raise ValueError("rescale_betas_zero_snr true (a zero terminal SNR) is not supported")
    betas = c.get("trained_betas")
    if betas is not None:  # listed betas win over the named schedule, as in diffusers
        if not isinstance(betas, list) or len(betas) != n or not all(weights.is_number(b) and 0 < b < 1 for b in betas):
            raise ValueError(f"field 'trained_betas' must be null or a list of num_train_timesteps ({n}) numbers in "
                             f"(0, 1)")
        return diffusion.alphas_cumprod(torch.tensor(betas, dtype=torch.float64)), prediction_type
    ends = {key: weights.config_value(c, key, "number", default) for key, default in
            (("beta_start", diffusion.DDPM_BETA_START), ("beta_end", diffusion.DDPM_BETA_END))}
    for key, value in ends.items():
        if value >= 1:
            raise ValueError(f"field '{key}' must be below 1 (a β is the variance of one step's noise), got {value}")
    return diffusion.alphas_cumprod(make[kind](n, ends["beta_start"], ends["beta_end"])), prediction_type


def side_multiple(unet_config, vae_config):
    """What image sides must be a multiple of: the VAE's downsampling, then one halving per UNet level but one."""
    return vae_config.downsample_factor * 2 ** (len(unet_config.channel_mult) - 1)


def model_sides(path):
    """(side_multiple, the side it was trained at) of the model at `path` (a diffusers folder, a single file, a run
    directory or its checkpoint): 64 and 512 for SD v1.x, a run's --resolution, a folder's UNet sample_size x the VAE's
    downsampling. Read from the config files, every one of them checked (UNet, VAE, text encoder, scheduler), and,
    for a run, from run.json, its base model's weights fingerprinted (rundir.base_path)."""
    path, run = Path(path), rundir.run_of(path)
    if run:
        info = rundir.read_run_json(run[0])
        return model_sides(rundir.base_path(run[0], info))[0], info["config"]["resolution"]
    found = checkpoints.find_components(path)
    if found["unet"][1] is None:  # a single file: SD v1.x or v2.x
        u, v = UNetConfig(), VAEConfig()
    else:
        u, v, t = (weights.read_config(found[sub][1], read) for sub, (_, _, read) in checkpoints.COMPONENTS.items())
        read_schedule(path)
        check_fit(u, v, t)
    return side_multiple(u, v), u.sample_size * v.downsample_factor


def check_fit(u, v, c):
    """ValueError unless a UNet, VAE and text encoder of these configs can run together: the UNet reads the text
    encoder's width and the VAE's latent channels."""
    if u.context_dim != c.width or u.in_channels != v.z_channels or u.out_channels != v.z_channels:
        raise ValueError(f"the models do not fit each other: UNet context_dim {u.context_dim}, in/out channels "
                         f"{u.in_channels}/{u.out_channels}; text encoder width {c.width}; VAE z_channels "
                         f"{v.z_channels}")


def latent_shape(models, height, width):
    """(C, h, w) of the latents of height x width images; ValueError when the models do not fit each other or the
    size (first SD's 8, then this model's own multiple)."""
    u, v, c = models.unet.config, models.vae_config, models.text_encoder.config
    check_fit(u, v, c)
    for side, why in ((8, ""), (side_multiple(u, v), " for this model")):
        if height <= 0 or width <= 0 or height % side or width % side:
            raise ValueError(f"height and width must be positive multiples of {side}{why}, got {height}x{width}")
    return v.z_channels, height // v.downsample_factor, width // v.downsample_factor


def load_models(path, device="cpu", dtype=torch.float32):
    """UNet, VAE, text encoder and tokenizer from a diffusers SD folder or a single-file checkpoint, in eval mode;
    or from a train.py run directory (or one of its checkpoint folders): its base model plus the trained weights,
    LoRA merged (`load_run`)."""
    run = rundir.run_of(path)
    if run:
        return load_run(run[0], device, dtype, checkpoint=run[1]).models
    vae = load_vae(path, dtype).to(device)
    schedule, prediction_type = read_schedule(path)
    text_encoder, tokenizer = load_text_encoder(path, dtype).to(device), load_tokenizer(path)
    why = tokenizer.fit_error(text_encoder.config.vocab_size)
    if why:
        raise ValueError(why)
    return Models(unet=load_unet(path, dtype).to(device), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                  vae_config=vae.config, alphas_cumprod=schedule, prediction_type=prediction_type)


@dataclass
class Run:
    """A trained run (load_run): `models` (LoRA merged unless asked not to), its indicator, groups and step."""
    models: Models
    indicator: Indicator  # None when the run's objective has none (ddm.uses_indicator)
    group_names: list
    step: int
    info: dict  # run.json


def _read_checkpoint(run_dir, config, name):
    """A run's checkpoint folder `name` read whole, or for None its newest that reads (passing over broken ones)."""
    files = checkpoints.checkpoint_files(config)
    ckpt = (checkpoints.read_checkpoint(run_dir / name, files) if name else
            checkpoints.newest_checkpoint(run_dir, files))
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} holds no finished checkpoint yet")
    return ckpt


def _run_indicator(info):
    """The indicator a run trained (built as train.py built it, untrained), or None when its objective has none."""
    c = info["config"]
    return (make_indicator(c["objective"], info["latent_shape"], len(c["group_names"]), c["indicator_hidden"])
            if uses_indicator(c["objective"], c["w_ind"]) else None)


def load_run(run_dir, device="cpu", dtype=torch.float32, merge=True, checkpoint=None):
    """The models of a run directory's `checkpoint` (a folder name; default: the newest that reads whole): its base
    model plus the trained weights."""
    run_dir = Path(run_dir)
    info = rundir.read_run_json(run_dir)
    config = info["config"]
    ckpt = _read_checkpoint(run_dir, config, checkpoint)
    models = load_models(rundir.base_path(run_dir, info))
    check_schedule(models, run_dir, info)
    models.unet.config.sample_size = config["resolution"] // models.vae_config.downsample_factor  # trained at it
    checkpoints.setup_trainable(models, config["lora_rank"], config["lora_alpha"], config["train_text_encoder"])
    indicator = _run_indicator(info)
    checkpoints.load_checkpoint_weights(ckpt, models.unet, models.text_encoder, indicator, config)
    for m in (models.unet, models.text_encoder, indicator):
        if m is not None:
            if merge:
                lora.merge_lora(m)
            m.requires_grad_(False).to(device, dtype).eval()
    models.vae.to(device, dtype)
    models.checkpoint = ckpt["path"].name
    return Run(models, indicator, config["group_names"], ckpt["step"], info)


def check_schedule(models, run_dir, info):
    """CheckpointError where the base model's schedule is not the one the run trained on, as run.json recorded it
    (a field an older run did not record is not compared): its scheduler_config.json changed since. The weights'
    fingerprint does not cover it."""
    was, now, differ = info.get("schedule"), checkpoints.schedule_record(models.alphas_cumprod), []
    if info.get("prediction_type", models.prediction_type) != models.prediction_type:
        differ.append(f"prediction type {info['prediction_type']}, now {models.prediction_type}")
    if was is not None and was != now:  # JSON keeps a float to the last bit
        length = was.get("timesteps") if isinstance(was, dict) else was
        differ.append(f"{length} timesteps, now {now['timesteps']}" if length != now["timesteps"]
                      else "another ᾱ over as many timesteps")
    if differ:
        raise weights.CheckpointError(
            f"{Path(run_dir) / 'run.json'}: the base model's schedule changed since the run started "
            f"({'; '.join(differ)}): its scheduler/scheduler_config.json is not the one the run trained with; put "
            "that one back")


def export_model(path, out_dir):
    """train.py --export: the model at `path` (a run: its newest checkpoint or the one named) as a diffusers folder,
    with the run's indicator beside it when it trained one, and what it was written from in export.json."""
    run = rundir.run_of(path)
    if run is None:
        source = {"model": str(Path(path).resolve()), "checkpoint": None, "step": None}
        return checkpoints.export_diffusers(load_models(path), out_dir, source)
    r = load_run(run[0], checkpoint=run[1])
    source = {"model": str(Path(run[0]).resolve()), "checkpoint": r.models.checkpoint, "step": r.step}
    return checkpoints.export_diffusers(r.models, out_dir, source, r.indicator, r.indicator and indicator_metadata(
        r.indicator, r.group_names, r.info["config"].get("attribute")))


INDICATOR_RECORD = {  # an indicator file's record (ddm.indicator_metadata), JSON but the attribute: what each must be
    "latent_shape": ("a list of 3 integers >= 1", lambda v: weights.is_ints(v) and len(v) == 3),
    "groups": ("a list of at least 2 distinct names", lambda v: isinstance(v, list) and len(v) >= 2
               and all(isinstance(g, str) for g in v) and len(set(v)) == len(v)),
    "hidden": ("a list of integers >= 1", weights.is_ints),
    "timestep_dim": ("an integer >= 0", lambda v: weights.is_int(v, 0)),
    "attribute": ("the name of an attribute, or empty", lambda v: isinstance(v, str))}


def indicator_record(meta, where):
    """The record of an indicator file, each field checked -> {field: value}; ValueError naming the field a
    hand-edited or foreign file lacks or gets wrong."""
    record = {}
    for key, (what, ok) in INDICATOR_RECORD.items():
        text = meta.get(key)
        try:
            record[key] = text if key == "attribute" else json.loads(text)
        except (TypeError, ValueError):  # missing, or not JSON: said as the text it is
            record[key] = text
        if text is None or not ok(record[key]):
            raise ValueError(f"{where}: " + (f"no field {key!r} in its indicator record" if text is None else
                                             f"field {key!r} must be {what}, got {record[key]!r}"))
    return record


def load_indicator(path, latent_shape):
    """(noise-aware indicator, its group names, its attribute or None, the checkpoint folder it was read from or
    None) from a train.py run directory (its newest checkpoint, as load_run reads it, without the base model), one
    of its checkpoint folders, its export, or an indicator.safetensors, which carries what it needs
    (ddm.indicator_metadata); ValueError naming the path when it is no such indicator, reads eps_hat, or was trained
    on latents of another shape (another resolution)."""
    path, where = Path(path), f"--indicator {path}"
    if (path / checkpoints.MODEL_INDEX_FILE).is_file():
        path = path / checkpoints.INDICATOR_FILE  # an export (train.py --export): its run's indicator, if it had one
        if not path.is_file():
            raise ValueError(f"{where}: {path} not found: a model folder without an indicator (a pipeline, or the "
                             "export of a run that trained none); give a run with a noise-aware indicator")
    if path.is_dir():
        run_dir, name = rundir.run_of(path) or (path, None)  # not a run: read_run_json says so
        info = rundir.read_run_json(run_dir)
        config, indicator = info["config"], _run_indicator(info)
        if indicator is None:
            raise ValueError(f"{where}: this run trained no indicator (objective "
                             f"{config['objective']}, w_ind {config['w_ind']})")
        ckpt = _read_checkpoint(run_dir, config, name)
        file, checkpoint = checkpoints.INDICATOR_FILE, ckpt["path"].name
        weights.load_strict(indicator, ckpt["tensors"][file], str(ckpt["path"] / file))
        names, attribute = [str(g) for g in config["group_names"]], config.get("attribute")
    else:
        meta = weights.read_metadata(path)
        if meta.get("ddm_indicator") != "1":
            raise ValueError(f"{where}: not an indicator file written by train.py (no indicator metadata); give "
                             f"the run directory it came from instead")
        r = indicator_record(meta, where)
        names, attribute, checkpoint = r["groups"], r["attribute"] or None, None
        indicator = Indicator(r["latent_shape"], len(names), r["hidden"], r["timestep_dim"])
        weights.load_strict(indicator, weights.read_state_dict(path), f"indicator from {path}")
    if indicator.timestep_dim == 0:
        why = (f"this indicator reads eps_hat, not (z_t, t); guidance needs a noise-aware one (train.py --objective "
               f"{' or '.join(filter(noise_aware, OBJECTIVES))})")
    elif indicator.latent_shape != tuple(latent_shape):
        why = (f"trained on latents {indicator.latent_shape}, but these images have latents {tuple(latent_shape)} "
               "(another resolution: sample at the one it was trained at)")
    else:
        return indicator.float().eval().requires_grad_(False), names, attribute, checkpoint
    raise ValueError(f"{where}: {why}")


INIT_CONFIGS = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig}  # the parts of an init config
# 0 or [] builds a net here, so the field check allows it; but a diffusers folder (base/, --export) keeps only
# attention_levels [], and _build refuses the others by name. They stay here so that -1 is told ">= 0".
MAY_BE_ZERO = {"num_res_blocks", "transformer_depth", "layers", "attention_levels"}


def _field_error(name, value, default):
    """Why `value` cannot stand for a config field whose default is `default`, or None: the default's kind, and a
    size >= 1 (>= 0 in MAY_BE_ZERO); a tuple field a list (non-empty unless it may be empty)."""
    low = 0 if name in MAY_BE_ZERO else 1
    if isinstance(default, tuple) and not (weights.is_ints(value, low) and (value or not low)):
        return f"must be a {'non-empty ' * low}list of integers >= {low}"
    if isinstance(default, float) and not weights.is_number(value, positive=True):
        return "must be a number > 0"
    if isinstance(default, int) and not isinstance(default, bool) and not weights.is_int(value, low):
        return f"must be an integer >= {low}"
    if default is None and value is not None and not weights.is_int(value, low):
        return "must be null or an integer >= 1"
    if isinstance(default, (str, bool)) and type(value) is not type(default):
        return f"must be a {type(default).__name__}"
    return None


def _fields_error(raw):
    """Why an init config's JSON is not {part: {field: value of its default's kind} or null}, or None."""
    unknown = sorted(set(raw) - set(INIT_CONFIGS))
    if unknown:
        return f"unknown keys {unknown}; it holds unet, vae and text_encoder"
    for key, cls in INIT_CONFIGS.items():
        fields = raw.get(key)
        if fields is not None and not isinstance(fields, dict):
            return f"{key} must be an object of fields, got {type(fields).__name__}"
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields or ()) - set(defaults))
        if unknown:
            return f"{key} has unknown fields {unknown}"
        for name, value in (fields or {}).items():
            why = _field_error(name, value, defaults[name])
            if why:
                return f"{key}: {name} {why}, got {value!r}"
    return None


def _text_encoder_error(text):
    """Why the text encoder cannot be built, or read the ids of CLIP's tokenizer, or None."""
    if text.vocab_size < CLIPTextConfig.vocab_size:
        return (f"vocab_size must be at least {CLIPTextConfig.vocab_size} (the ids of CLIP's tokenizer), got "
                f"{text.vocab_size}")
    return tower_error(text)


def _parts_error(raw, vae_path):
    """Why an init config and --vae (`vae_path`) do not give one of each model, or None."""
    if vae_path and raw.get("vae") is not None:
        return f"a 'vae' config and --vae {vae_path} were both given: choose one"
    missing = [key for key in INIT_CONFIGS if raw.get(key) is None and not (key == "vae" and vae_path)]
    if not missing:
        return None
    return f"missing the '{missing[0]}' config" + (" (or pass --vae PATH)" if missing[0] == "vae" else "")


def read_init_config(path, vae_path=None):
    """(the file's JSON dict, {"unet": UNetConfig, "vae": VAEConfig or None, "text_encoder": CLIPTextConfig}), each
    field of its default's kind, the networks they describe buildable; the VAE from the file or --vae, not both."""
    raw = weights.read_json(path)
    why = _fields_error(raw) or _parts_error(raw, vae_path)
    if why is None:
        out = {key: None if raw.get(key) is None else cls(**{k: tuple(v) if isinstance(v, list) else v
                                                               for k, v in raw[key].items()})
               for key, cls in INIT_CONFIGS.items()}
        for key, error in (("text_encoder", _text_encoder_error), ("unet", config_error)):  # None: not given
            problem = out[key] and error(out[key])
            if problem:
                why = f"{key}: {problem}"
                break
    if why:
        raise ValueError(f"--init-config {path}: {why}")
    return raw, out


def _build(path, key, cls, cfg):
    """cls(cfg), a config torch cannot build (GroupNorm groups that do not divide a width, ...) or whose diffusers
    folder (a from-scratch run's base/, --export) would not read back one line: a net that builds here with no layer
    where diffusers needs one (num_res_blocks 0, ...), or one that diffusers cannot say (a first level wider than
    model_channels), which would read back as another net."""
    try:
        model = cls(cfg)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"--init-config {path}: {key}: {e}") from None
    _, write, read = checkpoints.COMPONENTS[key]
    try:
        back = read(write(cfg))
        with torch.device("meta"):  # the same tensors, or another net (diffusers' widths start at the first level's)
            same = {k: v.shape for k, v in cls(back).state_dict().items()} == {
                k: v.shape for k, v in model.state_dict().items()}
        other = [f"{f.name} {getattr(cfg, f.name)} as {getattr(back, f.name)}" for f in dataclasses.fields(cfg)
                 if getattr(back, f.name) != getattr(cfg, f.name)]
        why = None if same else f"which would read back another net: {', '.join(other)}"
    except ValueError as e:
        why = f"whose config.json would not read back: {e}"
    if why:
        raise ValueError(f"--init-config {path}: {key}: a run keeps it as a diffusers folder (base/, --export), {why}")
    return model


def models_from_config(init_config, vae_path=None, seed=0):
    """Randomly initialised UNet / text encoder (and VAE unless `vae_path`), seeded, CLIP's tokenizer."""
    _, cfgs = read_init_config(init_config, vae_path)
    with torch.random.fork_rng(devices=[]):  # seeds the init without touching the caller's global RNG
        torch.manual_seed(seed)
        unet = _build(init_config, "unet", UNet, cfgs["unet"])
        text_encoder = _build(init_config, "text_encoder", CLIPTextModel, cfgs["text_encoder"])
        vae = load_vae(vae_path) if vae_path else _build(init_config, "vae", VAE, cfgs["vae"])
    return Models(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=Tokenizer.default(), vae_config=vae.config)

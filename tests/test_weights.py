import re

import pytest
import torch
from safetensors.torch import save_file

from weights import (CheckpointError, load_strict, read_component, read_json, read_metadata, read_state_dict,
                     rename)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2)
        self.norm = torch.nn.LayerNorm(2)


def test_single_file_prefix_is_stripped_and_schedule_buffers_are_ignored(tmp_path):
    src = Tiny()
    sd = {f"model.diffusion_model.{k}": v for k, v in src.state_dict().items()}
    sd["model.diffusion_model.betas"] = torch.zeros(10)  # never loaded
    sd["first_stage_model.other"] = torch.zeros(1)  # another model's tensor: not read
    save_file(sd, tmp_path / "m.safetensors")
    got, config = read_component(tmp_path / "m.safetensors", subfolder="unet", convert=dict,
                                 single_file_prefix="model.diffusion_model.", weight_names=("x.safetensors",))
    assert config is None and "other" not in got
    with torch.device("meta"):
        model = Tiny()
    load_strict(model, got, "Tiny")
    assert torch.equal(model.proj.weight, src.proj.weight)


def test_ckpt_is_read_with_weights_only_and_its_state_dict_unwrapped(tmp_path):
    src = Tiny()
    torch.save({"state_dict": src.state_dict(), "global_step": 3}, tmp_path / "m.ckpt")
    assert torch.equal(read_state_dict(tmp_path / "m.ckpt")["proj.bias"], src.proj.bias)


def test_mismatch_names_missing_unexpected_and_shapes(tmp_path):
    sd = Tiny().state_dict()
    sd.pop("norm.bias")
    sd["stray.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 tensors missing \(norm.bias\), 1 unexpected \(stray.weight\)"):
        load_strict(Tiny(), sd, "Tiny")
    sd = Tiny().state_dict()
    sd["proj.weight"] = torch.zeros(2, 4)
    with pytest.raises(CheckpointError, match=r"proj.weight has shape \(2, 4\).*\(2, 3\)"):
        load_strict(Tiny(), sd, "Tiny")


@pytest.mark.parametrize("assign", [True, False])
def test_integer_weights_of_a_quantized_checkpoint_are_named_not_a_torch_runtime_error(assign):
    """An int8 tensor where the model holds floats: torch refuses it deep inside load_state_dict ("Only Tensors of
    floating point ... can require gradients"), or copies it in as if it were a float (assign=False)."""
    sd = {**Tiny().state_dict(), "proj.weight": torch.zeros(2, 3, dtype=torch.int8)}
    with pytest.raises(CheckpointError, match=r"^Tiny: tensor proj.weight is torch.int8 in the checkpoint, but "
                                              r"torch.float32 in the model \(quantized: not read here\)$"):
        load_strict(Tiny(), sd, "Tiny", assign=assign)


def test_missing_tensors_alone_and_unexpected_tensors_alone_are_named():
    sd = Tiny().state_dict()
    sd.pop("norm.bias")
    with pytest.raises(CheckpointError, match=r"Tiny: .*1 tensors missing \(norm.bias\), 0 unexpected;"):
        load_strict(Tiny(), sd, "Tiny")
    sd = {**Tiny().state_dict(), "stray.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"Tiny: .*0 tensors missing, 1 unexpected \(stray.weight\);"):
        load_strict(Tiny(), sd, "Tiny")


def test_a_checkpoint_missing_a_tensor_is_named_with_its_file(tmp_path):
    import checkpoints
    from ddm import Indicator
    config = {"lora_rank": 0, "train_text_encoder": False, "objective": "plain-indicator", "w_ind": 1.0}
    indicator = Indicator((4, 2, 2), 2, (8,), timestep_dim=8)
    tensors = {"unet.safetensors": Tiny().state_dict(), "indicator.safetensors": indicator.state_dict()}
    tensors["indicator.safetensors"].pop("net.3.bias")
    ckpt = {"path": tmp_path / "checkpoint-000002", "tensors": tensors}
    with pytest.raises(CheckpointError, match=r"checkpoint-000002/indicator.safetensors: .*1 tensors missing "
                                              r"\(net.3.bias\), 0 unexpected"):
        checkpoints.load_checkpoint_weights(ckpt, Tiny(), None, Indicator((4, 2, 2), 2, (8,), timestep_dim=8), config)

def test_missing_and_truncated_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_state_dict(tmp_path / "nowhere.safetensors")
    save_file(Tiny().state_dict(), tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="t.safetensors"):
        read_state_dict(tmp_path / "t.safetensors")
    with pytest.raises(FileNotFoundError, match="neither a single-file checkpoint nor a diffusers folder"):
        read_component(tmp_path, subfolder="unet", single_file_prefix="", weight_names=("w.safetensors",), convert=dict)


def test_a_safetensors_file_whose_name_has_no_suffix_reads_as_one(tmp_path):
    """The Hugging Face cache keeps a snapshot's file as a link to blobs/<sha256>, a name without a suffix, and a run
    records --model resolved: the blob. It was read as a torch pickle ("not a PyTorch checkpoint (Unsupported
    operand 160)"), so a run fine-tuned from such a file could not be sampled, exported or resumed."""
    (tmp_path / "blobs").mkdir()
    save_file({"model.diffusion_model.w": torch.ones(2)}, tmp_path / "blobs" / "7c8b1d2e", metadata={"k": "v"})
    link = tmp_path / "v1-5-pruned-emaonly.safetensors"
    link.symlink_to(tmp_path / "blobs" / "7c8b1d2e")
    for path in (link, link.resolve()):
        assert read_state_dict(path, "model.diffusion_model.")["w"].tolist() == [1, 1]
        assert read_metadata(path)["k"] == "v"
    torch.save({"w": torch.ones(3)}, tmp_path / "blobs" / "0a1b")  # a torch file under a bare name reads too
    assert read_state_dict(tmp_path / "blobs" / "0a1b")["w"].tolist() == [1, 1, 1]


@pytest.mark.parametrize("name", ["empty.ckpt", "empty.safetensors", "empty"])
def test_an_empty_weight_file_is_named_as_empty(tmp_path, name):
    """The zero-byte file a failed download or a full disk leaves: "cannot read checkpoint PATH: " and no reason."""
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"^cannot read checkpoint {re.escape(str(tmp_path / name))}: the file "
                                              r"is empty \(0 bytes\)$"):
        read_state_dict(tmp_path / name)


@pytest.mark.parametrize("files,held", [
    (["config.json", "diffusion_pytorch_model.fp16.safetensors"],  # downloaded with diffusers' variant="fp16"
     "config.json, diffusion_pytorch_model.fp16.safetensors"),
    (["config.json"], "config.json"),  # a download cut short
    ([], "nothing"),
])
def test_a_subfolder_without_the_weight_file_says_what_it_holds(tmp_path, files, held):
    """It said only that the folder is neither a single-file checkpoint nor a diffusers folder, of a folder with
    unet/ in it."""
    (tmp_path / "unet").mkdir()
    for name in files:
        (tmp_path / "unet" / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=rf"looked for unet/\{{diffusion_pytorch_model.safetensors\}} and .* "
                                                rf"inside it; unet/ holds {held}$"):
        read_component(tmp_path, subfolder="unet", single_file_prefix="",
                       weight_names=("diffusion_pytorch_model.safetensors",), convert=dict)


def test_one_model_of_a_diffusers_folder_given_as_the_whole_model_is_named_as_such(tmp_path):
    """--model PIPE/vae or PIPE/unet/diffusion_pytorch_model.safetensors said the folder lacks text_encoder/, or that
    the file has no tensors under 'first_stage_model.', not that it is one model where the whole one was asked."""
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    save_file(Tiny().state_dict(), tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match=rf"inside it; {re.escape(str(tmp_path / 'vae'))} holds a config\.json "
                                                r"of its own: it is one model's folder; give the folder of the whole "
                                                r"model \(a diffusers folder or a single file\)$"):
        read_component(tmp_path / "vae", subfolder="text_encoder", single_file_prefix="",
                       weight_names=("model.safetensors",), convert=dict)
    file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(file))} has no tensors under 'first_stage_model\.': "
                                              r"not a single-file checkpoint of a whole SD v1\.x model$"):
        read_component(file, subfolder="vae", single_file_prefix="first_stage_model.",
                       weight_names=("diffusion_pytorch_model.safetensors",), convert=dict)


def test_rename_uses_the_longest_prefix_and_inverts():
    table = {"a": "x", "a.b": "y.z"}
    sd = {"a.b.weight": 1, "a.c.weight": 2, "q.weight": 3}
    out = rename(sd, table)
    assert out == {"y.z.weight": 1, "x.c.weight": 2, "q.weight": 3}
    assert rename(out, {v: k for k, v in table.items()}) == sd


UNET_OK = {"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
           "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [32, 64]}
TEXT_OK = {"vocab_size": 1000, "max_position_embeddings": 77, "hidden_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 4, "intermediate_size": 64}


@pytest.mark.parametrize("load,folder,config,message", [
    ("unet", "unet", "not json", r"unet/config.json, line 1: not valid JSON"),
    ("unet", "unet", "{}", r"unet/config.json: missing field 'down_block_types'"),
    ("unet", "unet", "[1, 2]", r"unet/config.json: expected a JSON object \{\.\.\.\}, got list"),
    ("unet", "unet", {**UNET_OK, "block_out_channels": None},
     r"unet/config.json: field 'block_out_channels' must be a non-empty list of positive integers, got null"),
    ("unet", "unet", {**UNET_OK, "block_out_channels": ["32", 64]}, r"field 'block_out_channels' .*\[\"32\", 64\]"),
    ("unet", "unet", {**UNET_OK, "layers_per_block": "2"}, r"field 'layers_per_block' must be a positive integer"),
    ("unet", "unet", {**UNET_OK, "attention_head_dim": 0}, r"field 'attention_head_dim' must be a positive integer"),
    ("unet", "unet", {**UNET_OK, "down_block_types": None}, r"field 'down_block_types' must be a non-empty list of"),
    ("vae", "vae", {"scaling_factor": None}, r"vae/config.json: field 'scaling_factor' must be a positive number"),
    ("vae", "vae", {"latent_channels": 4.5}, r"vae/config.json: field 'latent_channels' must be a positive integer"),
    ("vae", "vae", {"down_block_types": None}, r"vae/config.json: field 'down_block_types' must be a non-empty list"),
    ("text_encoder", "text_encoder", {}, r"text_encoder/config.json: missing field 'vocab_size'"),
    ("text_encoder", "text_encoder", {"vocab_size": None}, r"field 'vocab_size' must be a positive integer, got null"),
    ("text_encoder", "text_encoder", b'{"hidden_act": "gel\xfc"}', r"text_encoder/config.json: not UTF-8 text"),
    # configs that read but build no network: refused naming the file, not an assert or an error mid-forward
    ("text_encoder", "text_encoder", {**TEXT_OK, "hidden_size": 30},
     r"text_encoder/config.json: hidden_size 30 must be a multiple of num_attention_heads 4"),
    ("text_encoder", "text_encoder", {**TEXT_OK, "hidden_act": "relu"},
     r"text_encoder/config.json: hidden_act must be quick_gelu or gelu, got 'relu'"),
    ("unet", "unet", {**UNET_OK, "block_out_channels": [36, 72], "norm_num_groups": 4},
     r"unet/config.json: block_out_channels and attention_head_dim: 36 channels at level 0 do not split into 8 "
     r"heads"),
    ("unet", "unet", {**UNET_OK, "norm_num_groups": 5},
     r"unet/config.json: field 'norm_num_groups' 5 does not split the 32 channels of block_out_channels\[0\]"),
    ("vae", "vae", {"block_out_channels": [16, 32], "norm_num_groups": 5},
     r"vae/config.json: field 'norm_num_groups' 5 does not split the 16 channels of block_out_channels\[0\]"),
])
def test_bad_config_json_is_named_with_the_file_and_field_before_any_tensor_is_read(tmp_path, load, folder, config,
                                                                                   message):
    import json

    from clip_text import load_text_encoder
    from unet import load_unet
    from vae import load_vae
    (tmp_path / folder).mkdir()
    weight_name = "model.safetensors" if folder == "text_encoder" else "diffusion_pytorch_model.safetensors"
    (tmp_path / folder / weight_name).write_bytes(b"")  # never read: the config is checked first
    raw = config if isinstance(config, (str, bytes)) else json.dumps(config)
    (tmp_path / folder / "config.json").write_bytes(raw.encode() if isinstance(raw, str) else raw)
    loader = {"unet": load_unet, "vae": load_vae, "text_encoder": load_text_encoder}[load]
    with pytest.raises(CheckpointError, match=message):
        loader(tmp_path)


def test_unreadable_weight_files_report_the_systems_reason(tmp_path, monkeypatch):
    import socket

    import weights
    (tmp_path / "f.safetensors").mkdir()  # a folder where the file should be
    with pytest.raises(CheckpointError, match=r"f.safetensors is a folder, not a checkpoint"):
        read_state_dict(tmp_path / "f.safetensors")
    sock = socket.socket(socket.AF_UNIX)  # a socket: it exists, but no one can open it as a file
    sock.bind(str(tmp_path / "s.safetensors"))
    with pytest.raises(CheckpointError, match=r"s.safetensors is not a regular file"):
        read_state_dict(tmp_path / "s.safetensors")
    sock.close()
    # A file the user may not read. Tests run as root, where chmod 000 does not bite: the refusal is simulated,
    # and safetensors is made to say what it says then ("No such file or directory", its message for any failure).
    save_file(Tiny().state_dict(), tmp_path / "t.safetensors")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    def safetensors_open(path, *args, **kwargs):
        raise FileNotFoundError(f"No such file or directory: {path}")
    monkeypatch.setattr(weights, "open", denied, raising=False)
    monkeypatch.setattr(weights, "safe_open", safetensors_open)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*t.safetensors: Permission denied"):
        read_state_dict(tmp_path / "t.safetensors")


def test_an_empty_or_unreadable_file_is_named_by_read_metadata_too_and_an_unreadable_one_is_not_called_empty(
        tmp_path, monkeypatch):
    """read_metadata (an indicator file's) called an empty file "not an indicator file written by train.py" and let
    an unreadable one out as an OSError without its path; read_state_dict called an unreadable empty file empty."""
    import weights
    (tmp_path / "i.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"i\.safetensors: the file is empty \(0 bytes\)$"):
        read_metadata(tmp_path / "i.safetensors")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(weights, "open", denied, raising=False)
    for read in (read_metadata, read_state_dict):
        with pytest.raises(CheckpointError, match=r"i\.safetensors: Permission denied"):
            read(tmp_path / "i.safetensors")


class Callback:
    """Stands in for the objects a training framework pickles beside the weights (Lightning's ModelCheckpoint)."""


@pytest.mark.parametrize("content,reason", [
    ({"state_dict": Tiny().state_dict(), "callbacks": {"c": Callback()}},  # a Lightning .ckpt may keep these
     r"it pickles a test_weights.Callback, and only tensors, dicts and lists are unpickled here"),
    (torch.nn.Linear(3, 2), r"it pickles a torch.nn.modules.linear.Linear, and only tensors, dicts and lists"),
    (b'{"a": 1}\n', r"not a PyTorch checkpoint \(Unsupported operand 123\)"),  # a JSON file named .ckpt
])
def test_a_pickle_of_other_objects_is_one_line_naming_the_file_and_what_it_pickles(tmp_path, content, reason):
    """torch.load(weights_only=True) refuses them with a page of advice on unpickling them unsafely, with ANSI
    escapes and calls the user of a CLI cannot make."""
    path = tmp_path / "model.ckpt"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(CheckpointError) as e:
        read_state_dict(path, "model.diffusion_model.")
    assert re.fullmatch(rf"cannot read checkpoint {re.escape(str(path))}: {reason}[^\n\x1b]*", str(e.value)), e.value


def test_write_atomic_never_writes_through_a_link_where_its_tmp_file_goes(tmp_path):
    """PATH.tmp that is a symbolic link (planted, or left) is replaced, not followed: the file it points to, outside
    the folder, keeps its bytes, and PATH is a regular file."""
    import weights
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "samples.json.tmp").symlink_to(outside)
    weights.write_atomic(tmp_path / "out" / "samples.json", "{}\n")
    assert outside.read_text() == "not ours"
    assert not (tmp_path / "out" / "samples.json").is_symlink()
    assert (tmp_path / "out" / "samples.json").read_text() == "{}\n"


def test_a_json_number_python_will_not_read_is_one_line_naming_the_file(tmp_path):
    """An integer of over 4300 digits: json raises a plain ValueError (Python's limit on int conversion), and the
    message named no file."""
    path = tmp_path / "config.json"
    path.write_text('{"sample_size": ' + "9" * 5000 + "}")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: not valid JSON \(Exceeds the limit"):
        read_json(path)


def test_a_json_file_that_is_not_utf8_names_the_byte_and_where_it_is(tmp_path):
    """"not UTF-8 text (byte 0)" gave an offset that read like the byte's value; data.py's files name both."""
    path = tmp_path / "config.json"
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(CheckpointError, match=r"config.json: not UTF-8 text \(byte 0xff at offset 7\)"):
        read_json(path)

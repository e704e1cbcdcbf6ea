import pytest
import torch
from safetensors.torch import save_file

from weights import CheckpointError, load_strict, read_component, read_state_dict, rename


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
    got, config = read_component(tmp_path / "m.safetensors", subfolder="unet",
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


def test_missing_and_truncated_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_state_dict(tmp_path / "nowhere.safetensors")
    save_file(Tiny().state_dict(), tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="t.safetensors"):
        read_state_dict(tmp_path / "t.safetensors")
    with pytest.raises(FileNotFoundError, match="neither a single-file checkpoint nor a diffusers folder"):
        read_component(tmp_path, subfolder="unet", single_file_prefix="", weight_names=("w.safetensors",))


def test_rename_uses_the_longest_prefix_and_inverts():
    table = {"a": "x", "a.b": "y.z"}
    sd = {"a.b.weight": 1, "a.c.weight": 2, "q.weight": 3}
    out = rename(sd, table)
    assert out == {"y.z.weight": 1, "x.c.weight": 2, "q.weight": 3}
    assert rename(out, {v: k for k, v in table.items()}) == sd

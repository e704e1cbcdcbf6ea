"""train.py under faults and bad input, on the tiny models of test_train.py: no checkpoint of NaNs, one writer per
run directory, the user's files left alone, a broken checkpoint named and passed over, changed data refused, a
failed write named, one-line errors for a truncated run.json or an out-of-range seed."""
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import checkpoints
import ddm
import loading
import rundir
import train
import weights
from test_train import (FAST, ROOT, TINY, assert_same_tensors, checkpoint_files, data_dir, log_lines,  # noqa: F401
                        lora_run, make_data, one_thread, sd_dir)

# The arguments of test_train's `lora_run` fixture but --max-steps: a resumed run must end where that one does.
LORA = ["--lora-rank", "4", "--train-text-encoder", *FAST, "--checkpoint-every", "2"]


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


# ---- 3. no checkpoint of NaNs


def test_weights_made_infinite_by_the_update_stop_the_run_before_any_checkpoint(sd_dir, data_dir, tmp_path):
    out = tmp_path / "inf"
    with pytest.raises(FloatingPointError, match=r"weights .*not finite after the update at step 1\b.*"
                                                 r"none \(no checkpoint written yet\)"):
        train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(out), "--lora-rank", "0",
                     "--max-steps", "3", *FAST, "--lr", "1e39", "--checkpoint-every", "1"])
    assert checkpoints.latest_checkpoint(out) is None and not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize("max_grad_norm", ["1", "0"])
def test_a_non_finite_gradient_under_a_finite_loss_stops_the_run_before_the_update(max_grad_norm, sd_dir, data_dir,
                                                                                   tmp_path, monkeypatch):
    def sqrt_at_zero(b, indicator, hp):  # adds 0 to the loss, but d sqrt|u| / du at u = 0 is not finite
        loss, parts = ddm.ddm(b, indicator, hp)
        return loss + (b.pred - b.pred.detach()).abs().sqrt().mean(), parts

    monkeypatch.setitem(ddm.OBJECTIVES, "sqrt-at-zero", ddm.Objective(sqrt_at_zero, "pred"))
    out = tmp_path / "nan-grad"
    with pytest.raises(FloatingPointError, match=r"gradient norm is nan at step 1\b"):
        train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(out), "--lora-rank", "4",
                     "--max-steps", "2", *FAST, "--checkpoint-every", "1", "--objective", "sqrt-at-zero", "--w-ind",
                     "0", "--max-grad-norm", max_grad_norm])
    assert not list(out.glob("checkpoint-*"))


def test_a_nan_loss_in_one_micro_batch_stops_an_fp16_run_as_it_stops_a_float32_one(sd_dir, data_dir, tmp_path,
                                                                                    monkeypatch):
    """A NaN part is one not measured in that micro-batch; a NaN loss is a failure. Under fp16 the scaler skips the
    update whose gradients are NaN, so a run that averaged the loss over the other micro-batch logged a finite loss
    for an update that never happened, and went on (float32 stops at the gradient norm)."""
    calls = []

    def nan_once(b, indicator, hp):  # the first micro-batch's loss is NaN, every other one's is the DDM loss
        loss, parts = ddm.ddm(b, indicator, hp)
        calls.append(1)
        return (loss * math.nan if len(calls) == 1 else loss), parts

    monkeypatch.setitem(ddm.OBJECTIVES, "nan-once", ddm.Objective(nan_once, "pred"))
    out = tmp_path / "nan-loss"
    with pytest.raises(FloatingPointError, match=r"^loss is nan at step 1; training stopped before applying it"):
        train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(out), "--lora-rank", "4",
                     "--max-steps", "2", *FAST, "--checkpoint-every", "1", "--objective", "nan-once",
                     "--mixed-precision", "fp16"])
    assert not list(out.glob("checkpoint-*"))


def test_save_checkpoint_refuses_a_non_finite_tensor_and_keeps_the_previous_checkpoint(tmp_path):
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([w])
    w.grad = torch.ones(3)
    optimizer.step()
    first = checkpoints.save_checkpoint(tmp_path, 1, {"unet.safetensors": {"w": w}}, optimizer, None, {"elapsed": 1})
    before = {f.name: f.read_bytes() for f in first.iterdir()}
    with pytest.raises(FloatingPointError, match=r"unet\.safetensors: w is not finite at step 2"):
        checkpoints.save_checkpoint(tmp_path, 2, {"unet.safetensors": {"w": torch.tensor([1.0, float("nan"), 0])}},
                                    optimizer, None, {"elapsed": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000001"]
    assert {f.name: f.read_bytes() for f in first.iterdir()} == before


# ---- 6. one train.py per run directory


def test_a_second_train_py_on_a_running_run_directory_is_refused_naming_the_holder(sd_dir, data_dir, tmp_path):
    out = tmp_path / "busy"
    common = ["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "4", *FAST]
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, "--out", str(out), "--max-steps",
                              "100000"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "log.jsonl").is_file() or not (out / "log.jsonl").read_text():  # it is training
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        for how in (["--out", str(out)], ["--resume", str(out)]):
            with pytest.raises(FileExistsError, match=rf"{re.escape(str(out))} is in use by another train\.py "
                                                      rf"\(pid {first.pid}\)"):
                train.train([*common, *how, "--max-steps", "1"])
    finally:
        first.kill()
        first.wait()
    # the lock went with the process that held it
    train.train([*common, "--resume", str(out), "--max-steps", "1"])
    assert [r["step"] for r in log_lines(out)] == [1]


@pytest.mark.parametrize("new", [True, False])
def test_a_train_lock_that_is_a_symbolic_link_is_refused_and_what_it_points_to_is_untouched(new, tmp_path):
    victim, run = tmp_path / "victim.txt", tmp_path / "run"
    victim.write_text("precious")
    run.mkdir()
    for target in (victim, tmp_path / "nowhere.txt"):  # a file outside the run, and a link to nothing yet
        (run / "train.lock").unlink(missing_ok=True)
        (run / "train.lock").symlink_to(target)
        with pytest.raises(FileExistsError, match=rf"^{re.escape(str(run / 'train.lock'))} is a symbolic link"):
            with rundir.locked_run_dir(run, new=new):
                pytest.fail("locked through a link")
        assert (run / "train.lock").is_symlink()
    assert victim.read_text() == "precious" and not (tmp_path / "nowhere.txt").exists()


def test_a_disk_full_at_the_start_names_the_lock_file(data_dir, tmp_path):
    out = tmp_path / "new" / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(tmp_path / "no-model"), "--data",
                        str(data_dir), "--out", str(out), *FAST], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300, preexec_fn=file_size_limit(0))
    assert r.stderr.strip().splitlines() == [f"train.py: error: cannot write {out / 'train.lock'}: File too large"]
    assert r.returncode == 1 and not (tmp_path / "new").exists()


# ---- 8. the user's files in a run directory


def test_files_in_a_run_directory_that_train_py_did_not_write_are_kept_and_ignored(sd_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "4", *FAST, "--checkpoint-every", "1"]
    train.train([*common, "--out", str(out), "--max-steps", "1"])
    shutil.copytree(out / "checkpoint-000001", out / "checkpoint-000001-bak")
    (out / "checkpoint-backup-mine").mkdir()
    (out / "checkpoint-backup-mine" / "notes.txt").write_text("mine")
    (out / "checkpoint-notes.txt").write_text("mine too")
    (out / "checkpoint-000009.tmp.mine").mkdir()
    ours = {p.name for p in out.iterdir()} - {"checkpoint-000001"}
    train.train([*common, "--resume", str(out), "--max-steps", "3"])
    assert {p.name for p in out.iterdir()} == ours | {"checkpoint-000003"}
    assert (out / "checkpoint-backup-mine" / "notes.txt").read_text() == "mine"
    assert checkpoints.latest_checkpoint(out).name == "checkpoint-000003"
    assert loading.load_run(out).step == 3

    export = tmp_path / "export"
    (tmp_path / "export.tmp").mkdir()
    (tmp_path / "export.tmp" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=rf"{re.escape(str(export))}\.tmp exists"):
        train.train(["--model", str(out), "--export", str(export)])
    assert (tmp_path / "export.tmp" / "keep.txt").read_text() == "mine" and not export.exists()

    mine = tmp_path / "mine"  # a folder that is not a run directory: not even a lock file is left in it
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for how, error in ((["--out", str(mine)], FileExistsError), (["--resume", str(mine)], FileNotFoundError)):
        with pytest.raises(error, match="not empty|not a train.py run directory"):
            train.train([*common, *how, "--max-steps", "1"])
        assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_run_or_export_saved_under_a_checkpoint_name_inside_a_run_is_kept_when_the_run_trains_on(sd_dir, data_dir,
                                                                                                    tmp_path, capsys):
    """train.py --out RUN/checkpoint-000050 (a new folder) and --export RUN/checkpoint-000060 wrote folders with a
    checkpoint's name; the run, resumed, passed over them as broken checkpoints and deleted both whole at its next
    save. A checkpoint-named folder that holds anything a checkpoint does not is the user's: kept, and refused as
    the folder of a step the run is to save, before any step trains; an old checkpoint the user put a file in is
    kept with a note."""
    out = tmp_path / "run"
    common = ["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "4", *FAST, "--checkpoint-every", "1"]
    train.train([*common, "--out", str(out), "--max-steps", "1"])
    inner, export = out / "checkpoint-000050", out / "checkpoint-000060"
    train.train([*common[2:], "--model", str(out), "--out", str(inner), "--max-steps", "1"])
    train.train(["--model", str(out), "--export", str(export)])
    theirs = {p: p.read_bytes() for folder in (inner, export) for p in sorted(folder.rglob("*")) if p.is_file()}
    train.train([*common, "--resume", str(out), "--max-steps", "2"])
    assert {p: p.read_bytes() for folder in (inner, export) for p in sorted(folder.rglob("*")) if p.is_file()} == theirs
    assert loading.load_run(out).step == 2  # the newest checkpoint that reads
    (out / "checkpoint-000003").mkdir()
    (out / "checkpoint-000003" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=rf"{re.escape(str(out / 'checkpoint-000003'))} holds notes\.txt, which a "
                                         rf"checkpoint does not"):
        train.train([*common, "--resume", str(out), "--max-steps", "3"])
    assert (out / "checkpoint-000003" / "notes.txt").read_text() == "mine" and loading.load_run(out).step == 2
    assert log_lines(out)[-1]["step"] == 2  # refused before step 3 trained, not when it was to be saved
    shutil.rmtree(out / "checkpoint-000003")
    (out / "checkpoint-000002" / ".DS_Store").write_bytes(b"")
    capsys.readouterr()
    train.train([*common, "--resume", str(out), "--max-steps", "3"])
    assert (out / "checkpoint-000002" / ".DS_Store").exists() and loading.load_run(out).step == 3
    assert f"note: {out / 'checkpoint-000002'} is kept: it holds .DS_Store" in capsys.readouterr().err
    (out / "checkpoint-000005").mkdir()  # a step this resume does not save (every 2, and the last, 6): no refusal
    (out / "checkpoint-000005" / "notes.txt").write_text("mine")
    train.train([*common[:-1], "2", "--resume", str(out), "--max-steps", "6"])
    assert loading.load_run(out).step == 6 and (out / "checkpoint-000005" / "notes.txt").read_text() == "mine"


def test_a_resume_to_a_far_max_steps_checks_the_steps_it_saves_by_rule_not_by_listing_them(sd_dir, data_dir,
                                                                                             tmp_path):
    """--max-steps 10**15 ("train until I stop it") made the resume list every step it would save, a set of up to
    10**15 integers, before the check of the user's checkpoint-named folders: minutes, then out of memory."""
    out = tmp_path / "run"
    common = ["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "4", *FAST, "--checkpoint-every", "2"]
    train.train([*common, "--out", str(out), "--max-steps", "2"])
    (out / "checkpoint-000004").mkdir()
    (out / "checkpoint-000004" / "notes.txt").write_text("mine")
    (out / "checkpoint-000005").mkdir()  # a step this resume does not save: no refusal for it
    (out / "checkpoint-000005" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"checkpoint-000004 holds notes\.txt, which a checkpoint does not"):
        train.train([*common, "--resume", str(out), "--max-steps", str(10**15)])
    assert (out / "checkpoint-000004" / "notes.txt").read_text() == "mine" and loading.load_run(out).step == 2


@pytest.mark.parametrize("rank, text_encoder, objective", [(0, False, "ddm"), (4, True, "plain-indicator"),
                                                          (0, True, "indicator-weighted")])
def test_every_file_a_checkpoint_holds_is_one_save_checkpoint_may_delete(rank, text_encoder, objective):
    """A part added to checkpoint_parts but not to CHECKPOINT_FILES would make every checkpoint look like the user's
    (foreign_files): none would be deleted, every save keeping the older ones with a note."""
    config = {"lora_rank": rank, "train_text_encoder": text_encoder, "objective": objective, "w_ind": 1}
    assert {*checkpoints.checkpoint_files(config), "state.json", "optimizer.pt"} <= checkpoints.CHECKPOINT_FILES


def test_out_at_a_folder_inside_a_run_names_the_run_directory_to_resume(tmp_path, monkeypatch):
    """train.py --out RUN/checkpoint-N said "--resume it", but --resume takes the run directory, not its checkpoint;
    --out RUN itself still says "--resume it"."""
    run = tmp_path / "run"
    (run / "checkpoint-000002").mkdir(parents=True)
    (run / "checkpoint-000002" / "unet.safetensors").write_bytes(b"")
    (run / "run.json").write_text("{}")
    common = ["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data"), "--out"]
    for out, hint in ((run / "checkpoint-000002", f"--resume {run}, the run it is in"), (run, "--resume it")):
        with pytest.raises(FileExistsError, match=rf"^--out {re.escape(str(out))} exists and is not empty; choose a "
                                                  rf"new directory or {re.escape(hint)}$"):
            train.train([*common, str(out)])
    monkeypatch.chdir(run / "checkpoint-000002")  # --out . from inside the checkpoint folder: its run, by full path
    with pytest.raises(FileExistsError, match=rf"or --resume {re.escape(str(run.resolve()))}, the run it is in$"):
        train.train([*common, "."])
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoint-000002", "run.json", "unet.safetensors"]


def test_out_at_a_folder_that_is_no_run_is_not_offered_to_resume(tmp_path):
    """--out at a non-empty folder of one's own said "choose a new directory or --resume it", and --resume then failed:
    it is no run directory."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=rf"^--out {re.escape(str(mine))} exists and is not empty and is no run "
                                              r"directory; choose a new directory$"):
        train.train(["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data"), "--out", str(mine)])
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_out_at_a_run_that_saved_no_checkpoint_says_it_can_be_deleted_to_start_again(tmp_path):
    """A new run that stopped before its first checkpoint (a non-finite step 1, out of memory) leaves run.json and
    log.jsonl: "--resume it" then failed on the flag the user had changed to fix it, and nothing said that deleting
    it loses no checkpoint."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "log.jsonl").write_text("")
    with pytest.raises(FileExistsError, match=rf"^--out {re.escape(str(run))} holds a run that saved no checkpoint: "
                                              r"--resume it with the flags it started with, or delete it to start "
                                              r"again with others$"):
        train.train(["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data"), "--out", str(run)])
    assert sorted(p.name for p in run.iterdir()) == ["log.jsonl", "run.json"]
    (tmp_path / "elsewhere").mkdir()  # a checkpoint's name as a link: a run's folder all the same, occupied
    (run / "checkpoint-000002").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError, match=rf"^--out {re.escape(str(run))} exists and is not empty"):
        train.train(["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data"), "--out", str(run)])


# ---- 9. a broken checkpoint


@pytest.fixture(scope="module")
def two_checkpoints(sd_dir, data_dir, tmp_path_factory):
    """A lora_run twin holding checkpoint-000002 and -000004: what a kill between the rename of the newer one and the
    deletion of the older one leaves."""
    root = tmp_path_factory.mktemp("two")
    out = root / "run"
    common = ["--model", str(sd_dir), "--data", str(data_dir), *LORA]
    train.train([*common, "--out", str(out), "--max-steps", "2"])
    shutil.copytree(out / "checkpoint-000002", root / "kept")
    train.train([*common, "--resume", str(out), "--max-steps", "4"])
    shutil.copytree(root / "kept", out / "checkpoint-000002")
    return out


@pytest.mark.parametrize("broken", ["unet_lora.safetensors", "optimizer.pt", "state.json"])
def test_a_truncated_latest_checkpoint_is_named_and_resume_falls_back_to_the_one_before(
        broken, two_checkpoints, lora_run, sd_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    truncate(run / "checkpoint-000004" / broken)
    capsys.readouterr()
    if broken != "optimizer.pt":  # sampling reads no optimizer state
        assert loading.load_run(run).step == 2
        assert f"{run / 'checkpoint-000004' / broken}" in capsys.readouterr().err
    train.train(["--model", str(sd_dir), "--data", str(data_dir), *LORA, "--resume", str(run), "--max-steps", "4"])
    err = capsys.readouterr().err
    assert f"{run / 'checkpoint-000004' / broken}" in err and "falling back to checkpoint-000002" in err
    assert_same_tensors(checkpoint_files(run), checkpoint_files(lora_run))  # steps 3 and 4 trained again, exactly
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-000004"]


def test_a_run_whose_only_checkpoint_is_broken_is_refused_naming_the_file(two_checkpoints, sd_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    shutil.rmtree(run / "checkpoint-000002")
    state = run / "checkpoint-000004" / "state.json"
    truncate(state)
    message = rf"{re.escape(str(state))}, line \d+: not valid JSON.*no checkpoint of {re.escape(str(run))} reads"
    with pytest.raises(ValueError, match=message):
        train.train(["--model", str(sd_dir), "--data", str(data_dir), *LORA, "--resume", str(run), "--max-steps", "6"])
    with pytest.raises(ValueError, match=message):
        loading.load_run(run)
    assert state.stat().st_size > 0  # nothing deleted


def test_a_checkpoint_whose_state_json_names_another_step_is_refused_and_the_log_kept(two_checkpoints, sd_dir,
                                                                                      data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    shutil.rmtree(run / "checkpoint-000002")
    state = run / "checkpoint-000004" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": 1}))
    log = (run / "log.jsonl").read_bytes()
    message = rf"{re.escape(str(state))}: step 1, but the folder is checkpoint-000004.*no checkpoint of .* reads"
    with pytest.raises(ValueError, match=message):
        train.train(["--model", str(sd_dir), "--data", str(data_dir), *LORA, "--resume", str(run), "--max-steps", "6"])
    with pytest.raises(ValueError, match=message):
        loading.load_run(run)
    assert (run / "log.jsonl").read_bytes() == log


@pytest.mark.parametrize("target", ["moved", "unmounted"])
def test_a_checkpoint_that_is_a_symbolic_link_is_refused_and_the_run_and_its_log_are_kept(target, lora_run, sd_dir,
                                                                                          data_dir, tmp_path):
    """A checkpoint moved to another disk and linked back (or its disk not mounted: a dangling link) used to be passed
    over in silence: the resume started again from step 0, cut log.jsonl to nothing, and failed at its first save
    with "Cannot call rmtree on a symbolic link"; sampling fell back to an older checkpoint or to none."""
    run, moved = tmp_path / "run", tmp_path / "disk" / "checkpoint-000004"
    shutil.copytree(lora_run, run)
    moved.parent.mkdir()
    shutil.move(run / "checkpoint-000004", moved)
    (run / "checkpoint-000004").symlink_to(moved if target == "moved" else tmp_path / "unmounted" / moved.name)
    before = {p.name for p in run.iterdir()}, (run / "log.jsonl").read_bytes(), sorted(os.listdir(moved))
    message = rf"^{re.escape(str(run / 'checkpoint-000004'))} is a symbolic link"
    with pytest.raises(ValueError, match=message):
        train.train(["--model", str(sd_dir), "--data", str(data_dir), *LORA, "--resume", str(run), "--max-steps", "6"])
    with pytest.raises(ValueError, match=message):
        loading.load_run(run)
    assert ({p.name for p in run.iterdir()}, (run / "log.jsonl").read_bytes(), sorted(os.listdir(moved))) == before


@pytest.mark.parametrize("named", ["RUN", "RUN/checkpoint-000004"])
def test_a_fine_tune_of_a_run_directory_that_trained_on_since_is_refused_naming_both_checkpoints(named, lora_run,
                                                                                                 sd_dir, data_dir,
                                                                                                 tmp_path):
    """--model RUN loads RUN's newest checkpoint. When RUN trains on, that checkpoint is replaced: a resume (or a
    sample) of the fine-tune used to put its weights on the newer ones in silence, a model nobody trained. The same
    for --model RUN/checkpoint-000004, whose resume stopped on a bare "No such file or directory"."""
    parent, child = tmp_path / "parent", tmp_path / "child"
    shutil.copytree(lora_run, parent)
    model = parent if named == "RUN" else parent / "checkpoint-000004"
    tune = ["--model", str(model), "--data", str(data_dir), "--lora-rank", "4", *FAST, "--checkpoint-every", "1"]
    train.train([*tune, "--out", str(child), "--max-steps", "1"])
    train.train([*tune, "--resume", str(child), "--max-steps", "2"])  # the parent as it was: goes on
    train.train(["--model", str(sd_dir), "--data", str(data_dir), *LORA, "--resume", str(parent), "--max-steps", "6"])
    log = (child / "log.jsonl").read_bytes()
    message = (rf"^{re.escape(str(child / 'run.json'))}: the run fine-tunes {re.escape(str(parent))} at its "
               rf"checkpoint-000004, but it now holds checkpoint-000006")
    with pytest.raises(ValueError, match=message):
        train.train([*tune, "--resume", str(child), "--max-steps", "3"])
    with pytest.raises(ValueError, match=message):
        loading.load_run(child)
    assert (child / "log.jsonl").read_bytes() == log
    assert checkpoints.latest_checkpoint(child).name == "checkpoint-000002"
    parent.rename(tmp_path / "moved")  # the base run moved or deleted whole: not "it trained on since"
    with pytest.raises(ValueError, match=message.split(", but")[0] + r", but it does not exist \(moved or deleted\): "
                                         r"put it back there, or write where it is now in the field 'base'"):
        loading.load_run(child)


def _unet_weights(models):
    return {k: v.clone() for k, v in models.unet.state_dict().items()}


def test_a_fine_tune_of_a_run_whose_newest_checkpoint_was_broken_keeps_the_one_it_started_from(
        two_checkpoints, sd_dir, data_dir, tmp_path):
    """A fine-tune of RUN starts from RUN's newest checkpoint that reads (a broken newer one is passed over). It
    used to be refused afterwards because RUN's newest folder was not the one it started from, though that one was
    still there: the recorded checkpoint is what the fine-tune loads, by name."""
    parent, child = tmp_path / "parent", tmp_path / "child"
    shutil.copytree(two_checkpoints, parent)
    truncate(parent / "checkpoint-000004" / "unet_lora.safetensors")
    tune = ["--model", str(parent), "--data", str(data_dir), "--lora-rank", "4", *FAST, "--checkpoint-every", "1"]
    train.train([*tune, "--out", str(child), "--max-steps", "1"])
    assert json.loads((child / "run.json").read_text())["base_checkpoint"] == "checkpoint-000002"
    train.train([*tune, "--resume", str(child), "--max-steps", "2"])
    step2 = loading.load_run(parent).models  # checkpoint-000004 does not read: what the child started on
    assert loading.load_run(child).step == 2
    base = loading.load_models(rundir.base_path(child, rundir.read_run_json(child)))
    assert_same_tensors({"unet": _unet_weights(base)}, {"unet": _unet_weights(step2)})


def test_a_fine_tune_whose_starting_checkpoint_breaks_is_refused_naming_the_file_not_put_on_an_older_one(
        two_checkpoints, sd_dir, data_dir, tmp_path):
    """The checkpoint a fine-tune started from was read by whatever reads first: once it broke, the fine-tune's
    weights went onto the older checkpoint beside it, a model nobody trained, with only a note on stderr."""
    parent, child = tmp_path / "parent", tmp_path / "child"
    shutil.copytree(two_checkpoints, parent)
    tune = ["--model", str(parent), "--data", str(data_dir), "--lora-rank", "4", *FAST, "--checkpoint-every", "1"]
    train.train([*tune, "--out", str(child), "--max-steps", "1"])
    broken = parent / "checkpoint-000004" / "unet_lora.safetensors"
    truncate(broken)
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        loading.load_run(child)
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        train.train([*tune, "--resume", str(child), "--max-steps", "2"])


def test_a_checkpoint_folder_of_a_run_loads_as_that_checkpoint_and_a_fine_tune_of_it_resumes(two_checkpoints,
                                                                                              data_dir, tmp_path):
    """--model RUN/checkpoint-N: the model of that checkpoint, not of the run's newest one."""
    older = loading.load_models(two_checkpoints / "checkpoint-000002")
    assert older.checkpoint == "checkpoint-000002"
    newest = loading.load_run(two_checkpoints)
    assert newest.step == 4 and newest.models.checkpoint == "checkpoint-000004"
    assert not all(torch.equal(a, b) for a, b in zip(_unet_weights(older).values(),
                                                      _unet_weights(newest.models).values()))
    child = tmp_path / "child"
    tune = ["--model", str(two_checkpoints / "checkpoint-000002"), "--data", str(data_dir), "--lora-rank", "4", *FAST,
            "--checkpoint-every", "1"]
    train.train([*tune, "--out", str(child), "--max-steps", "1"])
    train.train([*tune, "--resume", str(child), "--max-steps", "2"])
    base = loading.load_models(rundir.base_path(child, rundir.read_run_json(child)))
    assert loading.load_run(child).step == 2 and base.checkpoint == "checkpoint-000002"


def test_a_checkpoint_folder_named_as_the_working_directory_loads_as_that_checkpoint(two_checkpoints, monkeypatch):
    """--model . from inside RUN/checkpoint-000002: '.' has no name of its own to recognise a checkpoint by."""
    monkeypatch.chdir(two_checkpoints / "checkpoint-000002")
    assert loading.load_models(".").checkpoint == "checkpoint-000002"


def test_a_checkpoint_folder_named_by_path_that_is_a_symbolic_link_is_refused(two_checkpoints, tmp_path):
    """load_run(RUN) refuses a checkpoint folder that is a link; --model RUN/checkpoint-N read it all the same: the
    weights of another run put on this run's base."""
    run, moved = tmp_path / "run", tmp_path / "disk" / "checkpoint-000002"
    shutil.copytree(two_checkpoints, run)
    moved.parent.mkdir()
    shutil.move(run / "checkpoint-000002", moved)
    (run / "checkpoint-000002").symlink_to(moved)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(run / 'checkpoint-000002'))} is a symbolic link"):
        loading.load_models(run / "checkpoint-000002")


def test_a_resume_asked_to_end_before_the_step_the_run_is_at_is_refused_and_exports_nothing(lora_run, sd_dir,
                                                                                            data_dir, tmp_path):
    """--max-steps 2 over a run at step 4 cannot go back: it used to end at once in silence, and with --export wrote
    step 4's weights under the name the user gave for step 2."""
    run, export = tmp_path / "run", tmp_path / "step-2"
    shutil.copytree(lora_run, run)
    before = {p.name for p in run.iterdir()}, (run / "log.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"^--max-steps 2 is below step 4, where the run is \(.*checkpoint-000004\)"):
        train.train(["--model", str(sd_dir), "--data", str(data_dir), *LORA, "--resume", str(run), "--max-steps", "2",
                     "--export", str(export)])
    assert ({p.name for p in run.iterdir()}, (run / "log.jsonl").read_bytes()) == before and not export.exists()
    train.train(["--model", str(sd_dir), "--data", str(data_dir), *LORA, "--resume", str(run), "--max-steps", "4"])


@pytest.mark.parametrize("change", ["renamed", "reshaped"])
def test_an_optimizer_state_that_does_not_fit_the_run_is_refused_naming_the_file(change, two_checkpoints, sd_dir,
                                                                                 data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    shutil.rmtree(run / "checkpoint-000002")
    path = run / "checkpoint-000004" / "optimizer.pt"
    saved = torch.load(path, weights_only=True)
    state = saved["optimizer"]["state"][0]
    if change == "renamed":
        state["exp_avg_renamed"] = state.pop("exp_avg")
    else:
        state["exp_avg"] = state["exp_avg"].flatten()[:3]
    torch.save(saved, path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: state 0 "):
        train.train(["--model", str(sd_dir), "--data", str(data_dir), *LORA, "--resume", str(run), "--max-steps", "6"])


def test_a_checkpoint_that_does_not_read_back_as_written_stops_the_run_and_keeps_the_previous_one(
        two_checkpoints, sd_dir, data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    shutil.rmtree(run / "checkpoint-000004")
    kept = {f.name: f.read_bytes() for f in (run / "checkpoint-000002").iterdir()}
    real_save_file = weights.save_file

    def lossy_save_file(tensors, path, metadata=None):  # a write that loses its tail without saying so
        real_save_file(tensors, path, metadata=metadata)
        truncate(Path(path))

    monkeypatch.setattr(weights, "save_file", lossy_save_file)
    with pytest.raises(ValueError, match=r"checkpoint-000004 does not read back as written, so it was not kept.*"
                                         r"checkpoint-000004\.tmp/unet_lora\.safetensors"):
        train.train(["--model", str(sd_dir), "--data", str(data_dir), *LORA, "--resume", str(run), "--max-steps", "4"])
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-000002"]
    assert {f.name: f.read_bytes() for f in (run / "checkpoint-000002").iterdir()} == kept


# ---- 10. changed data


def test_resume_over_changed_data_is_refused_unless_allowed(sd_dir, tmp_path):
    data = make_data(tmp_path / "data")
    out = tmp_path / "run"
    common = ["--model", str(sd_dir), "--data", str(data), "--lora-rank", "4", *FAST, "--checkpoint-every", "1"]
    train.train([*common, "--out", str(out), "--max-steps", "1"])
    image, meta = data / "3.png", data / "metadata.jsonl"
    original, stat = image.read_bytes(), image.stat()
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)  # same name, count and groups; other pixels
    refused = r"the data in .* changed since the run started \({}\).*--allow-data-change"
    with pytest.raises(ValueError, match=refused.format("the images' names, sizes or modification times differ")):
        train.train([*common, "--resume", str(out), "--max-steps", "2"])
    image.write_bytes(original)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    meta.write_text(meta.read_text().replace("a blue square", "a navy square", 1))
    with pytest.raises(ValueError, match=refused.format(r"metadata\.jsonl differs")):
        train.train([*common, "--resume", str(out), "--max-steps", "2"])
    train.train([*common, "--resume", str(out), "--max-steps", "2", "--allow-data-change"])
    assert [r["step"] for r in log_lines(out)] == [1, 2]


def test_after_a_resume_allowed_over_changed_data_that_data_is_the_runs_and_a_later_change_is_refused(sd_dir, tmp_path):
    """Every later resume compared the data with the first start's and needed --allow-data-change again, though the
    run had gone on with the new data: the resume that allows a change records the data it goes on with."""
    data = make_data(tmp_path / "data")
    out = tmp_path / "run"
    common = ["--model", str(sd_dir), "--data", str(data), "--lora-rank", "4", *FAST, "--checkpoint-every", "1"]
    train.train([*common, "--out", str(out), "--max-steps", "1"])
    meta = data / "metadata.jsonl"
    meta.write_text(meta.read_text().replace("a blue square", "a navy square", 1))
    train.train([*common, "--resume", str(out), "--max-steps", "2", "--allow-data-change"])
    train.train([*common, "--resume", str(out), "--max-steps", "3"])
    meta.write_text(meta.read_text().replace("a red square", "a crimson square", 1))
    with pytest.raises(ValueError, match=r"changed since the resume at step 1 that allowed a change \(metadata\.jsonl "
                                         r"differs\)"):
        train.train([*common, "--resume", str(out), "--max-steps", "4"])
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3]


def test_data_changed_after_an_allowed_change_is_said_to_differ_from_that_resumes_data(sd_dir, tmp_path):
    """The data put back as the run started on it was refused as "changed since the run started": it differs from
    the data the run went on with at the resume that allowed a change, which is what is compared."""
    data = make_data(tmp_path / "data")
    out = tmp_path / "run"
    common = ["--model", str(sd_dir), "--data", str(data), "--lora-rank", "4", *FAST, "--checkpoint-every", "1"]
    train.train([*common, "--out", str(out), "--max-steps", "1"])
    meta = data / "metadata.jsonl"
    first = meta.read_text()
    meta.write_text(first.replace("a blue square", "a navy square", 1))
    train.train([*common, "--resume", str(out), "--max-steps", "2", "--allow-data-change"])
    meta.write_text(first)
    with pytest.raises(ValueError, match=r"changed since the resume at step 1 that allowed a change \(metadata"):
        train.train([*common, "--resume", str(out), "--max-steps", "3"])


def test_a_data_folder_moved_or_copied_with_its_files_unchanged_resumes_and_the_resume_records_where(sd_dir, tmp_path,
                                                                                                     capsys):
    """A data folder moved elsewhere was refused as "started with data=OLD, now data=NEW; resume with the same
    arguments", which a path that is gone cannot be, and --allow-data-change did not help; a copy made in place (new
    modification times) needed --allow-data-change, recorded as a change of data that never happened. With
    metadata.jsonl and every image's bytes the same it is the same data: the resume goes on and says where it is
    now. Moved and changed, it is changed data."""
    data = make_data(tmp_path / "data")
    out, moved = tmp_path / "run", tmp_path / "moved"
    common = ["--model", str(sd_dir), "--lora-rank", "4", *FAST, "--checkpoint-every", "1"]
    train.train([*common, "--data", str(data), "--out", str(out), "--max-steps", "1"])
    shutil.copytree(data, moved, copy_function=shutil.copy)  # new modification times
    shutil.rmtree(data)
    capsys.readouterr()
    train.train([*common, "--data", str(moved), "--resume", str(out), "--max-steps", "2"])
    assert (f"note: the run started on the data in {data.resolve()}; it is in {moved.resolve()} now, its files the "
            "same") in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["resumes"][-1]["args"]["data"] == str(moved.resolve())
    Image.fromarray(255 - np.asarray(Image.open(moved / "3.png"))).save(moved / "3.png")
    with pytest.raises(ValueError, match=rf"the data in {re.escape(str(moved.resolve()))} changed since the run "
                                         rf"started \(moved from {re.escape(str(data.resolve()))}; the images' "
                                         r"contents differ\).*--allow-data-change"):
        train.train([*common, "--data", str(moved), "--resume", str(out), "--max-steps", "3"])
    train.train([*common, "--data", str(moved), "--resume", str(out), "--max-steps", "3", "--allow-data-change"])
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3]


def test_a_data_folder_copied_over_itself_resumes_without_allow_data_change(sd_dir, tmp_path, capsys):
    """Every file written again with the same bytes (a copy over itself: new modification times) is the same data:
    it needed --allow-data-change, recorded as a change of data that never happened."""
    data = make_data(tmp_path / "data")
    out = tmp_path / "run"
    common = ["--model", str(sd_dir), "--data", str(data), "--lora-rank", "4", *FAST, "--checkpoint-every", "1"]
    train.train([*common, "--out", str(out), "--max-steps", "1"])
    for f in sorted(data.iterdir()):
        f.write_bytes(f.read_bytes())
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    train.train([*common, "--resume", str(out), "--max-steps", "2"])
    assert "data changed" not in capsys.readouterr().err and [r["step"] for r in log_lines(out)] == [1, 2]


def test_resume_over_data_with_another_number_of_images_names_the_data_not_the_arguments(sd_dir, tmp_path):
    """It said "resume with the same arguments", which were the same; --allow-data-change does not help either."""
    data = make_data(tmp_path / "data")
    out = tmp_path / "run"
    common = ["--model", str(sd_dir), "--data", str(data), "--lora-rank", "4", *FAST, "--checkpoint-every", "1"]
    train.train([*common, "--out", str(out), "--max-steps", "1"])
    shutil.copy(data / "0.png", data / "8.png")
    with open(data / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "8.png", "text": "a red square", "group": "red"}) + "\n")
    for allow in ([], ["--allow-data-change"]):
        with pytest.raises(ValueError, match=r"the run was started with num_images=8, now num_images=9; the data in "
                                             r".* changed since the run started: restore it, or fine-tune the run "
                                             r"on the new data as a new run \(--model .*run\)$"):
            train.train([*common, "--resume", str(out), "--max-steps", "2", *allow])


def test_resume_over_an_image_edited_in_place_with_its_size_and_time_kept_is_refused(sd_dir, tmp_path):
    data = make_data(tmp_path / "data")
    image = data / "3.png"
    Image.open(image).save(image, compress_level=0)  # stored uncompressed: any pixels give the same file size
    out = tmp_path / "run"
    common = ["--model", str(sd_dir), "--data", str(data), "--lora-rank", "4", *FAST, "--checkpoint-every", "1"]
    train.train([*common, "--out", str(out), "--max-steps", "1"])
    stat = image.stat()
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image, compress_level=0)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    with pytest.raises(ValueError, match=r"changed since the run started \(the images' contents differ\)"):
        train.train([*common, "--resume", str(out), "--max-steps", "2"])


def test_a_run_json_from_before_the_content_hash_resumes_on_the_checks_it_recorded(sd_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "4", *FAST, "--checkpoint-every", "1"]
    train.train([*common, "--out", str(out), "--max-steps", "1"])
    info = json.loads((out / "run.json").read_text())
    assert set(info["data"]) == {"metadata.jsonl", "images", "contents"}
    del info["data"]["contents"]
    (out / "run.json").write_text(json.dumps(info))
    train.train([*common, "--resume", str(out), "--max-steps", "2"])
    assert [r["step"] for r in log_lines(out)] == [1, 2]


def test_a_run_json_from_before_the_data_fingerprint_resumes_on_another_folder_only_when_allowed(sd_dir, tmp_path,
                                                                                                  capsys):
    """A run.json without the data's fingerprint has no bytes to compare a folder elsewhere with: other images under
    the same names, count and groups were taken, and the note said "its files the same". Refused unless
    --allow-data-change, which warns; the same folder resumes as before."""
    data, other, out = make_data(tmp_path / "data"), make_data(tmp_path / "other"), tmp_path / "run"
    for p in other.glob("*.png"):
        Image.fromarray(255 - np.asarray(Image.open(p))).save(p)
    common = ["--model", str(sd_dir), "--lora-rank", "4", *FAST, "--checkpoint-every", "1"]
    train.train([*common, "--data", str(data), "--out", str(out), "--max-steps", "1"])
    info = json.loads((out / "run.json").read_text())
    del info["data"]
    (out / "run.json").write_text(json.dumps(info))
    refused = (rf"changed since the run started \(moved from {re.escape(str(data.resolve()))}; run\.json records no "
               r"fingerprint of its files to compare\).*--allow-data-change")
    with pytest.raises(ValueError, match=refused):
        train.train([*common, "--data", str(other), "--resume", str(out), "--max-steps", "2"])
    train.train([*common, "--data", str(data), "--resume", str(out), "--max-steps", "2"])
    capsys.readouterr()
    train.train([*common, "--data", str(other), "--resume", str(out), "--max-steps", "3", "--allow-data-change"])
    assert "warning: the data changed since the run started (moved from" in capsys.readouterr().err
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3]


def test_a_fine_tune_whose_base_model_was_replaced_at_the_same_path_is_refused_not_loaded(sd_dir, data_dir, tmp_path):
    """run.json named the base model by its path alone: other weights put at that path (another model, a fine-tune
    saved over it) were loaded under the run's trained weights, by sample.py and by a resume, without a word."""
    base, run = tmp_path / "sd", tmp_path / "run"
    shutil.copytree(sd_dir, base)
    tune = ["--model", str(base), "--data", str(data_dir), *LORA]
    train.train([*tune, "--out", str(run), "--max-steps", "2"])
    before = loading.load_run(run).models.unet.state_dict()
    unet = base / "unet" / "diffusion_pytorch_model.safetensors"
    original = unet.read_bytes()
    safetensors.torch.save_file({k: v + 1 for k, v in safetensors.torch.load_file(unet).items()}, unet)
    message = (rf"^{re.escape(str(run / 'run.json'))}: the run fine-tunes {re.escape(str(base))}, but its weights "
               rf"changed since the run started \(unet{re.escape(os.sep)}diffusion_pytorch_model\.safetensors "
               rf"differs\)")
    with pytest.raises(ValueError, match=message):
        loading.load_run(run)
    with pytest.raises(ValueError, match=message):
        train.train([*tune, "--resume", str(run), "--max-steps", "4"])
    unet.write_bytes(original)
    assert_same_tensors({"unet": before}, {"unet": loading.load_run(run).models.unet.state_dict()})  # same: it loads
    info = json.loads((run / "run.json").read_text())
    del info["base_fingerprint"]  # a run from before the fingerprint: its base is taken as it is
    (run / "run.json").write_text(json.dumps(info))
    safetensors.torch.save_file({k: v + 1 for k, v in safetensors.torch.load_file(unet).items()}, unet)
    loading.load_run(run)


def test_a_run_of_a_run_whose_parent_was_trained_anew_at_the_same_path_is_refused_not_loaded(sd_dir, data_dir,
                                                                                            tmp_path):
    """A run fine-tuned from another run named the parent's checkpoint by its folder name alone: the parent deleted
    and trained again (another seed, the same steps) gave the child the new parent's weights under its own, in
    sample.py, --export and a resume, without a word."""
    parent, child = tmp_path / "A", tmp_path / "B"
    steps = [*LORA, "--data", str(data_dir), "--max-steps", "2"]
    train.train(["--model", str(sd_dir), "--out", str(parent), *steps])
    train.train(["--model", str(parent), "--out", str(child), *steps])
    loading.load_run(child)
    shutil.rmtree(parent)
    train.train(["--model", str(sd_dir), "--out", str(parent), *steps, "--seed", "7"])
    message = (rf"^{re.escape(str(child / 'run.json'))}: the run fine-tunes {re.escape(str(parent))} at its "
               rf"checkpoint-000002, but its weights changed since the run started \(.*unet_lora\.safetensors")
    with pytest.raises(ValueError, match=message):
        loading.load_run(child)
    with pytest.raises(ValueError, match=message):
        train.train(["--model", str(parent), "--resume", str(child), *steps[:-1], "4"])


@pytest.mark.parametrize("name", ["model.safetensors", "sd.ckpt"])
def test_an_export_named_like_one_weight_file_is_refused_before_training(name, sd_dir, data_dir, tmp_path):
    """--export model.safetensors wrote a diffusers folder of that name, where a single file was expected."""
    with pytest.raises(OSError, match=rf"^--export .*{re.escape(name)}: .*a diffusers folder, not one file"):
        train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(tmp_path / "never"), *FAST,
                     "--max-steps", "1", "--export", str(tmp_path / name)])
    assert not (tmp_path / "never").exists() and not (tmp_path / name).exists()


@pytest.mark.parametrize("inside", ["", "checkpoint-000001", "base"])
def test_an_export_into_the_run_directory_is_refused_before_training(inside, sd_dir, data_dir, tmp_path):
    """--export RUN/checkpoint-000001 (or RUN/base, or RUN itself) passed the check before training, as nothing was
    there yet: the run trained every step, then could not export onto its own folder ("RUN exists" for RUN)."""
    run = tmp_path / "run"
    with pytest.raises(OSError, match=r"^--export .*: it lies in the run directory"):
        train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(run), *FAST, "--max-steps", "1",
                     "--export", str(run / inside)])
    assert not list(run.glob("checkpoint-*")) and not (run / "log.jsonl").exists()


def test_a_fine_tune_whose_base_schedule_changed_is_refused_not_sampled_or_resumed_on_other_targets(sd_dir, data_dir,
                                                                                                     tmp_path):
    """The fingerprint covers the weight files: a scheduler_config.json edited since (v_prediction, another length)
    had sample.py and --export use it for a model trained on epsilon, and a resume train on v targets after epsilon
    ones, without a word."""
    base, run = tmp_path / "sd", tmp_path / "run"
    shutil.copytree(sd_dir, base)
    tune = ["--model", str(base), "--data", str(data_dir), *LORA]
    train.train([*tune, "--out", str(run), "--max-steps", "2"])
    schedule = base / "scheduler" / "scheduler_config.json"  # none: SD's, as the run trained on
    schedule.parent.mkdir()
    sd = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
          "prediction_type": "epsilon"}
    for change, was in (({"prediction_type": "v_prediction"}, "prediction type epsilon, now v_prediction"),
                        ({"num_train_timesteps": 500}, "1000 timesteps, now 500"),
                        ({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}, "another")):
        schedule.write_text(json.dumps({**sd, **change}))
        message = (rf"^{re.escape(str(run / 'run.json'))}: the base model's schedule changed since the run started "
                   rf"\(.*{was}")
        with pytest.raises(ValueError, match=message):
            loading.load_run(run)
        with pytest.raises(ValueError, match=message):
            train.train([*tune, "--resume", str(run), "--max-steps", "4"])
    schedule.write_text(json.dumps(sd))  # the same schedule, said in a file
    loading.load_run(run)


def test_a_model_folder_named_like_a_checkpoint_is_fingerprinted_as_a_model(sd_dir, tmp_path):
    """A diffusers folder named checkpoint-000100 was taken for a run's checkpoint folder by its name alone: no
    top-level weight files, so an empty fingerprint, and other weights put there were never noticed."""
    base = tmp_path / "checkpoint-000100"
    shutil.copytree(sd_dir, base)
    assert rundir.model_fingerprint(base) == rundir.model_fingerprint(sd_dir) != {}


def test_a_fine_tune_whose_base_model_was_moved_names_its_run_json_and_the_field_to_mend(sd_dir, data_dir, tmp_path):
    """A base model moved away gave "no checkpoint file or folder at SD", as if --model had been mistyped just now."""
    base, run = tmp_path / "sd", tmp_path / "run"
    shutil.copytree(sd_dir, base)
    train.train(["--model", str(base), "--data", str(data_dir), *LORA, "--out", str(run), "--max-steps", "2"])
    base.rename(tmp_path / "moved")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(run / 'run.json'))}: the run fine-tunes "
                                         rf"{re.escape(str(base))}, but it does not exist .*the field 'base'"):
        loading.load_run(run)


def test_a_moved_base_model_is_mended_as_the_message_says(sd_dir, data_dir, tmp_path):
    """The message said "write where it is now in the field 'base'"; done, run.json was refused: "field 'base' ... is
    not the model the run fine-tunes, config.model ...". It names both fields, and with both written the run loads."""
    base, run = tmp_path / "sd", tmp_path / "run"
    shutil.copytree(sd_dir, base)
    train.train(["--model", str(base), "--data", str(data_dir), *LORA, "--out", str(run), "--max-steps", "2"])
    base.rename(tmp_path / "moved")
    with pytest.raises(ValueError, match=r"write where it is now in the field 'base' and in config\.model"):
        loading.load_run(run)
    info = json.loads((run / "run.json").read_text())
    info["base"] = info["config"]["model"] = str(tmp_path / "moved")
    (run / "run.json").write_text(json.dumps(info))
    assert loading.load_run(run).step == 2


def test_a_resume_that_validates_a_step_again_keeps_no_image_of_the_attempt_that_crashed(sd_dir, data_dir, tmp_path,
                                                                                         monkeypatch):
    """validation/step_N/ of a step the crashed attempt validated past its last checkpoint kept that attempt's images
    beside the resume's: with --validation-n 1 and another prompt, 00.png was the new prompt's, 01.png and 02.png the
    old one's. A file there that no run wrote is kept."""
    run, step = tmp_path / "run", train.Trainer.step
    flags = ["--model", str(sd_dir), "--data", str(data_dir), *FAST, "--w-ind", "0", "--lora-rank", "4",
             "--checkpoint-every", "2", "--validation-every", "1", "--validation-steps", "1", "--max-steps", "4"]

    def crash_in_step_4(self):
        if self.step_count == 3:
            raise KeyboardInterrupt
        return step(self)

    with monkeypatch.context() as m:
        m.setattr(train.Trainer, "step", crash_in_step_4)
        with pytest.raises(KeyboardInterrupt):
            train.train(flags + ["--out", str(run), "--validation-prompt", "a red square", "--validation-n", "3"])
    assert len(list((run / "validation" / "step_000003").iterdir())) == 3
    (run / "validation" / "step_000003" / "notes.txt").write_text("mine")
    train.train(flags + ["--resume", str(run), "--validation-prompt", "a blue square", "--validation-n", "1"])
    assert sorted(p.name for p in (run / "validation" / "step_000003").iterdir()) == ["00.png", "notes.txt"]
    assert sorted(p.name for p in (run / "validation" / "step_000002").iterdir()) == ["00.png", "01.png", "02.png"]


def test_the_base_fingerprint_sees_one_tensor_changed_in_a_large_file(tmp_path):
    """A LoRA merged into a saved-over base changes only the attention tensors it trained, a few % of the file: 64
    pieces spread evenly over it could all miss them. Every tensor's first bytes are read."""
    file = tmp_path / "model.safetensors"
    tensors = {f"t{k:03d}": torch.full((16384,), float(k)) for k in range(200)}  # 64 KiB each, 12.8 MB
    safetensors.torch.save_file(tensors, file)
    before = rundir.model_fingerprint(file)
    safetensors.torch.save_file({**tensors, "t101": tensors["t101"] + 1}, file)
    assert os.path.getsize(file) == int(before["model.safetensors"].split()[0])  # the same size: only bytes changed
    assert rundir.model_fingerprint(file) != before
    header = json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}).encode()  # reversed
    file.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))  # a traceback from the seek or read
    assert rundir.model_fingerprint(file)["model.safetensors"].startswith(f"{8 + len(header) + 8} ")


# ---- 11. a failed write


def file_size_limit(limit):
    """For subprocess: files this process writes stop growing at `limit` bytes (EFBIG, "File too large"), a fault
    injected by the kernel into every write, as a full disk would be."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_write_names_the_path_and_leaves_nothing_that_blocks_a_retry(sd_dir, data_dir, tmp_path):
    out = tmp_path / "new" / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", str(sd_dir), "--data", str(data_dir), "--out", str(out),
           "--lora-rank", "0", "--max-steps", "1", *FAST, "--checkpoint-every", "1"]
    for limit, path in ((1000, out / "run.json.tmp"), (200_000, out / "checkpoint-000001.tmp" / "unet.safetensors")):
        r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                           timeout=300, preexec_fn=file_size_limit(limit))
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert r.stderr.strip().splitlines() == [f"train.py: error: cannot write {path}: File too large"]
        assert not list(out.glob("*.tmp")) and not list(out.glob("checkpoint-*"))
        if limit == 1000:  # no run.json: the folders made for it are gone too
            assert not (tmp_path / "new").exists()
    assert json.loads((out / "run.json").read_text())["config"]
    train.train([*cmd[2:], "--resume", str(out)])
    assert checkpoints.latest_checkpoint(out).name == "checkpoint-000001"


@pytest.mark.parametrize("where", ["under a file", "read-only"])
def test_an_export_folder_that_cannot_be_written_is_refused_before_training(where, sd_dir, data_dir, tmp_path,
                                                                          monkeypatch):
    """--export under a file, or in a folder that cannot be written, was found only when the trained run came to
    export (after hours: "cannot write DIR.tmp"); it is refused with the other flags, before the run directory."""
    parent = tmp_path / "parent"
    if where == "under a file":
        parent.write_text("mine")
    else:
        parent.mkdir()
        access = os.access  # the tests may run as root, whom a mode of 555 does not stop
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != parent and access(path, mode, **kw))
    out, export = tmp_path / "run", parent / "sub" / "export"
    with pytest.raises(OSError, match=rf"--export {re.escape(str(export))}: {re.escape(str(parent))} is "
                                      + ("a file" if where == "under a file" else "not writable")):
        train.train(["--model", str(sd_dir), "--data", str(data_dir), "--out", str(out), "--max-steps", "1", *FAST,
                     "--export", str(export)])
    assert not out.exists() and not export.exists()


def test_a_from_scratch_run_whose_run_json_fails_takes_its_base_folder_away(sd_dir, data_dir, tmp_path, monkeypatch):
    """A from-scratch run writes base/ before run.json: when run.json cannot be written, the error names it and
    base/ goes again with the folders made for the run (a retry starts clean)."""
    write_json = weights.write_json

    def full_at_run_json(path, obj):
        if Path(path).name == "run.json":
            raise weights.WriteError(f"no space left on {path}")
        write_json(path, obj)

    monkeypatch.setattr(weights, "write_json", full_at_run_json)
    config, out = tmp_path / "tiny.json", tmp_path / "new" / "run"
    config.write_text(json.dumps({"unet": TINY["unet"], "text_encoder": TINY["text_encoder"]}))
    with pytest.raises(weights.WriteError, match=re.escape(f"no space left on {out / 'run.json'}")):
        train.train(["--init-config", str(config), "--vae", str(sd_dir), "--data", str(data_dir), "--out", str(out),
                     "--max-steps", "1", *FAST])
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_reads_as_no_space_left_on_the_path():
    with pytest.raises(OSError, match=r"^no space left on /dev/full$"):  # torch's writer: "enforce fail at ..."
        weights.save_torch({"x": torch.zeros(10 ** 5)}, Path("/dev/full"))


# ---- clear messages


@pytest.mark.parametrize("edit, message", [
    (lambda info: info["config"].update(lora_rank="4"), r"config field 'lora_rank' must be an integer >= 0, got '4'"),
    (lambda info: info["config"].pop("lora_rank"), r"config field 'lora_rank' must be an integer >= 0, got None"),
    (lambda info: info["config"].pop("w_ind"), r"config field 'w_ind' must be a number, got None"),
    (lambda info: info["config"].update(indicator_hidden=[0]),
     r"config field 'indicator_hidden' must be a list of integers >= 1, got \[0\]"),
    (lambda info: info["config"].update(train_text_encoder=1),
     r"config field 'train_text_encoder' must be true or false, got 1"),
    # the indicator is built with one class per name: an AssertionError from ddm.Indicator
    (lambda info: info["config"].update(group_names=["7"]),
     r"config field 'group_names' must name at least 2 groups \(the run trained an indicator\), got \['7'\]"),
    (lambda info: info.update(base=info["base"] + "-elsewhere"), r"field 'base' .*-elsewhere is not the model the run "
                                                                 r"fine-tunes, config\.model "),
    # a run of an objective a reader added to ddm.py in another checkout: a KeyError from ddm.uses_indicator before
    (lambda info: info["config"].update(objective="toy"),
     r"config field 'objective' must be an objective this checkout's ddm\.OBJECTIVES defines, got 'toy'"),
    # joined onto the base run's path: "../x" would load a folder outside it, 5 was a TypeError
    (lambda info: info.update(base_checkpoint="../elsewhere"),
     r"field 'base_checkpoint' must be null or a checkpoint folder's name, got '\.\./elsewhere'"),
    (lambda info: info.update(base_checkpoint=5), r"field 'base_checkpoint' must be null or a checkpoint folder's "
                                                  r"name, got 5"),
    # compared with the base's files: a list read as other weights, "changed since the run started"
    (lambda info: info.update(base_fingerprint=["x"]), r"field 'base_fingerprint' must be null or an object, got "
                                                       r"\['x'\]"),
    # sample.py's default side: a KeyError traceback, or a TypeError in the side check
    (lambda info: info["config"].pop("resolution"), r"config field 'resolution' must be an integer >= 8, got None"),
    # the indicator is built on it: a KeyError or TypeError traceback from make_indicator
    (lambda info: info.pop("latent_shape"), r"field 'latent_shape' must be a list of 3 integers >= 1 \(the latents' "
                                            r"channels, height, width\), got None"),
    (lambda info: info.update(latent_shape=[4, 8, 8.5]),
     r"field 'latent_shape' must be a list of 3 integers >= 1 \(the latents' channels, height, width\), got "
     r"\[4, 8, 8\.5\]"),
])
def test_a_hand_edited_run_json_is_one_line_naming_the_field(edit, message, lora_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    info = json.loads((run / "run.json").read_text())
    edit(info)
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(run / 'run.json'))}: {message}"):
        loading.load_run(run)


@pytest.mark.parametrize("field, value, what", [("resumes", {}, "a list"), ("args", ["--seed", "1"], "an object"),
                                                ("data", None, "an object")])  # the fingerprint: a TypeError
def test_a_hand_edited_resume_record_is_one_line_naming_the_field(field, value, what, lora_run, sd_dir, data_dir,
                                                                  tmp_path):
    """run.json's `resumes` (each resume appends to it), `args` (a resume compares its flags with them) and `data` (the
    data's fingerprint) of another type: the resume stops with one line naming the field before it trains or writes, not
    with an AttributeError from the record of the resume or a TypeError from the fingerprint. Loading the run
    (sample.py, evaluate.py), which reads none of them, still works."""
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    info = json.loads((run / "run.json").read_text())
    info[field] = value
    (run / "run.json").write_text(json.dumps(info))
    before = (run / "run.json").read_bytes()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(run / 'run.json'))}: field '{field}' must be {what}$"):
        train.train(["--model", str(sd_dir), "--data", str(data_dir), *LORA, "--resume", str(run), "--max-steps", "5"])
    assert (run / "run.json").read_bytes() == before and not (run / "checkpoint-000005").exists()
    assert loading.load_run(run).step == 4


def test_a_truncated_run_json_and_a_seed_out_of_range_are_one_line_errors(lora_run, sd_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    truncate(run / "run.json")
    message = rf"{re.escape(str(run / 'run.json'))}, line \d+: not valid JSON"
    with pytest.raises(ValueError, match=message):
        train.train(["--model", str(sd_dir), "--data", str(data_dir), *LORA, "--resume", str(run)])
    with pytest.raises(ValueError, match=message):
        loading.load_run(run)
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(sd_dir), "--data", str(data_dir),
                        *LORA, "--resume", str(run)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and re.search(message, r.stderr)
    for seed in (2 ** 64, -1):  # checked before anything loads: this --model does not exist
        with pytest.raises(ValueError, match=rf"--seed must lie in 0\.\.2\*\*64-1, got {seed}"):
            train.train(["--model", str(tmp_path / "no-model"), "--data", str(data_dir), "--out",
                         str(tmp_path / "never"), *FAST, "--seed", str(seed)])
    assert not (tmp_path / "never").exists()

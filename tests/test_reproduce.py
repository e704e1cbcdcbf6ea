"""reproduce.py --quick end to end on CPU: a well-formed report with every method, every seed, the verdict, the CFG
check and grids; three groups work end to end; bad arguments are refused; an existing run directory is refused
without --overwrite, and --overwrite keeps the cache. (The pipeline, not the science.) Then the numbers the README
claims, pinned by their meaning on hand-made rows and stubbed stages: the verdict's bar, mean and sample std over
seeds, the CFG check's choice and scales, the VAE's scaling factor, the folder each method trains on, its labels
and captions, and the guidance targets of the scenarios. tools/plant_bugs.py checks that each of them bites."""
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import data
import guidance
import reproduce
from vae import load_vae

INDICATOR_METHODS = {"plain", "ddm", "ddm-x0", "iw", "iw-10", "guided-3", "guided-10", "guided-auto", "guided-auto-10",
                     "guided-auto-1"}  # runs that train one


def quick(argv):
    n = torch.get_num_threads()
    stderr = io.StringIO()  # tqdm writes its bars here
    try:  # one thread: tiny models gain little from two, and two threads on a busy machine spin-wait a lot
        with contextlib.redirect_stderr(stderr):
            report = reproduce.main(["--quick", "--threads", "1", "--no-progress", *argv])
    finally:
        torch.set_num_threads(n)  # reproduce sets the process's thread count
    drawn = stderr.getvalue()
    assert "it/s" not in drawn and "step/s" not in drawn and "train:" not in drawn, (
        "--no-progress still drew a progress bar:\n" + drawn[-2000:])
    return report


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("repro-cache")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("repro") / "run"
    return out, quick(["--out", str(out), "--cache", str(cache), "--seeds", "2"])


def test_quick_run_writes_a_report_with_every_method_and_every_seed(quick_run):
    out, report = quick_run
    stored = json.loads((out / "report.json").read_text())
    assert stored["rows"] == json.loads(json.dumps(report["rows"]))
    names = [m.name for m in reproduce.METHODS if m.default]
    rows = stored["rows"]
    assert [r["method"] for r in rows] == ["base"] + [n for n in names for _ in range(2)]
    assert [r["seed"] for r in rows[1:]] == [0, 1] * len(names)
    for r in rows:
        for key in ("fd", "fd_soft", "spd", "mean_confidence", "frechet_distance", "classifier_heldout_accuracy"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["method"], key, r[key])
        assert 0 <= r["fd"] <= math.sqrt(0.5) + 1e-9 and 0 <= r["spd"] <= 1
        assert abs(sum(r["proportions"]) - 1) < 1e-9 and set(r["frechet_per_group"]) == {"7", "8"}
        assert r["n_generic"] == reproduce.QUICK.n_generic and set(r["success_rates"]) == {"7", "8"}
        assert (r["indicator_entropy"] is not None) == (r["method"] == "ddm")  # the authors' own signal
        if r["method"] != "base":  # the run's checkpoint holds an indicator, and it measured itself on labels
            has_indicator = (checkpoints.latest_checkpoint(r["run"]) / "indicator.safetensors").is_file()
            assert has_indicator == (r["method"] in INDICATOR_METHODS), r["method"]
            measured = r["train"]["indicator_bacc"] is not None or r["train"]["indicator_acc"] is not None
            assert measured == has_indicator or r["method"] == "guided-auto-1", r["method"]  # 1%: maybe no label
            assert r["unet_as_plain"] == (r["method"] in {"plain", "guided-3", "guided-10", "guided-auto",
                                                          "guided-auto-10", "guided-auto-1"}), r["method"]
    summary = {s["method"]: s for s in stored["summary"]}
    assert list(summary) == ["base"] + names
    for name, s in summary.items():
        assert s["seeds"] == (["-"] if name == "base" else [0, 1])
        mine = [r["fd"] for r in rows if r["method"] == name]
        assert s["fd"] == pytest.approx(sum(mine) / len(mine)) and s["fd_std"] >= 0
        assert (s["meets_goal"] is None) == (name in ("base", "plain"))
    assert stored["best_method"] in names
    for name in ("plain", stored["best_method"]):  # the CFG check: every scale, every seed
        assert sorted(r["cfg"] for r in stored["cfg_rows"] if r["method"] == name) == sorted(
            [reproduce.QUICK.guidance, *reproduce.QUICK.cfg_check] * 2)
    text = (out / "report.md").read_text()
    assert all(m.label in text for m in reproduce.METHODS if m.default) and "## Verdict" in text and "CFG scale" in text
    for grid in stored["grids"]:
        with Image.open(out / grid) as img:
            assert img.width > img.height > 0
    assert (out / "grids" / "all_seed0.png").is_file()


def test_the_report_names_the_step_the_guided_rows_decided_their_targets_at(quick_run):
    """report.md said "decided at t = 801" at any number of sampling steps: --quick's 3 steps decide at t = 667."""
    out, _ = quick_run
    rows = json.loads((out / "report.json").read_text())["rows"]
    steps = {p["decide_step"] for r in rows if r.get("guidance_chosen") for p in r["guidance_chosen"].values()}
    steps.discard(None)  # drawn targets (guidance 3 and 10) decide nothing
    assert steps == {667} and "trajectory-aware targets decided at t = 667 " in (out / "report.md").read_text()


def test_three_groups_run_end_to_end(tmp_path, cache):
    report = quick(["--out", str(tmp_path / "k3"), "--cache", str(cache), "--groups", "8,1,7", "--counts",
                    "5,30,10", "--methods", "plain,balanced,guided-3,clusters", "--seeds", "1"])
    assert report["groups"] == [1, 7, 8] and report["counts"] == {"1": 30, "7": 10, "8": 5}
    assert report["fd_max"] == pytest.approx(math.sqrt(2 / 3))
    for r in report["rows"]:
        assert len(r["proportions"]) == 3 and set(r["success_rates"]) == {"1", "7", "8"}
        assert 0 <= r["fd"] <= math.sqrt(2 / 3) + 1e-9
    text = (tmp_path / "k3" / "report.md").read_text()
    assert "| Frechet 1 | Frechet 7 | Frechet 8 |" in text
    folder = next(p for p in cache.glob("data-biased-*") if json.loads((p / "done.json").read_text())["settings"][
        "counts"] == {"1": 30, "7": 10, "8": 5})
    digits = [json.loads(line)["group"] for line in (folder / "images" / "metadata.jsonl").read_text().splitlines()]
    assert [digits.count(d) for d in (1, 7, 8)] == [30, 10, 5]
    # the label-free method: its run's groups are 3 clusters of that set, the labels kept aside for the report
    clusters = next(r for r in report["rows"] if r["method"] == "clusters")["train"]["clusters"]
    assert list(clusters) == ["cluster0", "cluster1", "cluster2"]
    assert [sum(c[d] for c in clusters.values()) for d in ("1", "7", "8")] == [30, 10, 5]
    assert "## Clusters of the label-free runs" in text and "cluster0 " in text


@pytest.mark.parametrize("argv, message", [
    (["--groups", "7"], "at least two distinct digits"), (["--groups", "7,7"], "at least two distinct digits"),
    (["--groups", "7,8", "--counts", "360"], "for each of the 2 groups"),
    (["--counts", "500,40"], "1..400 images"), (["--methods", "plain,magic"], "unknown ['magic']"),
    (["--counts", "20,5"], "--counts must give at least 32 images in all"),  # one fine-tuning batch
    (["--quick", "--counts", "4,3"], "--counts must give at least 8 images in all"),
    # clusters-2x's k = 2 x 5 groups > 8 images: refused by data.py clusters after plain had trained
    (["--quick", "--methods", "plain,clusters-2x", "--groups", "3,4,5,6,7", "--counts", "4,1,1,1,1"],
     "--counts must give at least 10 images in all (the 10 clusters of clusters-2x)"),
    (["--groups", "seven,8"], "comma-separated integers"),
    (["--methods", "plain,guided-3,plain"], "--methods names plain twice"),
    (["--methods", ""], "--methods: unknown none given"), (["--groups", ""], "comma-separated integers"),
    (["--counts", ""], "comma-separated integers"),
    (["--experiment", "attributes", "--methods", "plain"], "--methods is for --experiment digits"),
    (["--experiment", "attributes", "--groups", "1,2"], "--groups is for --experiment digits"),
    (["--experiment", "attributes", "--counts", "5,5"], "--counts is for --experiment digits"),
    # a file where a folder goes said "[Errno 17] File exists: '/dev/null'" once stages ran, naming no flag
    (["--out", "/dev/null"], "--out /dev/null: /dev/null is a file, not a folder"),
    (["--cache", "/dev/null/cache"], "--cache /dev/null/cache: /dev/null is a file, not a folder"),
    # a missing folder, then "..": Path.exists() saw no results there to refuse, and mkdir wrote over them
    (["--out", "/no-such-folder/../tmp"], "--out /no-such-folder/../tmp: /no-such-folder does not exist, so '..'"),
    # past the cores: libgomp failed to make the threads (16384), or the process crashed (100000)
    (["--threads", str(os.cpu_count() + 1)], f"--threads must be between 1 and {os.cpu_count()}")])
def test_bad_arguments_are_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        reproduce.parse_args(argv)
    assert message in capsys.readouterr().err


def test_existing_results_are_refused_and_overwrite_keeps_the_cache(quick_run, tmp_path):
    out, _ = quick_run
    with pytest.raises(SystemExit, match="--overwrite"):
        reproduce.main(["--quick", "--out", str(out)])
    # the same rule on a copy of the layout (no second training run): results go, the cache stays
    (tmp_path / "finetune" / "plain-seed0").mkdir(parents=True)
    (tmp_path / "report.json").write_text('{"mode": "quick", "rows": [], "summary": []}')
    (tmp_path / "cache" / "vae-0").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="finetune, report.json"):
        reproduce.claim_run_dir(tmp_path, overwrite=False)
    reproduce.claim_run_dir(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert (tmp_path / "cache" / "vae-0").is_dir()


def a_runs_results(out, report_md):
    """What a run leaves in OUT besides the cache: fine-tunes of both experiments, grids, report.json, report.md."""
    for run in ("plain-seed0", "guided-auto-10-seed1", "colour+width-10-seed2"):
        (out / "finetune" / run).mkdir(parents=True)
        (out / "finetune" / run / "run.json").write_text("{}")
    (out / "grids").mkdir()
    for png in ("all_seed0.png", "plain_vs_guided-auto_seed0.png", "attributes_zero_seed0.png"):
        (out / "grids" / png).write_bytes(b"png")
    (out / "report.json").write_text('{"mode": "full", "rows": [], "summary": []}')
    (out / "report.md").write_text(report_md)
    (out / "cache" / "vae-0").mkdir(parents=True)


def files_under(folder):
    return {p.relative_to(folder): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def test_overwrite_deletes_a_runs_results_and_refuses_a_folder_holding_files_no_run_wrote(tmp_path):
    """--out at a folder of one's own: a report.md, a figure in grids/, one's own runs in finetune/ were deleted by
    --overwrite (the refusal before it called them results). They are named and the folder is left as it was."""
    sizes = dataclasses.asdict(reproduce.QUICK)
    digits = reproduce.report_markdown({
        "paper": "p", "groups": [7, 8], "counts": {"7": 9, "8": 1}, "mode": "quick", "sizes": sizes, "seeds": 1,
        "generic_prompt": "g", "fd_max": 0.7, "classifier_heldout_accuracy": 0.9, "summary": [], "best_method": None,
        "cfg_rows": [], "rows": [], "grids": [], "timings_s": {}, "threads": 1})
    attributes = reproduce.attribute_markdown({
        "digits": reproduce.ATTR_DIGITS, "mode": "quick", "counts_per_digit": {}, "sizes": sizes, "summary": [],
        "judge_check": {}, "grids": [], "timings_s": {}, "seeds": 1, "threads": 1})
    for k, report_md in enumerate((digits, attributes)):
        out = tmp_path / f"run{k}"
        a_runs_results(out, report_md)
        reproduce.claim_run_dir(out, overwrite=True)
        assert sorted(p.name for p in out.iterdir()) == ["cache"]
    mine = {"report.md": "# my report\n", "grids/figure1.svg": "<svg/>", "finetune/my-sd-run/weights.bin": "w",
            "report.json": '{"my": "notes"}'}  # a JSON file no run wrote
    for k, (name, text) in enumerate(mine.items()):
        out = tmp_path / f"mine{k}"  # a name of its own: the message must name the entry, not the folder
        a_runs_results(out, digits)
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
        before = files_under(out)
        for overwrite in (False, True):
            with pytest.raises(FileExistsError) as refused:
                reproduce.claim_run_dir(out, overwrite=overwrite)
            named = "/".join(name.split("/")[:2])  # the entry of finetune/ or grids/ that holds it
            assert named in str(refused.value) and "pass --overwrite" not in str(refused.value)
            assert files_under(out) == before
    out = tmp_path / "folder"  # a folder where a run writes its report.json
    a_runs_results(out, digits)
    (out / "report.json").unlink()
    (out / "report.json").mkdir()
    (out / "report.json" / "notes.txt").write_text("mine")
    before = files_under(out)
    with pytest.raises(FileExistsError, match=r"folder holds report\.json, which this reproduce\.py does not write"):
        reproduce.claim_run_dir(out, overwrite=True)
    assert files_under(out) == before


def test_overwrite_keeps_a_report_md_edited_since_the_run_wrote_it(quick_run, tmp_path):
    """--overwrite took any report.md that opens with a run's title as the run's own: notes added to it were deleted.
    report.json records the sha256 of the report.md written beside it; one that differs is the user's now."""
    out, _ = quick_run
    stored = json.loads((out / "report.json").read_text())
    assert stored["report_md_sha256"] == hashlib.sha256((out / "report.md").read_bytes()).hexdigest()
    for name in ("report.json", "report.md"):
        shutil.copy(out / name, tmp_path / name)
    reproduce.claim_run_dir(tmp_path, overwrite=True)  # as written: the run's own
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    for name in ("report.json", "report.md"):
        shutil.copy(out / name, tmp_path / name)
    with open(tmp_path / "report.md", "a") as f:
        f.write("\n## My notes\n\nseed 2 looks odd\n")
    before = files_under(tmp_path)
    with pytest.raises(FileExistsError, match=r"holds report\.md, which this reproduce\.py does not write"):
        reproduce.claim_run_dir(tmp_path, overwrite=True)
    assert files_under(tmp_path) == before


def test_cached_stage_is_reused_and_unfinished_one_rebuilt(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "x").write_text("1")
        return {"n": len(calls)}

    folder = reproduce.stage_dir(tmp_path, "stage", {"a": 1})
    assert folder != reproduce.stage_dir(tmp_path, "stage", {"a": 2})  # other settings, other folder
    assert reproduce.cached(folder, {"a": 1}, build, "s") == {"n": 1}
    assert reproduce.cached(folder, {"a": 1}, build, "s") == {"n": 1} and len(calls) == 1
    (folder / "done.json").unlink()  # as if killed before finishing
    assert reproduce.cached(folder, {"a": 1}, build, "s") == {"n": 2}


@pytest.mark.parametrize("done", ["{}", '{"result": {"path": 5}}', '{"settings": {"a": 1}, "resu', "[1]"])
def test_a_cached_stage_whose_done_json_does_not_read_is_built_again(done, tmp_path):
    """A done.json cut short or edited by hand stopped the run with a KeyError or TypeError traceback, or a JSON
    error naming no file: the stage's record does not read, so the stage is unfinished, and its folder is the
    cache's own."""
    calls = []

    def build(folder):
        calls.append(folder)
        return {"n": len(calls), "path": str(folder / "x")}

    folder = reproduce.stage_dir(tmp_path, "stage", {"a": 1})
    reproduce.cached(folder, {"a": 1}, build, "s")
    (folder / "done.json").write_text(done)
    assert reproduce.cached(folder, {"a": 1}, build, "s") == {"n": 2, "path": str(folder / "x")}
    assert reproduce.cached(folder, {"a": 1}, build, "s")["n"] == 2  # and the new record reads


def test_a_stage_another_run_is_building_in_a_shared_cache_is_waited_for_and_reused(tmp_path):
    """Two runs sharing a --cache: the second found no done.json while the first was building, deleted its folder
    and built again beside it (a quick run stopped with '[Errno 17] File exists: .../vae'). It waits and reuses."""
    started, release, calls, results = threading.Event(), threading.Event(), [], []

    def build(folder):
        calls.append(folder)
        (folder / "x").write_text("1")
        started.set()
        assert release.wait(10)  # the first build runs on while the second run arrives
        assert (folder / "x").read_text() == "1"
        return {"n": len(calls)}

    folder = reproduce.stage_dir(tmp_path, "stage", {"a": 1})
    threads = [threading.Thread(target=lambda: results.append(reproduce.cached(folder, {"a": 1}, build, "s")))
               for _ in range(2)]
    threads[0].start()
    assert started.wait(10)
    threads[1].start()
    threads[1].join(0.5)  # the second run waits for the first's build
    release.set()
    for t in threads:
        t.join(10)
    assert results == [{"n": 1}, {"n": 1}] and len(calls) == 1


def test_a_cached_stage_reused_from_where_the_cache_is_now_reads_its_files_there(tmp_path, monkeypatch):
    """A stage records its files' paths as they were when it was built (relative to the working directory, with the
    default --out): reused from another working directory, or after the cache was moved, they pointed where no
    file is (or at another cache's), and the run stopped minutes later naming a path no flag gave."""
    def build(folder):
        (folder / "vae").mkdir()
        return {"path": str(folder / "vae"), "n": 1}

    monkeypatch.chdir(tmp_path)
    reproduce.cached(reproduce.stage_dir("runs/cache", "stage", {"a": 1}), {"a": 1}, build, "s")
    Path("runs/cache").rename("moved")
    folder = reproduce.stage_dir("moved", "stage", {"a": 1})
    assert reproduce.cached(folder, {"a": 1}, build, "s") == {"path": str(folder / "vae"), "n": 1}
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    folder = reproduce.stage_dir(tmp_path / "moved", "stage", {"a": 1})
    assert reproduce.cached(folder, {"a": 1}, build, "s")["path"] == str(folder / "vae")


def test_the_attribute_experiment_runs_end_to_end(tmp_path, cache):
    report = quick(["--experiment", "attributes", "--out", str(tmp_path / "attr"), "--cache", str(cache),
                    "--seeds", "1"])
    names = [r.name for r in reproduce.ATTR_ROWS]
    assert [r["method"] for r in report["rows"]] == names and [s["method"] for s in report["summary"]] == names
    for r in report["rows"]:
        assert set(r["per_prompt"]) == {str(d) for d in reproduce.ATTR_DIGITS}
        for p in r["per_prompt"].values():
            assert 0 <= p["colour+width"]["fd"] <= math.sqrt(3 / 4) + 1e-9 and 0 <= p["content"] <= 1
            assert abs(sum(p["colour+width"]["proportions"]) - 1) < 1e-9
        assert r["fd_joint_worst_prompt"] == max(p["colour+width"]["fd"] for p in r["per_prompt"].values())
        assert r["unet_as_plain"] == (r["method"] != "ddm")  # every guided row samples the plain UNet
        assert (r["guidance_chosen"] is None) == (r["method"] in ("plain", "ddm"))
    assert all(v["rule"] == 1.0 for k, v in report["judge_check"].items() if isinstance(v, dict))
    text = (tmp_path / "attr" / "report.md").read_text()
    assert "FD intersections" in text and all(r.label in text for r in reproduce.ATTR_ROWS)
    assert (tmp_path / "attr" / report["grids"][0]).is_file()


# ---- the verdict and its statistics, on rows built by hand ---------------------------------------------------------


def row(method, seed, fd, frechet, groups=(7, 8)):
    """One evaluated model as run() records it, with the numbers the verdict reads."""
    return {"method": method, "label": f"{method} label", "seed": seed, "fd": fd, "fd_soft": fd, "spd": 0.1,
            "frechet_distance": frechet, "share_outside_groups": 0.0, "mean_confidence": 0.9,
            "indicator_entropy": None, "proportions": [0.5] * len(groups),
            "frechet_per_group": {str(g): frechet for g in groups}, "train": {}}


def verdicts(rows):
    return {s["method"]: s["meets_goal"] for s in reproduce.summarize(rows, [7, 8])}


def test_the_bar_is_half_of_plains_fd_at_at_most_ten_percent_worse_frechet():
    plain_fd, plain_frechet = 0.5, 10.0  # FD halves exactly in binary
    rows = [row("base", "-", 0.0, 1.0), row("plain", 0, plain_fd, plain_frechet),
            row("at-bar", 0, 0.5 * plain_fd, 1.1 * plain_frechet),
            row("fd-over", 0, 0.5 * plain_fd + 1e-6, plain_frechet),
            row("frechet-over", 0, 0.0, 1.1 * plain_frechet + 1e-6),
            row("beats-plain-fd-only", 0, 0.75 * plain_fd, plain_frechet),
            row("frechet-only", 0, plain_fd, 0.5 * plain_frechet),
            row("frechet-12-percent-worse", 0, 0.0, 1.12 * plain_frechet)]
    assert verdicts(rows) == {"base": None, "plain": None, "at-bar": True, "fd-over": False, "frechet-over": False,
                              "beats-plain-fd-only": False, "frechet-only": False, "frechet-12-percent-worse": False}
    table = reproduce.verdict_table(reproduce.summarize(rows, [7, 8]), [7, 8]).splitlines()
    assert [line.rsplit("|", 2)[1].strip() for line in table[2:]] == ["–", "–", "**yes**"] + ["no"] * 5
    assert verdicts([r for r in rows if r["method"] != "plain"]) == dict.fromkeys(
        ["base", "at-bar", "fd-over", "frechet-over", "beats-plain-fd-only", "frechet-only",
         "frechet-12-percent-worse"])  # no plain fine-tune: nothing is judged


def test_the_bar_also_keeps_every_groups_recall_at_nine_tenths_of_plains_and_the_worst_seed_is_shown():
    def with_recall(r, r7, r8):
        return {**r, "recall_per_group": {"7": r7, "8": r8}}

    rows = [with_recall(row("plain", 0, 0.5, 10.0), 0.5, 0.8),
            with_recall(row("at-bar", 0, 0.25, 10.0), 0.9 * 0.5, 0.9 * 0.8),  # 0.9 x plain's recall, exactly
            with_recall(row("minority-lost", 0, 0.25, 10.0), 0.5, 0.9 * 0.8 - 1e-6),
            with_recall(row("majority-lost", 0, 0.25, 10.0), 0.9 * 0.5 - 1e-6, 0.8),
            with_recall(row("unmeasured", 0, 0.25, 10.0), 0.5, None)]
    assert verdicts(rows) == {"plain": None, "at-bar": True, "minority-lost": False, "majority-lost": False,
                              "unmeasured": False}
    seeds = [row("plain", 0, 0.5, 10.0)] + [row("g", s, fd, 10.0) for s, fd in ((0, 0.02), (1, 0.16), (2, 0.05))]
    summary = {s["method"]: s for s in reproduce.summarize(seeds, [7, 8])}
    assert summary["g"]["fd_worst"] == 0.16 and summary["g"]["fd"] == pytest.approx(0.23 / 3)
    assert "| 0.160 |" in reproduce.verdict_table(list(summary.values()), [7, 8])


def test_a_recall_only_some_seeds_measured_does_not_meet_the_bar():
    """A seed with too few images of a group has no recall for it. The mean over the seeds that measured it was
    judged alone, so a "yes" could rest on one seed of three; now every seed must measure it."""
    def with_recall(r, r8):
        return {**r, "recall_per_group": {"7": 0.5, "8": r8}}

    rows = [with_recall(row("plain", 0, 0.5, 10.0), 0.5)] + [
        with_recall(row(name, s, 0.1, 10.0), 0.9 if s == 0 or name == "all" else None)
        for name in ("one", "all") for s in range(3)]
    assert verdicts(rows) == {"plain": None, "one": False, "all": True}


def legend_of_an_empty_report():
    """report.md of a digits run with no rows, its lines joined by spaces (the legend is wrapped)."""
    return " ".join(reproduce.report_markdown({
        "paper": "p", "groups": [7, 8], "counts": {"7": 9, "8": 1}, "mode": "quick", "seeds": 3,
        "sizes": dataclasses.asdict(reproduce.QUICK), "generic_prompt": "g", "fd_max": 0.7,
        "classifier_heldout_accuracy": 0.9, "summary": [], "best_method": None, "cfg_rows": [], "rows": [],
        "grids": [], "timings_s": {}, "threads": 1}).split())


def test_the_bar_compares_means_over_seeds_and_the_legend_says_so():
    """The bar is judged on the means over seeds: a seed whose recall is under 0.9 x that seed's plain can still meet
    it. The report's legend said "measured in every seed", which reads as a bar met seed by seed (on an earlier run
    guided-auto's 7s in seed 1 were at 0.88 x plain's seed 1, and the table said yes, as the means did)."""
    def with_recall(r, r7):
        return {**r, "recall_per_group": {"7": r7, "8": 0.8}}

    rows = [with_recall(row("plain", s, 0.5, 10.0), r7) for s, r7 in enumerate((0.3, 0.7, 0.5))] + [
        with_recall(row("g", s, 0.1, 10.0), r7) for s, r7 in enumerate((0.5, 0.5, 0.5))]  # seed 1: 0.71 x plain's
    assert verdicts(rows) == {"plain": None, "g": True}
    assert "The bar, on the unrounded means over seeds:" in legend_of_an_empty_report()


def test_the_attribute_legend_too_says_the_bar_is_judged_on_the_unrounded_means():
    """The tables round the means (FD to 3 places, Frechet to 1); the bar compares the unrounded ones, so a row may
    read as on the bar in the table and miss it, or the other way round. Both legends say which (the digits' above)."""
    legend = " ".join(reproduce.attribute_markdown({
        "digits": reproduce.ATTR_DIGITS, "mode": "quick", "counts_per_digit": {}, "sizes":
        dataclasses.asdict(reproduce.QUICK), "summary": [], "judge_check": {}, "grids": [], "timings_s": {},
        "seeds": 3, "threads": 1}).split())
    assert "The bar, on the unrounded means over seeds:" in legend


def test_the_legend_says_fd_and_spd_count_each_image_in_the_most_likely_of_the_groups():
    """evaluate_images judges FD's shares and SPD's successes by the arg max over the evaluated groups' logits only
    (tests/test_evaluate.py: an image of another class still counts in one of them). The legend said "the share ...
    that the judge assigns to the requested digit", which reads as the 10-class judge's own best class; on the
    shipped run 10-26% of a model's generic images (mean by method) have their best class outside the groups."""
    assert "FD and SPD count each image in the most likely of the groups" in legend_of_an_empty_report()


def test_the_attribute_experiment_samples_enough_images_to_measure_every_groups_recall():
    """Recall is measured on subsets of attr_diversity images of a group. At 150 images a prompt, a model that kept
    its training share of the rarest group (green, 1 in 10) made 15 of them, fewer than the 20 a subset takes, so
    its recall went unmeasured: seven of the eight rows of the verdict lacked a recall in some seed. The rarest
    group at its training share must make at least 1.5 subsets a prompt."""
    for attribute, values in reproduce.ATTR_GROUPS.items():
        at = list(reproduce.ATTR_GROUPS).index(attribute)
        total = sum(reproduce.ATTR_COUNTS.values())
        rarest = min(sum(n for k, n in reproduce.ATTR_COUNTS.items() if k[at] == v) for v in values) / total
        assert reproduce.FULL.attr_n * rarest >= 1.5 * reproduce.FULL.attr_diversity, attribute


def test_summary_is_the_mean_and_sample_std_over_seeds():
    rows = [row("base", "-", 0.3, 5.0)] + [row("ddm", s, fd, fr) for s, fd, fr in
                                           ((0, 0.1, 10.0), (1, 0.2, 14.0), (2, 0.6, 12.0))]
    base, ddm = reproduce.summarize(rows, [7, 8])
    assert ddm["seeds"] == [0, 1, 2] and base["seeds"] == ["-"]
    assert ddm["fd"] == pytest.approx(0.3) and ddm["frechet_distance"] == pytest.approx(12.0)
    # sample std (ddof 1): sqrt(((-0.2)^2 + (-0.1)^2 + 0.3^2) / 2) = sqrt(0.07); the population std is sqrt(0.14 / 3)
    assert ddm["fd_std"] == pytest.approx(0.07 ** 0.5) and ddm["frechet_distance_std"] == pytest.approx(2.0)
    assert ddm["frechet_8"] == pytest.approx(12.0) and ddm["share_7"] == pytest.approx(0.5)
    assert (base["fd"], base["fd_std"]) == (pytest.approx(0.3), 0.0)  # one seed: no spread
    table = reproduce.verdict_table([base, ddm], [7, 8]).splitlines()
    assert table[2].startswith("| base label | **0.300** | 0.300 | 0.100 | 5.0 |")  # one model: no "± 0.000"
    assert table[3].startswith("| ddm label | **0.300 ± 0.265** |")


def test_a_number_not_every_seed_measured_says_over_how_many_and_one_seed_shows_no_spread():
    """A group none of a seed's images fell in has no recall there. The one seed of three that measured it was
    shown as "0.60 ± 0.00", a spread never measured; and the CFG check at --seeds 1 showed "± 0.000" too."""
    rows = [{**row("g", s, 0.1, 10.0), "recall_per_group": {"7": 0.5 + s / 10, "8": 0.6 if s == 0 else None}}
            for s in range(3)]
    table = reproduce.verdict_table(reproduce.summarize(rows, [7, 8]), [7, 8])
    assert "| 0.60 ± 0.10 | 0.60 (1 of 3 seeds) |" in table
    rows[1]["recall_per_group"]["8"] = 0.8
    table = reproduce.verdict_table(reproduce.summarize(rows, [7, 8]), [7, 8])
    assert "| 0.60 ± 0.10 | 0.70 ± 0.14 (2 of 3 seeds) |" in table
    cfg = reproduce.cfg_table([{"label": "plain", "seed": 0, "cfg": 3.0, "fd": 0.238, "frechet_distance": 41.26}])
    assert cfg.splitlines()[2] == "| plain | 3 | 0.238 | 41.3 |"


def test_the_attribute_table_shows_a_spread_only_over_more_than_one_seed():
    def attr_row(method, seed, fd):
        return {**dict.fromkeys(reproduce.ATTR_KEYS, 0.5), "method": method, "label": f"{method} label",
                "seed": seed, "fd_joint": fd}

    summary = reproduce.summarize_attributes([attr_row("plain", 0, 0.4), attr_row("g", 0, 0.1), attr_row("g", 1, 0.3)])
    plain, guided = reproduce.attribute_table(summary).splitlines()[2:]
    assert plain.startswith("| plain label | 0.500 | 0.500 | **0.400** |") and "±" not in plain
    assert guided.startswith("| g label | 0.500 ± 0.000 | 0.500 ± 0.000 | **0.200 ± 0.141** |")


def run_stubbed(tmp_path, monkeypatch, evaluate_model, argv):
    """reproduce.run(--quick ARGV) with every stage stubbed (no training, no sampling) -> its report."""
    classifier = type("Judge", (), {"heldout_accuracy": 0.99})()
    monkeypatch.setattr(reproduce, "prepare", lambda args, sizes, timings: (classifier, {"path": "vae"},
                                                                            {"path": "base"}))
    monkeypatch.setattr(reproduce, "digit_judge", lambda classifier, groups: (classifier, None))
    monkeypatch.setattr(reproduce, "same_unet", lambda run, plain: None)
    monkeypatch.setattr(reproduce, "fine_tune",
                        lambda args, sizes, m, seed, base, vae: tmp_path / f"{m.name}-seed{seed}")
    monkeypatch.setattr(reproduce, "load_models", lambda path: "base-seed0")
    monkeypatch.setattr(reproduce, "load_run", lambda path: type("Run", (), {"models": str(path), "indicator": None}))
    monkeypatch.setattr(reproduce, "train_stats", lambda run: {"rec": 0.1})
    monkeypatch.setattr(reproduce, "evaluate_model", evaluate_model)
    args = reproduce.parse_args(["--quick", "--out", str(tmp_path / "run"), *argv, "--no-progress"])
    n = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return reproduce.run(args)
    finally:
        torch.set_num_threads(n)


def test_cfg_check_measures_plain_and_the_lowest_fd_method_at_each_scale(tmp_path, monkeypatch):
    """run() with every stage stubbed (no training, no sampling): the CFG check takes the method of lowest mean FD
    among those judged (never base or plain), and each of its rows holds what was sampled at that row's scale."""
    # balanced is best: guided-3 has a lower FD, but at a Frechet three times plain's it fails the bar
    fds = {"base": 0.0, "plain": 0.5, "ddm": 0.3, "balanced": 0.1, "guided-3": 0.05}
    calls = []

    def evaluate_model(models, indicator, method, judge, groups, sizes, *, guidance=None, generic_only=False,
                       progress=True):
        name, scale = method.name if method else "base", guidance or sizes.guidance
        calls.append((name, models, scale, generic_only))
        fd = fds[name] + 0.01 * models.endswith("seed1") + scale / 1000  # the scale it was sampled at, readable
        frechet = 30.0 if name == "guided-3" else 10.0
        measured = {k: v for k, v in row(name, None, fd, frechet).items() if k not in ("method", "label", "seed",
                                                                                         "train")}
        return measured, torch.zeros(8, reproduce.RESOLUTION, reproduce.RESOLUTION, 3,
                                                        dtype=torch.uint8)

    report = run_stubbed(tmp_path, monkeypatch, evaluate_model, ["--methods", ",".join(list(fds)[1:]), "--seeds", "2"])
    assert report["best_method"] == "balanced"
    scales = reproduce.QUICK.cfg_check
    assert sorted(c[2] for c in calls if c[3]) == sorted(scales * 4)  # plain and balanced, two seeds each
    assert {c[0] for c in calls if c[3]} == {"plain", "balanced"}
    for r in report["cfg_rows"]:
        assert r["fd"] == pytest.approx(fds[r["method"]] + 0.01 * r["seed"] + r["cfg"] / 1000), r
    assert sorted((r["method"], r["seed"], r["cfg"]) for r in report["cfg_rows"]) == sorted(
        (m, s, c) for m in ("plain", "balanced") for s in (0, 1) for c in (reproduce.QUICK.guidance, *scales))
    assert "plain, and the best method: balanced" in (tmp_path / "run" / "report.md").read_text()


def test_the_rows_list_each_methods_seeds_in_the_order_they_ran(tmp_path, monkeypatch):
    """The rows were sorted by their seed as text: from 11 seeds on, seed 10 came before seed 2 in the per-seed
    table and in summary[].seeds."""
    def evaluate_model(models, indicator, method, judge, groups, sizes, **kw):
        measured = {k: v for k, v in row("plain", None, 0.5, 10.0).items() if k not in ("method", "label", "seed",
                                                                                         "train")}
        return measured, torch.zeros(8, reproduce.RESOLUTION, reproduce.RESOLUTION, 3, dtype=torch.uint8)

    report = run_stubbed(tmp_path, monkeypatch, evaluate_model, ["--methods", "plain", "--seeds", "11"])
    assert [r["seed"] for r in report["rows"] if r["method"] == "plain"] == list(range(11))
    assert report["summary"][1]["seeds"] == list(range(11))


def test_a_second_run_on_the_same_out_is_refused_while_the_first_runs(tmp_path, monkeypatch):
    """Two runs on one --out (the default runs/repro, e.g. the default run and `--methods plain,clusters,clusters-2x`
    in two terminals): the second found no results yet, ran to the end and wrote its report, and the first, ending
    later, replaced it; both exited 0, and finetune/ held a run no report named. The second is refused at once."""
    second = []

    def evaluate_model(models, indicator, method, judge, groups, sizes, **kw):
        if not second:  # the first run is evaluating its base: a second run starts on the same --out
            second.append(None)
            args = reproduce.parse_args(["--quick", "--out", str(tmp_path / "run"), "--methods", "balanced",
                                         "--seeds", "1", "--no-progress"])
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    second[0] = reproduce.run(args)
            except FileExistsError as e:
                second[0] = e
        measured = {k: v for k, v in row("plain", None, 0.5, 10.0).items() if k not in ("method", "label", "seed",
                                                                                         "train")}
        return measured, torch.zeros(8, reproduce.RESOLUTION, reproduce.RESOLUTION, 3, dtype=torch.uint8)

    report = run_stubbed(tmp_path, monkeypatch, evaluate_model, ["--methods", "plain", "--seeds", "1"])
    assert isinstance(second[0], FileExistsError), "the second run on the same --out was not refused"
    assert "in use by another reproduce.py" in str(second[0]) and str(tmp_path / "run") in str(second[0])
    assert [r["method"] for r in report["rows"]] == ["base", "plain"]
    stored = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [r["method"] for r in stored["rows"]] == ["base", "plain"]
    run_stubbed(tmp_path, monkeypatch, evaluate_model, ["--methods", "plain", "--seeds", "1", "--overwrite"])  # freed


def test_the_cfg_check_takes_the_lowest_fd_that_meets_the_bar_else_the_lowest_fd_never_base_or_plain():
    def s(method, fd, meets):
        return {"method": method, "fd": fd, "meets_goal": meets}

    summary = [s("base", 0.0, None), s("plain", 0.5, None), s("a", 0.01, False), s("b", 0.2, True), s("c", 0.1, True)]
    assert reproduce.best_method(summary) == "c"
    assert reproduce.best_method([x if x["method"] in ("base", "plain") else {**x, "meets_goal": False}
                                  for x in summary]) == "a"
    assert reproduce.best_method(summary[:2]) is None


# ---- the reproduction's data: the VAE's scale, the folders each method trains on, the guided scenarios -------------


@pytest.mark.parametrize("methods, best, heading", [
    (["plain", "guided-auto"], "guided-auto", "(plain, and the best method: guided-auto)"),
    (["plain"], None, "(plain)"), (["guided-auto"], "guided-auto", "(the best method: guided-auto)")])
def test_the_cfg_heading_names_only_the_methods_the_check_measured(methods, best, heading):
    """With --methods plain the heading read 'the best method: None'; without plain it named plain all the same."""
    cfg_rows = [{"method": m, "label": m, "cfg": 3.0, "fd": 0.1, "frechet_distance": 50.0} for m in methods]
    text = reproduce.report_markdown({
        "paper": "p", "groups": [7, 8], "counts": {"7": 9, "8": 1}, "mode": "quick", "seeds": 1,
        "sizes": dataclasses.asdict(reproduce.QUICK), "generic_prompt": "g", "fd_max": 0.7,
        "classifier_heldout_accuracy": 0.9, "summary": [], "best_method": best, "cfg_rows": cfg_rows, "rows": [],
        "grids": [], "timings_s": {}, "threads": 1})
    assert f"## Classifier-free guidance scale {heading}\n" in text


def test_vae_scaling_factor_gives_the_train_latents_unit_std(tmp_path, monkeypatch, one_thread):
    train_idx, held_idx = np.arange(64), np.arange(64, 80)  # a few digits and steps: the rule, not a good VAE
    monkeypatch.setattr(reproduce.data, "split_digits", lambda seed: (train_idx, held_idx))
    info = reproduce.train_vae(tmp_path, dataclasses.replace(reproduce.QUICK, vae_steps=3, vae_batch=8),
                               progress=False)
    vae = load_vae(info["path"])
    images, _ = data.load_digits()
    x = torch.from_numpy(np.stack([np.asarray(data.digit_image(images[i], reproduce.RESOLUTION)) for i in train_idx]))
    with torch.no_grad():
        z = vae.encode(x.permute(0, 3, 1, 2).float() / 127.5 - 1).mean
    assert vae.config.scaling_factor == info["scaling_factor"]
    assert abs(z.std().item() - 1) > 0.2  # the unscaled latents are not of unit std by chance
    assert (z * vae.config.scaling_factor).std().item() == pytest.approx(1.0, abs=1e-3)


def metadata(folder):
    return [json.loads(line) for line in (Path(folder) / "metadata.jsonl").read_text().splitlines()]


def test_biased_folder_labels_its_share_of_each_digit_and_half_its_captions_name_the_digit(tmp_path):
    info = reproduce.build_folder(tmp_path, {7: 36, 8: 4}, seed=1, labelled=0.1)
    rows = metadata(info["path"])
    for digit, n, kept in ((7, 36, 4), (8, 4, 1)):  # round(10% of each digit), and at least one label each
        mine = [r for r in rows if r["digit"] == digit]
        assert len(mine) == n and [r["group"] for r in mine].count(digit) == kept
        assert {r["group"] for r in mine} == {digit, None}
    for r in rows:  # a caption is generic or names its own digit, in words; never a label
        assert r["text"] in (reproduce.GENERIC_PROMPT, reproduce.group_prompt(r["digit"])), r
        assert not any(c.isdigit() for c in r["text"]) and not {"group", "label"} & set(r["text"].split())
    assert 0 < sum(r["text"] != reproduce.GENERIC_PROMPT for r in rows) < len(rows)
    caption, digits = reproduce.caption_for(0), [k % 10 for k in range(2000)]
    named = sum(caption(d) == reproduce.group_prompt(d) for d in digits) / len(digits)
    assert abs(named - 0.5) <= 4 * (0.25 / len(digits)) ** 0.5  # half, within 4 binomial sigmas


def test_each_method_fine_tunes_on_the_folder_it_claims(tmp_path, monkeypatch):
    launched = {}

    def train(argv):
        out = Path(argv[argv.index("--out") + 1])
        launched[out.name.rsplit("-seed", 1)[0]] = argv
        return out

    monkeypatch.setattr(reproduce.train, "train", train)
    args = reproduce.parse_args(["--quick", "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"),
                                 "--counts", "36,4", "--no-progress"])
    for name in ("iw", "iw-10", "balanced"):  # iw's folder is built first: iw-10 must not reuse it
        reproduce.fine_tune(args, reproduce.QUICK, reproduce.BY_NAME[name], 0, {"path": "base"}, {"path": "vae"})
    for name, kept in (("iw", {7: 36, 8: 4}), ("iw-10", {7: 4, 8: 1}), ("balanced", {7: 36, 8: 4})):
        argv = launched[name]
        rows = metadata(argv[argv.index("--data") + 1])
        assert {d: sum(r["digit"] == d for r in rows) for d in (7, 8)} == {7: 36, 8: 4}
        assert {d: sum(r["group"] == d for r in rows) for d in (7, 8)} == kept, name
        assert argv[argv.index("--model") + 1] == "base"
        assert argv[argv.index("--objective") + 1] == reproduce.BY_NAME[name].objective
        assert ("--indicator-lr" in argv) == (name != "balanced")


def test_group_prompts_are_guided_toward_their_own_group_and_generic_ones_toward_uniform_draws(monkeypatch):
    calls = []

    def generate(models, prompts, seeds, *, guidance, guides, **kw):
        calls.append(dict(prompts=prompts, seeds=seeds, guidance=guidance, guides=guides))
        return torch.zeros(len(prompts), reproduce.RESOLUTION, reproduce.RESOLUTION, 3, dtype=torch.uint8)

    monkeypatch.setattr(reproduce.sample, "generate", generate)
    groups, sizes, indicator = [1, 7, 8], reproduce.QUICK, SimpleNamespace(num_groups=3)
    uniform, n = torch.full((3,), 1 / 3), sizes.n_generic
    models = SimpleNamespace(alphas_cumprod=torch.ones(1000))  # the schedule length guidance decides on
    method = reproduce.Method("g", "g", source="plain", indicator_guidance=3.0)  # targets drawn per image
    generic, grouped, requested, _ = reproduce.sample_scenarios(models, groups, sizes, indicator=indicator,
                                                                method=method, progress=False)
    assert len(generic) == n and requested == [g for g in groups for _ in range(sizes.n_per_group)]
    assert [c["prompts"][0] for c in calls] == [reproduce.GENERIC_PROMPT] + [reproduce.group_prompt(g) for g in groups]
    assert all(c["guidance"] == sizes.guidance and c["guides"][0].indicator is indicator and
               c["guides"][0].scale == 3.0 for c in calls)
    assert torch.equal(calls[0]["guides"][0].targets, guidance.draw_targets(calls[0]["seeds"], uniform))
    for k, c in enumerate(calls[1:]):  # each group prompt: its own group
        assert c["guides"][0].targets.tolist() == [k] * sizes.n_per_group
    calls.clear()
    label_free = reproduce.Method("c", "c", source="plain", indicator_guidance=3.0, clusters=1)
    reproduce.sample_scenarios(models, groups, sizes, indicator=indicator, method=label_free, progress=False)
    for c in calls:  # clusters name no group: every prompt's images draw uniformly
        assert torch.equal(c["guides"][0].targets, guidance.draw_targets(c["seeds"], uniform))
    calls.clear()
    reproduce.sample_scenarios(models, groups, sizes, guidance=7.5, generic_only=True, progress=False)
    assert len(calls) == 1 and calls[0]["guidance"] == 7.5 and calls[0]["guides"] == []  # the CFG check's scale

"""reproduce.py --quick end to end on CPU: a well-formed report with every method, every seed, the verdict, the CFG
check and grids; three groups work end to end; bad arguments are refused; an existing run directory is refused
without --overwrite, and --overwrite keeps the cache. (The pipeline, not the science.)"""
import contextlib
import io
import json
import math

import pytest
import torch
from PIL import Image

import checkpoints
import reproduce

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
    assert "it/s" not in stderr.getvalue() and "step/s" not in stderr.getvalue() and "train:" not in stderr.getvalue(), (
        "--no-progress still drew a progress bar:\n" + stderr.getvalue()[-2000:])
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
    (["--groups", "seven,8"], "comma-separated integers")])
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
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "cache" / "vae-0").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="finetune, report.json"):
        reproduce.claim_run_dir(tmp_path, overwrite=False)
    reproduce.claim_run_dir(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert (tmp_path / "cache" / "vae-0").is_dir()


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

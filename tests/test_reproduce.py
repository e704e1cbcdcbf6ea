"""reproduce.py --quick end to end on CPU: a well-formed report with every column, every seed and grids; an existing
run directory is refused without --overwrite, and --overwrite keeps the cache. (The pipeline, not the science.)"""
import contextlib
import io
import json
import math

import pytest
import torch
from PIL import Image

import reproduce


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro") / "run"
    n = torch.get_num_threads()
    stderr = io.StringIO()  # tqdm writes its bars here
    try:  # one thread: tiny models gain little from two, and two threads on a busy machine spin-wait a lot
        with contextlib.redirect_stderr(stderr):
            report = reproduce.main(["--quick", "--out", str(out), "--seeds", "2", "--threads", "1", "--no-progress"])
    finally:
        torch.set_num_threads(n)  # reproduce sets the process's thread count
    assert "it/s" not in stderr.getvalue() and "step/s" not in stderr.getvalue() and "train:" not in stderr.getvalue(), (
        "--no-progress still drew a progress bar:\n" + stderr.getvalue()[-2000:])
    return out, report


def test_quick_run_writes_a_report_with_every_column_and_every_seed(quick_run):
    out, report = quick_run
    stored = json.loads((out / "report.json").read_text())
    assert stored["rows"] == json.loads(json.dumps(report["rows"]))
    w_inds = [0.0, *reproduce.QUICK.w_inds]
    rows = stored["rows"]
    assert [r["method"] for r in rows] == ["base"] + [reproduce.method_name(w) for w in w_inds for _ in range(2)]
    assert [(r["w_ind"], r["seed"]) for r in rows[1:]] == [(w, s) for w in w_inds for s in range(2)]
    for r in rows:
        for key in ("fd", "fd_soft", "spd", "mean_confidence", "frechet_distance", "classifier_heldout_accuracy"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["method"], r["w_ind"], key, r[key])
        assert 0 <= r["fd"] <= math.sqrt(0.5) + 1e-9 and 0 <= r["spd"] <= 1
        assert abs(sum(r["proportions"]) - 1) < 1e-9
        assert r["n_generic"] == reproduce.QUICK.n_generic and set(r["success_rates"]) == {"7", "8"}
        if r["w_ind"]:  # DDM runs: the trained indicator's entropy, at most ln 2
            assert 0 <= r["indicator_entropy"] <= math.log(2) + 1e-9
        else:
            assert r["indicator_entropy"] is None
    summary = stored["summary"]
    assert [s["w_ind"] for s in summary] == w_inds
    for s in summary:
        assert s["seeds"] == [0, 1] and math.isfinite(s["fd"]) and s["fd_std"] >= 0
        mean = sum(r["fd"] for r in rows if r["w_ind"] == s["w_ind"]) / 2
        assert s["fd"] == pytest.approx(mean)

    lines = (out / "report.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == reproduce.COLUMNS
    body = [line for line in lines if line.startswith("| ") and line != header and not line.startswith("| ---")]
    assert len(body) == len(rows) + len(summary)  # every model, then every method's mean ± std
    assert all(line.count("|") == len(reproduce.COLUMNS) + 1 for line in body)
    for grid in stored["grids"]:
        with Image.open(out / grid) as img:
            assert img.width > img.height > 0
    assert (out / "grids" / "all_seed0.png").is_file()


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

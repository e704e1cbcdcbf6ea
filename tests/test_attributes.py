"""The attribute experiment's pieces (ours): digits with an ink colour and a stroke width that captions never name,
their judges, groups named by attribute with partial labels, and one guidance term per attribute."""
import argparse
import collections
import json
import re

import numpy as np
import pytest
import torch

import data
import diffusion
import evaluate
import guidance
import reproduce
import sample
import train
from ddm import Indicator
from test_train import FAST, RES, TINY, make_data, one_thread, sd_dir  # noqa: F401 (fixtures)

COUNTS = {("red", "thick"): 14, ("red", "thin"): 4, ("green", "thick"): 2, ("green", "thin"): 1}


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def test_the_colour_rule_is_exact_and_the_width_rule_reproduces_the_split_of_real_digits(digits):
    images, labels = digits
    train_idx, held_idx = data.split_digits(0)
    thresholds = data.width_thresholds(data.ink_masses(images, train_idx, 32), labels[train_idx])
    for d in (0, 1, 7):
        mine = train_idx[labels[train_idx] == d]
        white = np.stack([np.asarray(data.digit_image(images[i], 32)) for i in mine])
        thick = data.ink_mass(white) > thresholds[d]
        assert thick.mean() == pytest.approx(0.5, abs=0.01)  # the median splits the class in two
        for colour in ("green", "red"):
            painted = np.stack([np.asarray(data.digit_image(images[i], 32, colour)) for i in mine])
            judge = evaluate.AttributeJudge("colour+width", None, thresholds[d])
            truth = [f"{colour}+{'thick' if t else 'thin'}" for t in thick]
            assert judge.names(painted) == truth  # colour exactly, and the width of the painted digit is its own
    faint = np.zeros((2, 4, 4, 3), np.uint8)
    faint[0, 0, 0] = (1, 0, 0)  # one dim red pixel against nothing: red
    faint[1, 0, 0] = (0, 1, 0)
    assert evaluate.AttributeJudge("colour", None, 0).names(faint) == ["red", "green"]


def test_the_builder_draws_exact_counts_per_digit_and_intersection_and_captions_name_only_the_digit(digits,
                                                                                                      tmp_path):
    images, labels = digits
    train_idx, held_idx = data.split_digits(0)
    out = data.make_attribute_digits(tmp_path / "a", images, labels, {d: COUNTS for d in (1, 7)},
                                     reproduce.group_prompt, indices=train_idx, labelled=0.5, seed=3)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    got = collections.Counter((r["digit"], r["colour"], r["width"]) for r in rows)
    assert got == {(d, c, w): n for d in (1, 7) for (c, w), n in COUNTS.items()}
    assert not {r["source_index"] for r in rows} & set(held_idx.tolist())  # held-out digits never drawn
    assert len({r["source_index"] for r in rows}) == len(rows)
    words = {"red", "green", "thick", "thin", "colour", "width"}
    assert all(r["text"] == reproduce.group_prompt(r["digit"]) and not words & set(r["text"].split()) for r in rows)
    for key in got:  # half of each intersection labelled (at least one), on both attributes together
        members = [r for r in rows if (r["digit"], r["colour"], r["width"]) == key]
        kept = [r for r in members if r["group"]["colour"] is not None]
        assert len(kept) == max(1, round(0.5 * len(members)))
        assert all(r["group"] == {"colour": r["colour"], "width": r["width"]} for r in kept)
    thresholds = data.width_thresholds(data.ink_masses(images, train_idx, 32), labels[train_idx])
    for r in rows[:20]:  # each image's width is its own, judged on the file as written
        from PIL import Image
        pixels = np.asarray(Image.open(out / r["file_name"]))[None]
        assert evaluate.AttributeJudge("width", None, thresholds[r["digit"]]).names(pixels) == [r["width"]]
    before = (out / "metadata.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):  # a built folder is not overwritten silently
        data.make_attribute_digits(out, images, labels, {1: COUNTS}, reproduce.group_prompt, indices=train_idx)
    assert (out / "metadata.jsonl").read_bytes() == before


def attribute_folder(folder, rows):
    """A tiny folder of 16 px squares whose groups name two attributes; rows: (colour or None, size or None)."""
    folder = make_data(folder)
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for line, (colour, size) in zip(lines, rows):
        line["group"] = {k: v for k, v in (("colour", colour), ("size", size)) if k != "size" or size != "absent"}
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_groups_named_by_attribute_train_with_labels_missing_for_one_attribute(sd_dir, tmp_path):
    rows = [("red", "big"), ("blue", None), ("red", "small"), (None, "big"), ("blue", "absent"), ("red", "small"),
            ("blue", "big"), (None, None)]
    folder = attribute_folder(tmp_path / "d", rows)
    for attribute, names, groups in (
            ("colour", ["blue", "red"], [1, 0, 1, -1, 0, 1, 0, -1]),
            ("size", ["big", "small"], [0, -1, 1, 0, -1, 1, 0, -1]),
            ("colour+size", ["blue+big", "red+big", "red+small"], [1, -1, 2, -1, -1, 2, 0, -1])):
        f = data.ImageFolder(folder, RES, attribute=attribute)
        assert (f.group_names, f.groups, f.attributes) == (names, groups, ["colour", "size"]), attribute
    common = ["--model", str(sd_dir), "--data", str(folder), "--lora-rank", "4", "--max-steps", "2", *FAST,
              "--objective", "plain-indicator", "--w-ind", "1"]
    run = train.train([*common, "--out", str(tmp_path / "size"), "--attribute", "size"])
    info = json.loads((run / "run.json").read_text())["config"]
    assert info["attribute"] == "size" and info["group_names"] == ["big", "small"]
    for bad, message in ((["--attribute", "shape"], "no image has the attribute 'shape'"),
                         ([], r"choose one \(--attribute NAME")):
        with pytest.raises(ValueError, match=message):
            train.train([*common, "--out", str(tmp_path / "never"), *bad])
    with pytest.raises(ValueError, match=r"started with attribute='size', now attribute=None"):  # not its groups
        train.train([*common, "--resume", str(run), "--max-steps", "3"])
    with pytest.raises(ValueError, match="name no attributes"):
        train.train([*common[:3], str(make_data(tmp_path / "plain")), *common[4:], "--out", str(tmp_path / "never"),
                     "--attribute", "colour"])
    assert not (tmp_path / "never").exists()


def test_two_indicators_add_their_guidance_terms():
    """Toy indicators whose log-probability gradients are known: guiding by both moves a step by the sum."""
    shape = (4, 2, 2)

    def linear(direction):  # logits (0, <x, direction>): d/dx log p(1 | x) = (1 - p1) direction
        ind = Indicator(shape, 2, (), timestep_dim=8)
        with torch.no_grad():
            ind.net[-1].weight.zero_(), ind.net[-1].bias.zero_()
            ind.net[-1].weight[1, :16] = direction.flatten()
        return ind.requires_grad_(False)

    g = torch.Generator().manual_seed(0)
    a, b = linear(torch.randn(shape, generator=g)), linear(torch.randn(shape, generator=g))
    x = torch.randn(3, *shape, generator=g)
    targets = torch.tensor([1, 0, 1])
    one = [diffusion.indicator_gradient(ind, x, 500, targets) for ind in (a, b)]

    class Zero(torch.nn.Module):  # a "UNet" predicting no noise
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, context):
            return torch.zeros_like(x)

    ac = diffusion.sd_schedule()
    cond, gens = torch.zeros(3, 4, 8), [torch.Generator() for _ in range(3)]
    out = {name: diffusion.denoise(Zero(), x, cond, None, ac, gens, steps=1, guidance=1.0, guides=[
        diffusion.Guidance(ind, targets, 2.0) for ind in inds]) for name, inds in
        (("none", ()), ("a", (a,)), ("b", (b,)), ("both", (a, b)))}
    # one DDIM step, t = 1 to past 0: x_prev = sqrt(a0) (x - sqrt(1 - a1) eps) / sqrt(a1) + sqrt(1 - a0) eps, linear
    # in eps, and each term moves eps by -2 sqrt(1 - a1) times its gradient: both move it by the sum
    a0, a1 = ac[0].item(), ac[1].item()
    per_eps = (1 - a0) ** 0.5 - a0 ** 0.5 * (1 - a1) ** 0.5 / a1 ** 0.5
    for name, grad in (("a", one[0]), ("b", one[1]), ("both", one[0] + one[1])):
        torch.testing.assert_close(out[name] - out["none"], per_eps * -2.0 * (1 - a1) ** 0.5 * grad, atol=1e-6,
                                   rtol=1e-4)
    assert one[0].abs().max() > 0.1 and one[1].abs().max() > 0.1


def test_targets_by_attribute_name_and_the_refusals(tmp_path):
    assert guidance.target_specs([], ["colour", "width"]) == ["uniform", "uniform"]
    assert guidance.target_specs(["red=1,green=0"], ["colour", "width"]) == ["red=1,green=0"] * 2
    assert guidance.target_specs(["width:thin=0.5,thick=0.5"], ["colour", "width"]) == ["uniform",
                                                                                       "thin=0.5,thick=0.5"]
    with pytest.raises(ValueError, match="--target shape: name one of the attributes"):
        guidance.target_specs(["shape:uniform"], ["colour", "width"])


def test_targets_by_attribute_for_some_of_three_indicators_pass_the_flag_check(tmp_path):
    """Two ATTRIBUTE:SPEC targets for three indicators were refused as "give one for all indicators or one per
    --indicator (3), got 2", which target_specs reads as meant: the third indicator aims at uniform."""
    args = argparse.Namespace(calibration=None, indicator_guidance=1.0, indicator=[str(tmp_path)] * 3,
                              target=["colour:red=1,blue=0", "size:big=1,small=0"])
    assert guidance.flag_error(args) is None
    assert guidance.target_specs(args.target, ["colour", "size", "shape"]) == ["red=1,blue=0", "big=1,small=0",
                                                                               "uniform"]
    args.target = ["red=1,blue=0", "big=1,small=0"]  # in order: one for all or one per indicator
    assert "give one for all indicators or one per --indicator (3), got 2" in guidance.flag_error(args)
    args.target = ["colour:red=1,blue=0", "uniform"]  # a mix: target_specs names the spec at fault, as for two
    assert guidance.flag_error(args) is None


def test_a_refused_target_names_the_spec_at_fault():
    """Beside one ATTRIBUTE:SPEC, a spec naming no attribute is the one named; an attribute named twice is said so
    (the message named the first spec, which was fine, and asked to name an attribute that it named)."""
    with pytest.raises(ValueError, match="--target uniform: name one of the attributes"):
        guidance.target_specs(["colour:red=1,green=0", "uniform"], ["colour", "width"])
    with pytest.raises(ValueError, match="--target names the attribute colour twice"):
        guidance.target_specs(["colour:red=1,green=0", "colour:uniform"], ["colour", "width"])


def test_an_attribute_named_twice_in_an_intersection_is_refused(tmp_path):
    """--attribute colour+colour trained the groups 'blue+blue' and 'red+red' without a word."""
    folder = attribute_folder(tmp_path / "d", [("red", "big"), ("blue", "small")] * 4)
    with pytest.raises(ValueError, match=r"--attribute colour\+colour names the attribute 'colour' twice"):
        data.ImageFolder(folder, RES, attribute="colour+colour")


def test_an_attribute_taking_ints_and_strings_is_refused_in_an_intersection_too(tmp_path):
    """--attribute size refused the sizes 1 and "1"; --attribute colour+size merged them into 'red+1' silently."""
    folder = make_data(tmp_path / "d", [{"colour": c, "size": s} for c, s in
                                        (("red", 1), ("blue", "1"), ("red", "1"), ("blue", 2))] * 2)
    for attribute in ("size", "colour+size", "size+colour"):
        with pytest.raises(ValueError, match=r"attribute 'size' takes ints and strings \('1' and 1\)"):
            data.ImageFolder(folder, RES, attribute=attribute)


def test_an_attribute_of_one_labelled_value_is_named_in_an_intersection_too(tmp_path):
    """With every blue image's colour unlabelled, --attribute colour said "field 'group' takes only the value 'red'
    on every line" (the lines hold objects, and blue ones are there), and colour+size trained the groups red+big and
    red+small: an indicator of the size alone, named as if it read the colour too."""
    rows = [("red", "big"), (None, "small"), ("red", "small"), (None, "big")] * 2
    folder = attribute_folder(tmp_path / "d", rows)
    for attribute in ("colour", "colour+size", "size+colour"):
        with pytest.raises(ValueError, match=rf"attribute 'colour' takes only the value 'red' on every line that "
                                             rf"labels {re.escape(attribute)}; DDM needs at least two labelled"):
            data.ImageFolder(folder, RES, attribute=attribute)
    apart = attribute_folder(tmp_path / "apart", [("red", None), (None, "small"), ("blue", None), (None, "big")] * 2)
    assert data.ImageFolder(apart, RES, attribute="colour").group_names == ["blue", "red"]
    with pytest.raises(ValueError, match=r"no line gives colour and size a value together; DDM needs at least two"):
        data.ImageFolder(apart, RES, attribute="colour+size")


@pytest.fixture(scope="module")
def attribute_runs(sd_dir, tmp_path_factory):
    """Noise-aware indicators of one step on a folder of two attributes: colour, size and colour+size."""
    tmp = tmp_path_factory.mktemp("attribute_runs")
    folder = attribute_folder(tmp / "d", [("red", "big"), ("blue", "small"), ("red", "small"), ("blue", "big")] * 2)
    common = ["--model", str(sd_dir), "--data", str(folder), "--lora-rank", "4", "--max-steps", "1", *FAST,
              "--objective", "plain-indicator", "--w-ind", "1"]
    return {a: train.train([*common, "--out", str(tmp / a), "--attribute", a]) for a in ("colour", "size",
                                                                                        "colour+size")}


def test_a_target_no_group_of_an_indicator_fits_names_that_indicator_and_its_attribute(attribute_runs, tmp_path):
    """--target red=0.5,blue=0.5 given for both indicators said "target 'red=0.5,blue=0.5': 'red' is not a group
    (groups: big, small)", naming neither the flag nor the indicator whose groups those are."""
    size = attribute_runs["size"]
    args = ["--model", str(attribute_runs["colour"]), "--prompt", "a red square", "--n", "2", "--steps", "2",
            "--height", str(RES), "--width", str(RES), "--indicator", str(attribute_runs["colour"]), "--indicator",
            str(size), "--indicator-guidance", "1", "--calibration", "2", "--out", str(tmp_path / "never")]
    with pytest.raises(SystemExit, match=rf"^error: --indicator {re.escape(str(size))} \(attribute size\): --target "
                                         r"'red=0.5,blue=0.5': 'red' is not a group \(groups: big, small\)$"):
        sample.main([*args, "--target", "red=0.5,blue=0.5"])
    assert not (tmp_path / "never").exists()


def test_an_indicator_of_an_intersection_beside_one_of_its_attributes_is_refused(attribute_runs, tmp_path):
    """An indicator of colour+size beside one of colour guided the colour twice, toward targets of their own."""
    colour, joint = attribute_runs["colour"], attribute_runs["colour+size"]
    args = ["--model", str(colour), "--prompt", "a red square", "--n", "2", "--steps", "2", "--height", str(RES),
            "--width", str(RES), "--indicator-guidance", "1", "--calibration", "2", "--out", str(tmp_path / "never")]
    for first, second in ((colour, joint), (joint, colour)):
        with pytest.raises(SystemExit, match=rf"--indicator {re.escape(str(second))} guides the attribute colour "
                                             r"that an earlier --indicator guides already"):
            sample.main([*args, "--indicator", str(first), "--indicator", str(second)])
    assert not (tmp_path / "never").exists()


def test_a_target_of_groups_whose_names_hold_a_colon_is_a_spec_for_indicators_that_name_no_attribute():
    """Group names of a plain metadata.jsonl may hold ':' (train.py reads "hair:long"); their --target was read as
    ATTRIBUTE:SPEC and refused with "give the SPEC alone", which is what the user had done."""
    spec = "hair:long=0.7,hair:short=0.3"
    assert guidance.target_specs([spec], [None]) == [spec]
    assert guidance.target_specs([spec, "uniform"], [None, None]) == [spec, "uniform"]


def test_a_target_by_attribute_for_indicators_that_name_none_says_so():
    """Indicators of folders whose groups name no attribute: the message listed their attributes as "(None)"."""
    with pytest.raises(ValueError, match=r"--target gender: the indicators' runs name no attribute \(their groups "
                                         r"were plain values\); give the SPEC alone"):
        guidance.target_specs(["gender:uniform"], [None])

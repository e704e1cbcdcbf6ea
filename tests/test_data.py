import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def test_shipped_digits_are_5000_real_mnist_digits_500_per_class(digits):
    images, labels = digits
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [500] * 10
    # real MNIST: black background, white strokes, centred by mass within the 20x20 box of the 28x28 frame
    assert images[:, 0, :].max() == 0 and images.max() == 255
    assert 0.08 < (images > 127).mean() < 0.2


def test_split_is_deterministic_disjoint_and_balanced(digits):
    _, labels = digits
    train, held = data.split_digits(seed=0, heldout_per_class=100, labels=labels)
    train2, held2 = data.split_digits(seed=0, heldout_per_class=100, labels=labels)
    assert np.array_equal(train, train2) and np.array_equal(held, held2)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == 5000
    assert np.bincount(labels[held]).tolist() == [100] * 10
    assert not np.array_equal(held, data.split_digits(seed=1, labels=labels)[1])
    with pytest.raises(AssertionError, match="heldout_per_class=500"):
        data.split_digits(heldout_per_class=500, labels=labels)


def test_biased_folder_has_the_asked_ratio_and_no_heldout_image(tmp_path, digits):
    images, labels = digits
    train, held = data.split_digits(seed=0, labels=labels)
    root = data.make_digit_folder(tmp_path / "biased", images, labels, {7: 360, 8: 40}, indices=train,
                                  resolution=32, prompt=lambda d: f"a photo of the digit {d}", seed=3)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert [r["group"] for r in rows].count(7) == 360 and [r["group"] for r in rows].count(8) == 40
    source = np.array([r["source_index"] for r in rows])
    assert len(set(source.tolist())) == 400 and not np.isin(source, held).any()
    assert all(labels[r["source_index"]] == r["group"] and r["text"] == f"a photo of the digit {r['group']}"
               for r in rows)
    # the PNG is the source digit, RGB at the asked resolution
    img = Image.open(root / rows[0]["file_name"])
    assert img.mode == "RGB" and img.size == (32, 32)
    back = np.asarray(img.convert("L").resize((28, 28), Image.BICUBIC), dtype=np.float64)
    assert np.abs(back - images[rows[0]["source_index"]]).mean() < 12
    # held-out digits are never drawn even when the pool is the only limit
    with pytest.raises(AssertionError, match="digit 7 but the pool holds only 400"):
        data.make_digit_folder(tmp_path / "x", images, labels, {7: 401}, indices=train)
    with pytest.raises(FileExistsError, match="overwrite"):
        data.make_digit_folder(root, images, labels, {7: 1, 8: 1}, indices=train)


def test_an_interrupted_build_is_rebuilt_over_its_own_files_and_still_keeps_anyone_elses(digits, tmp_path,
                                                                                        monkeypatch):
    """A build stopped half-way (Ctrl-C) left its images without a metadata.jsonl, and every rebuild, --overwrite
    or not, refused them as no build's files: the folder had to be deleted by hand. The build records its files
    first (metadata.unfinished.jsonl), so a rebuild replaces them; a file no build wrote is still refused."""
    images, labels = digits
    out, calls = tmp_path / "d", []
    render = data.digit_image

    def stop_at_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render(*args)

    with monkeypatch.context() as m:
        m.setattr(data, "digit_image", stop_at_the_third)
        with pytest.raises(KeyboardInterrupt):
            data.make_digit_folder(out, images, labels, {7: 3, 8: 2})
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "metadata.unfinished.jsonl"]
    data.make_digit_folder(out, images, labels, {7: 3, 8: 2})
    assert sorted(p.name for p in out.iterdir()) == [f"{k:05d}.png" for k in range(5)] + ["metadata.jsonl"]
    calls.clear()
    with monkeypatch.context() as m:  # a rebuild with other counts, stopped: the old metadata.jsonl, new images
        m.setattr(data, "digit_image", stop_at_the_third)
        with pytest.raises(KeyboardInterrupt):
            data.make_digit_folder(out, images, labels, {7: 1, 8: 4}, overwrite=True)
    with pytest.raises(ValueError, match=r"metadata.jsonl: a build of this folder was interrupted"):
        data.ImageFolder(out, 32)  # its labels would not be its images'
    data.make_digit_folder(out, images, labels, {7: 1}, overwrite=True)  # the interrupted build's other files go
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "metadata.jsonl"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "00000.png").write_bytes(b"mine")
    (mine / "metadata.unfinished.jsonl").write_text(json.dumps({"file_name": "00001.png"}) + "\n")
    with pytest.raises(FileExistsError, match=r"00000.png exists and no metadata.jsonl of a previous build lists it"):
        data.make_digit_folder(mine, images, labels, {7: 3, 8: 2})
    assert (mine / "00000.png").read_bytes() == b"mine"


def test_the_digits_command_draws_a_biased_folder_from_the_training_split_or_names_the_bad_flag(tmp_path, capsys):
    """No command built a folder of the shipped digits: train.py met them only inside reproduce.py. It draws from the
    training split alone (the held-out digits judge, never train), keeps the asked share of labels, says what it
    wrote, and refuses a bad --counts in one line naming it, before anything is written."""
    out = tmp_path / "digits"
    data.main(["digits", "--counts", "7=9,8=1", "--labelled", "0.5", "--resolution", "16", "--out", str(out)])
    assert capsys.readouterr().out == f"wrote 10 images (7: 9, 8: 1) and metadata.jsonl to {out}\n"
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["digit"] for r in rows) == [7] * 9 + [8] and {r["text"] for r in rows} == {"a photo of a digit"}
    assert [r["group"] for r in rows].count(None) == 5  # round(0.5 x 9) = 4 sevens and the one eight keep theirs
    assert not set(data.split_digits(0)[1].tolist()) & {r["source_index"] for r in rows}
    assert Image.open(out / rows[0]["file_name"]).size == (16, 16)
    for counts, message in (("7=9,eight=1", "--counts must be DIGIT=COUNT pairs"), ("7=1,7=2", "each digit 0-9 once"),
                            ("10=1", "each digit 0-9 once"), ("7=0", "1 <= COUNT <= 400"),
                            ("7=401", "1 <= COUNT <= 400 (a digit's images in the training split)"),
                            ("\u00b2=1", "--counts must be DIGIT=COUNT pairs")):  # a digit to str.isdigit, not to int
        with pytest.raises(SystemExit) as e:
            data.main(["digits", "--counts", counts, "--out", str(tmp_path / "never")])
        assert e.value.code == 2 and message in capsys.readouterr().err, counts
    with pytest.raises(SystemExit, match="--overwrite"):
        data.main(["digits", "--counts", "7=2", "--out", str(out)])
    assert not (tmp_path / "never").exists() and len(list(out.glob("*.png"))) == 10


def test_a_digit_folder_is_not_written_over_files_it_did_not_write(tmp_path, digits):
    """Nothing the code did not write is lost: a folder holding the user's own 00000.png and no metadata.jsonl of a
    previous build is refused, naming the file, and the file is untouched; a finished build is rebuilt with
    overwrite=True."""
    images, labels = digits
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "00000.png").write_bytes(b"my own picture")
    with pytest.raises(FileExistsError, match=r"mine/00000.png exists and no metadata.jsonl of a previous build"):
        data.make_digit_folder(mine, images, labels, {3: 2, 1: 2})
    assert (mine / "00000.png").read_bytes() == b"my own picture" and not (mine / "metadata.jsonl").exists()
    built = data.make_digit_folder(tmp_path / "built", images, labels, {3: 2, 1: 2})
    data.make_digit_folder(built, images, labels, {3: 1, 1: 1}, overwrite=True)
    assert len((built / "metadata.jsonl").read_text().splitlines()) == 2


def test_rebuilding_a_folder_of_links_writes_new_files_not_into_the_folder_they_point_to(tmp_path, digits):
    """A folder last built with links (data.py clusters --link) holds symlinks to another data set's images under
    the names a digit folder writes. Rebuilding it as a digit folder with overwrite saved each PNG through the link,
    over the other data set's image."""
    images, labels = digits
    theirs = data.make_digit_folder(tmp_path / "theirs", images, labels, {3: 2, 1: 2})
    before = files_of(theirs)
    linked = data.write_folder(tmp_path / "linked", [(theirs / f"{k:05d}.png", f"{k:05d}.png", {"group": 0})
                                                     for k in range(4)], link=True)
    data.make_digit_folder(linked, images, labels, {3: 2, 1: 2}, seed=1, overwrite=True)
    assert files_of(theirs) == before
    assert not any(p.is_symlink() for p in linked.iterdir())


def files_of(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_image_folder_reads_pixels_text_and_group_indices(tmp_path, digits):
    images, labels = digits
    root = data.make_digit_folder(tmp_path / "d", images, labels, {3: 4, 1: 2}, resolution=32, seed=0)
    ds = data.ImageFolder(root, 16)
    assert len(ds) == 6 and ds.group_names == [1, 3]
    item = ds[0]
    assert item["pixels"].shape == (3, 16, 16) and item["pixels"].dtype == torch.float32
    assert item["pixels"].min() >= -1 and item["pixels"].max() <= 1 and item["pixels"].min() < -0.99
    assert item["text"] == "a photo of a digit"
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert [ds.group_names[ds[i]["group"]] for i in range(6)] == [r["group"] for r in rows]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=6)))
    assert batch["pixels"].shape == (6, 3, 16, 16) and batch["group"].tolist() == ds.groups


def _folder(tmp_path, rows, images=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, img in (images or {}).items():
        img.save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    return tmp_path


def test_image_folder_converts_gray_rgba_and_palette_and_maps_string_groups(tmp_path):
    rgba = Image.new("RGBA", (20, 12), (255, 0, 0, 0))  # fully transparent red -> white background
    gray = Image.new("L", (12, 20), 0)
    pal = Image.new("P", (8, 8), 0)
    root = _folder(tmp_path, [{"file_name": "a.png", "text": "", "group": "woman"},
                              {"file_name": "b.png", "text": "x", "group": "man"},
                              {"file_name": "c.png", "text": "y", "group": "man", "extra": 1}],
                   {"a.png": rgba, "b.png": gray, "c.png": pal})
    ds = data.ImageFolder(root, 8)
    assert ds.group_names == ["man", "woman"] and ds.groups == [1, 0, 0]
    assert torch.allclose(ds[0]["pixels"], torch.ones(3, 8, 8)) and ds[0]["text"] == ""
    assert torch.allclose(ds[1]["pixels"], -torch.ones(3, 8, 8))
    assert ds[2]["pixels"].shape == (3, 8, 8)
    # center crop keeps the middle: a wide image with a white centre column band
    wide = np.zeros((8, 24), np.uint8)
    wide[:, 8:16] = 255
    root2 = _folder(tmp_path / "w", [{"file_name": "w.png", "text": "", "group": 0},
                                     {"file_name": "w2.png", "text": "", "group": 1}],
                    {"w.png": Image.fromarray(wide), "w2.png": Image.fromarray(wide)})
    assert data.ImageFolder(root2, 8)[0]["pixels"].min() > 0.9  # only the white middle square survives
    assert data.ImageFolder(root2, 8, center_crop=False)[0]["pixels"].min() < -0.9  # squashed: black sides stay


@pytest.mark.parametrize("rows, pattern", [
    (['{"file_name": "a.png", "text": "t", "group": 0}', '{"file_name": "b.png", "text": '],
     r"metadata.jsonl, line 2: not valid JSON"),
    (['{"file_name": "a.png", "text": "t", "group": ' + "9" * 5000 + "}"],  # past Python's int digits: no file named
     r"metadata.jsonl, line 1: not valid JSON \(Exceeds the limit"),
    ([{"file_name": "a.png", "text": "t", "group": 0}, {"file_name": "b.png", "text": "t"}],
     r"metadata.jsonl, line 2: missing field 'group'"),
    ([{"text": "t", "group": 0}], r"metadata.jsonl, line 1: missing field 'file_name'"),
    ([{"file_name": "a.png", "group": 0}], r"metadata.jsonl, line 1: missing field 'text'"),
    ([{"file_name": "a.png", "text": "t", "group": 0}, {"file_name": "gone.png", "text": "t", "group": 1}],
     r"metadata.jsonl, line 2: field 'file_name': image .*gone.png does not exist"),
    ([{"file_name": "a.png", "text": "t", "group": 0}, {"file_name": "bad.png", "text": "t", "group": 1}],
     r"metadata.jsonl, line 2: field 'file_name': cannot read image .*bad.png"),
    ([{"file_name": "a.png", "text": "t", "group": 0}, {"file_name": "a.png", "text": "t", "group": 0}],
     r"metadata.jsonl: field 'group' takes only the value 0 on every line; DDM needs at least two groups"),
    ([{"file_name": "a.png", "text": "t", "group": 0}, {"file_name": "a.png", "text": "u", "group": None}],
     r"metadata.jsonl: field 'group' takes only the value 0 on every labelled line; DDM needs at least two groups"),
    ([{"file_name": "a.png", "text": "t", "group": 0}, {"file_name": "a.png", "text": "t", "group": "1"}],
     r"metadata.jsonl, line 2: field 'group' is '1' but line 1 has 0"),
    ([{"file_name": "a.png", "text": "t", "group": 0.5}], r"line 1: field 'group' must be an int, a string or null"),
    # a label with a space at an end, or a blank one, is a group apart that --target cannot name (it strips names)
    ([{"file_name": "a.png", "text": "t", "group": "woman"}, {"file_name": "a.png", "text": "t", "group": "woman "}],
     r"metadata.jsonl, line 2: field 'group' 'woman ': the group name 'woman ' has spaces at its ends"),
    ([{"file_name": "a.png", "text": "t", "group": {"gender": " man", "age": None}}],
     r"metadata.jsonl, line 1: field 'group' .*: the group name ' man' has spaces at its ends"),
    ([{"file_name": "a.png", "text": "t", "group": " "}],
     r"metadata.jsonl, line 1: field 'group' ' ': the group name ' ' is blank; an image without a label has null"),
    ([{"file_name": "a.png", "text": "t", "group": ""}], r"metadata.jsonl, line 1: field 'group' '': .* is blank"),
    ([{"file_name": "a.png", "text": None, "group": 0}], r"line 1: field 'text' must be a string"),
    (["[1, 2]"], r"line 1: expected a JSON object"),
    ([], r"metadata.jsonl: no images listed"),
    ([{"file_name": "a.png", "text": "t", "group": {}}, {"file_name": "a.png", "text": "t", "group": None}],
     r"metadata.jsonl: field 'group' is \{\} \(an object naming no attribute\) on every labelled line; DDM needs "
     r"at least two labelled groups"),  # was a TypeError: unhashable type: 'dict'
])
def test_image_folder_bad_input_names_file_line_and_field(tmp_path, rows, pattern):
    root = _folder(tmp_path, rows, {"a.png": Image.new("RGB", (8, 8))})
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=pattern):
        data.ImageFolder(root, 8)


def test_a_folder_of_fewer_than_two_groups_reads_for_a_run_that_needs_none(tmp_path):
    """need_groups=False, train.py's plain fine-tune: a folder without a label, or of one group, reads as it is."""
    for groups, names, indices in (([None, None], [], [-1, -1]), ([None, 3], [3], [-1, 0])):
        rows = [{"file_name": "a.png", "text": "t", "group": g} for g in groups]
        root = _folder(tmp_path / str(len(names)), rows, {"a.png": Image.new("RGB", (8, 8))})
        folder = data.ImageFolder(root, 8, need_groups=False)
        assert folder.group_names == names and folder.groups == indices


def test_image_folder_rejects_bad_resolution_and_missing_metadata(tmp_path):
    root = _folder(tmp_path, [{"file_name": "a.png", "text": "t", "group": 0},
                              {"file_name": "a.png", "text": "t", "group": 1}], {"a.png": Image.new("RGB", (8, 8))})
    for bad in (30, 0):  # train.py and data.py clusters check --resolution; here it is a programming error
        with pytest.raises(AssertionError, match="resolution must be a positive multiple of 8"):
            data.ImageFolder(root, bad)
    (root / "metadata.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="metadata.jsonl not found"):
        data.ImageFolder(root, 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.ImageFolder(tmp_path / "nowhere", 8)


# --- biased sets of real images in CelebA's attribute-file format --------------------------------------------------

CELEBA_HEADER = "5_o_Clock_Shadow Arched_Eyebrows Attractive Male Young "  # CelebA's names; its header ends in a space


@pytest.fixture
def celeba(tmp_path, digits):
    """A small folder in CelebA's layout: 30 JPEGs 000001.jpg ... and list_attr_celeba.txt (count line, header,
    `file ±1 ...` rows padded with spaces as CelebA pads them); images 1-12 are Male."""
    images, _ = digits
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    rows = []
    for k in range(1, 31):
        Image.fromarray(images[k]).convert("RGB").resize((44, 54)).save(folder / f"{k:06d}.jpg")
        values = [(-1) ** k, 1, (-1) ** (k // 2), 1 if k <= 12 else -1, 1]
        rows.append(f"{k:06d}.jpg " + " ".join(f"{v:2d}" for v in values))
    attributes = tmp_path / "list_attr_celeba.txt"
    attributes.write_text("30\n" + CELEBA_HEADER + "\n" + "\n".join(rows) + "\n")
    return folder, attributes


def _build(folder, attributes, out, *extra):
    return data.main(["celeba", "--images", str(folder), "--attributes", str(attributes), "--attribute", "Male",
                      "--prompt", "a photo of a face", "--out", str(out), *extra])


def test_celeba_builder_writes_the_asked_counts_by_copy_and_train_reads_it(celeba, tmp_path):
    folder, attributes = celeba
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = _build(folder, attributes, tmp_path / "my_data", "--counts", "8,4", "--seed", "1")
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and sum(r["group"] == "Male" for r in rows) == 8
    assert {r["group"] for r in rows} == {"Male", "not Male"} and {r["text"] for r in rows} == {"a photo of a face"}
    for r in rows:  # the group is the file's Male column; the image is a byte-for-byte copy
        assert (int(r["file_name"][:6]) <= 12) == (r["group"] == "Male")
        assert r["attribute_line"] == int(r["file_name"][:6]) + 2
        assert not (out / r["file_name"]).is_symlink()
        assert (out / r["file_name"]).read_bytes() == before[r["file_name"]]
        assert r["source"] == str((folder / r["file_name"]).resolve())
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # sources untouched, nothing moved
    assert [r["group"] for r in rows] != sorted(r["group"] for r in rows)  # groups interleaved
    dataset = data.ImageFolder(out, resolution=32)
    assert dataset.group_names == ["Male", "not Male"] and sorted(dataset.groups) == [0] * 8 + [1] * 4
    again = _build(folder, attributes, tmp_path / "again", "--counts", "8,4", "--seed", "1")
    assert (again / "metadata.jsonl").read_text() == (out / "metadata.jsonl").read_text()  # seeded


def test_celeba_builder_links_names_groups_and_rebuilds_only_its_own_files(celeba, tmp_path):
    folder, attributes = celeba
    out = _build(folder, attributes, tmp_path / "d", "--counts", "3,12", "--group-names", "man", "woman", "--link")
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["group"] for r in rows) == ["man"] * 3 + ["woman"] * 12
    assert all((out / r["file_name"]).is_symlink() and (out / r["file_name"]).resolve() == folder.resolve() /
               r["file_name"] for r in rows)
    with pytest.raises(SystemExit, match=r"metadata.jsonl exists; pass --overwrite"):
        _build(folder, attributes, out, "--counts", "3,12")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    _build(folder, attributes, out, "--counts", "3,12", "--overwrite")  # copies over its own links, not into them
    assert not any(p.is_symlink() for p in out.glob("*.jpg"))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "000001.jpg").write_bytes(b"someone else's file")
    with pytest.raises(SystemExit, match=r"theirs/000001.jpg exists and no metadata.jsonl .* lists it"):
        _build(folder, attributes, tmp_path / "theirs", "--counts", "12,18")
    assert (tmp_path / "theirs" / "000001.jpg").read_bytes() == b"someone else's file"


def test_a_folder_of_links_rebuilt_onto_itself_is_refused_as_its_own_source_and_kept(celeba, tmp_path):
    """--images D --out D --overwrite over a --link build of D: each source is D's own link, which the check compared
    with the file it points to; the rebuild deleted the first link, then failed to copy it, leaving metadata.jsonl
    listing an image that was gone."""
    folder, attributes = celeba
    out = _build(folder, attributes, tmp_path / "d", "--counts", "3,12", "--link")
    before = {p.name: (os.readlink(p) if p.is_symlink() else p.read_bytes()) for p in out.iterdir()}
    with pytest.raises(SystemExit, match=r"is its own source"):
        _build(out, attributes, out, "--counts", "3,12", "--overwrite")
    assert {p.name: (os.readlink(p) if p.is_symlink() else p.read_bytes()) for p in out.iterdir()} == before


@pytest.mark.parametrize("name", ["a,b", "c=d", "e:f", "g+h"])
def test_celeba_builder_refuses_a_group_name_that_target_could_not_name(name, celeba, tmp_path):
    """--target reads NAME=SHARE,... (ATTRIBUTE:SPEC; intersections A+B): a folder of such a group was written, and
    no --target could name its groups."""
    folder, attributes = celeba
    with pytest.raises(SystemExit, match=rf"group name {re.escape(repr(name))} holds one of , = : \+ \(--target "
                                         r"separates names and shares with them\)$"):
        _build(folder, attributes, tmp_path / "out", "--counts", "1,1", "--group-names", name, "woman")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", [" man", "man ", " ", ""])
def test_celeba_builder_refuses_a_blank_group_name_or_one_with_spaces_at_its_ends(name, celeba, tmp_path):
    """train.py refuses such a folder (--target strips names, so it could not name the group): refused here first."""
    folder, attributes = celeba
    with pytest.raises(SystemExit, match=rf"group name {re.escape(repr(name))} (is blank|has spaces at its ends)"):
        _build(folder, attributes, tmp_path / "out", "--counts", "1,1", "--group-names", name, "woman")
    assert not (tmp_path / "out").exists()


def test_celeba_builder_names_the_missing_image_attribute_or_supply(celeba, tmp_path, capsys):
    folder, attributes = celeba
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"has no attribute 'Smiling'; its 5 attributes are 5_o_Clock_Shadow, "):
        data.main(["celeba", "--images", str(folder), "--attributes", str(attributes), "--attribute", "Smiling",
                   "--counts", "1,1", "--prompt", "p", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"asked for 13 images with Male = 1 but .*list_attr_celeba.txt lists only 12"):
        _build(folder, attributes, out, "--counts", "13,1")
    with pytest.raises(SystemExit, match=r"asked for 19 images with Male = -1 .* lists only 18"):
        _build(folder, attributes, out, "--counts", "1,19")
    (folder / "000007.jpg").unlink()
    with pytest.raises(SystemExit, match=r"image .*000007.jpg not found \(listed in .*list_attr_celeba.txt, line 9\)"):
        _build(folder, attributes, out, "--counts", "12,18")
    assert not out.exists()  # every source is checked before anything is written
    with pytest.raises(SystemExit, match=r"attribute file .*nothing.txt not found"):
        _build(folder, tmp_path / "nothing.txt", out, "--counts", "1,1")
    with pytest.raises(SystemExit) as e:
        _build(folder, attributes, out, "--counts", "800")
    assert e.value.code == 2 and "--counts must be two integers WITH,WITHOUT" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a superscript two is a digit to isdigit, not to int()
        _build(folder, attributes, out, "--counts", "²,1")
    assert e.value.code == 2 and "--counts must be two integers WITH,WITHOUT" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"counts must be two positive ints"):
        _build(folder, attributes, out, "--counts", "800,0")
    with pytest.raises(SystemExit):
        _build(folder, attributes, out, "--counts", "a,b")
    assert "--counts must be two integers" in capsys.readouterr().err


@pytest.mark.parametrize("text, pattern", [
    ("2\nMale Young\n1.jpg 1 -1\n", r"line 1 says 2 images but 1 image lines follow"),
    ("1\nMale Young\n1.jpg 1\n", r"line 3: expected a file name and 2 values of 1 or -1"),
    ("1\nMale Young\n1.jpg 0 1\n", r"line 3: expected a file name and 2 values"),
    ("2\nMale Young\n1.jpg 1 1\n1.jpg -1 1\n", r"line 4: 1.jpg is listed twice \(first on line 3\)"),
    ("1\nMale Young\n../1.jpg 1 1\n", r"line 3: '../1.jpg' is not a plain file name"),
    ("Male Young\n1.jpg 1 1\n", r"line 1: expected the number of images"),
])
def test_attribute_file_errors_name_the_line(tmp_path, text, pattern):
    (tmp_path / "attr.txt").write_text(text)
    with pytest.raises(ValueError, match=pattern):
        data.read_attribute(tmp_path / "attr.txt", "Male")


def _two_line_folder(tmp_path, file_name):
    return _folder(tmp_path / "d", [{"file_name": "a.png", "text": "t", "group": 0},
                                    {"file_name": file_name, "text": "t", "group": 1}],
                   {"a.png": Image.new("RGB", (8, 8))})


@pytest.mark.parametrize("file_name", ["../outside.png", "sub/../../outside.png", "{outside}", "/etc/passwd",
                                       "/no/such/file.png", "link.png", "linkdir/a.png"])
def test_file_names_that_leave_the_data_folder_are_refused_before_any_image_is_opened(tmp_path, monkeypatch,
                                                                                      file_name):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "outside.png")  # a real image, beside the folder
    root = _two_line_folder(tmp_path, file_name.format(outside=tmp_path / "outside.png"))
    (root / "sub").mkdir()
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    (root / "linkdir").symlink_to(tmp_path)
    opened = []
    monkeypatch.setattr(data.Image, "open", lambda *a, **k: opened.append(a) or pytest.fail("an image was opened"))
    with pytest.raises(ValueError, match=r"metadata.jsonl, line 2: field 'file_name' .* lies outside the data folder"):
        data.ImageFolder(root, 8)
    assert opened == []


@pytest.mark.parametrize("file_name", ["a.png", "./a.png", "sub/../a.png"])
def test_an_image_listed_twice_with_two_groups_is_refused_naming_both_lines(tmp_path, file_name):
    """Line 2 gives a.png of line 1 another group: one image trained as both 0 and 1. Listed twice with one group,
    or once without a label (two captions of one image), it reads."""
    root = _two_line_folder(tmp_path, file_name)
    (root / "sub").mkdir()
    with pytest.raises(ValueError, match=rf"metadata.jsonl, line 2: field 'file_name' {re.escape(repr(file_name))} "
                                         r"has group 1 here but 0 on line 1; an image has one group$"):
        data.ImageFolder(root, 8)
    rows = [{"file_name": "a.png", "text": "a red square", "group": 0},
            {"file_name": file_name, "text": "red", "group": 0},
            {"file_name": file_name, "text": "a square", "group": None},
            {"file_name": "b.png", "text": "", "group": 1}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Image.new("RGB", (8, 8)).save(root / "b.png")
    assert data.ImageFolder(root, 8).groups == [0, 0, -1, 1]


def test_file_names_inside_the_folder_through_subfolders_and_symlinks_are_read(tmp_path):
    root = _two_line_folder(tmp_path, "sub/../inner/link.png")
    (root / "inner").mkdir()
    (root / "sub").mkdir()
    Image.new("RGB", (8, 8), "white").save(root / "inner" / "b.png")
    (root / "inner" / "link.png").symlink_to(root / "inner" / "b.png")
    ds = data.ImageFolder(root, 8)
    assert torch.allclose(ds[1]["pixels"], torch.ones(3, 8, 8))


def test_metadata_that_is_not_utf8_or_not_a_file_is_named_with_its_line(tmp_path):
    root = _folder(tmp_path / "d", [{"file_name": "a.png", "text": "t", "group": 0}],
                   {"a.png": Image.new("RGB", (8, 8))})
    with open(root / "metadata.jsonl", "ab") as f:
        f.write(b'\n{"file_name": "a.png", "text": "caf\xe9", "group": 1}\n')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"metadata.jsonl, line 2: not UTF-8 text \(byte 0xe9"):
        data.ImageFolder(root, 8)
    (root / "metadata.jsonl").unlink()
    (root / "metadata.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"cannot read .*metadata.jsonl: Is a directory"):
        data.ImageFolder(root, 8)


def test_an_image_path_that_is_a_folder_is_named_as_such(tmp_path):
    root = _two_line_folder(tmp_path, "b.png")
    (root / "b.png").mkdir()
    with pytest.raises(ValueError, match=r"line 2: field 'file_name': .*b.png is a folder, not an image"):
        data.ImageFolder(root, 8)


def test_unreadable_metadata_reports_the_systems_reason(tmp_path, monkeypatch):
    root = _two_line_folder(tmp_path, "a.png")

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(data.Path, "read_bytes", denied)  # tests run as root, where chmod 000 does not bite
    with pytest.raises(ValueError, match=r"cannot read .*metadata.jsonl: Permission denied"):
        data.ImageFolder(root, 8)


# 16-bit and other modes: mid-grey 40000/65535 must load as 156/255 (40000/257, rounded), not clip to white
def _saved(tmp_path, img, name):
    img.save(tmp_path / name)
    return tmp_path / name


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    grey16 = Image.fromarray(np.full((4, 4), 40000, np.uint16))
    assert grey16.mode == "I;16"
    for name in ("g.png", "g.tif"):
        got = np.asarray(data.open_image(_saved(tmp_path, grey16, name)))
        assert got.shape == (4, 4, 3) and (got == 156).all(), name
    big = Image.fromarray(np.full((4, 4), 40000, np.int32))  # mode I: what 32-bit integer TIFFs open as
    assert big.mode == "I"
    assert (np.asarray(data.open_image(_saved(tmp_path, big, "i.tif"))) == 156).all()
    assert (np.asarray(data.open_image(_saved(tmp_path, Image.fromarray(np.full((4, 4), 65535, np.uint16)),
                                            "w.png"))) == 255).all()


def test_modes_without_a_known_range_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"mode I .*values from -5 to 70000.*0\.\.65535"):
        data.open_image(_saved(tmp_path, Image.fromarray(np.array([[-5, 70000]], np.int32)), "i.tif"))
    with pytest.raises(ValueError, match=r"mode F \(32-bit floating point\)"):
        data.open_image(_saved(tmp_path, Image.fromarray(np.full((4, 4), 0.5, np.float32)), "f.tif"))
    # and in a data folder, with its line
    root = _two_line_folder(tmp_path, "f.tif")
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(root / "f.tif")
    with pytest.raises(ValueError, match=r"line 2: field 'file_name': cannot read image .*f.tif \(.*mode F"):
        data.ImageFolder(root, 8)


def test_alpha_palette_and_cmyk_images_convert_to_the_expected_rgb(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (100, 255))  # opaque grey
    la.putpixel((1, 0), (100, 0))  # transparent: the white background
    assert np.asarray(data.open_image(_saved(tmp_path, la, "la.png"))).tolist() == [[[100] * 3, [255] * 3]]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255, 255, 0, 0])
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0  # index 0 (blue) is transparent
    assert np.asarray(data.open_image(_saved(tmp_path, pal, "p.png"))).tolist() == [[[255] * 3, [255, 0, 0]]]
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))  # no ink: white
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # full cyan
    assert np.asarray(data.open_image(_saved(tmp_path, cmyk, "c.tif"))).tolist() == [[[255] * 3, [0, 255, 255]]]



@pytest.mark.parametrize("name", ["photo.png", "photo.jpg"])
def test_a_photo_with_an_exif_orientation_is_read_upright_as_viewers_show_it(tmp_path, name):
    """Cameras store a portrait photo as landscape pixels and an EXIF Orientation tag; every viewer shows it turned.
    Read without the tag, the model trained on (and the judge scored) the photo on its side."""
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16, 0] = 255  # left half red, right half blue, as stored
    stored[:, 16:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: turn 90 degrees clockwise to show: red on top, blue below
    root = _two_line_folder(tmp_path, name)
    Image.fromarray(stored).save(root / name, exif=exif)
    got = np.asarray(data.open_image(root / name), np.float64)
    assert got.shape == (32, 16, 3)  # portrait, as shown
    assert got[:14, :, 0].min() > 200 and got[:14, :, 2].max() < 60  # top: red
    assert got[18:, :, 2].min() > 200 and got[18:, :, 0].max() < 60  # bottom: blue
    square = (data.ImageFolder(root, 8)[1]["pixels"] + 1) * 127.5  # train.py's centre square: red above blue
    assert square[0, :3].min() > 200 and square[2, :3].max() < 60 and square[2, 5:].min() > 200


def test_a_grey_or_rgb_png_with_a_transparent_colour_is_composited_over_white(tmp_path):
    """A tRNS chunk makes one grey level or one RGB colour transparent, as a palette's index can be: over white too."""
    grey = Image.new("L", (2, 1), 0)
    grey.putpixel((1, 0), 100)
    grey.save(tmp_path / "g.png", transparency=0)
    assert np.asarray(data.open_image(tmp_path / "g.png")).tolist() == [[[255] * 3, [100] * 3]]
    rgb = Image.new("RGB", (2, 1), (0, 0, 0))
    rgb.putpixel((1, 0), (10, 20, 30))
    rgb.save(tmp_path / "c.png", transparency=(0, 0, 0))
    assert np.asarray(data.open_image(tmp_path / "c.png")).tolist() == [[[255] * 3, [10, 20, 30]]]
    bits = Image.new("1", (2, 1), 0)  # a 1-bit PNG's black made transparent: it stayed black
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "b.png", transparency=0)
    assert np.asarray(data.open_image(tmp_path / "b.png")).tolist() == [[[255] * 3, [255] * 3]]


def _tiny_vae(folder):
    """A random tiny VAE written as a diffusers vae/ folder (random weights still map dark and bright apart)."""
    from safetensors.torch import save_file
    from vae import VAE, VAEConfig, vae_diffusers_config, vae_to_diffusers
    cfg = VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, num_groups=4)
    torch.manual_seed(0)
    vae = VAE(cfg)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in vae_to_diffusers(vae.state_dict(), cfg).items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(vae_diffusers_config(cfg)))
    return folder


def test_cluster_folder_gives_unlabelled_images_groups_of_free_size(tmp_path):
    """`data.py clusters` (ours): 24 dark and 6 bright images, half of them labelled, become two clusters of 24
    and 6; captions and labels are kept, the images copied, and train.py's ImageFolder reads the groups."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for k in range(30):
        bright = k % 5 == 0
        pixels = rng.integers(200, 256, (16, 16, 3)) if bright else rng.integers(0, 40, (16, 16, 3))
        name = f"sub/{k:02d}.png" if k < 3 else f"{k:02d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(src / name)
        rows.append({"file_name": name, "text": f"caption {k}", "group": ("bright" if bright else "dark")
                     if k % 2 else None})
    (src / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    vae = _tiny_vae(tmp_path / "vae")
    out = data.main(["clusters", "--data", str(src), "--vae", str(vae), "--k", "2", "--resolution", "16",
                     "--out", str(tmp_path / "out")])
    written = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [w["file_name"] for w in written] == [r["file_name"] for r in rows]
    assert [w["text"] for w in written] == [r["text"] for r in rows]
    assert [w["label"] for w in written] == [r["group"] for r in rows]
    bright = {w["group"] for k, w in enumerate(written) if k % 5 == 0}
    dark = {w["group"] for k, w in enumerate(written) if k % 5}
    assert len(bright) == 1 and len(dark) == 1 and bright != dark  # 6 and 24: the small group keeps its cluster
    assert all((out / r["file_name"]).read_bytes() == (src / r["file_name"]).read_bytes() for r in rows)
    dataset = data.ImageFolder(out, 16)
    assert dataset.group_names == ["cluster0", "cluster1"] and sorted(np.bincount(dataset.groups)) == [6, 24]
    with pytest.raises(SystemExit, match=r"metadata.jsonl exists; pass --overwrite"):
        data.main(["clusters", "--data", str(src), "--vae", str(vae), "--k", "2", "--resolution", "16",
                   "--out", str(out)])
    with pytest.raises(SystemExit, match=r"is its own source"):
        data.main(["clusters", "--data", str(src), "--vae", str(vae), "--k", "2", "--resolution", "16",
                   "--out", str(src), "--overwrite"])
    assert (src / "metadata.jsonl").read_text().splitlines()[0] == json.dumps(rows[0])  # untouched
    with pytest.raises(SystemExit, match=r"data.py: error: k must lie in \[2, 30\]"):
        data.main(["clusters", "--data", str(src), "--vae", str(vae), "--k", "1", "--resolution", "16",
                   "--out", str(tmp_path / "k1")])


def test_an_out_through_a_missing_folder_and_dotdot_is_refused_before_it_can_overwrite(tmp_path):
    """--out missing/../built: its metadata.jsonl and images looked absent (missing is not there), so a finished
    build was rebuilt without --overwrite."""
    built = tmp_path / "built"
    data.main(["digits", "--counts", "7=2", "--resolution", "16", "--out", str(built)])
    before = {p.name: p.read_bytes() for p in built.iterdir()}
    with pytest.raises(SystemExit, match=rf"{tmp_path / 'missing'} does not exist, so '\.\.' after it"):
        data.main(["digits", "--counts", "7=3", "--resolution", "16", "--out", str(tmp_path / "missing/../built")])
    assert {p.name: p.read_bytes() for p in built.iterdir()} == before and not (tmp_path / "missing").exists()


def test_clusters_refuses_an_out_it_cannot_write_before_the_vae_loads_or_encodes_an_image(tmp_path, monkeypatch):
    """--out was checked only after every image had gone through the VAE (minutes for SD at 512 px): a finished
    build without --overwrite, a folder holding the user's own files or a file as --out are refused first."""
    rows = [{"file_name": f"{k}.png", "text": "", "group": None} for k in range(4)]
    src = _folder(tmp_path / "src", rows, {f"{k}.png": Image.new("RGB", (16, 16), (60 * k, 0, 0)) for k in range(4)})
    built = _folder(tmp_path / "built", rows[:1])  # a finished build: its metadata.jsonl
    theirs = _folder(tmp_path / "theirs", [], {"2.png": Image.new("RGB", (16, 16), "white")})
    (theirs / "metadata.jsonl").unlink()
    (tmp_path / "file").write_text("mine")
    monkeypatch.setattr(data, "load_vae", lambda path: pytest.fail("the VAE loaded before --out was checked"))
    for out, message in ((built, r"metadata.jsonl exists; pass --overwrite"),
                         (theirs, r"theirs/2.png exists and no metadata.jsonl of a previous build lists it"),
                         (tmp_path / "file", r"file exists and is not a folder")):
        with pytest.raises(SystemExit, match=rf"^data\.py: error: .*{message}"):
            data.main(["clusters", "--data", str(src), "--vae", "none", "--k", "2", "--resolution", "16",
                       "--out", str(out)])
    assert (theirs / "2.png").exists() and (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("k", ["1", "5"])
def test_clusters_refuses_a_k_the_images_cannot_hold_before_the_vae_loads(k, tmp_path, monkeypatch):
    """--k 1, or more clusters than images, was refused by fit_clusters after every image had gone through the VAE."""
    rows = [{"file_name": f"{j}.png", "text": "", "group": None} for j in range(4)]
    src = _folder(tmp_path / "src", rows, {f"{j}.png": Image.new("RGB", (16, 16), (60 * j, 0, 0)) for j in range(4)})
    monkeypatch.setattr(data, "load_vae", lambda path: pytest.fail("the VAE loaded before --k was checked"))
    message = rf"^data\.py: error: k must lie in \[2, 4\] \(the number of images\), got {k}$"
    with pytest.raises(SystemExit, match=message):
        data.main(["clusters", "--data", str(src), "--vae", "none", "--k", k, "--resolution", "16",
                   "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_clusters_refuses_more_dims_than_the_latents_have_instead_of_taking_fewer(tmp_path, monkeypatch):
    """--dims past the principal components the latents have (at most one per image, and per latent number) was
    cut to that many without a word: more images than dims is checked before the VAE loads, the latent's size
    when it is known."""
    rows = [{"file_name": f"{j}.png", "text": "", "group": None} for j in range(70)]
    images = {f"{j}.png": Image.new("RGB", (8, 8), (3 * j, 255 - 3 * j, j % 7 * 30)) for j in range(70)}
    src = _folder(tmp_path / "src", rows, images)
    with monkeypatch.context() as m:
        m.setattr(data, "load_vae", lambda path: pytest.fail("the VAE loaded before --dims was checked"))
        with pytest.raises(SystemExit, match=r"^data\.py: error: dims must lie in \[1, 70\] \(the number of images\), "
                                             r"got 71$"):
            data.main(["clusters", "--data", str(src), "--vae", "none", "--k", "2", "--dims", "71", "--resolution",
                       "8", "--out", str(tmp_path / "out")])
    vae = _tiny_vae(tmp_path / "vae")  # 8 px -> latents of 4 x 4 x 4 = 64 numbers
    with pytest.raises(SystemExit, match=r"^data\.py: error: dims must be at most 64, the numbers in one latent at "
                                         r"resolution 8, got 65$"):
        data.main(["clusters", "--data", str(src), "--vae", str(vae), "--k", "2", "--dims", "65", "--resolution",
                   "8", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_folders_built_with_link_are_read_and_clustered_and_a_link_elsewhere_still_is_not(celeba, tmp_path):
    """--link writes symlinks to the sources, outside the folder on purpose; the line's `source` names the target.
    A link whose line names no such source, or another one, still lies outside the folder."""
    folder, attributes = celeba
    linked = _build(folder, attributes, tmp_path / "linked", "--counts", "6,6", "--link")
    dataset = data.ImageFolder(linked, 16)
    assert dataset.group_names == ["Male", "not Male"] and len(dataset) == 12
    vae = _tiny_vae(tmp_path / "vae")
    for source in (linked, _build(folder, attributes, tmp_path / "copied", "--counts", "6,6")):
        out = data.main(["clusters", "--data", str(source), "--vae", str(vae), "--k", "2", "--resolution", "16",
                         "--out", str(tmp_path / f"clusters-of-{source.name}"), "--link"])
        clustered = data.ImageFolder(out, 16)
        assert clustered.names == data.ImageFolder(source, 16).names == dataset.names  # same names, same order
        assert all((out / name).is_symlink() for name in clustered.names)
        assert [p.read_bytes() for p in clustered.files] == [p.read_bytes() for p in dataset.files]
    rows = [json.loads(line) for line in (linked / "metadata.jsonl").read_text().splitlines()]
    for row in ({k: v for k, v in rows[1].items() if k != "source"}, {**rows[1], "source": rows[2]["source"]}):
        (linked / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in [rows[0], row]) + "\n")
        with pytest.raises(ValueError, match=r"metadata.jsonl, line 2: field 'file_name' .* lies outside the data "
                                             r"folder"):
            data.ImageFolder(linked, 16)


@pytest.mark.parametrize("argv, message", [
    (["clusters", "--dims", "-1"], "--dims must be >= 1, got -1"),  # it kept all components but the last
    (["clusters", "--dims", "0"], "--dims must be >= 1, got 0"),
    (["clusters", "--resolution", "12"], "--resolution must be a positive multiple of 8"),
    (["clusters", "--seed", "-1"], "--seed must be between 0 and"),
    (["celeba", "--seed", "-1"], "--seed must be between 0 and"),
])
def test_data_py_flags_out_of_range_are_refused_before_anything_is_read(tmp_path, capsys, argv, message):
    required = {"clusters": ["--data", str(tmp_path / "none"), "--vae", str(tmp_path / "none"), "--k", "2"],
                "celeba": ["--images", str(tmp_path / "none"), "--attributes", str(tmp_path / "none"),
                           "--attribute", "Male", "--counts", "1,1", "--prompt", "p"]}[argv[0]]
    with pytest.raises(SystemExit) as e:
        data.main([argv[0], *required, "--out", str(tmp_path / "out"), *argv[1:]])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_attribute_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    (tmp_path / "attr.txt").write_bytes(b"1\nMale Young\ncaf\xe9.jpg 1 1\n")  # Latin-1
    with pytest.raises(ValueError, match=r"attr.txt, line 3: not UTF-8 text \(byte 0xe9"):
        data.read_attribute(tmp_path / "attr.txt", "Male")


def test_a_folder_of_attribute_groups_is_clustered_keeping_each_group_object_as_its_label(tmp_path):
    groups = [{"colour": "red", "width": "thin"}, None, {"colour": "green", "width": None}]
    rows = [{"file_name": f"{k}.png", "text": "", "group": groups[k % 3]} for k in range(8)]
    src = _folder(tmp_path / "src", rows, {f"{k}.png": Image.new("RGB", (16, 16), (30 * k, 0, 0)) for k in range(8)})
    out = data.main(["clusters", "--data", str(src), "--vae", str(_tiny_vae(tmp_path / "vae")), "--k", "2",
                     "--resolution", "16", "--out", str(tmp_path / "out")])
    assert [json.loads(line)["label"] for line in (out / "metadata.jsonl").read_text().splitlines()] == \
        [r["group"] for r in rows]


@pytest.mark.parametrize("values, attribute, message", [
    ((("x+y", "z"), ("x", "y+z"), ("p", "q")), "a+b", r"attribute 'a' has the value 'x\+y', whose '\+' could "
                                                       r"merge intersections in --attribute a\+b"),
    ((("red", 1), ("blue", 2), (2, 1)), "a", r"attribute 'a' takes ints and strings \('red' and 2\)"),
])
def test_attribute_values_that_would_merge_or_cannot_be_ordered_are_one_line(values, attribute, message, tmp_path):
    rows = [{"file_name": f"{k}.png", "text": "", "group": {"a": a, "b": b}} for k, (a, b) in enumerate(values * 2)]
    src = _folder(tmp_path / "src", rows, {r["file_name"]: Image.new("RGB", (16, 16)) for r in rows})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(src / 'metadata.jsonl'))}: {message}"):
        data.ImageFolder(src, 16, attribute=attribute)


def test_clustering_identical_images_is_one_line_naming_the_folder(tmp_path):
    src = _folder(tmp_path / "src", [{"file_name": f"{k}.png", "text": "", "group": None} for k in range(6)],
                  {f"{k}.png": Image.new("RGB", (16, 16), (90, 90, 90)) for k in range(6)})
    vae = _tiny_vae(tmp_path / "vae")
    with pytest.raises(SystemExit) as e:
        data.main(["clusters", "--data", str(src), "--vae", str(vae), "--k", "2", "--resolution", "16", "--out",
                   str(tmp_path / "out")])
    assert str(e.value).startswith(f"data.py: error: {src}: its 6 images have 1 distinct latent") and \
        "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_text_file_saved_with_a_byte_order_mark_reads_as_without_it(tmp_path):
    """Windows Notepad starts UTF-8 files with U+FEFF: it is not part of the first prompt or the first JSON line."""
    (tmp_path / "prompts.txt").write_bytes(b"\xef\xbb\xbfa red square\nblue\n")
    assert data.text_lines(tmp_path / "prompts.txt") == [(1, "a red square"), (2, "blue")]
    rows = [{"file_name": "a.png", "text": "x", "group": "red"}, {"file_name": "b.png", "text": "y", "group": "blue"}]
    folder = _folder(tmp_path / "f", rows, {"a.png": Image.new("RGB", (16, 16)), "b.png": Image.new("RGB", (16, 16))})
    (folder / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + (folder / "metadata.jsonl").read_bytes())
    assert data.ImageFolder(folder, 16).texts == ["x", "y"]


def test_a_rebuild_with_overwrite_replaces_only_same_named_files_and_reads_the_list_as_the_folder_does(tmp_path,
                                                                                                    digits):
    """A metadata.jsonl may be the user's own (the README's data format), so --overwrite replaces only the files the
    new build writes under names it lists, and deletes nothing else; "./b.png" in the list is the file b.png (it was
    refused as a file no list names)."""
    images, _ = digits
    sources, out = tmp_path / "src", tmp_path / "mine"
    sources.mkdir()
    out.mkdir()
    for name in ("a.png", "b.png"):
        data.digit_image(images[0]).save(sources / name)
        data.digit_image(images[1]).save(out / name)
    (out / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "", "group": 1}\n'
                                        '{"file_name": "./b.png", "text": "", "group": 2}\n')
    data.write_folder(out, [(sources / "b.png", "b.png", {"text": "", "group": 1})], overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "metadata.jsonl"]
    assert (out / "b.png").read_bytes() == (sources / "b.png").read_bytes()

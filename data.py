"""Data: the shipped MNIST digits, biased sets drawn from them or from CelebA-style labels, and train.py's folder.

A data set is a folder of images with a `metadata.jsonl`, one JSON object a line (the Hugging Face imagefolder
convention): {"file_name": "00000.png", "text": "a photo of a digit", "group": 7}. `file_name` stays inside the
folder (`--link` symlinks point to the line's `source`); `text` is the caption ("" the empty prompt); `group` an
int or a str (one type per file; not blank, no space at either end), or null for an image without a label; groups
are sorted and numbered 0..K-1 (`ImageFolder.group_names`), null is -1. Other fields are ignored. Groups label
images, never prompt words.

    python data.py celeba --images DIR --attributes list_attr_celeba.txt --attribute Male --counts 800,200
                          --prompt "a photo of a face" --out my_data/      (CelebA's attribute-file format)
    python data.py clusters --data my_data/ --vae sd-v1-5/ --k 3 --out my_data_clusters/   (ours: no labels)
    python data.py digits --counts 7=360,8=40 --out my_digits/     (the shipped digits' training split, 9 : 1)

The shipped digits (assets/digits/, source and licence in its README) are 5,000 real MNIST digits, 500 a class.
`clusters` gives a folder's images clusters of their VAE latents as groups (ddm.fit_clusters).
"""

import argparse
import contextlib
import gzip
import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

import cli
import ddm
import weights
from vae import load_vae

DIGITS_PATH = Path(__file__).resolve().parent / "assets" / "digits" / "mnist_5k.csv.gz"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------------------------
# The shipped digits

def load_digits(path=DIGITS_PATH):
    """Read the shipped digits -> (images uint8 (N,28,28), labels int64 (N,)) as numpy arrays, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"digit file {path} not found (it ships with the repository in assets/digits/)")
    with gzip.open(path, "rb") as f:
        text = f.read()
    rows = text.count(b"\n") + (not text.endswith(b"\n"))
    # one flat parse of the CSV (10x faster than np.loadtxt); the row count guards against ragged lines. The file
    # ships with the code (no flag names another), so a bad one is a broken checkout: asserted
    values = np.fromstring(text.replace(b"\n", b","), dtype=np.int64, sep=",")
    assert rows and values.size == rows * (28 * 28 + 1), \
        f"{path}: expected {rows} rows of 785 integers (28x28 pixels + label), got {values.size} values"
    table = values.reshape(rows, 28 * 28 + 1)
    assert table.min() >= 0 and table[:, :-1].max() <= 255 and table[:, -1].max() <= 9, \
        f"{path}: pixels must lie in 0..255 and labels in 0..9"
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    return images, table[:, -1].copy()


def split_digits(seed=0, heldout_per_class=100, labels=None):
    """Deterministic train / held-out split -> (train_idx, heldout_idx), sorted int64 index arrays, disjoint.

    `heldout_per_class` digits of every class are drawn at random (numpy Generator seeded by `seed`) and kept out
    of everything that trains (the classifier, the diffusion models); they serve only for evaluation. `labels`
    defaults to those of `load_digits()`.
    """
    labels = load_digits()[1] if labels is None else np.asarray(labels)
    rng = np.random.default_rng(seed)
    heldout = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        assert 0 <= heldout_per_class < len(members), f"heldout_per_class={heldout_per_class}: class {c} has " \
                                                      f"{len(members)}"
        heldout.append(rng.permutation(members)[:heldout_per_class])
    heldout = np.sort(np.concatenate(heldout)).astype(np.int64)
    train = np.setdiff1d(np.arange(len(labels)), heldout).astype(np.int64)
    return train, heldout


def digit_image(image, resolution=32, colour=None):
    """One 28x28 uint8 digit -> an RGB PIL image of `resolution` px (bicubic), the form generated images take: in
    white ink, or in the ink colour `colour` (COLOURS) on black."""
    img = Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L")
    if resolution != img.width:
        img = img.resize((resolution, resolution), Image.BICUBIC)
    if colour is None:
        return img.convert("RGB")
    return Image.fromarray((np.asarray(img.convert("RGB"), np.float64) * COLOURS[colour]).round().astype(np.uint8))


def make_digit_folder(out_dir, images, labels, counts, *, indices=None, resolution=32,
                      prompt="a photo of a digit", seed=0, overwrite=False, labelled=1.0, flag="overwrite=True"):
    """Write an image-folder data set of digits with exactly `counts[digit]` images of each digit -> its path.

    images, labels: the arrays of `load_digits()`. indices: the pool to draw from (e.g. the train indices of
    `split_digits`, so held-out digits never reach training); default all. counts: {digit: how many}, e.g.
    {7: 450, 8: 50} for the paper-style 9 : 1 bias; drawn without replacement, so a count above the pool's
    supply of that digit is an error. prompt: the caption, a str or a function digit -> str (per-group prompts).
    labelled: the share of each digit's images that keep their group; the others get "group": null (at least one
    image per digit stays labelled). Each line of `metadata.jsonl` also records `source_index` (the row in
    `load_digits()` order) and the `digit` itself, for auditing. flag: what a refusal to rebuild names (a CLI's
    --overwrite).
    """
    images, labels = np.asarray(images), np.asarray(labels)
    assert images.ndim == 3 and len(images) == len(labels) and counts, "images (N,H,W), one label each, counts"
    pool = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = []
    for digit, n in sorted(counts.items()):
        members = pool[labels[pool] == digit]
        assert 0 <= n <= len(members), f"asked for {n} images of digit {digit!r} but the pool holds only {len(members)}"
        chosen.append(rng.permutation(members)[:n])
    keep = {int(i) for c in chosen for i in c[:max(1, round(labelled * len(c)))]}  # stratified: per digit
    chosen = rng.permutation(np.concatenate(chosen))  # groups interleaved, not in blocks
    caption = prompt if callable(prompt) else lambda digit: prompt
    entries = [(lambda i=i: digit_image(images[i], resolution), f"{k:05d}.png",
                {"text": caption(d), "group": d if i in keep else None, "digit": d, "source_index": i})
               for k, (i, d) in enumerate(zip(chosen.tolist(), labels[chosen].tolist()))]
    return write_folder(out_dir, entries, overwrite=overwrite, flag=flag)


# Two attributes the caption never names (ours): ink colour (synthetic: a pixel rule, red > green, tells them apart
# exactly) and stroke width (natural: thin or thick against the median ink mass of the digit's own class)
COLOURS = {"green": (0.0, 1.0, 0.0), "red": (1.0, 0.0, 0.0)}  # ink on black


def ink_mass(images):
    """Stroke mass of digit images uint8 (N, H, W, 3): each pixel's brightest channel summed, / 255; the same for
    white, red or green ink."""
    return np.asarray(images, dtype=np.float64).max(-1).sum((1, 2)) / 255


def digit_images(images, indices, resolution=32, colours=None):
    """The shipped digits at `indices` as the folders hold them and generated images look: uint8 (N, R, R, 3), in
    white ink, or digit k in the ink colour colours[k] (COLOURS)."""
    colours = [None] * len(indices) if colours is None else colours
    return np.stack([np.asarray(digit_image(images[i], resolution, c)) for i, c in zip(indices, colours)])


def ink_masses(images, indices, resolution=32):
    """The ink mass of each shipped digit at `indices` (N,), rendered at `resolution` as the folders hold them."""
    return ink_mass(digit_images(images, indices, resolution))


def width_thresholds(masses, labels):
    """{digit: the median of `masses` over its digits}, `labels` the digits' classes: thin below, thick above."""
    return {int(d): float(np.median(masses[labels == d])) for d in np.unique(labels)}


def make_attribute_digits(out_dir, images, labels, counts, prompt, *, indices, resolution=32, seed=0, labelled=1.0,
                          overwrite=False):
    """A data folder of digits with two attributes the caption never names, exactly `counts` = {digit: {(colour,
    width): n}} of each intersection -> its path. The width is the digit's own (thin: ink mass at or below its
    class median among `indices`), drawn without replacement; the colour is painted. metadata.jsonl: "group":
    {"colour", "width"} on a `labelled` share of the images of every intersection of every digit (at least one),
    null values on the others; the true "digit", "colour", "width" and "source_index" beside it for auditing; the
    caption prompt(digit)."""
    rng = np.random.default_rng(seed)
    masses = ink_masses(images, indices, resolution)
    thresholds, mass = width_thresholds(masses, labels[indices]), dict(zip(indices.tolist(), masses))
    rows = []
    for digit in sorted(counts):
        pools = {w: rng.permutation([i for i in indices if labels[i] == digit
                                     and (mass[i] > thresholds[digit]) == (w == "thick")]).tolist()
                 for w in ("thin", "thick")}
        for (colour, width), n in sorted(counts[digit].items()):
            assert n <= len(pools[width]), f"{n} {width} {digit}s asked, the pool holds {len(pools[width])}"
            rows += [{"digit": digit, "colour": colour, "width": width, "source_index": pools[width].pop()}
                     for _ in range(n)]
    for key in sorted({(r["digit"], r["colour"], r["width"]) for r in rows}):  # each intersection keeps its share
        members = [r for r in rows if (r["digit"], r["colour"], r["width"]) == key]
        n_labelled = max(1, round(labelled * len(members)))  # the first n of a shuffled pool: a random choice
        rng.permutation(len(members))  # draws nothing used; kept so the RNG stream, and the data built, stay the same
        for k, r in enumerate(members):
            r["group"] = {a: r[a] for a in ("colour", "width")} if k < n_labelled else {"colour": None, "width": None}
    rows = [{"text": prompt(r["digit"]), **r} for r in rng.permutation(rows).tolist()]  # groups interleaved
    entries = [(lambda r=r: digit_image(images[r["source_index"]], resolution, r["colour"]), f"{k:05d}.png", r)
               for k, r in enumerate(rows)]
    return write_folder(out_dir, entries, overwrite=overwrite, flag="overwrite=True")


# ----------------------------------------------------------------------------------------------------------------
# Biased sets of real images, labelled in CelebA's attribute-file format

def read_attribute(path, attribute):
    """One column of an attribute file in CelebA's format -> list of (line number, file name, +1 or -1).

    The format of CelebA's list_attr_celeba.txt (and CelebAMask-HQ's CelebAMask-HQ-attribute-anno.txt): line 1
    the number of images, line 2 the attribute names, then one line per image, `file_name` followed by one 1 or -1
    per attribute, separated by any run of spaces. Errors name the file and the line.
    """
    path = weights.existing_file(path, "attribute file")
    lines = [line for _, line in text_lines(path)]
    if len(lines) < 2 or not lines[0].strip().isdecimal():
        raise ValueError(f"{path}, line 1: expected the number of images, then a line of attribute names "
                         f"(CelebA's list_attr_celeba.txt format), got {lines[0][:60] if lines else ''!r}")
    names = lines[1].split()
    if attribute not in names:
        raise ValueError(f"{path} has no attribute {attribute!r}; its {len(names)} attributes are "
                         f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    column, rows, seen = names.index(attribute) + 1, [], {}
    for lineno, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        name, why = fields[0], None
        if len(fields) != len(names) + 1 or fields[column] not in ("1", "-1"):
            why = (f"expected a file name and {len(names)} values of 1 or -1 ({attribute} the {column}th), got "
                   f"{line[:80]!r}")
        elif Path(name).name != name or "\\" in name or name in (".", ".."):
            why = f"{name!r} is not a plain file name"
        elif name in seen:
            why = f"{name} is listed twice (first on line {seen[name]})"
        if why:
            raise ValueError(f"{path}, line {lineno}: {why}")
        seen[name] = lineno
        rows.append((lineno, name, int(fields[column])))
    if len(rows) != int(lines[0]):
        raise ValueError(f"{path}: line 1 says {int(lines[0])} images but {len(rows)} image lines follow")
    return rows


def make_attribute_folder(out_dir, images_dir, attribute_file, attribute, counts, prompt, *, group_names=None,
                          seed=0, link=False, overwrite=False):
    """Write a data folder (the format above) of `counts = (with, without)` images that have (1) and lack (-1)
    `attribute`, drawn at random (numpy, seeded) from those `attribute_file` lists -> its path.

    Groups are named `group_names = (with, without)`, by default (attribute, "not " + attribute), e.g. "Male" and
    "not Male"; every caption is `prompt`. Every source is checked before anything is written; write_folder then
    copies them (or links, link=True; overwrite as there) under their own names, and each metadata line records its
    image's source path and attribute-file line.
    """
    images_dir = Path(images_dir)
    with_name, without_name = group_names or (attribute, f"not {attribute}")
    why = next(filter(None, (group_name_error(n, ",=:+") for n in (with_name, without_name))), None)
    if why or with_name == without_name:
        raise ValueError(why or f"the two groups need different names, got {with_name!r} twice")
    if len(counts) != 2 or not all(map(weights.is_int, counts)):
        raise ValueError(f"counts must be two positive ints (with, without the attribute), got {counts!r}")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder {images_dir} does not exist")
    rows = read_attribute(attribute_file, attribute)
    rng = np.random.default_rng(seed)
    chosen = []
    for n, value, group in ((counts[0], 1, with_name), (counts[1], -1, without_name)):
        pool = [r for r in rows if r[2] == value]
        if n > len(pool):
            raise ValueError(f"asked for {n} images with {attribute} = {value} but {attribute_file} lists only "
                             f"{len(pool)}")
        chosen += [(pool[i], group) for i in rng.permutation(len(pool))[:n]]
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]  # groups interleaved, not in blocks
    for (lineno, name, _), _ in chosen:
        if not (images_dir / name).is_file():
            raise FileNotFoundError(f"image {images_dir / name} not found (listed in {attribute_file}, line {lineno})")

    entries = [(images_dir / name, name, {"text": prompt, "group": group,
                                          "source": str((images_dir / name).resolve()), "attribute_line": lineno})
               for (lineno, name, _), group in chosen]
    return write_folder(out_dir, entries, link=link, overwrite=overwrite)


def listed_files(meta):
    """The files a metadata.jsonl lists inside its folder, as `within` gives them (so "./a.png" is "a.png"; lines
    without a file_name skipped)."""
    return {line_file(meta.parent, line) for _, line in text_lines(meta)} - {None}


def line_file(folder, line):
    """The file a metadata.jsonl line lists inside `folder` (`within`), or None: no JSON object with a file_name."""
    with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
        return within(folder, json.loads(line)["file_name"])


def within(out_dir, name):
    """out_dir/name with its folders resolved (the file itself, not what a link points to), or None if it lies
    outside out_dir."""
    with contextlib.suppress(OSError, ValueError, RuntimeError, TypeError):  # a NUL, a link loop, not a str
        target = (out_dir / name).parent.resolve() / Path(name).name
        return target if target.is_relative_to(out_dir.resolve()) else None


UNFINISHED = "metadata.unfinished.jsonl"  # a build's metadata.jsonl lines, written before its files (write_folder)


def interrupted_error(root):
    """Why the data folder `root` cannot be read as it stands, or None: a build of it stopped half-way (write_folder's
    UNFINISHED record is there), so its images may not be the ones its metadata.jsonl describes."""
    if not (Path(root) / UNFINISHED).is_file():
        return None
    return (f"{Path(root) / 'metadata.jsonl'}: a build of this folder was interrupted, so its images may not be the "
            f"ones this file describes, if it is there ({UNFINISHED} lists them): build it again")


def check_out_folder(out_dir, files, overwrite, flag="--overwrite"):
    """Raise unless the images `files` = [(source path or None, file_name inside out_dir)] can be written into
    `out_dir`: each name inside it and not its own source, a previous build's metadata.jsonl only with overwrite (the
    `flag` the message names), no file there that such a metadata.jsonl does not list -> the files an interrupted
    build wrote (UNFINISHED). make_cluster_folder checks before the VAE encodes; write_folder again before it writes."""
    why = cli.dotdot_error(out_dir)
    if why:
        raise ValueError(why)
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder; --out names the data folder to write")
    targets = [within(out_dir, name) for _, name in files]
    for (source, name), target in zip(files, targets):
        if target is None:
            raise ValueError(f"file_name {name!r} would lie outside {out_dir}")
        # the target is where the source points, or the source itself (a --link build rebuilt onto itself: a link)
        if source is not None and target in (Path(source).resolve(), within(Path(source).parent, Path(source).name)):
            raise ValueError(f"{out_dir / name} is its own source: write the folder somewhere else")
    meta_path, unfinished = out_dir / "metadata.jsonl", out_dir / UNFINISHED
    # files the previous build listed, or an interrupted build was writing: the only ones this one may replace
    interrupted = listed_files(unfinished) if unfinished.is_file() else set()
    if meta_path.exists() and not overwrite:
        raise FileExistsError(f"{meta_path} exists; pass {flag} to rebuild the folder")
    ours = interrupted | (listed_files(meta_path) if meta_path.exists() else set())
    taken = [name for (_, name), t in zip(files, targets) if os.path.lexists(out_dir / name) and t not in ours]
    if taken:
        raise FileExistsError(f"{out_dir / taken[0]} exists and no metadata.jsonl of a previous build lists it; "
                              "choose an empty folder")
    return interrupted


def write_folder(out_dir, entries, *, link=False, overwrite=False, flag="--overwrite"):
    """Write a data folder -> out_dir. entries: (source, file_name inside out_dir, the line's other fields); a source
    path is copied (symlinked with link=True), a source function's PIL image saved. metadata.jsonl is written last
    and atomically: a folder without it is an unfinished build, whose files UNFINISHED lists (written first, so a
    rebuild may replace them). An existing metadata.jsonl needs overwrite=True (a refusal names `flag`), and even
    then only files that it lists are replaced: nothing this code did not write is lost (`check_out_folder`)."""
    out_dir = Path(out_dir)
    interrupted = check_out_folder(out_dir, [(None if callable(s) else s, name) for s, name, _ in entries], overwrite,
                                   flag)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"file_name": name, **fields}) + "\n" for _, name, fields in entries)
    unfinished = out_dir / UNFINISHED
    weights.write_atomic(unfinished, lines)
    for source, name, _ in entries:
        target = out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)  # a link of the old build: writing onto it would write into its source
        if callable(source):
            source().save(target)
        elif link:
            target.symlink_to(Path(source).resolve())
        else:
            shutil.copyfile(source, target)
    weights.write_atomic(out_dir / "metadata.jsonl", lines)
    for path in interrupted - {within(out_dir, name) for _, name, _ in entries}:  # that build's, not written again
        path.unlink(missing_ok=True)
    unfinished.unlink()
    return out_dir


def make_cluster_folder(out_dir, data_dir, vae_path, k, *, resolution=512, dims=None, seed=0, link=False,
                        overwrite=False):
    """Ours, groups without labels: the images of the data folder `data_dir`, with "group": "cluster<j>", their
    cluster under `ddm.fit_clusters` (free sizes) of the clean latents, the VAE's posterior means at `resolution`
    -> (out_dir, cluster sizes (K,)). Each line keeps its caption, and its group, if it had one, as "label" (never
    read by training: it lets you see what the clusters found). Images are copied, or symlinked with link=True.
    `dims`: principal components clustered (None: 10, or fewer where the images or a latent have fewer)."""
    data = ImageFolder(data_dir, resolution, need_groups=None)
    n = len(data)  # at most n principal components (fit_clusters): k, dims and the folder checked before encoding
    why = (f"k must lie in [2, {n}] (the number of images), got {k}" if not 2 <= k <= n else
           f"dims must lie in [1, {n}] (the number of images), got {dims}" if (dims or 0) > n else None)
    if why:
        raise ValueError(why)
    check_out_folder(Path(out_dir), list(zip(data.files, data.names)), overwrite)
    vae = load_vae(vae_path)
    z0 = encode_dataset(vae, data, 32, "cpu")[0] * vae.config.scaling_factor  # posterior means; 32 images a batch
    distinct, size = len(torch.unique(z0.flatten(1), dim=0)), z0[0].numel()  # at most one component per number
    why = (f"{data_dir}: its {len(z0)} images have {distinct} distinct latent{'s' * (distinct > 1)} at resolution "
           f"{resolution}, fewer than the {k} clusters asked for" if distinct < k else  # covariances of 0
           f"dims must be at most {size}, the numbers in one latent at resolution {resolution}, got {dims}"
           if (dims or 0) > size else None)
    if why:
        raise ValueError(why)
    clusters, _ = ddm.fit_clusters(z0, k, dims=10 if dims is None else dims, seed=seed)  # 10: fewer where fewer exist
    rows = zip(data.files, data.names, data.texts, data.labels, clusters.tolist())
    entries = [(path, name, {"text": text, "group": f"cluster{c}", "label": label, "source": str(path)})
               for path, name, text, label, c in rows]
    return write_folder(out_dir, entries, link=link, overwrite=overwrite), torch.bincount(clusters, minlength=k)


# ----------------------------------------------------------------------------------------------------------------
# The image folder train.py reads

# Modes holding more than 8 bits a pixel. Pillow's convert() clips them to 8 bits instead of scaling (a 16-bit grey
# of 40000/65535 becomes white), so they are scaled here. Mode I (32-bit int) is what 32-bit integer TIFFs open as;
# it is read as 16-bit, its usual content, and refused past that range. Mode F (float) has no agreed range.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def open_image(path):
    """Open an image file as 8-bit RGB, upright as viewers show it (a camera's EXIF orientation applied);
    grayscale/palette are expanded, 16-bit grey is scaled by 255/65535, transparency (an alpha channel, or a
    palette's, grey level's or colour's tRNS) is composited over white. ValueError naming the file (and the mode,
    for float or out-of-range images) when it does not read."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)  # a portrait photo: stored landscape, with the turn to apply in EXIF
            if img.mode in SIXTEEN_BIT_MODES:
                values = np.asarray(img).astype(np.int64)
                if values.size and (values.min() < 0 or values.max() > 65535):
                    raise ValueError(f"mode {img.mode} image with values from {values.min()} to {values.max()}: "
                                     f"only 0..65535 (16-bit) is understood")
                return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
            if img.mode == "F":
                raise ValueError("mode F (32-bit floating point) images have no agreed pixel range; "
                                 "save it as an 8- or 16-bit image")
            if img.mode in ("P", "1", "L", "RGB") and "transparency" in img.info:
                img = img.convert("RGBA")
            if img.mode in ("RGBA", "LA", "PA"):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")
    except Exception as e:  # PIL raises several types for bad files; all mean the same here
        raise ValueError(f"cannot read image {path} ({e})") from None


def text_lines(path):
    """[(line number, text)] of a UTF-8 text file; ValueError naming the file (and the line of a byte that is not
    UTF-8) when it cannot be read."""
    try:
        raw_lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    lines = []
    for n, raw in enumerate(raw_lines, start=1):
        try:
            lines.append((n, raw.decode("utf-8-sig" if n == 1 else "utf-8")))  # a byte order mark (Notepad) is no text
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}, line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                             ) from None
    return lines


def read_prompts(path):
    """The non-blank lines of a prompts file, stripped; ValueError naming the file and line otherwise."""
    if not Path(path).is_file():
        raise ValueError(f"{path} is not a file")
    prompts = [line.strip() for _, line in text_lines(path) if line.strip()]
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return prompts


def group_name_error(name, separators=""):
    """Why `name` cannot be a group that --target (which strips the names it reads) names, or None: blank, spaces at
    its ends ("woman " beside "woman" would be a group apart), or one of `separators` in it (a folder we write)."""
    if not name.strip():
        return f"group name {name!r} is blank"
    if name != name.strip():
        return f"group name {name!r} has spaces at its ends, which would make it a group apart from {name.strip()!r}"
    if set(name) & set(separators):
        return (f"group name {name!r} holds one of {' '.join(separators)} (--target separates names and shares "
                "with them)")
    return None


def row_error(row, first):
    """Why the JSON value `row` of a metadata line is not an image's line, or None. first: (line number, group) of
    the first labelled line before it, or None: groups are all ints or all strings."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    missing = [field for field in ("file_name", "text", "group") if field not in row]
    if missing:
        return f"missing field '{missing[0]}'"
    name, text, group = row["file_name"], row["text"], row["group"]
    if not isinstance(name, str) or not name or "\0" in name:
        return f"field 'file_name' must be a non-empty string, got {name!r}"
    if not isinstance(text, str):
        return f"field 'text' must be a string, got {text!r}"
    values = group.values() if isinstance(group, dict) and all(isinstance(k, str) for k in group) else [group]
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, str))) for v in values):
        return (f"field 'group' must be an int, a string or null (or an object of those by attribute name), "
                f"got {group!r}")
    why = next(filter(None, (group_name_error(v) for v in values if isinstance(v, str))), None)
    if why:
        return f"field 'group' {group!r}: the {why}" + ("; an image without a label has null" if why.endswith("blank")
                                                        else "")
    if group is not None and first and type(group) is not type(first[1]):
        return (f"field 'group' is {group!r} but line {first[0]} has {first[1]!r}; groups must be all ints or all "
                "strings")
    return None


def read_metadata(meta):
    """The lines of a `metadata.jsonl` -> [(line number, resolved image path, text, raw group, file_name inside the
    folder)], every field checked (`line_record`); an image listed on several lines (one caption each) has one
    group."""
    root = meta.parent.resolve()
    records, first = [], None  # first: (line number, group) of the first labelled line
    seen = {}  # an image's name inside the folder -> (line number, group) of the first line that labels it
    for lineno, line in text_lines(meta):
        if not line.strip():
            continue
        why, record = line_record(line, lineno, root, first, seen)
        if why:
            raise ValueError(f"{meta}, line {lineno}: {why}")
        if first is None and record[3] is not None:
            first = (lineno, record[3])
        records.append(record)
    return records


def line_record(line, lineno, root, first, seen):
    """(why the metadata line cannot be read, or None; its record). A `file_name` must stay inside the folder after
    following `..` and symlinks: it is refused before anything is opened, so a data set cannot read (or probe for)
    files elsewhere. One exception: the link that `write_folder(link=True)` made, a symlink in a folder inside this
    one whose target the line's `source` names."""
    try:
        row = json.loads(line)
    except ValueError as e:  # JSONDecodeError, or a number Python will not convert (over 4300 digits)
        return f"not valid JSON ({getattr(e, 'msg', e)})", None
    why = row_error(row, first)
    if why:
        return why, None
    name, group = row["file_name"], row["group"]
    entry = root / name  # an absolute `name` replaces root here, and is caught below
    try:
        path, folder = entry.resolve(), entry.parent.resolve()
        linked = isinstance(row.get("source"), str) and entry.is_symlink() and Path(row["source"]).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: a symlink loop; ValueError: a NUL in source
        return f"field 'file_name' {name!r} cannot be resolved ({e})", None
    if not folder.is_relative_to(root) or not (path.is_relative_to(root) or path == linked):
        return f"field 'file_name' {name!r} lies outside the data folder {root}", None
    inside = str(folder.relative_to(root) / entry.name)
    earlier = seen.setdefault(inside, (lineno, group)) if group is not None else (lineno, group)
    if earlier[1] != group:  # an image listed on several lines (one caption each) keeps one group
        return (f"field 'file_name' {name!r} has group {group!r} here but {earlier[1]!r} on line {earlier[0]}; an "
                f"image has one group"), None
    return None, (lineno, path, row["text"], group, inside)


def image_error(path):
    """Why the image file `path` cannot be read, or None."""
    if not path.exists():
        return f"image {path} does not exist"
    if path.is_dir():
        return f"{path} is a folder, not an image"
    try:
        open_image(path)
    except ValueError as e:
        return str(e)
    return None


def attribute_error(meta, attributes, attribute, parts, labelled):
    """Why --attribute (its `parts`: A+B is the intersection of A and B) cannot pick the groups of a folder whose
    metadata `meta` names `attributes`, from the values of `parts` on each `labelled` line; None if it can."""
    unknown = [a for a in parts if a not in attributes]
    if unknown:
        return (f"{meta}: the groups name the attributes {', '.join(attributes)}; "
                + (f"no image has the attribute {unknown[0]!r}" if attribute else "choose one")
                + " (--attribute NAME, or A+B for their intersections)")
    twice = cli.repeated(parts)
    if twice is not None:
        return f"--attribute {attribute} names the attribute {twice!r} twice"
    # one kind per attribute: one attribute's values are sorted, and in an intersection 1 and "1" would merge
    mixed = next((k for k in range(len(parts)) if len({type(v[k]) for v in labelled}) > 1), None)
    if mixed is not None:
        text, number = (next(v[mixed] for v in labelled if isinstance(v[mixed], kind)) for kind in (str, int))
        return (f"{meta}: attribute {parts[mixed]!r} takes ints and strings ({text!r} and {number!r}); one kind per "
                "attribute")
    plus = next(((a, x) for v in labelled for a, x in zip(parts, v) if "+" in str(x)), None)
    if len(parts) > 1 and plus:
        return (f"{meta}: attribute {plus[0]!r} has the value {plus[1]!r}, whose '+' could merge intersections in "
                f"--attribute {attribute}")
    if not labelled:
        return (f"{meta}: no line gives {' and '.join(parts)} a value{' together' * (len(parts) > 1)}; DDM needs at "
                "least two labelled groups")
    one = next((k for k in range(len(parts)) if len({v[k] for v in labelled}) == 1), None)
    if one is not None:  # said here of the attribute, not of the field 'group' (objects) of every line
        return (f"{meta}: attribute {parts[one]!r} takes only the value {labelled[0][one]!r} on every line that "
                f"labels {attribute}; DDM needs at least two labelled values of each")
    return None


class ImageFolder(torch.utils.data.Dataset):
    """A folder with `metadata.jsonl` (format in the module docstring) as a torch Dataset.

    item -> {"pixels": float (3,R,R) in [-1,1], "text": str, "group": int index into `group_names`}.
    Every line and every image is checked when the folder is opened, so bad data stops a run before training
    starts; errors name the metadata file, the line number and the field. center_crop=True resizes the shorter
    side to R (bicubic) and crops the centre square; False squashes the whole image to R x R. Both are
    deterministic (no random crop), which keeps resumed training runs exactly reproducible.
    """

    def __init__(self, root, resolution, center_crop=True, need_groups=True, attribute=None):
        self.root, self.resolution, self.center_crop = Path(root), resolution, center_crop
        assert resolution > 0 and resolution % 8 == 0, f"resolution must be a positive multiple of 8, got {resolution}"
        meta = self.root / "metadata.jsonl"
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder {self.root} does not exist")
        if not meta.exists():
            raise FileNotFoundError(f"{meta} not found: a data folder needs a metadata.jsonl "
                                    f'(one line per image: {{"file_name": ..., "text": ..., "group": ...}})')
        records = read_metadata(meta)  # (line number, path, text, raw group, name); every path inside (or linked)
        why = interrupted_error(self.root) or (None if records else f"{meta}: no images listed")
        if why:
            raise ValueError(why)
        for lineno, path, *_ in records:
            why = image_error(path)
            if why:
                raise ValueError(f"{meta}, line {lineno}: field 'file_name': {why}")
        _, self.files, self.texts, self.labels, self.names = map(list, zip(*records))  # labels: groups as written
        objects = [g for g in self.labels if isinstance(g, dict)]  # labels by attribute
        self.attributes = sorted({a for g in objects for a in g})
        # need_groups=False (a plain fine-tune, blind to the groups; a resume, checked against run.json): fewer than
        # two, none too; attribute labels unread without --attribute. None: `make_cluster_folder`, its own groups
        blind = need_groups is None or (need_groups is False and attribute is None and bool(objects))
        raw = [None] * len(records) if blind else self.groups_of(meta, self.labels, attribute)
        self.group_names = sorted({g for g in raw if g is not None})
        if need_groups and len(self.group_names) < 2:
            what = "is null on every line"
            if self.group_names:  # with null lines beside it: the labelled ones
                lines = "every labelled line" if None in raw else "every line"
                what = f"takes only the value {self.group_names[0]!r} on {lines}"
            raise ValueError(f"{meta}: field 'group' {what}; DDM needs at least two "
                             f"{'groups' if self.group_names else 'labelled groups'}")
        index = {g: k for k, g in enumerate(self.group_names)}
        self.groups = [index.get(g, -1) for g in raw]  # group index of every item; -1: no label (null)

    def groups_of(self, meta, groups, attribute):
        """Each image's group: the value itself, or with named attributes ({"colour": "red", "width": "thin"}) the
        value of `attribute`, or "red+thin" for "colour+width" (their intersection); None where not labelled."""
        if not self.attributes:
            if attribute is not None:
                raise ValueError(f"--attribute {attribute}: the groups in {meta} name no attributes")
            if any(isinstance(g, dict) for g in groups):  # one type per file: every labelled line has {}
                raise ValueError(f"{meta}: field 'group' is {{}} (an object naming no attribute) on every labelled "
                                 "line; DDM needs at least two labelled groups")
            return groups
        parts = (attribute or "").split("+")
        values = [None if g is None or any(g.get(a) is None for a in parts) else [g[a] for a in parts] for g in groups]
        why = attribute_error(meta, self.attributes, attribute, parts, [v for v in values if v is not None])
        if why:
            raise ValueError(why)
        return [v if v is None else v[0] if len(v) == 1 else "+".join(map(str, v)) for v in values]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = open_image(self.files[i])
        R = self.resolution
        if self.center_crop:
            scale = R / min(img.size)
            w, h = max(R, round(img.width * scale)), max(R, round(img.height * scale))
            img = img.resize((w, h), Image.BICUBIC)
            left, top = (w - R) // 2, (h - R) // 2
            img = img.crop((left, top, left + R, top + R))
        else:
            img = img.resize((R, R), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)  # (3,R,R) in [0,255]
        return {"pixels": pixels / 127.5 - 1.0, "text": self.texts[i], "group": self.groups[i]}


# ----------------------------------------------------------------------------------------------------------------
# The order train.py reads the images in, and their VAE posteriors, both functions of the seed and position only


def derive_seed(*key):
    """A 63-bit seed from a tuple such as (seed, "noise", step, micro, rank), by hashing: distinct keys give
    unrelated streams (unlike seed + step, where run A's step 1 would replay run B's step 0)."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 1


def micro_batch_indices(n, batch_size, seed, start=0, rank=0, world_size=1):
    """Dataset indices of every micro-batch of this rank, from global micro-batch `start` on, forever.

    Epoch e is a permutation seeded by (seed, e), cut into world_size·batch_size chunks (the incomplete rest is
    dropped); rank r takes the r-th batch_size share of each chunk (DistributedSampler would deal it every
    world_size-th index of the chunk: the same chunk per step, split another way).
    """
    per_epoch, epoch = n // (batch_size * world_size), None
    for m in itertools.count(start):
        e, k = divmod(m, per_epoch)
        if e != epoch:
            epoch, order = e, torch.Generator().manual_seed(derive_seed(seed, "epoch", e))
            perm = torch.randperm(n, generator=order)
        first = (k * world_size + rank) * batch_size
        yield perm[first:first + batch_size].tolist()


def encode_dataset(vae, data, batch_size, device):
    """(mean, std) of the VAE posterior of every image, in fixed chunks (so identical on every run)."""
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            pixels = torch.stack([data[j]["pixels"] for j in range(i, min(i + batch_size, len(data)))])
            posterior = vae.encode(pixels.to(device))
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def micro_batches(data, indices, cache=None, num_workers=0, pin_memory=False):
    """Each micro-batch of `indices` (micro_batch_indices): {"pixels", "text", "group"} read by a DataLoader, or
    {"mean", "std", "text", "group"} from `cache`, the posteriors encode_dataset computed once."""
    if cache is None:
        yield from torch.utils.data.DataLoader(data, batch_sampler=indices, num_workers=num_workers,
                                               pin_memory=pin_memory)
        return
    for idx in indices:
        rows = torch.tensor(idx, device=cache[0].device)
        yield {"mean": cache[0][rows], "std": cache[1][rows], "text": [data.texts[i] for i in idx],
               "group": torch.tensor([data.groups[i] for i in idx])}


# Command line

SEED = (0, 2 ** 64 - 1)  # numpy's default_rng takes any seed >= 0, torch.Generator 64 bits
RANGES = {"celeba": {"seed": SEED}, "clusters": {"dims": (1, None), "seed": SEED},  # checked by cli.range_error
          "digits": {"seed": SEED, "labelled": (0.0, 1.0, True)}}


def add_folder_flags(c, seeds, link=True):
    """The flags of a command that writes a data folder: where, its seed (which seeds `seeds`), rebuild, and where
    `link`, --link to symlink the images instead of copying them."""
    c.add_argument("--out", required=True, type=Path, help="the data folder to write")
    c.add_argument("--seed", type=int, default=0, help=f"seeds {seeds}")
    if link:
        c.add_argument("--link", action="store_true", help="symlink the images instead of copying them")
    c.add_argument("--overwrite", action="store_true", help="rebuild a folder a previous run wrote")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the data folders train.py reads (metadata.jsonl + images).")
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("celeba", help="a biased set of real images labelled in CelebA's attribute-file format",
                            description="Draw WITH images that have ATTRIBUTE and WITHOUT images that lack it "
                                        "from an attribute file in CelebA's format, and copy (or link) them into "
                                        "OUT beside the metadata.jsonl that train.py reads.")
    c.add_argument("--images", required=True, type=Path,
                   help="folder of the images the attribute file names (CelebA: img_align_celeba/)")
    c.add_argument("--attributes", required=True, type=Path, metavar="FILE",
                   help="list_attr_celeba.txt, or any file in its format")
    c.add_argument("--attribute", required=True, help="the attribute that splits the two groups, e.g. Male")
    c.add_argument("--counts", required=True, metavar="WITH,WITHOUT",
                   help="images with the attribute (1) and without it (-1), e.g. 800,200")
    c.add_argument("--prompt", required=True, help='the caption of every image, e.g. "a photo of a face"')
    c.add_argument("--group-names", nargs=2, metavar=("WITH", "WITHOUT"),
                   help='names of the two groups (default: ATTRIBUTE and "not ATTRIBUTE")')
    add_folder_flags(c, "which images are drawn")
    c = commands.add_parser("clusters", help="ours: a copy of a data folder whose groups are clusters of its images "
                                             "(no labels needed)",
                            description="Group the images of DATA without labels: a K-component Gaussian mixture "
                                        "with free sizes on their VAE latents (ddm.fit_clusters). Writes OUT: the "
                                        "images, and a metadata.jsonl whose groups are cluster0..cluster<K-1> (a "
                                        "previous group stays as 'label', for you to compare).")
    c.add_argument("--data", required=True, type=Path, help="a data folder (metadata.jsonl + images), groups optional")
    c.add_argument("--vae", required=True, help="the model whose latents are clustered: an SD folder, its vae/, "
                                                "or a single-file checkpoint")
    c.add_argument("--k", required=True, type=int, help="number of clusters (>= 2)")
    c.add_argument("--resolution", type=int, default=512, help="the resolution train.py will use (default 512)")
    c.add_argument("--dims", type=int, help="principal components of the latents clustered (default 10, or fewer "
                   "where the images or a latent have fewer)")
    add_folder_flags(c, "the mixture's initial centres")
    c = commands.add_parser("digits", help="a biased set of the shipped MNIST digits (their training split)",
                            description="Draw COUNT images of each DIGIT from the shipped digits' training split "
                                        "(the held-out ones judge, never train) into OUT, beside the metadata.jsonl "
                                        "that train.py reads; an image's group is its digit.")
    c.add_argument("--counts", required=True, metavar="DIGIT=COUNT,...", help="e.g. 7=360,8=40 (400 a digit at most)")
    c.add_argument("--prompt", default="a photo of a digit", help="the caption of every image")
    c.add_argument("--resolution", type=int, default=32, help="image side in pixels (bicubic from 28; default 32)")
    c.add_argument("--labelled", type=float, default=1.0, help="share of each digit's images that keep their group")
    add_folder_flags(c, "which digits are drawn", link=False)
    args = parser.parse_args(argv)
    why = cli.range_error(args, RANGES[args.command]) or (
        cli.side_error("resolution", args.resolution) if args.command != "celeba" else None)
    if why:
        parser.error(why)
    command = {"celeba": celeba, "clusters": clusters, "digits": digits}[args.command]
    return cli.one_line_errors(lambda: command(parser, args), "data.py")


def clusters(parser, args):
    out, sizes = make_cluster_folder(args.out, args.data, args.vae, args.k, resolution=args.resolution,
                                     dims=args.dims, seed=args.seed, link=args.link, overwrite=args.overwrite)
    print(f"wrote {int(sizes.sum())} images in {args.k} clusters (sizes {sizes.tolist()}) and metadata.jsonl to {out}")
    return out


def celeba(parser, args):
    counts = tuple(int(n) for n in args.counts.split(",") if n.strip().lstrip("-").isdecimal())  # int() reads these
    if len(counts) != 2 or len(args.counts.split(",")) != 2:
        parser.error(f"--counts must be two integers WITH,WITHOUT, e.g. 800,200, got {args.counts!r}")
    out = make_attribute_folder(args.out, args.images, args.attributes, args.attribute, counts, args.prompt,
                                group_names=args.group_names, seed=args.seed, link=args.link, overwrite=args.overwrite)
    names = args.group_names or (args.attribute, f"not {args.attribute}")
    print(f"wrote {sum(counts)} images ({names[0]}: {counts[0]}, {names[1]}: {counts[1]}) and metadata.jsonl to {out}")
    return out


def digits(parser, args):
    images, labels = load_digits()
    pool = split_digits(0)[0]  # reproduce.py's split: its judge is scored on the held-out digits
    most = int(np.bincount(labels[pool]).min())  # 400 of each digit
    pairs = [part.partition("=") for part in args.counts.split(",")]
    counts = {int(d): int(n) for d, eq, n in pairs if eq and d.strip().isdecimal() and n.strip().isdecimal()}
    if len(counts) != len(pairs) or max(counts) > 9 or not all(1 <= n <= most for n in counts.values()):
        parser.error(f"--counts must be DIGIT=COUNT pairs, each digit 0-9 once, 1 <= COUNT <= {most} (a digit's "
                     f"images in the training split), e.g. 7=360,8=40; got {args.counts!r}")
    out = make_digit_folder(args.out, images, labels, counts, indices=pool, resolution=args.resolution,
                            prompt=args.prompt, seed=args.seed, overwrite=args.overwrite, labelled=args.labelled,
                            flag="--overwrite")
    print(f"wrote {sum(counts.values())} images ({', '.join(f'{d}: {n}' for d, n in counts.items())}) and "
          f"metadata.jsonl to {out}")
    return out


if __name__ == "__main__":
    main()

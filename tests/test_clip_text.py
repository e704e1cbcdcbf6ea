"""clip_text.py and tokenizer.py against transformers' CLIPTextModel and CLIPTokenizer (the oracles SD pipelines use).

The tokenizer tests run offline on CLIP's real vocabulary: vocab.json + merges.txt are generated into a temporary
folder from the shipped assets/bpe_simple_vocab_16e6.txt.gz by tools/make_sd_tokenizer.py.
"""
import json
import random
import re
import shutil

import pytest
import regex
import torch
import transformers
from safetensors.torch import save_file

import weights
from clip_text import (CLIPTextConfig, CLIPTextModel, load_text_encoder, text_encoder_config_from_hf,
                       text_encoder_hf_config)
from tokenizer import WHITESPACE, Tokenizer, chunks, load_tokenizer, pre_split_pattern
from tools.make_sd_tokenizer import write_sd_tokenizer

SD15_ASTRONAUT = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407] + [49407] * 65

LONG = ", ".join(f"a very detailed photo number {i} of a cat" for i in range(20))  # ~180 tokens
HARD = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "   ",
    "Hello!!! What?!... (yes) [no] {maybe} <tag> #hash @at $5 100% a&b ~~ ** __init__ -- ->",
    "3.14159, 1,000,000 and 2nd 1990s 0.5x 4k 8K",
    "don't I'll we've they're she's it'd I'm DON'T WE'VE o'clock rock'n'roll '' 's",
    "café naïve résumé Ångström Straße jalapeño ÉCOLE ΟΔΟΣ Σίσυφος İstanbul",
    "cafe\u0301 (combining accent, NFC-composed by the reference)",
    "emoji 😀👍🏽 👨‍👩‍👧 ❤️ 🇫🇷 ★☆",
    "日本語のテキスト 中文 你好世界 한국어 一二三 ½ ² Ⅻ ٣",
    "русский текст and العربية and עברית",
    "  extra   spaces\tand\ttabs\nand\r\nnewlines  \u00a0nbsp\u3000ideographic\u2003em ",
    "a\x1cb\x1fc zero\u200bwidth soft\u00adhyphen",
    "UPPER CASE PROMPT, Mixed Case Prompt",
    "<|startoftext|>literal specials<|endoftext|> and <|ENDOFTEXT|> and <|endoftext",
    "ﬁ ligature, ＦＵＬＬＷＩＤＴＨ, ℌ, ㎏, ①②",
    LONG,
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_sd_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def ours(tok_dir):
    return Tokenizer.from_folder(tok_dir)


@pytest.fixture(scope="module")
def ref(tok_dir):
    return transformers.CLIPTokenizer.from_pretrained(str(tok_dir))


def ref_ids(ref, texts):
    return torch.tensor(ref(texts, padding="max_length", max_length=77, truncation=True).input_ids)


# --- tokenizer -----------------------------------------------------------------------------------------------------

def test_sd15_prompt_ids_are_the_published_literals(ours, ref):
    prompt = "a photo of an astronaut riding a horse on mars"
    assert ours(prompt).tolist() == [SD15_ASTRONAUT]
    assert ref_ids(ref, [prompt]).tolist() == [SD15_ASTRONAUT]
    assert Tokenizer.default()(prompt).tolist() == [SD15_ASTRONAUT]


def test_hard_strings_give_identical_ids_to_transformers(ours, ref):
    got, want = ours(HARD), ref_ids(ref, HARD)
    assert got.shape == (len(HARD), 77) and got.dtype == torch.long
    for text, g, w in zip(HARD, got, want):
        assert g.tolist() == w.tolist(), text
    for text in HARD:  # untruncated too
        assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids, text


def test_long_prompt_is_truncated_to_75_tokens_and_keeps_the_end_token(ours, ref):
    ids = ours(LONG)[0]
    assert len(ours.encode(LONG)) > 150
    assert ids[0] == 49406 and ids[-1] == 49407 and (ids[1:76] != 49407).all()
    assert ids[1:76].tolist() == ours.encode(LONG)[:75]
    assert ids.tolist() == ref_ids(ref, [LONG])[0].tolist()


def random_texts(n, seed):
    """Random strings over scripts, marks, digits, symbols, emoji and every kind of space."""
    pools = [range(0x20, 0x7F), range(0xA0, 0x250), range(0x300, 0x370), range(0x370, 0x530), range(0x590, 0x700),
             range(0x900, 0x980), range(0x2000, 0x2070), range(0x2150, 0x2190), range(0x2460, 0x24FF),
             range(0x3000, 0x3100), range(0x4E00, 0x4F00), range(0xAC00, 0xAD00), range(0xFF00, 0xFF70),
             range(0x1F300, 0x1F700), range(0x1D400, 0x1D500), range(0x0, 0x20)]
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            pool = rng.choice(pools[:3] * 4 + pools)  # mostly Latin, ASCII punctuation and digits
            chars.append(chr(rng.choice(pool)))
            if rng.random() < 0.15:
                chars.append(rng.choice([" ", "  ", "\t", "'s", "'ll", "'", "\u0301"]))
        texts.append("".join(chars))
    return texts


def test_random_unicode_gives_identical_ids_to_transformers(ours, ref):
    texts = random_texts(400, seed=0)
    want = ref(texts, add_special_tokens=False).input_ids
    for text, w in zip(texts, want):
        assert ours.encode(text) == w, ascii(text)


def test_cutting_text_just_before_whitespace_changes_no_id(ours, ref):
    """Long texts are read in chunks cut before whitespace (tokenizer.chunks): the ids of the two sides of any such
    cut, put together, must be those of the whole text."""
    space = re.compile(f"[{WHITESPACE}]")
    for text in HARD + random_texts(200, seed=1):
        want = ref(text, add_special_tokens=False).input_ids
        for q in (m.start() for m in space.finditer(text, 1)):
            assert ours.encode(text[:q]) + ours.encode(text[q:]) == want, (ascii(text), q)


def test_chunks_end_before_the_last_whitespace_they_reach():
    assert list(chunks("ab cd ef", 4)) == ["ab", " cd", " ef"]
    assert list(chunks("abcdefgh ij", 3)) == ["abc", "def", "gh", " ij"]  # no whitespace in reach: cut at 3
    assert list(chunks("a\u3000\u3000b", 1)) == ["a", "\u3000", "\u3000", "b"]
    for size in (1, 2, 5, 100):
        assert "".join(chunks(HARD[11], size)) == HARD[11]


def _random_word(n, seed=0):
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def test_words_cut_for_the_token_limit_give_transformers_ids(tok_dir, ref):
    """With a limit of 8 text tokens a word is merged over its first 2 * 8 * 32 = 512 bytes only (32: CLIP's
    longest token): the first 8 ids must still be the reference's, which merges the whole word."""
    short = Tokenizer.from_folder(tok_dir)
    short.max_length = 10
    for word in [_random_word(700), "😂" * 300, "ab" * 400, "photograph" * 80, _random_word(400) + "😍" * 200,
                 "a," * 600, "<|endoftext|>" * 120, "e\u0301" * 600]:  # runs cut into 4 * 8 * 32 = 1024-char chunks
        want = ref(word, padding="max_length", max_length=10, truncation=True).input_ids
        assert short(word)[0].tolist() == want, word[:20]


def test_a_1mb_word_and_a_50mb_prompt_take_well_under_two_seconds(ours):
    import time
    for text, words in [(_random_word(1_000_000), None), ("😀" * 250_000, None),
                        (("a photo of a cat, " * 3_000_000)[:50_000_000], "a photo of a cat, " * 20),
                        (" " * 50_000_000 + "cat", "cat"), ("a," * 25_000_000, "a," * 40)]:
        start = time.perf_counter()
        ids = ours(text)
        assert time.perf_counter() - start < 2.0, (len(text), text[:20])
        assert ids.shape == (1, 77) and ids[0, -1] == 49407
        if words is not None:  # the ids are those of a short text that starts the same way
            assert ids.tolist() == ours(words).tolist()


def test_pre_split_letters_and_numbers_equal_the_regex_packages_unicode_classes():
    """Our \\p{L} / \\p{N} built from unicodedata against the `regex` package's, on every assigned code point."""
    import unicodedata
    ref_pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""")
    chars = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Zs", "Zl", "Zp",
                                                                                       "Cc")]
    # each char between a letter and a digit: it joins the letter run, stands alone, or forms its own run
    text = " ".join(f"a{c}1" for c in chars)
    assert pre_split_pattern().findall(text) == ref_pattern.findall(text)
    bmp = " ".join(f"a{c}1" for c in chars if c <= "\uffff")  # the fast pattern for text without astral chars
    assert pre_split_pattern(astral=False).findall(bmp) == ref_pattern.findall(bmp)


def test_decode_inverts_encode_like_transformers(ours, ref):
    for text in HARD[:-1]:
        ids = ours(text)[0]
        assert ours.decode(ids) == ref.decode(ids.tolist(), skip_special_tokens=True), text
    assert ours.decode(ours.encode("A Photo of AN astronaut")) == "a photo of an astronaut"


def test_default_tokenizer_equals_the_generated_sd_folder(ours):
    default = Tokenizer.default()
    assert default.encoder == ours.encoder and default.ranks == ours.ranks
    assert len(default.encoder) == 49408 and len(default.ranks) == 48894


def test_load_tokenizer_reads_pipeline_folder_tokenizer_folder_and_single_file(tok_dir, tmp_path):
    pipe = tmp_path / "pipe" / "tokenizer"
    pipe.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (pipe / name).write_bytes((tok_dir / name).read_bytes())
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")  # a single file carries no tokenizer: the standard one is used
    for path in (tmp_path / "pipe", pipe, single):
        assert load_tokenizer(path)("a photo").tolist()[0][:4] == [49406, 320, 1125, 49407]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_tokenizer_json_alone_as_transformers_5_saves_it_gives_identical_ids(ref, ours, tmp_path):
    ref.save_pretrained(tmp_path / "v5")
    assert sorted(p.name for p in (tmp_path / "v5").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    tok = load_tokenizer(tmp_path / "v5")
    assert tok.encoder == ours.encoder and tok.ranks == ours.ranks
    assert tok(HARD).tolist() == ref_ids(ref, HARD).tolist()
    pipe = tmp_path / "pipe" / "tokenizer"  # a diffusers pipeline saved by transformers 5
    pipe.mkdir(parents=True)
    (pipe / "tokenizer.json").write_bytes((tmp_path / "v5" / "tokenizer.json").read_bytes())
    assert load_tokenizer(tmp_path / "pipe").ranks == ours.ranks
    old = json.loads((tmp_path / "v5" / "tokenizer.json").read_text(encoding="utf-8"))
    old["model"]["merges"] = [" ".join(m) for m in old["model"]["merges"]]  # older files: one "a b" string each
    (pipe / "tokenizer.json").write_text(json.dumps(old), encoding="utf-8")
    assert Tokenizer.from_folder(pipe).ranks == ours.ranks


def test_a_tokenizer_that_adds_tokens_is_refused_naming_them(tok_dir, tmp_path):
    """Textual inversion adds a token ("<cat-toy>", id 49408) that CLIP's BPE lacks: transformers reads it as one id,
    ours split it into plain BPE pieces, and a prompt using it asked for something else without a word."""
    added = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    added.add_tokens("<cat-toy>")
    assert added("a <cat-toy>").input_ids == [49406, 320, 49408, 49407]
    added.save_pretrained(tmp_path / "v5")  # tokenizer.json alone
    over = tmp_path / "over"  # saved over an SD tokenizer/ folder: its vocab.json and merges.txt stay beside it
    shutil.copytree(tok_dir, over)
    shutil.copy(tmp_path / "v5" / "tokenizer.json", over)
    v4 = tmp_path / "v4"  # transformers 4's CLIPTokenizer: added_tokens.json beside vocab.json and merges.txt
    shutil.copytree(tok_dir, v4)
    (v4 / "added_tokens.json").write_text(json.dumps({"<cat-toy>": 49408}))
    for folder in (tmp_path / "v5", over, v4):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(folder))} adds tokens its vocabulary lacks: "
                                             r"'<cat-toy>' \(id 49408\)"):
            Tokenizer.from_folder(folder)
    (v4 / "added_tokens.json").write_text(json.dumps({"<|startoftext|>": 49406, "<|endoftext|>": 49407}))
    assert Tokenizer.from_folder(v4)("a photo").tolist()[0][:4] == [49406, 320, 1125, 49407]  # CLIP's own: read
    (over / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"content": ["x"], "id": 1}]}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(over))} adds tokens its vocabulary lacks: \['x'\] "
                                         r"\(id 1\)"):  # not a string: a TypeError traceback
        Tokenizer.from_folder(over)


def added_token(content):
    """A special token as transformers 4 writes it into special_tokens_map.json."""
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def sd2_folders(tok_dir, tmp_path):
    """Tokenizer folders that declare pad_token "!" (id 0) as SD v2.x's (openclip ViT-H) does, in the layouts
    transformers reads: what transformers 5 saves (tokenizer.json + tokenizer_config.json), and transformers 4's
    vocab.json + merges.txt with special_tokens_map.json (which wins over tokenizer_config.json unless that lists
    added_tokens_decoder) or with tokenizer_config.json alone."""
    transformers.CLIPTokenizer.from_pretrained(str(tok_dir), pad_token="!").save_pretrained(tmp_path / "v5")
    assert sorted(p.name for p in (tmp_path / "v5").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    bos = added_token("<|startoftext|>")
    layouts = {"sd21": ({"pad_token": "!", "bos_token": {"__type": "AddedToken", **bos}, "model_max_length": 77,
                         "tokenizer_class": "CLIPTokenizer"}, {"pad_token": "!", "bos_token": bos}),
               "map_wins": ({"pad_token": "<|endoftext|>"}, {"pad_token": added_token("!")}),
               "config_only": ({"pad_token": {"__type": "AddedToken", **added_token("!")}}, None),
               "decoder_listed": ({"pad_token": "!", "added_tokens_decoder": {}}, {"pad_token": "<|endoftext|>"})}
    for name, (config, special_map) in layouts.items():
        shutil.copytree(tok_dir, tmp_path / name)
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps(config))
        if special_map is not None:
            (tmp_path / name / "special_tokens_map.json").write_text(json.dumps(special_map))
    return [tmp_path / name for name in ["v5", *layouts]]


def test_the_folders_pad_token_gives_transformers_ids_for_sd2_and_sd1(tok_dir, tmp_path):
    """SD v2.x's tokenizer folder pads with "!" (id 0), not <|endoftext|>: padded with 49407 here, the text encoder's
    states at the padded positions (which the UNet attends to) were another model's, without a word. transformers
    also reads the pad token as a special token: a "!" in the prompt is id 0, split out before BPE."""
    texts = HARD + ["wow! great", "!!!", "a!b", "a photo of a cat!"] + random_texts(100, seed=2)
    for folder in sd2_folders(tok_dir, tmp_path):
        ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
        assert ref.pad_token_id == 0, folder.name
        ours = Tokenizer.from_folder(folder)
        assert ours(texts).tolist() == ref_ids(ref, texts).tolist() and ours.pad_id == 0, folder.name
        assert ours("a photo").tolist()[0][:6] == [49406, 320, 1125, 49407, 0, 0]
        for text in texts:
            assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids, (folder.name, ascii(text))
        for text in ["a photo", "wow! great", "!!!"]:  # trailing padding dropped, a "!" of the prompt kept
            assert ours.decode(ours(text)[0]) == ours.decode(ours.encode(text)), text
        assert ours.decode(ours("a photo")[0]) == "a photo"
    v1 = tmp_path / "v1"  # SD v1.x's folder names <|endoftext|>: padded with 49407, a "!" of the prompt is BPE's
    shutil.copytree(tok_dir, v1)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (v1 / name).write_text(json.dumps({"pad_token": "<|endoftext|>", "bos_token": added_token("<|startoftext|>")}))
    for folder in (v1, tok_dir):
        ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
        ours = Tokenizer.from_folder(folder)
        assert ours(texts).tolist() == ref_ids(ref, texts).tolist() and ours.pad_id == 49407, folder.name
        assert ours("wow!").tolist()[0][:6] == [49406, 2781, 256, 49407, 49407, 49407]


def test_a_pad_token_outside_the_vocabulary_is_refused_naming_the_file(tok_dir, tmp_path):
    shutil.copytree(tok_dir, tmp_path, dirs_exist_ok=True)
    for name, value, problem in [("tokenizer_config.json", "<pad>", "'<pad>' is not in the vocabulary"),
                                 ("special_tokens_map.json", {"content": 0}, "must be a token")]:
        (tmp_path / name).write_text(json.dumps({"pad_token": value}))
        with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / name))}: pad_token {problem}"):
            Tokenizer.from_folder(tmp_path)


def test_bad_tokenizer_json_names_the_file_and_the_entry(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    path.write_bytes(b'{"model": "\xff"}')  # not UTF-8: the message named no file
    with pytest.raises(ValueError, match="tokenizer.json: not a tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    path.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}, "merges": []}}))
    with pytest.raises(ValueError, match="'WordPiece'.*'BPE' with '</w>'"):
        Tokenizer.from_folder(tmp_path)
    path.write_text(json.dumps({"model": {"type": "BPE", "end_of_word_suffix": "</w>", "vocab": {},
                                          "merges": [["i", "n"], ["t", "h", "x"]]}}))
    with pytest.raises(ValueError, match=r"model.merges\[1\]: expected two symbols"):
        Tokenizer.from_folder(tmp_path)


@pytest.mark.parametrize("kept", [0, 1000])
def test_a_merges_txt_cut_short_at_a_line_end_is_refused_not_read_as_fewer_merges(tok_dir, tmp_path, kept):
    """An empty merges.txt, or one cut after a whole line, read: every prompt then split into far more, other ids
    than the text encoder was trained on, without a word."""
    (tmp_path / "vocab.json").write_bytes((tok_dir / "vocab.json").read_bytes())
    lines = (tok_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    (tmp_path / "merges.txt").write_text("\n".join(lines[:1 + kept]) + "\n" if kept else "", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"the vocabulary has {48894 - kept} tokens that no merge makes \(e.g. "
                                         r".*\): the merges are cut short, or another vocabulary's"):
        Tokenizer.from_folder(tmp_path)


@pytest.mark.parametrize("bom, newline", [(b"", b"\r\n"), (b"\xef\xbb\xbf", b"\n")])
def test_a_merges_txt_with_windows_line_ends_or_a_byte_order_mark_reads_as_the_same_tokenizer(tok_dir, tmp_path, bom,
                                                                                             newline):
    """A checkout with CRLF line ends gave every merge a "\r" (a BOM the header): "the vocabulary lacks 48894
    tokens", naming neither the file nor the cause."""
    (tmp_path / "vocab.json").write_bytes((tok_dir / "vocab.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes(bom + (tok_dir / "merges.txt").read_bytes().replace(b"\n", newline))
    prompts = ["a photo of a doctor", "an astronaut riding a horse"]
    assert torch.equal(Tokenizer.from_folder(tmp_path)(prompts), Tokenizer.from_folder(tok_dir)(prompts))


@pytest.mark.parametrize("token, value, shown", [("a</w>", "320", "'320'"), ("a</w>", -3, "-3"), ("a</w>", 1.5, "1.5"),
                                                 ("a</w>", True, "True")])
def test_a_vocab_json_whose_id_is_no_integer_from_0_is_refused_naming_the_folder_and_token(tok_dir, tmp_path, token,
                                                                                          value, shown):
    """A string id was a TypeError where the largest id is compared with the text encoder's vocab_size; -3 an
    IndexError in the embedding."""
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    vocab[token] = value
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_bytes((tok_dir / "merges.txt").read_bytes())
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}: token 'a</w>' has the id {re.escape(shown)} "
                                         r"in the vocabulary; ids are integers >= 0$"):
        Tokenizer.from_folder(tmp_path)


def test_bad_tokenizer_inputs_raise_clear_errors(tok_dir, tmp_path, ours):
    (tmp_path / "vocab.json").write_bytes((tok_dir / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="no merges.txt"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nt h x\n")
    with pytest.raises(ValueError, match="line 3"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nq zz\n")
    with pytest.raises(ValueError, match="lacks 1 tokens.*qzz"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "merges.txt").write_bytes(b"#version: 0.2\ni n\n\xe9 t\n")
    with pytest.raises(ValueError, match=r"merges.txt: not UTF-8 text"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0,')
    with pytest.raises(ValueError, match=r"vocab.json, line 1: not valid JSON"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_bytes((tok_dir / "vocab.json").read_bytes())
    (tmp_path / "merges.txt").write_text("#version: 0.2\nin g\ni n\n")  # "in" is used before it is made
    with pytest.raises(ValueError, match=r"merge 1 \('in', 'g'\) comes before the merge that makes its parts"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(TypeError, match="str"):
        ours(["fine", 3])
    with pytest.raises(TypeError, match="str"):
        ours.encode(None)
    with pytest.raises(ValueError, match="49408"):
        ours.decode([320, 49408])
    assert ours([]).shape == (0, 77)


# --- text encoder --------------------------------------------------------------------------------------------------

TINY = dict(vocab_size=1000, max_position=77, width=64, layers=2, heads=4, mlp=96, eos_token_id=999)


def perturbed_reference(cfg, seed=0):
    """transformers' CLIPTextModel from our exported config, eager attention, every weight moved off its init."""
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(**text_encoder_hf_config(cfg))
    config._attn_implementation = "eager"  # the plain softmax(QK^T)V reference, not another SDPA call
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_tiny_text_encoder_equals_transformers_last_hidden_state(activation, tmp_path):
    cfg = CLIPTextConfig(**TINY, activation=activation)
    ref_model = perturbed_reference(cfg)
    ref_model.save_pretrained(tmp_path / "text_encoder")  # transformers 5 names: no `text_model.` level
    model = load_text_encoder(tmp_path)
    assert model.config == cfg
    g = torch.Generator().manual_seed(1)
    for shape in ((3, 77), (2, 9)):
        ids = torch.randint(0, cfg.vocab_size, shape, generator=g)
        with torch.no_grad():
            want = ref_model(input_ids=ids).last_hidden_state
            got = model(ids)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5
    assert text_encoder_config_from_hf(text_encoder_hf_config(cfg)) == cfg


@pytest.mark.parametrize("value, message", [("1e-5", r"field 'layer_norm_eps' must be a positive number, got \"1e-5\""),
                                            (1e-6, r"has layer_norm_eps 1e-06; only 1e-5 is supported")])
def test_a_layer_norm_eps_other_than_clips_is_refused_saying_what_it_is(value, message):
    """A string "1e-5" was told "has layer_norm_eps 1e-5; only 1e-5 is supported"."""
    with pytest.raises(ValueError, match=message):
        text_encoder_config_from_hf({**text_encoder_hf_config(CLIPTextConfig(**TINY)), "layer_norm_eps": value})


@pytest.mark.parametrize("positions", [1])  # 0: "must be a positive integer", as any size
def test_a_text_encoder_of_fewer_than_two_positions_is_refused_naming_the_field(positions):
    """A text is at least its start and end tokens: a tower of one position loaded, and the tokenizer then failed
    with "cannot reshape array of size 4 into shape (2,1)" at the first prompt."""
    config = {**text_encoder_hf_config(CLIPTextConfig(**TINY)), "max_position_embeddings": positions}
    with pytest.raises(ValueError, match=rf"^max_position_embeddings must be at least 2 \(a text's start and end "
                                         rf"tokens\), got {positions}$"):
        text_encoder_config_from_hf(config)


def test_text_encoder_refuses_bad_inputs():
    """Token ids come from the tokenizer, which only makes valid ones: the forward asserts what a caller can get
    wrong (too many positions) and lets torch's embedding refuse ids out of range or not integers (no GPU sync)."""
    model = CLIPTextModel(CLIPTextConfig(**TINY))
    for ids, error, match in ((torch.tensor([[0, 1000]]), IndexError, "out of range"),
                              (torch.tensor([[-1, 3]]), IndexError, "out of range"),
                              (torch.zeros(1, 78, dtype=torch.long), AssertionError, "78 tokens.*77 positions"),
                              (torch.zeros(1, 77), RuntimeError, "Long, Int")):
        with pytest.raises(error, match=match):
            model(ids)
    with pytest.raises(AssertionError, match="activation='relu'"):
        CLIPTextModel(CLIPTextConfig(**TINY, activation="relu"))


def test_wrong_checkpoint_names_missing_and_unexpected_tensors(tmp_path):
    sd = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(49408, 768),
          "cond_stage_model.transformer.text_model.encoder.layer.0.q.weight": torch.zeros(768, 768)}
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(weights.CheckpointError, match=r"tensors missing .*1 unexpected \(text_model\.encoder\.layer"):
        load_text_encoder(tmp_path / "bad.safetensors")
    save_file({"first_stage_model.x": torch.zeros(1)}, tmp_path / "vae_only.safetensors")
    with pytest.raises(weights.CheckpointError, match="cond_stage_model.transformer."):
        load_text_encoder(tmp_path / "vae_only.safetensors")


SD15_TEXT_ENCODER_CONFIG = {  # the shape of SD v1.5's text_encoder/config.json, legacy token ids included
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "projection_dim": 768, "torch_dtype": "float32", "vocab_size": 49408,
}


def test_full_size_single_file_and_folder_layouts_load_identical_weights_equal_to_transformers(tmp_path):
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIPTextModel().state_dict().items()}
    assert len(shapes) == 196 and sum(s.numel() for s in shapes.values()) == 123_060_480
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=g) * 0.05 + (1.0 if k.endswith("norm1.weight") else 0.0)).half()
          for k, s in shapes.items()}  # fp16 on disk (as SD's fp16 files), read back as fp32
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # stored by some files; ignored
    folder = tmp_path / "pipe" / "text_encoder"
    folder.mkdir(parents=True)
    save_file(sd, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(SD15_TEXT_ENCODER_CONFIG))
    single = {f"cond_stage_model.transformer.{k}": v for k, v in sd.items()}
    single["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # other models' tensors: not read
    single["first_stage_model.quant_conv.bias"] = torch.zeros(8)
    save_file(single, tmp_path / "sd.safetensors")
    del sd, single

    a = load_text_encoder(tmp_path / "pipe")
    b = load_text_encoder(tmp_path / "sd.safetensors")
    assert a.config == b.config == CLIPTextConfig() and not a.training
    assert sum(p.numel() for p in a.parameters()) == 123_060_480
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(v.dtype == torch.float32 and torch.equal(v, sb[k]) for k, v in sa.items())
    del b, sb

    ref_model = transformers.CLIPTextModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor([SD15_ASTRONAUT])
    with torch.no_grad():
        got, want = a(ids), ref_model(input_ids=ids).last_hidden_state
    assert got.shape == (1, 77, 768)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()

"""CLIP's byte-level BPE tokenizer (Radford et al. 2021, Sec. 2.4), id for id equal to transformers' CLIPTokenizer.

Stable Diffusion v1.x's prompts go through it before the text encoder (clip_text.py): lower-cased byte pair
encoding, [SOS] + at most 75 ids + [EOS], padded to 77 with the folder's pad token ([EOS]; SD v2.x's folders
name "!"). Written with the standard library only: no `regex`, no `ftfy`, no `tokenizers`. CLIP's merges ship in
assets/bpe_simple_vocab_16e6.txt.gz (MIT).
"""
import functools
import gzip
import heapq
import itertools
import json
import operator
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np
import torch

import weights

BPE_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"  # CLIP's merges, MIT
START, END = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode():
    """CLIP's (= GPT-2's) reversible map byte -> printable character, so BPE runs on strings without spaces or
    control characters: printable Latin-1 bytes map to themselves, the other 68 to chr(256), chr(257), ...

    The dict order (printable bytes first) is the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return dict(zip(printable + others, map(chr, printable + [256 + n for n in range(len(others))])))


# transformers' CLIPTokenizer normalizes with Oniguruma's `\s`, the Unicode White_Space set. Python's `\s` also
# matches U+001C..U+001F, which the reference keeps as symbols, so the set is spelled out.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
WHITESPACE_RUN = re.compile(f"[{WHITESPACE}]+")
LAST_WHITESPACE = re.compile(f"(?s:.*)[{WHITESPACE}]")  # chunks' cut
# The special strings count only where written exactly, found before normalization. transformers' split pattern
# lists them as well, but there they never match (lower-cased "<|ENDOFTEXT|>" splits as "<|" "endoftext" "|>").
SPECIAL = re.compile(f"({re.escape(START)}|{re.escape(END)})")


def chunks(text, size):
    """`text` in consecutive pieces of at most `size` characters, each cut just before the last whitespace
    character it reaches, or, in a longer run without whitespace, after `size` characters.

    A cut before whitespace changes no id: no pre-split piece or special string holds whitespace, and NFC never
    composes a whitespace character with what precedes it."""
    start = 0
    while start < len(text):
        end = start + size
        if end >= len(text):
            yield text[start:]
            return
        space = LAST_WHITESPACE.match(text, start + 1, end + 1)  # the last whitespace in text[start+1 : end+1]
        end = space.end() - 1 if space else end
        yield text[start:end]
        start = end


@functools.cache
def pre_split_pattern(astral=True):
    """CLIP's pre-split regex, 's|'t|'re|'ve|'m|'ll|'d | \\p{L}+ | \\p{N} | [^\\s\\p{L}\\p{N}]+ (contractions, runs of
    letters, single digits, runs of other non-space characters), without the `regex` package: `re` has no \\p{L} or
    \\p{N}, so they are built as code point ranges from unicodedata's L* and N* categories, once per process. Those
    are the running Python's tables (3.11: Unicode 14.0); a reference on newer ones (tokenizers: 16.0) also counts
    the letters added since (CJK Extensions H and I, Egyptian Extended-A, ...), so text holding them can split apart.
    With astral=False the classes stop at U+FFFF: the same split of any text without astral characters (emoji, CJK
    extensions, math letters), ~4x faster in `re` (a set reaching past U+FFFF loses its bitmap, scanned by range)."""
    categories = map(unicodedata.category, map(chr, range((sys.maxunicode if astral else 0xFFFF) + 1)))
    letters, numbers, start = [], [], 0
    for major, run in itertools.groupby(categories, key=operator.itemgetter(0)):
        end = start + sum(1 for _ in run)
        if major in "LN":
            (letters if major == "L" else numbers).append(f"\\U{start:08x}-\\U{end - 1:08x}")
        start = end
    L, N = "".join(letters), "".join(numbers)
    return re.compile(f"'s|'t|'re|'ve|'m|'ll|'d|[{L}]+|[{N}]|[^{WHITESPACE}{L}{N}]+")


def clip_vocab_and_merges(path=BPE_PATH):
    """CLIP's vocabulary {token: id} and merge list from its `bpe_simple_vocab_16e6.txt.gz`, built as CLIP does."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # CLIP keeps the first 49152 - 256 - 2 = 48,894 merges (line 0 is a version header)
    merges = [tuple(line.split(" ")) for line in lines[1:1 + 49152 - 256 - 2]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
    return {t: i for i, t in enumerate(tokens)}, merges


class Tokenizer:
    """Byte-level BPE as in CLIP, id for id equal to transformers' CLIPTokenizer.

    encode(text): split out the literal special strings; NFC; collapse whitespace runs to one space; lower-case;
    pre-split (pre_split_pattern); each piece -> UTF-8 bytes -> bytes_to_unicode symbols, the last one marked
    `</w>` (end of word); merge adjacent pairs, lowest merge rank first, until no pair has a rank; look up ids.
    __call__ wraps each text as [start] + ids[:75] + [end], padded with pad_id (end, or `pad_with`) to 77, reading
    only as much of the text as those 75 ids need (`encode`).
    Unlike OpenAI's original, no ftfy / html.unescape clean-up, as transformers 5's CLIPTokenizer (4.x without ftfy
    split CJK characters apart and dropped control characters first: other ids for such text).
    """

    def __init__(self, vocab, merges, source=None):
        """ValueError, naming `source` (the folder or file they came from) where vocab and merges are no CLIP BPE."""
        self.encoder = dict(vocab)
        self.ranks = {tuple(m): rank for rank, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        needed = [START, END, *self.byte_encoder.values(), *(s + "</w>" for s in self.byte_encoder.values())]
        needed += ["".join(m) for m in self.ranks]
        missing = [t for t in needed if t not in self.encoder]
        made = {}  # token -> rank of the first merge that makes it; `bpe` needs every part made before it is used
        for (a, b), rank in self.ranks.items():
            made[a + b] = min(rank, made.get(a + b, rank))
        late = [(rank, p) for p, rank in self.ranks.items() if max(made.get(p[0], -1), made.get(p[1], -1)) > rank]
        unmade = sorted(self.encoder.keys() - set(needed))  # a merges.txt cut at a line end reads, with fewer merges
        bad_id = next(((t, i) for t, i in self.encoder.items() if not weights.is_int(i, 0)), None)
        if bad_id:
            why = f"token {bad_id[0]!r} has the id {bad_id[1]!r} in the vocabulary; ids are integers >= 0"
        elif missing:
            why = (f"the vocabulary lacks {len(missing)} tokens the tokenizer needs (byte symbols, merge results, "
                   f"{START}, {END}), e.g. {missing[:5]}")
        elif late:
            why = (f"merge {late[0][0] + 1} {late[0][1]} comes before the merge that makes its parts: not a BPE "
                   f"merge list")
        elif unmade:
            why = (f"the vocabulary has {len(unmade)} tokens that no merge makes (e.g. {unmade[:3]}): the "
                   f"merges are cut short, or another vocabulary's")
        else:
            why = None
        if why:
            raise ValueError(f"{source}: {why}" if source else why)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.start_id, self.end_id = self.encoder[START], self.encoder[END]
        self.pad_with(END)
        self.max_length = 77  # SD's; Models sets its text encoder's positions
        self.longest = max((len("".join(m).removesuffix("</w>")) for m in self.ranks), default=1)  # in bytes
        self.pattern, self.bmp_pattern = pre_split_pattern(), pre_split_pattern(astral=False)
        self.cache = {}  # pre-split piece -> ids; prompts reuse few words, so BPE runs once per word

    def pad_with(self, token):
        """Pad with `token`, a vocabulary entry. transformers adds a pad token to the special strings, which count
        where written exactly (SD v2.x's "!": a "!" in the prompt is its id 0 too)."""
        self.pad_id = self.encoder[token]
        tokens = sorted({START, END, token}, key=len, reverse=True)  # the longest first where one holds another
        self.special = re.compile(f"({'|'.join(map(re.escape, tokens))})") if token not in (START, END) else SPECIAL

    @classmethod
    def from_folder(cls, path):
        """A tokenizer from a tokenizer folder: vocab.json + merges.txt (with a `#version` header), the files hub SD
        and CLIP folders carry, or else tokenizer.json alone, which transformers 5 saves; padded with the pad token
        its tokenizer_config.json or special_tokens_map.json names (`with_pad_token`)."""
        path = Path(path)
        if not (path / "vocab.json").is_file() and (path / "tokenizer.json").is_file():
            return with_pad_token(cls.from_tokenizer_json(path / "tokenizer.json"), path)
        for name in ("vocab.json", "merges.txt"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path} has no {name}: a CLIP tokenizer folder needs vocab.json and "
                                        "merges.txt, or tokenizer.json")
        vocab = weights.read_json(path / "vocab.json")
        try:
            lines = (path / "merges.txt").read_bytes().decode("utf-8-sig").split("\n")  # -sig: a byte order mark
        except UnicodeDecodeError as e:
            raise ValueError(f"{path / 'merges.txt'}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                             f"{e.start})") from None
        first = 1 if lines[0].startswith("#version") else 0
        merges = []
        for n, line in enumerate(lines[first:], first + 1):
            line = line.removesuffix("\r")  # Windows line ends (a checkout's autocrlf)
            if line:
                pair = line.split(" ")
                if len(pair) != 2:
                    raise ValueError(f"{path / 'merges.txt'} line {n}: expected two symbols, got {line!r}")
                merges.append(tuple(pair))
        return with_pad_token(check_added_tokens(cls(vocab, merges, source=path), path), path)

    @classmethod
    def from_tokenizer_json(cls, path):
        """A tokenizer from a `tokenizers` library tokenizer.json: its BPE model's vocab and merges (pairs, or
        "a b" strings in older files), refused where its folder adds tokens (check_added_tokens). The normalizer and
        pre-tokenizer it also describes are CLIP's, built in here."""
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))  # 3.6 MB: read once, for the added tokens too
            model = spec["model"]
            vocab, merges = model["vocab"], model["merges"]
        except (ValueError, KeyError, TypeError) as e:  # ValueError: not JSON, not UTF-8
            raise ValueError(f"{path}: not a tokenizer.json with model.vocab and model.merges ({e!r})") from None
        pairs = [m.split(" ") if isinstance(m, str) else m for m in merges] if isinstance(merges, list) else []
        bad = next((n for n, p in enumerate(pairs)
                    if not (isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p))), None)
        if not isinstance(vocab, dict) or not isinstance(merges, list):
            why = "model.vocab must be an object and model.merges a list"
        elif model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
            why = (f"model is {model.get('type')!r} with end_of_word_suffix {model.get('end_of_word_suffix')!r}; a "
                   "CLIP tokenizer is 'BPE' with '</w>'")
        elif bad is not None:
            why = f"model.merges[{bad}]: expected two symbols, got {merges[bad]!r}"
        else:
            return check_added_tokens(cls(vocab, [tuple(p) for p in pairs], source=path), path.parent, spec)
        raise ValueError(f"{path}: {why}")

    @classmethod
    def default(cls):
        """The SD v1.x tokenizer (CLIP's vocabulary), built from the shipped assets/bpe_simple_vocab_16e6.txt.gz."""
        return cls(*clip_vocab_and_merges())

    def bpe(self, piece, max_bytes=None):
        """Ids of one pre-split piece: repeatedly merge the adjacent pair of lowest rank, every occurrence left to
        right, until no pair has a rank. A heap of (rank, position) yields the pairs in that same order (a merge
        only makes pairs of higher rank, as each merge's parts are earlier merges), in O(n log n) where a scan of
        the word per merge is quadratic (34 s for a 32k-character word). With `max_bytes`, only the piece's first
        max_bytes bytes are merged, without the end-of-word mark if that cuts it."""
        data = piece.encode("utf-8")
        cut = max_bytes is not None and len(data) > max_bytes
        symbols = [self.byte_encoder[b] for b in (data[:max_bytes] if cut else data)]
        if not cut:
            symbols[-1] += "</w>"
        n = len(symbols)
        after, before = list(range(1, n + 1)), list(range(-1, n - 1))  # a linked list over the positions
        heap = [(self.ranks[p], i) for i, p in enumerate(zip(symbols, symbols[1:])) if p in self.ranks]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = after[i]
            if symbols[i] is None or j == n or self.ranks.get((symbols[i], symbols[j])) != rank:
                continue  # stale: a symbol of this pair has merged with another since
            symbols[i], symbols[j] = symbols[i] + symbols[j], None
            after[i] = after[j]
            if after[i] < n:
                before[after[i]] = i
            for k in (before[i], i):  # the two new pairs around the merged symbol
                if k >= 0 and after[k] < n and (symbols[k], symbols[after[k]]) in self.ranks:
                    heapq.heappush(heap, (self.ranks[symbols[k], symbols[after[k]]], k))
        ids = [self.encoder[s] for s in symbols if s is not None]
        if not cut:
            self.cache[piece] = ids
        return ids

    def encode(self, text, max_tokens=None):
        """Token ids of `text`, without start/end tokens; with `max_tokens`, its first max_tokens ids only.

        The first max_tokens ids span at most max_tokens x the longest token (32 bytes for CLIP), and a long input
        is cut far past that, so the work stays bounded (the reference's, quadratic in a word's length, does not):
        the text into chunks of 4x that, read one by one until the ids are there (`chunks`), and a word into 2x
        that before its merges (`bpe`). Merges past a cut changed none of the kept ids in any text tested
        against the reference (tests/test_clip_text.py).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        max_bytes = None if max_tokens is None else 2 * max_tokens * self.longest
        parts = [text] if max_bytes is None else chunks(text, 2 * max_bytes)
        ids = []
        for chunk in parts:
            for i, part in enumerate(self.special.split(chunk)):  # odd parts are the special strings themselves
                if i % 2:
                    ids.append(self.encoder[part])
                    continue
                # NFC by this Python's tables: about 50 combining marks of Unicode 10-14 compose here and block in
                # the reference's (tokenizers), so text holding them gets other ids, as with the letters above
                # Σ -> σ first: the reference lower-cases character by character, str.lower() alone would give a
                # word-final capital sigma its final form (ΟΔΟΣ -> οδος, not οδοσ)
                part = WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", part)).replace("Σ", "σ").lower()
                pattern = self.pattern if part and max(part) > "\uffff" else self.bmp_pattern
                for piece in pattern.findall(part):
                    ids += self.cache.get(piece) or self.bpe(piece, max_bytes)
            if max_tokens is not None and len(ids) >= max_tokens:
                return ids[:max_tokens]
        return ids

    def __call__(self, texts):
        """LongTensor (B, max_length): [start] + at most max_length-2 text ids + [end], padded with pad_id."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a str or a list of str")
        n, rows = self.max_length, []
        for text in texts:
            ids = [self.start_id, *self.encode(text, n - 2), self.end_id]  # truncate first: end is always kept
            rows.append(ids + [self.pad_id] * (n - len(ids)))
        return torch.from_numpy(np.array(rows, dtype=np.int64).reshape(len(rows), n))  # 10x torch.tensor(rows)

    def cut(self, texts):
        """The distinct texts longer than the max_length - 2 ids `__call__` keeps of each: the rest is not read."""
        n = self.max_length - 2  # [start] and [end] take two of the places
        return [t for t in dict.fromkeys(texts) if len(self.encode(t, n + 1)) > n]

    def fit_error(self, vocab_size, eos_token_id=None):
        """Why a text encoder with `vocab_size` embeddings (pooling at `eos_token_id`, CLIP's) cannot read these ids,
        or None."""
        top = max(self.encoder.values())
        if top >= vocab_size:  # the embedding would have no row for it
            return (f"the tokenizer's ids reach {top}, past the text encoder's vocab_size {vocab_size}: they are "
                    "not one model's")
        if eos_token_id not in (None, self.end_id):  # no row would hold the end token, where CLIP pools
            return (f"the tokenizer's end token is {self.end_id}, but the text encoder pools at eos_token_id "
                    f"{eos_token_id}: they are not one model's")
        return None

    def decode(self, ids):
        """Text of `ids` (list or 1-D tensor), start/end and the padding after the end dropped; words end at `</w>`
        markers. A pad id elsewhere is text: SD v2.x's pad "!" is also the prompt's "!"."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        bad = [i for i in ids if i not in self.decoder]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are not in the vocabulary (size {len(self.decoder)})")
        n = len(ids)
        while n and ids[n - 1] == self.pad_id:
            n -= 1
        if n and ids[n - 1] == self.end_id:
            ids = ids[:n]
        symbols = "".join(self.decoder[i] for i in ids if i not in (self.start_id, self.end_id))
        text = bytearray(self.byte_decoder[c] for c in symbols).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()


def check_added_tokens(tokenizer, folder, spec=None):
    """`tokenizer`, read from `folder`, if the folder adds no tokens to its vocabulary; else ValueError naming them
    (textual inversion's "<cat-toy>"): transformers reads each as one id, the BPE here would split it into pieces.
    transformers lists them in added_tokens.json (4.x), or tokenizer.json's added_tokens (`spec`: its JSON if read)."""
    pairs = []  # (token, id)
    if (folder / "added_tokens.json").is_file():
        pairs += weights.read_json(folder / "added_tokens.json").items()
    if (folder / "tokenizer.json").is_file():
        listed = (spec or weights.read_json(folder / "tokenizer.json")).get("added_tokens")
        pairs += [(e.get("content"), e.get("id")) for e in (listed if isinstance(listed, list) else [])
                  if isinstance(e, dict)]
    new = [f"{t!r} (id {i})" for t, i in pairs if not (isinstance(t, str) and tokenizer.encoder.get(t) == i)]
    if new:
        raise ValueError(f"{folder} adds tokens its vocabulary lacks: {', '.join(new[:5])}; added tokens "
                         f"(textual inversion) are not read here, and a prompt using them would ask for another text")
    return tokenizer


def with_pad_token(tokenizer, folder):
    """`tokenizer`, read from `folder`, padding with the pad_token the folder names where transformers reads it
    (a string or an {"content": ...} object): special_tokens_map.json's (transformers 4's file), else
    tokenizer_config.json's; the first is not read where the second lists added_tokens_decoder. None named:
    <|endoftext|>, CLIPTokenizer's default and SD v1.x's. SD v2.x's folders name "!" (id 0)."""
    source = None  # the file that names the pad token; special_tokens_map.json wins over tokenizer_config.json
    config = weights.read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    if config.get("pad_token") is not None:
        source, named = folder / "tokenizer_config.json", config["pad_token"]
    if "added_tokens_decoder" not in config and (folder / "special_tokens_map.json").is_file():
        special_map = weights.read_json(folder / "special_tokens_map.json")
        if special_map.get("pad_token") is not None:
            source, named = folder / "special_tokens_map.json", special_map["pad_token"]
    if source is None:
        return tokenizer
    token = named.get("content") if isinstance(named, dict) else named
    if not isinstance(token, str):
        why = f"pad_token must be a token (a string, or an object with its \"content\"), not {named!r}"
    elif token not in tokenizer.encoder:
        why = (f"pad_token {token!r} is not in the vocabulary: transformers would add it as a new id, which the CLIP "
               "text encoder does not have")
    else:
        tokenizer.pad_with(token)
        return tokenizer
    raise ValueError(f"{source}: {why}")


def load_tokenizer(path):
    """The tokenizer of a diffusers folder (its `tokenizer/`, or the folder itself if it holds the tokenizer files:
    vocab.json + merges.txt, or tokenizer.json), or, for a single-file checkpoint (which carries none), the
    standard CLIP tokenizer."""
    path = Path(path)
    if path.is_file():
        return Tokenizer.default()
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint file or folder at {path}")
    return Tokenizer.from_folder(path / "tokenizer" if (path / "tokenizer").is_dir() else path)

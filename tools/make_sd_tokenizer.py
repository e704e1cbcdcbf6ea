"""Write a Stable Diffusion `tokenizer/` folder (vocab.json + merges.txt) from CLIP's BPE merges.

SD v1.x pipelines ship CLIP's vocabulary as transformers files; this rebuilds them offline from the
`bpe_simple_vocab_16e6.txt.gz` in assets/ (see assets/README.md for its source and licence), e.g. so that
transformers' CLIPTokenizer can be loaded as an oracle in tests:

    python tools/make_sd_tokenizer.py OUT_DIR [--bpe assets/bpe_simple_vocab_16e6.txt.gz]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenizer import BPE_PATH, clip_vocab_and_merges  # noqa: E402


def write_sd_tokenizer(out_dir, bpe_path=BPE_PATH):
    """Write vocab.json and merges.txt (with transformers' `#version: 0.2` header) into out_dir; return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(bpe_path)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                        encoding="utf-8")
    return out_dir


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--bpe", default=str(BPE_PATH), help="CLIP's bpe_simple_vocab_16e6.txt.gz")
    a = p.parse_args()
    out = write_sd_tokenizer(a.out_dir, a.bpe)
    print(f"wrote {out / 'vocab.json'} and {out / 'merges.txt'}")


if __name__ == "__main__":
    main()

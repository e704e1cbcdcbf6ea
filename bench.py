"""Benchmarks against the reference implementations on identical weights: `python bench.py [NAME ...]`.

Each NAME is a module in benchmarks/ with a main(); with no NAME all of them run. They print ratios
ours/reference (below 1.0 means we are faster) and peak memory; nothing here is a test.
"""
import importlib
import os
import pkgutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import benchmarks  # noqa: E402


def main():
    available = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name != "common")
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(f"{__doc__.strip()}\n\navailable: {', '.join(available)}")
        return
    names = sys.argv[1:] or available
    for name in names:
        if name not in available:
            sys.exit(f"unknown benchmark {name!r}; available: {', '.join(available)}")
        print(f"== {name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main()


if __name__ == "__main__":
    main()

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_help_says_how_to_call_it_and_lists_the_benchmarks_without_running_one():
    out = subprocess.run([sys.executable, "bench.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "python bench.py [NAME ...]" in out.stdout
    assert "available: gpu, sample, text, train, unet, vae" in out.stdout
    assert "==" not in out.stdout  # no benchmark ran


def test_every_benchmark_imports_against_the_code_it_measures():
    """The benchmarks call into train.py (its parser's defaults, its optimizer): a helper moved or renamed there
    broke `python bench.py train` with a traceback, and no test ran a benchmark."""
    names = ["gpu", "sample", "text", "train", "unet", "vae"]
    code = "import importlib, sys; [importlib.import_module(f'benchmarks.{n}') for n in sys.argv[1:]]"
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]

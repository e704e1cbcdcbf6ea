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

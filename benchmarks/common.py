"""Timing and memory helpers shared by the benchmarks (they may import the oracles; product code never does)."""
import math
import statistics
import threading
import time

import torch


def fill_random_(module, seed=0):
    """Fan-in-scaled uniform weights and norm scales around 1, drawn on the module's device (cheaper than the
    libraries' own inits, and activations keep a sane size through a deep network). Returns the module."""
    g = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            bound = 1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1
            p.uniform_(-bound, bound, generator=g)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return module


def rss_mb():
    """Resident set size of this process in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def peak_memory_mb(fn):
    """Run fn() once; return (result, peak RSS above the starting RSS in MiB), sampled every 2 ms."""
    start, peak, done = rss_mb(), [0.0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    return out, max(peak[0], rss_mb()) - start


@torch.inference_mode()
def interleaved_medians(fns, warmup=2, reps=7):
    """Median seconds of each fn in {name: fn}, timed in interleaved rounds after warm-up so drift hits all."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(title, ours, theirs, mem_ours=None, mem_theirs=None):
    """Print one benchmark line: medians, the ratio ours/reference, and peak memory when measured."""
    line = f"{title:<44} ours {ours * 1e3:9.1f} ms   ref {theirs * 1e3:9.1f} ms   ratio {ours / theirs:5.2f}"
    if mem_ours is not None:
        line += f"   peak MiB ours {mem_ours:7.0f} ref {mem_theirs:7.0f}"
    print(line, flush=True)
    return ours / theirs

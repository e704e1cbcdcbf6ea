"""The CUDA paths, on a GPU machine: CI has no GPU, so there every test here is reported as skipped, with the
reason. Our UNet matches diffusers on the GPU in float32 and stays as close as diffusers itself under bf16/fp16
autocast; gradient checkpointing gives the gradients of the plain backward; train.py trains under bf16 and fp16
(GradScaler) autocast with gradient checkpointing, and resumes; a run directory samples in float16."""
import json

import pytest
import torch

import checkpoints
import loading
import sample
import train
from test_train import FAST, RES, assert_images_have_content, data_dir, log_lines, sd_dir  # noqa: F401 (fixtures)
from test_unet import TINY, inputs, pair

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (CI has none; run `pytest tests/test_cuda.py` on a GPU)")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 matmuls and convs in full float32 (no TF32), as the CPU tests compute."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", TINY)
def test_unet_on_cuda_matches_diffusers_in_float32_and_under_autocast(name):
    cfg = TINY[name]
    ours, ref = (m.to(CUDA) for m in pair(cfg))
    x, context = (z.to(CUDA) for z in inputs(cfg))
    t = torch.tensor([3, 700], device=CUDA)
    with torch.no_grad():
        got, want = ours(x, t, context), ref(x, t, context).sample
        assert (got - want).abs().max().item() <= 1e-5
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cuda", dtype=dtype):
                got_amp, want_amp = ours(x, t, context), ref(x, t, context).sample
            # under autocast we are as close to the float32 result as diffusers is (within its own error again)
            assert rel_err(got_amp, want) <= 2 * rel_err(want_amp, want) + 1e-3, dtype


def test_gradient_checkpointing_gives_the_same_gradients_on_cuda():
    cfg = TINY["three_levels_depth2_4heads"]
    ours = pair(cfg)[0].to(CUDA).train()
    x, context = (z.to(CUDA) for z in inputs(cfg))
    t = torch.tensor([3, 700], device=CUDA)
    grads = []
    for checkpointing in (False, True):
        ours.gradient_checkpointing = checkpointing
        ours.zero_grad(set_to_none=True)
        ours(x, t, context).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_py_on_cuda_with_autocast_and_checkpointing_resumes_and_samples(precision, sd_dir, data_dir,  # noqa: F811
                                                                             tmp_path):
    common = ["--model", str(sd_dir), "--data", str(data_dir), "--lora-rank", "4", "--train-text-encoder", *FAST,
              "--device", "cuda", "--mixed-precision", precision, "--gradient-checkpointing", "--checkpoint-every",
              "3"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train.train([*common, "--out", str(whole), "--max-steps", "6"])
    train.train([*common, "--out", str(parts), "--max-steps", "3"])
    train.train([*common, "--resume", str(parts), "--max-steps", "6"])

    log = log_lines(whole)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] is not None and r["loss"] < 10 for r in log), log
    assert [r["step"] for r in log_lines(parts)] == [1, 2, 3, 4, 5, 6]
    state = torch.load(checkpoints.latest_checkpoint(parts) / "optimizer.pt", weights_only=True)
    assert bool(state["scaler"]) == (precision == "fp16")  # fp16 keeps its loss scale across the resume
    # GPU kernels need not be bit-reproducible, so the resumed run must be close, not equal, to the whole one
    a, b = (loading.load_run(r, merge=False).models.unet.state_dict() for r in (whole, parts))
    for k in a:
        if ".lora_" in k:
            torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3, msg=k)

    models = {dtype: loading.load_models(whole, device="cuda", dtype=dtype) for dtype in (torch.float32,
                                                                                         torch.float16)}
    images = {dtype: sample.generate(m, ["a red square", "a blue square"], [0, 1], steps=5, height=RES, width=RES,
                                     progress=False).float() for dtype, m in models.items()}
    assert images[torch.float16].shape == (2, RES, RES, 3)
    assert_images_have_content(images[torch.float16])
    assert (images[torch.float16] - images[torch.float32]).abs().mean() < 2  # uint8 levels


def test_sample_cli_on_cuda_writes_float16_images(sd_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    sample.main(["--model", str(sd_dir), "--prompt", "a red square", "--n", "3", "--batch-size", "2", "--steps",
                 "4", "--height", str(RES), "--width", str(RES), "--out", str(out), "--device", "cuda"])
    info = json.loads((out / "samples.json").read_text())
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert info["dtype"] == "float16" and info["device"].startswith("cuda")

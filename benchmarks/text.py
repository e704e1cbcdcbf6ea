"""Text side of SD v1.x: our CLIP text encoder and tokenizer against transformers on identical inputs.

1. Text encoder, full size (ViT-L/14 text tower, 123M parameters), one 77-token prompt, CPU fp32: median time
   ratio ours / transformers.CLIPTextModel (its default SDPA attention) on identical random weights, and the
   peak RSS growth of one forward. Bar 1.0, aim 0.9.
2. Tokenizer: 1,000 distinct prompts to a (1000, 77) id tensor, ours (pure Python, with its per-word cache) vs
   transformers' fast CLIPTokenizer (Rust `tokenizers`). Bar: within 2x (ratio <= 2.0).
"""
import random
import tempfile

import torch
import transformers

import weights
from benchmarks.common import interleaved_medians, peak_memory_mb, report
from clip_text import TRANSFORMERS5_NAMES, CLIPTextConfig, CLIPTextModel
from tokenizer import Tokenizer
from tools.make_sd_tokenizer import write_sd_tokenizer


def prompts(n=1000, seed=0):
    rng = random.Random(seed)
    people = ["doctor", "nurse", "CEO", "firefighter", "teacher", "software engineer", "chef", "pilot", "farmer",
              "scientist", "lawyer", "janitor", "housekeeper", "police officer", "artist", "athlete"]
    looks = ["smiling", "serious", "young", "elderly", "tired", "confident", "candid", "happy", "thoughtful"]
    places = ["in an office", "at a hospital", "on a street in Paris", "in a kitchen", "outdoors at sunset",
              "in a laboratory", "on a farm", "in a classroom", "at night, neon lights", "by the sea"]
    styles = ["photo", "portrait photograph", "oil painting", "digital art", "35mm film still", "watercolor"]
    extras = ["highly detailed", "8k", "sharp focus", "trending on artstation", "bokeh", "f/1.8",
              "award-winning", "soft light", "Canon EOS 5D", "ultra-realistic", "(masterpiece)", "4K UHD"]
    return [f"a {rng.choice(styles)} of a {rng.choice(looks)} {rng.choice(people)} {rng.choice(places)}, "
            + ", ".join(rng.sample(extras, rng.randint(1, 5))) + f", seed {rng.randint(0, 99999)}"
            for _ in range(n)]


def bench_text_encoder():
    torch.manual_seed(0)
    cfg = CLIPTextConfig()
    with torch.device("meta"):
        ours = CLIPTextModel(cfg)
    sd = {k: torch.randn(v.shape) * 0.05 + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
          for k, v in ours.state_dict().items()}
    weights.load_strict(ours, sd, "text encoder").eval()
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position, hidden_size=cfg.width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, intermediate_size=cfg.mlp,
        hidden_act="quick_gelu")).eval()
    ref.load_state_dict(weights.rename(sd, {v: k for k, v in TRANSFORMERS5_NAMES.items()}), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (1, 77))
    with torch.inference_mode():
        diff = (ours(ids) - ref(input_ids=ids).last_hidden_state).abs().max().item()
    print(f"text encoder: {sum(p.numel() for p in ours.parameters()):,} parameters, "
          f"threads {torch.get_num_threads()}, max abs diff {diff:.2e}")
    t = interleaved_medians({"ours": lambda: ours(ids), "ref": lambda: ref(input_ids=ids)}, warmup=3, reps=15)
    with torch.inference_mode():
        _, mem_ours = peak_memory_mb(lambda: ours(ids))
        _, mem_ref = peak_memory_mb(lambda: ref(input_ids=ids))
    return report("text encoder 1x77 (CPU fp32)", t["ours"], t["ref"], mem_ours, mem_ref)


def bench_tokenizer():
    texts = prompts()
    with tempfile.TemporaryDirectory() as d:
        ref = transformers.CLIPTokenizer.from_pretrained(str(write_sd_tokenizer(d)))
        ours = Tokenizer.from_folder(d)
    call_ref = lambda: ref(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours(texts), call_ref().input_ids), "tokenizer ids differ from transformers"

    def cold():  # every distinct word goes through BPE again
        ours.cache.clear()
        return ours(texts)

    backend = ref.backend_tokenizer  # the bare Rust tokenizer, without transformers' Python wrapping
    backend.enable_truncation(77)
    backend.enable_padding(length=77, pad_id=ours.end_id)
    t = interleaved_medians({"cold": cold, "warm": lambda: ours(texts), "ref": call_ref,
                             "rust": lambda: backend.encode_batch(texts)}, warmup=2, reps=9)
    print(f"tokenizer: 1,000 prompts, ours cold cache {t['cold'] * 1e3:.1f} ms ({1000 / t['cold']:,.0f} "
          f"prompts/s), warm {t['warm'] * 1e3:.1f} ms ({1000 / t['warm']:,.0f} prompts/s); transformers fast "
          f"{t['ref'] * 1e3:.1f} ms ({1000 / t['ref']:,.0f} prompts/s)")
    report("tokenizer 1,000 prompts (warm cache)", t["warm"], t["ref"])
    report("tokenizer 1,000 prompts (warm) vs bare Rust", t["warm"], t["rust"])
    return report("tokenizer 1,000 prompts (cold cache)", t["cold"], t["ref"])


def main():
    bench_tokenizer()
    bench_text_encoder()


if __name__ == "__main__":
    main()

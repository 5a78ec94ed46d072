"""GPU micro-benchmark in pure PyTorch (no vLLM): one K-token FLASH draft pass (the reference model) against
one target forward of a 7B-shaped LMM decoder (Qwen2.5-VL-7B: hidden 3584, 28 layers, 28 heads / 4 KV heads,
MLP 18944, vocab 152k), random bf16 weights, batch 1 and 8, a KV context of --context tokens. Timed with CUDA
events; writes benchmarks/results/gpu_draft_vs_target.json. Finishes in well under 5 minutes on one GPU.

    python benchmarks/gpu/draft_vs_target.py            # on a GPU machine (needs torch only)
    python benchmarks/gpu/draft_vs_target.py --small    # a CPU-sized smoke run (what the tests run)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vllm_flash.config import FlashConfig  # noqa: E402
from vllm_flash.modeling import DraftLayer, FlashDraft, apply_rotary  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
               intermediate_size=18944, vocab_size=152064, layers=28),
    "small": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  intermediate_size=512, vocab_size=4096, layers=4),
}


def cached_attention(layer: DraftLayer, x: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor) -> torch.Tensor:
    """One decoder layer over new tokens x (B, T, d) attending to a KV cache (B, H_kv, L, D) plus themselves."""
    b, t, _ = x.shape
    y = layer.input_norm(x)
    q = apply_rotary(layer.q_proj(y).view(b, t, layer.num_heads, layer.head_dim), positions, layer.rope_theta)
    k = apply_rotary(layer.k_proj(y).view(b, t, layer.num_kv_heads, layer.head_dim), positions, layer.rope_theta)
    v = layer.v_proj(y).view(b, t, layer.num_kv_heads, layer.head_dim)
    k = torch.cat([k_cache, k.transpose(1, 2)], dim=2)
    v = torch.cat([v_cache, v.transpose(1, 2)], dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, enable_gqa=True)  # new tokens see all
    x = x + layer.o_proj(out.transpose(1, 2).reshape(b, t, -1))
    y = layer.post_attention_norm(x)
    return x + layer.down_proj(F.silu(layer.gate_proj(y)) * layer.up_proj(y))


def timer(device: torch.device):
    if device.type == "cuda":
        def measure(fn, repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            fn()
            torch.cuda.synchronize()
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / repeats
    else:
        def measure(fn, repeats):
            fn()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            return (time.perf_counter() - start) * 1e3 / repeats
    return measure


@torch.no_grad()
def run(shape: str, batches: list[int], k: int, context: int, repeats: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    s = dict(SHAPES[shape])
    layers = s.pop("layers")
    config = FlashConfig(num_speculative_tokens=k, num_latents=36, **s)
    torch.manual_seed(0)
    target_layers = [DraftLayer(config).to(device, dtype) for _ in range(layers)]
    lm_head = torch.randn(config.vocab_size, config.hidden_size, device=device, dtype=dtype) * 0.02
    embed = torch.randn(config.vocab_size, config.hidden_size, device=device, dtype=dtype) * 0.02
    draft = FlashDraft(config).to(device, dtype)
    draft.attach_target_head(embed, lm_head)
    measure = timer(device)
    rows = []
    for b in batches:
        cache = lambda: torch.randn(b, config.num_key_value_heads, context, config.head_dim,  # noqa: E731
                                    device=device, dtype=dtype)
        target_caches = [(cache(), cache()) for _ in range(layers)]
        draft_cache = (cache(), cache())
        # target verify step: K drafted tokens + the last one
        x_target = torch.randn(b, k + 1, config.hidden_size, device=device, dtype=dtype)
        pos_target = torch.arange(context, context + k + 1, device=device).expand(b, -1)

        def target_step():
            x = x_target
            for layer, (kc, vc) in zip(target_layers, target_caches):
                x = cached_attention(layer, x, pos_target, kc, vc)
            return x[:, -1:] @ lm_head.t()

        # draft pass: fuse the newest position, expand it into K SAR slots, one layer, K logits
        ids = torch.randint(config.vocab_size, (b, 1), device=device)
        feature = torch.randn(b, 1, config.hidden_size, device=device, dtype=dtype)
        pos_draft = torch.arange(context, context + k, device=device).expand(b, -1)
        slots = torch.arange(k, device=device).expand(b, -1)

        def draft_pass():
            h = draft.fusion(draft.embed(ids), feature)
            x = draft.slot_inputs(h.expand(-1, k, -1), slots)
            out = draft.norm(cached_attention(draft.layer, x, pos_draft, *draft_cache))
            return (out @ lm_head.t()).argmax(-1)

        target_ms = measure(target_step, repeats)
        draft_ms = measure(draft_pass, repeats)
        rows.append({"batch_size": b, "target_forward_ms": target_ms, "draft_pass_ms": draft_ms,
                     "c": draft_ms / target_ms})
        print(json.dumps(rows[-1]), flush=True)
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
            "shape": shape, "k": k, "context": context, "torch": torch.__version__, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes (smoke run)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"
                                             / "gpu_draft_vs_target.json"))
    args = parser.parse_args(argv)
    result = run("small" if args.small else "7b", [1, 8], args.k, args.context if not args.small else 64,
                 args.repeats if not args.small else 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

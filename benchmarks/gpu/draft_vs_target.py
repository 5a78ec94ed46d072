"""GPU micro-benchmark in pure PyTorch (no vLLM): one K-token FLASH draft pass (the reference model) against
one target forward of a 7B-shaped LMM decoder (Qwen2.5-VL-7B: hidden 3584, 28 layers, 28 heads / 4 KV heads,
MLP 18944, vocab 152k), random bf16 weights, batch 1 and 8, a KV context of --context tokens. Timed with CUDA
events, both eagerly and as replayed CUDA graphs (vLLM decodes through CUDA graphs, so at batch 1 the graph
numbers are the ones that match serving; eager timings there mostly measure kernel launches). Writes
benchmarks/results/gpu_draft_vs_target.json and .md. Finishes in well under 5 minutes on one GPU.

    python benchmarks/gpu/draft_vs_target.py            # on a GPU machine (needs torch only)
    python benchmarks/gpu/draft_vs_target.py --small    # a CPU-sized smoke run (what the tests run)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
try:
    import transformers  # noqa: F401
except ImportError:
    # The GPU machines here carry PyTorch alone. FlashConfig uses PretrainedConfig only to hold its fields,
    # so a plain attribute holder stands in for it; nothing else from transformers is needed.
    class _PretrainedConfig:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    sys.modules["transformers"] = types.SimpleNamespace(PretrainedConfig=_PretrainedConfig)
from vllm_flash.config import FlashConfig  # noqa: E402
from vllm_flash.modeling import DraftLayer, FlashDraft  # noqa: E402

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
    q, k = layer.rotary(positions, layer.q_proj(y).view(b, t, layer.num_heads, layer.head_dim),
                        layer.k_proj(y).view(b, t, layer.num_kv_heads, layer.head_dim))
    v = layer.v_proj(y).view(b, t, layer.num_kv_heads, layer.head_dim)
    k = torch.cat([k_cache, k.transpose(1, 2)], dim=2)
    v = torch.cat([v_cache, v.transpose(1, 2)], dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, enable_gqa=True)  # new tokens see all
    x = x + layer.o_proj(out.transpose(1, 2).reshape(b, t, -1))
    y = layer.post_attention_norm(x)
    return x + layer.down_proj(F.silu(layer.gate_proj(y)) * layer.up_proj(y))


def timer(device: torch.device):
    """measure(fn, repeats) -> mean milliseconds per call, after one warm-up call."""
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


def as_cuda_graph(fn):
    """fn captured once into a CUDA graph; the returned callable replays it (static inputs, as in vLLM)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@torch.no_grad()
def run(shape: str, batches: list[int], k: int, context: int, repeats: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    s = dict(SHAPES[shape])
    layers = s.pop("layers")
    config = FlashConfig(num_speculative_tokens=k, num_latents=36, max_position_embeddings=context + k + 1, **s)
    torch.manual_seed(0)
    with device:  # initialise on the GPU: 7B parameters initialised on the host take minutes
        target_layers = [DraftLayer(config).to(dtype) for _ in range(layers)]
        draft = FlashDraft(config).to(dtype)
    lm_head = torch.randn(config.vocab_size, config.hidden_size, device=device, dtype=dtype) * 0.02
    embed = torch.randn(config.vocab_size, config.hidden_size, device=device, dtype=dtype) * 0.02
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

        row = {"batch_size": b, "target_forward_ms": measure(target_step, repeats),
               "draft_pass_ms": measure(draft_pass, repeats)}
        row["c"] = row["draft_pass_ms"] / row["target_forward_ms"]
        if device.type == "cuda":
            try:
                row["target_forward_graph_ms"] = measure(as_cuda_graph(target_step), repeats)
                row["draft_pass_graph_ms"] = measure(as_cuda_graph(draft_pass), repeats)
                row["c_graph"] = row["draft_pass_graph_ms"] / row["target_forward_graph_ms"]
            except RuntimeError as error:  # keep the eager numbers; say why the graph ones are missing
                row["graph_error"] = str(error)[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown_table(result))
    return result


def markdown_table(result: dict) -> str:
    graphs = all("c_graph" in r for r in result["rows"])
    head = ["batch", "target forward (ms)", "K=%d draft pass (ms)" % result["k"], "c"]
    if graphs:
        head += ["target, CUDA graph (ms)", "draft, CUDA graph (ms)", "c, CUDA graph"]
    lines = [f"{result['device']}, {result['dtype']}, {result['shape']} shapes, context {result['context']}, "
             f"torch {result['torch']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["batch_size"], f"{r['target_forward_ms']:.2f}", f"{r['draft_pass_ms']:.2f}", f"{r['c']:.3f}"]
        if graphs:
            cells += [f"{r['target_forward_graph_ms']:.2f}", f"{r['draft_pass_graph_ms']:.2f}", f"{r['c_graph']:.3f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

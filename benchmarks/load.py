"""Larger load run: FLASH behind `vllm serve`, N concurrent OpenAI requests (default 1000), plain vLLM side by
side; writes benchmarks/results/load.json and load.md.

    .venv/bin/python benchmarks/load.py --requests 1000
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("PYTHONHASHSEED", "0")

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=300)
    parser.add_argument("--workdir", default=".vllm-flash-bench")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from vllm_flash.loadgen import Server, request_mix, run_load
    from vllm_flash.tiny_targets import build_tiny_target, text_prompts
    from vllm_flash.train import distill_text_draft

    work = Path(args.workdir)
    target, draft = work / "load-target", work / "load-draft"
    if not (target / "config.json").exists():
        build_tiny_target("qwen2_5_vl", target)
    if not (draft / "model.safetensors").exists():
        distill_text_draft(target, draft, text_prompts("qwen2_5_vl", 16))
    stop_id = AutoTokenizer.from_pretrained(str(target)).convert_tokens_to_ids("the")
    specs = request_mix(args.requests, seed=1, stop_token_id=stop_id)
    logs = Path(tempfile.mkdtemp())
    results = {}
    spec = json.dumps({"method": "flash", "model": str(draft), "num_speculative_tokens": 4})
    for name, extra in (("none", []), ("flash", ["--speculative-config", spec])):
        with Server(str(target), extra, logs / f"{name}.log") as server:
            run_load(server.base, request_mix(20, seed=2), args.concurrency)
            before = server.memory_bytes()
            run = run_load(server.base, specs, args.concurrency)
            time.sleep(3)
            run["summary"]["memory_mb"] = {"before": before / 2**20, "after": server.memory_bytes() / 2**20}
            results[name] = run
    expected = {o.index: o.text for o in results["none"]["outcomes"] if o.status == "ok"}
    mismatches = sum(1 for o in results["flash"]["outcomes"]
                     if o.status == "ok" and o.index in expected and o.text != expected[o.index])
    out = {name: r["summary"] for name, r in results.items()}
    out["flash_outputs_differing_from_none"] = mismatches
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load.json").write_text(json.dumps(out, indent=2))
    lines = ["| method | requests | ok | disconnected | req/s | output tok/s | p50 s | p90 s | p99 s | memory MB before -> after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("none", "flash"):
        s = out[name]
        lat = s["latency_s"]
        lines.append(f"| {name} | {s['requests']} | {s['status_counts'].get('ok', 0)} | "
                     f"{s['status_counts'].get('disconnected', 0)} | {s['requests_per_s']:.1f} | "
                     f"{s['output_tokens_per_s']:.0f} | {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | "
                     f"{s['memory_mb']['before']:.0f} -> {s['memory_mb']['after']:.0f} |")
    (RESULTS / "load.md").write_text("\n".join(lines) + f"\n\nFLASH outputs differing from plain: {mismatches}\n")
    print("\n".join(lines))
    print(f"FLASH outputs differing from plain: {mismatches}")


if __name__ == "__main__":
    main()

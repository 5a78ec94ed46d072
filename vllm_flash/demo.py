"""`vllm-flash demo`: the shipped toy-world target LMM (a Qwen2.5-VL trained from scratch) served by vLLM with
its trained FLASH draft.

Captions a few held-out images and one held-out video with plain vLLM and with method 'flash', and prints the
captions, whether each is the world's correct description, whether FLASH's output is identical to plain
vLLM's, the acceptance figures and the measured speed-up (batch 1, greedy).
"""
from __future__ import annotations

import gc
import time
from pathlib import Path

from .evaluate import acceptance_summary, engine_env, metrics_delta, spec_metrics


def run_demo(args) -> int:
    engine_env()
    from vllm import LLM, SamplingParams

    from . import world

    target, draft = Path(args.target), Path(args.draft)
    for what, path in (("target", target), ("draft", draft)):
        if not (path / "config.json").exists():
            raise SystemExit(f"vllm-flash demo: no {what} at {path} (the repository ships both under "
                             f"assets/world/; pass --target/--draft, or retrain: bash benchmarks/world/retrain.sh)")
    items = [("image_caption", i) for i in range(args.images)] + [("video_caption", 0)]
    size = world.image_size_of(target)
    pairs = [world.request(task, i, size) for task, i in items]
    requests, references = [p[0] for p in pairs], [p[1] for p in pairs]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    common = dict(model=str(target), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
                  limit_mm_per_prompt={"image": 1, "video": 1}, disable_log_stats=False,
                  enable_prefix_caching=False)
    results = {}
    for name, spec in (("plain", None),
                       ("flash", {"method": "flash", "model": str(draft), "num_speculative_tokens": args.k})):
        llm = LLM(speculative_config=spec, **common)
        llm.generate(requests, params, use_tqdm=False)  # warm-up (same requests: no cache is kept)
        before = spec_metrics(llm) if spec else {}
        start = time.perf_counter()
        outputs = [llm.generate([r], params, use_tqdm=False)[0] for r in requests]  # batch 1
        elapsed = time.perf_counter() - start
        results[name] = (outputs, elapsed, metrics_delta(spec_metrics(llm), before) if spec else {})
        del llm
        gc.collect()

    plain, plain_time, _ = results["plain"]
    flash, flash_time, metrics = results["flash"]
    identical = [list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids) for a, b in zip(plain, flash)]
    print(f"\n=== vllm-flash demo: toy-world Qwen2.5-VL target ({target}) + FLASH draft (K={args.k}), greedy ===")
    for (task, i), out, reference, same in zip(items, flash, references, identical):
        text = out.outputs[0].text.strip()
        print(f"\n[held-out {'video' if task == 'video_caption' else 'image'} {i}] {text}")
        print(f"    correct description: {text == reference}; identical to plain vLLM: {same}")
    summary = acceptance_summary(metrics, args.k)
    tokens = sum(len(o.outputs[0].token_ids) for o in flash)
    print(f"\ntau (tokens per verify step): {summary['tau']:.2f}; acceptance per draft position: "
          + ", ".join(f"{a:.2f}" for a in summary["acceptance_per_position"]))
    print(f"output tokens/s at batch 1: plain {tokens / plain_time:.1f}, flash {tokens / flash_time:.1f} "
          f"-> speed-up {plain_time / flash_time:.2f}x")
    return 0 if all(identical) else 1

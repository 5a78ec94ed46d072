"""Acceptance and speed of a FLASH draft in vLLM, measured against plain vLLM in the same run.

    vllm-flash eval --target TARGET_DIR --draft DRAFT_DIR --data heldout.jsonl [--k 4] [--json out.json]
"""
from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path


def engine_env() -> None:
    """Defaults for running vLLM in this process (offline; on CPU, a KV cache that fits)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def spec_metrics(llm) -> dict:
    found = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            found[m.name.removeprefix("vllm:spec_decode_")] = getattr(m, "values", None) or m.value
    return found


def metrics_delta(after: dict, before: dict) -> dict:
    """Spec-decode counters accumulated between two `spec_metrics` snapshots (lists: per position)."""
    return {key: ([a - b for a, b in zip(value, before.get(key) or [0] * len(value))] if isinstance(value, list)
                  else value - before.get(key, 0)) for key, value in after.items()}


def acceptance_summary(metrics: dict, k: int) -> dict:
    drafts = metrics.get("num_drafts", 0) or 0
    accepted = metrics.get("num_accepted_tokens", 0) or 0
    per_pos = metrics.get("num_accepted_tokens_per_pos") or [0] * k
    return {
        "tau": 1 + accepted / drafts if drafts else float("nan"),  # tokens per verify step
        "acceptance_rate": accepted / max(1, metrics.get("num_draft_tokens", 0) or 0),
        "acceptance_per_position": [a / drafts if drafts else float("nan") for a in per_pos],
    }


def compare(target: str, draft: str, requests: list, k: int, max_tokens: int, engine: dict | None = None,
            repeats: int = 1, method: str = "flash") -> dict:
    """Run `requests` through plain vLLM and through the draft (FLASH, or another of vLLM's draft-model methods
    such as eagle3); tau, acceptance and the speed ratio."""
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    options = dict(model=target, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
                   disable_log_stats=False)
    options.update(engine or {})
    results = {}
    for name, spec in (("none", None),
                       (method, {"method": method, "model": draft, "num_speculative_tokens": k})):
        llm = LLM(speculative_config=spec, **options)
        llm.generate(requests[:1], params, use_tqdm=False)  # warm-up
        before = spec_metrics(llm)
        times, outputs = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            outputs = llm.generate(requests, params, use_tqdm=False)
            times.append(time.perf_counter() - start)
        results[name] = (outputs, sorted(times)[len(times) // 2], metrics_delta(spec_metrics(llm), before))
        del llm
        gc.collect()
    plain, drafted = results["none"], results[method]
    summary = acceptance_summary(drafted[2], k)
    tokens = sum(len(o.outputs[0].token_ids) for o in drafted[0])
    return {
        **summary,
        "speedup_vs_none": plain[1] / drafted[1],
        "output_tokens_per_s": {"none": tokens / plain[1], method: tokens / drafted[1]},
        "identical_to_none": all(list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
                                 for a, b in zip(plain[0], drafted[0])),
        "requests": len(requests), "k": k,
    }


def requests_from_data(target: str, data: str, image_root: str | None = None) -> tuple[list, dict, dict]:
    from transformers import AutoProcessor

    from .data import BadDataReport, read_conversations, vllm_request

    processor = AutoProcessor.from_pretrained(target)
    report = BadDataReport()
    requests, limits = [], {"image": 1, "video": 1}
    for conv in read_conversations(data, report, image_root):
        requests.append(vllm_request(conv, processor))
        limits = {"image": max(limits["image"], len(conv.images)), "video": max(limits["video"], len(conv.videos))}
    return requests, limits, dict(report.counts)


def run_eval(args) -> int:
    engine_env()
    requests, limits, bad = requests_from_data(args.target, args.data, args.image_root)
    if not requests:
        raise SystemExit(f"vllm-flash eval: no usable rows in {args.data} ({bad})")
    result = compare(args.target, args.draft, requests, args.k, args.max_tokens,
                     engine={"limit_mm_per_prompt": limits}, repeats=args.repeats)
    result["bad_rows"] = bad
    print(f"requests: {result['requests']}  (bad rows skipped: {bad or 'none'})")
    print("| tau | acceptance per position | speed-up vs none | identical to none |")
    print("|---|---|---|---|")
    print(f"| {result['tau']:.2f} | {' / '.join(f'{a:.2f}' for a in result['acceptance_per_position'])} | "
          f"{result['speedup_vs_none']:.2f}x | {result['identical_to_none']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0

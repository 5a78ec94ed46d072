"""Acceptance and speed of drafts in vLLM (FLASH, EAGLE-3, ngram), measured against plain vLLM in the same run.

    vllm-flash eval --target TARGET_DIR --data heldout.jsonl --draft DRAFT_DIR [--draft EAGLE3_DIR] [--ngram] \
        [--k 4] [--json out.json]
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


def sum_metrics(deltas: list[dict]) -> dict:
    """`metrics_delta`s of several runs added up."""
    total: dict = {}
    for d in deltas:
        for key, value in d.items():
            if isinstance(value, list):
                total[key] = [a + b for a, b in zip(total.get(key) or [0] * len(value), value)]
            else:
                total[key] = total.get(key, 0) + value
    return total


def acceptance_summary(metrics: dict, k: int) -> dict:
    drafts = metrics.get("num_drafts", 0) or 0
    accepted = metrics.get("num_accepted_tokens", 0) or 0
    per_pos = metrics.get("num_accepted_tokens_per_pos") or [0] * k
    return {
        "tau": 1 + accepted / drafts if drafts else float("nan"),  # tokens per verify step
        "acceptance_rate": accepted / max(1, metrics.get("num_draft_tokens", 0) or 0),
        "acceptance_per_position": [a / drafts if drafts else float("nan") for a in per_pos],
    }


# vLLM's prompt lookup as the bench and `vllm-flash eval --ngram` run it: 2- to 5-grams.
NGRAM = {"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 5}


def _draft_settings(draft: str | Path) -> dict:
    path = Path(draft) / "config.json"
    if not path.is_file():
        raise SystemExit(f"no draft at {draft}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path} is not valid JSON: {e}") from None


def draft_method(draft: str | Path, config: dict | None = None) -> str:
    """The vLLM method that serves the draft in `draft`: "flash", or "eagle3" for a `speculators` EAGLE-3 draft."""
    config = _draft_settings(draft) if config is None else config
    if config.get("model_type") == "flash_draft":
        return "flash"
    if "speculators_model_type" in config:
        return "eagle3"
    raise SystemExit(f"{draft} is neither a FLASH draft (model_type flash_draft) nor a speculators EAGLE-3 draft "
                     f"(speculators_model_type); its model_type is {config.get('model_type')!r}")


def draft_config(draft: str | Path, k: int | None = None) -> dict:
    """vLLM's speculative_config for the draft in `draft`. K defaults to what a FLASH draft was built for, and to 4
    for an EAGLE-3 draft; more than a FLASH draft was built for is refused before any engine starts."""
    config = _draft_settings(draft)
    method = draft_method(draft, config)
    if method == "flash":
        built = config["num_speculative_tokens"]
        if k is not None and k > built:
            raise SystemExit(f"{draft} drafts at most K = {built} tokens, not {k}")
        k = built if k is None else k
    return {"method": method, "model": str(draft), "num_speculative_tokens": k or 4}


def compare(target: str, runs: dict[str, dict], requests: list, max_tokens: int, engine: dict | None = None,
            repeats: int = 1) -> dict:
    """Run `requests` greedily through plain vLLM and through each speculative_config in `runs` (name -> config),
    one engine at a time. For each run: tau, acceptance, the speed ratio to plain vLLM, whether every output is
    identical to plain vLLM's, and the raw spec-decode counters (to sum over parts)."""
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    options = dict(model=target, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
                   disable_log_stats=False)
    options.update(engine or {})
    measured = {}
    # ngram last: once its numba kernels are loaded, vLLM 0.32 cannot start another engine in this process.
    order = ["none", *sorted(runs, key=lambda name: runs[name]["method"] == "ngram")]
    for name in order:
        llm = LLM(speculative_config=runs.get(name), **options)
        llm.generate(requests[:1], params, use_tqdm=False)  # warm-up
        before = spec_metrics(llm)
        times, outputs = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            outputs = llm.generate(requests, params, use_tqdm=False)
            times.append(time.perf_counter() - start)
        measured[name] = (outputs, sorted(times)[len(times) // 2], metrics_delta(spec_metrics(llm), before))
        del llm
        gc.collect()
    plain_outputs, plain_seconds, _ = measured["none"]
    tokens = sum(len(o.outputs[0].token_ids) for o in plain_outputs)
    result = {"requests": len(requests), "max_tokens": max_tokens, "output_tokens": tokens,
              "none": {"output_tokens_per_s": tokens / plain_seconds}}
    for name, spec in runs.items():
        outputs, seconds, metrics = measured[name]
        result[name] = {
            "method": spec["method"], "k": spec["num_speculative_tokens"],
            **acceptance_summary(metrics, spec["num_speculative_tokens"]),
            "output_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outputs) / seconds,
            "speedup_vs_none": plain_seconds / seconds,
            "identical_to_none": all(list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
                                     for a, b in zip(plain_outputs, outputs)),
            "metrics": metrics,
        }
    return result


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


def eval_runs(drafts: list[str], ngram: bool, k: int | None) -> dict[str, dict]:
    """`vllm-flash eval`'s runs: each draft under its method's name (with its folder's name where two share a
    method), then ngram. K defaults to what a FLASH draft was built for, and to 4 otherwise."""
    if k is not None and k < 1:
        raise SystemExit(f"vllm-flash eval: --k must be at least 1, not {k}")
    configs = [draft_config(draft, k) for draft in drafts]
    methods = [c["method"] for c in configs]
    runs = {(c["method"] if methods.count(c["method"]) == 1 else f"{c['method']}:{Path(c['model']).name}"): c
            for c in configs}
    if len(runs) < len(configs):
        raise SystemExit(f"vllm-flash eval: two drafts share a name: {drafts}")
    if ngram:
        runs["ngram"] = {**NGRAM, "num_speculative_tokens": k or 4}
    return runs


def run_eval(args) -> int:
    if not args.draft and not args.ngram:
        raise SystemExit("vllm-flash eval: nothing to measure; give --draft DIR (FLASH or EAGLE-3) and/or --ngram")
    runs = eval_runs(args.draft or [], args.ngram, args.k)
    engine_env()
    requests, limits, bad = requests_from_data(args.target, args.data, args.image_root)
    if not requests:
        raise SystemExit(f"vllm-flash eval: no usable rows in {args.data} ({bad})")
    result = compare(args.target, runs, requests, args.max_tokens, engine={"limit_mm_per_prompt": limits},
                     repeats=args.repeats)
    result["bad_rows"] = bad
    print(f"requests: {result['requests']}  (bad rows skipped: {bad or 'none'}); plain vLLM "
          f"{result['none']['output_tokens_per_s']:.1f} tokens/s")
    print("| run | K | tau | acceptance per position | tokens/s | speed-up vs none | identical to none |")
    print("|---|---|---|---|---|---|---|")
    for name in runs:
        r = result[name]
        print(f"| {name} | {r['k']} | {r['tau']:.2f} | {' / '.join(f'{a:.2f}' for a in r['acceptance_per_position'])}"
              f" | {r['output_tokens_per_s']:.1f} | {r['speedup_vs_none']:.2f}x | {r['identical_to_none']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    differ = [name for name in runs if not result[name]["identical_to_none"]]
    if differ:
        print(f"vllm-flash eval: greedy outputs of {differ} differ from plain vLLM's; please report this as a bug")
        return 1
    return 0

"""Serve an EAGLE-3 draft in vLLM next to plain vLLM: greedy outputs identical? acceptance?

    .venv/bin/python benchmarks/eagle3/verify_vllm.py --target TARGET --draft DRAFT --data heldout.jsonl \
        [--image-root DIR] [--k 4] [--max-tokens 48] [--limit 0] [--json out.json]

The requests are the JSONL's first questions, built by `vllm_flash.data.vllm_request` (text, images,
videos), as `vllm-flash eval` builds them for FLASH drafts. Exits 1 when any output differs.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vllm_flash.evaluate import acceptance_summary, engine_env, requests_from_data, spec_metrics  # noqa: E402


def generate(target: str, spec: dict | None, requests: list, max_tokens: int, limits: dict):
    from vllm import LLM, SamplingParams

    # The project's CPU engine settings (tests/vllm_helpers.make_llm); stats on for get_metrics().
    llm = LLM(model=target, speculative_config=spec, dtype="float32", enforce_eager=True, max_model_len=2048,
              seed=0, disable_log_stats=False, limit_mm_per_prompt=limits)
    try:
        outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs], spec_metrics(llm)
    finally:
        del llm  # engines share global state: release one before the next starts
        gc.collect()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--image-root", default=None)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--limit", type=int, default=0, help="use the first N requests (0: all)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    engine_env()
    requests, limits, bad = requests_from_data(args.target, args.data, args.image_root)
    requests = requests[: args.limit or None]
    plain, _ = generate(args.target, None, requests, args.max_tokens, limits)
    spec = {"method": "eagle3", "model": args.draft, "num_speculative_tokens": args.k}
    eagle, metrics = generate(args.target, spec, requests, args.max_tokens, limits)
    same = [a == b for a, b in zip(plain, eagle)]
    result = {"requests": len(requests), "identical": sum(same), "all_identical": all(same), "k": args.k,
              **acceptance_summary(metrics, args.k), "metrics": metrics, "bad_rows": bad}
    print(f"{result['identical']}/{len(requests)} greedy outputs identical to plain vLLM; tau {result['tau']:.2f}; "
          f"acceptance rate {result['acceptance_rate']:.3f}; per position "
          + " / ".join(f"{a:.2f}" for a in result["acceptance_per_position"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["all_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Shared helpers for the tests that run real vLLM (CPU, in-process)."""
from __future__ import annotations

import gc

from vllm import LLM, SamplingParams

from vllm_flash.evaluate import spec_metrics  # noqa: F401  (re-exported for the tests)


def make_llm(target, draft=None, k=4, speculative_overrides=None, **kwargs) -> LLM:
    spec = None if draft is None else {"method": "flash", "model": str(draft), "num_speculative_tokens": k,
                                       **(speculative_overrides or {})}
    options = dict(dtype="float32", enforce_eager=True, max_model_len=1024, seed=0, disable_log_stats=False,
                   limit_mm_per_prompt={"image": 2, "video": 1} if "qwen" in str(target) else {"image": 2})
    options.update(kwargs)
    options.setdefault("speculative_config", spec)
    return LLM(model=str(target), **options)


def with_llm(target, draft, use, k=4, **kwargs):
    """Build an engine, return `use(llm)`, and release the engine before returning.

    Engines in one process share vLLM's global parallel state: an old engine that is collected after a new
    one started tears the new one's state down. So no caller may keep a reference to an engine.
    """
    llm = make_llm(target, draft, k=k, **kwargs)
    try:
        return use(llm)
    finally:
        del llm
        gc.collect()


def greedy(max_tokens=24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]

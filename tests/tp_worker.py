"""Run the tiny-target workload with tensor parallelism (separate process: TP workers need their own
thread binding) and print the greedy token ids as JSON."""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per CPU worker (shared VLLM.md)

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from vllm_flash.tiny_targets import mixed_requests

    target, draft, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    llm = LLM(model=target, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              tensor_parallel_size=tp, limit_mm_per_prompt={"image": 2, "video": 1}, disable_log_stats=False,
              speculative_config={"method": "flash", "model": draft, "num_speculative_tokens": 4})
    outputs = llm.generate(mixed_requests("qwen2_5_vl"), SamplingParams(temperature=0, max_tokens=24))
    drafts = sum(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_drafts")
    print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outputs], "drafts": drafts}))

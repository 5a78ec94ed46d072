"""`vllm-flash demo`: FLASH serving end to end on a built-in default.

Builds (once) a tiny random Qwen2.5-VL target and a FLASH draft self-distilled on its own greedy answers,
then runs the same requests (text, image, video) through plain vLLM and through vLLM with method 'flash',
and prints the text, whether the outputs are identical, and the acceptance figures. The tiny target is
random, so its text is word salad; what the demo shows is the serving path and the numbers.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path

from .evaluate import acceptance_summary, engine_env, spec_metrics


def run_demo(args) -> int:
    engine_env()
    from vllm import LLM, SamplingParams

    from .tiny_targets import build_tiny_target, chat_prompt, random_image, random_video, text_prompts
    from .train import distill_text_draft

    work = Path(args.workdir)
    target, draft = work / "target-qwen2_5_vl", work / "draft-flash"
    if not (target / "config.json").exists():
        print(f"building a tiny random Qwen2.5-VL target in {target} ...", flush=True)
        build_tiny_target("qwen2_5_vl", target)
    if not (draft / "model.safetensors").exists():
        print(f"self-distilling a FLASH draft (K={args.k}) in {draft} (about a minute) ...", flush=True)
        distill_text_draft(target, draft, text_prompts("qwen2_5_vl", 16), k=args.k)

    requests = text_prompts("qwen2_5_vl", 3)[:3] + [
        {"prompt": chat_prompt("qwen2_5_vl", "describe the picture", images=1),
         "multi_modal_data": {"image": random_image(1, 112)}},
        {"prompt": chat_prompt("qwen2_5_vl", "describe what happens", video=True),
         "multi_modal_data": {"video": random_video(2, 4, 112)}},
    ]
    labels = ["text", "text", "text", "image", "video"]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    common = dict(model=str(target), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
                  limit_mm_per_prompt={"image": 1, "video": 1}, disable_log_stats=False)
    results = {}
    for name, spec in (("plain", None),
                       ("flash", {"method": "flash", "model": str(draft), "num_speculative_tokens": args.k})):
        llm = LLM(speculative_config=spec, **common)
        llm.generate(requests[:1], params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        results[name] = (outputs, elapsed, spec_metrics(llm) if spec else {})
        del llm
        gc.collect()

    plain, plain_time, _ = results["plain"]
    flash, flash_time, metrics = results["flash"]
    identical = [list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids) for a, b in zip(plain, flash)]
    print("\n=== vllm-flash demo: tiny Qwen2.5-VL target + FLASH draft, greedy ===")
    for label, out, same in zip(labels, flash, identical):
        print(f"[{label}] {out.outputs[0].text[:110]!r}  (identical to plain vLLM: {same})")
    summary = acceptance_summary(metrics, args.k)
    tokens = sum(len(o.outputs[0].token_ids) for o in flash)
    print(f"\ndraft passes: {metrics.get('num_drafts')}, drafted tokens: {metrics.get('num_draft_tokens')}, "
          f"accepted: {metrics.get('num_accepted_tokens')}")
    print(f"tau (tokens per verify step): {summary['tau']:.2f}")
    print("acceptance per draft position: " + ", ".join(f"{a:.2f}" for a in summary["acceptance_per_position"]))
    print(f"output tokens/s: plain {tokens / plain_time:.1f}, flash {tokens / flash_time:.1f} "
          f"(speed-up {plain_time / flash_time:.2f}x; a 2-layer toy target is too cheap for drafting to pay)")
    return 0 if all(identical) else 1

"""Draft-pass cost relative to a target step, at batch 1, inside vLLM (CPU or GPU).

Times, per decode step with one request: the target model's forward (verify step), the FLASH draft model's
forward, and the whole proposer call (input preparation, metadata, forward, sampling). Writes JSON and a
markdown table to benchmarks/results/.

    .venv/bin/python benchmarks/draft_cost.py            # tiny 2-layer target and a 24-layer, 256-wide one
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

RESULTS = Path(__file__).parent / "results"


def measure(target: Path, draft: Path, k: int, steps: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_flash.proposer import FlashProposer
    from vllm_flash.tiny_targets import chat_prompt
    from vllm_flash.vllm_model import FlashDraftModel

    timings = {"target_forward": [], "draft_forward": [], "propose": []}

    def timed(cls, name, key, only_decode=False):
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            out = original(self, *args, **kwargs)
            timings[key].append(time.perf_counter() - start)
            return out

        setattr(cls, name, wrapper)
        return lambda: setattr(cls, name, original)

    restore = [timed(GPUModelRunner, "_model_forward", "target_forward"),
               timed(FlashDraftModel, "forward", "draft_forward"),
               timed(FlashProposer, "propose", "propose")]
    try:
        llm = LLM(model=str(target), dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
                  speculative_config={"method": "flash", "model": str(draft), "num_speculative_tokens": k})
        prompt = chat_prompt("qwen2_5_vl", "red circle next to a blue square")
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        for values in timings.values():
            values.clear()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True), use_tqdm=False)
        del llm
        gc.collect()
    finally:
        for undo in restore:
            undo()
    # drop the prefill step: decode steps only
    med = {key: statistics.median(values[1:]) * 1e3 for key, values in timings.items()}
    return {"target_forward_ms": med["target_forward"], "draft_forward_ms": med["draft_forward"],
            "propose_ms": med["propose"], "c_forward": med["draft_forward"] / med["target_forward"],
            "c_propose": med["propose"] / med["target_forward"], "decode_steps": len(timings["propose"]) - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default=".vllm-flash-bench")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()

    import torch

    import vllm

    from vllm_flash.checkpoint import init_draft_for_target, save_draft
    from vllm_flash.tiny_targets import build_tiny_target

    work = Path(args.workdir)
    shapes = {"tiny (2 layers x 128)": dict(num_layers=2, hidden=128),
              "qwen-shaped (24 layers x 256)": dict(num_layers=24, hidden=256)}
    rows = []
    for name, shape in shapes.items():
        tag = f"{shape['num_layers']}x{shape['hidden']}"
        target = work / f"target-{tag}"
        if not (target / "config.json").exists():
            build_tiny_target("qwen2_5_vl", target, **shape)
        draft = work / f"draft-{tag}"
        torch.manual_seed(0)
        # shaped as `vllm-flash train` makes drafts: with a token mixer (its cost is in the proposer call)
        save_draft(init_draft_for_target(target, num_speculative_tokens=args.k, num_latents=4,
                                         slot_token_mixer=True), draft)
        row = {"target": name, "k": args.k, **measure(target, draft, args.k, args.steps)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    RESULTS.mkdir(exist_ok=True)
    out = {"machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
           "device": "cuda" if torch.cuda.is_available() else "cpu", "vllm_version": vllm.__version__,
           "rows": rows}
    (RESULTS / "draft_cost.json").write_text(json.dumps(out, indent=2))
    lines = ["| target | K | target step (ms) | draft forward (ms) | proposer call (ms) | c (forward) | c (proposer) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['target']} | {r['k']} | {r['target_forward_ms']:.2f} | {r['draft_forward_ms']:.2f} | "
              f"{r['propose_ms']:.2f} | {r['c_forward']:.3f} | {r['c_propose']:.3f} |" for r in rows]
    (RESULTS / "draft_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""CI-sized load: 300 concurrent OpenAI requests against `vllm serve` with FLASH on 127.0.0.1 (mixed text and
images, streaming or not, some clients dropping mid-stream, max_tokens and stop-token endings). Completed
greedy outputs equal plain vLLM's; nothing crashes or hangs; memory returns to its level before the load."""
import json
import time

import requests
from transformers import AutoTokenizer

from vllm_flash.loadgen import Server, request_mix, run_load


def test_300_concurrent_requests_lossless_and_stable(qwen_target, qwen_fitted_draft, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(qwen_target))
    stop_id = tokenizer.convert_tokens_to_ids("the")
    specs = request_mix(300, seed=1, stop_token_id=stop_id)
    warmup = request_mix(20, seed=2)
    spec = json.dumps({"method": "flash", "model": str(qwen_fitted_draft), "num_speculative_tokens": 4})
    with Server(str(qwen_target), [], tmp_path / "plain.log") as server:
        plain = run_load(server.base, specs)
    with Server(str(qwen_target), ["--speculative-config", spec], tmp_path / "flash.log") as server:
        run_load(server.base, warmup)
        before = server.memory_bytes()
        flash = run_load(server.base, specs)
        time.sleep(3)
        after = server.memory_bytes()
        health = requests.get(f"{server.base}/health", timeout=10).status_code
        metrics = requests.get(f"{server.base}/metrics", timeout=10).text
    summary = flash["summary"]
    (tmp_path / "load.json").write_text(json.dumps({"plain": plain["summary"], "flash": summary}, indent=2))
    assert health == 200
    assert set(summary["status_counts"]) <= {"ok", "disconnected"}, summary["status_counts"]
    assert summary["status_counts"]["ok"] >= 250
    assert summary["finish_reasons"].get("length", 0) > 0 and summary["finish_reasons"].get("stop", 0) > 0
    expected = {o.index: o.text for o in plain["outcomes"] if o.status == "ok"}
    mismatched = [o.index for o in flash["outcomes"] if o.status == "ok" and o.index in expected
                  and o.text != expected[o.index]]
    assert not mismatched, f"requests whose FLASH output differs from plain vLLM: {mismatched[:10]}"
    accepted = [line for line in metrics.splitlines() if line.startswith("vllm:spec_decode_num_accepted_tokens_total")]
    assert accepted and float(accepted[0].split()[-1]) > 0
    assert after < before * 1.10 + 150 * 2**20, (before, after)

"""Tensor parallelism and Ray: FLASH under TP=2 equals plain single-process vLLM; the plugin loads by itself
inside Ray actor processes."""
import json
import subprocess
import sys
from pathlib import Path

from vllm_flash.tiny_targets import mixed_requests

from .vllm_helpers import greedy, token_ids, with_llm


def test_flash_with_tensor_parallel_2_equals_plain_single_process(qwen_target, qwen_random_draft):
    plain = with_llm(qwen_target, None, lambda llm: token_ids(llm.generate(mixed_requests("qwen2_5_vl"),
                                                                             greedy(max_tokens=24))))
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("tp_worker.py")), str(qwen_target),
                          str(qwen_random_draft), "2"], capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["drafts"] > 0
    assert result["tokens"] == plain


def test_plugin_registers_itself_inside_ray_actor_processes():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote
        class Worker:
            def check(self):
                import os

                # What vLLM's Ray workers do at start (worker_base.py): load the general plugins.
                from vllm.plugins import load_general_plugins

                load_general_plugins()
                from vllm.config.speculative import SpeculativeConfig
                from vllm.engine.arg_utils import get_kwargs

                import vllm_flash.plugin as plugin

                return os.getpid(), plugin._registered, "flash" in get_kwargs(SpeculativeConfig)["method"]["choices"]

        workers = [Worker.remote() for _ in range(2)]
        results = ray.get([w.check.remote() for w in workers], timeout=300)
    finally:
        ray.shutdown()
    import os

    assert all(registered and admitted for _, registered, admitted in results)
    assert all(pid != os.getpid() for pid, _, _ in results)

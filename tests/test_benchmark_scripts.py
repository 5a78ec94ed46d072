"""The GPU micro-benchmark script runs end to end (at CPU size) and writes its numbers."""
import importlib.util
import json
from pathlib import Path


def test_gpu_microbenchmark_runs_small_on_cpu(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "draft_vs_target.py"
    spec = importlib.util.spec_from_file_location("draft_vs_target", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "r.json"
    result = module.main(["--small", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["rows"] == result["rows"] and [r["batch_size"] for r in written["rows"]] == [1, 8]
    assert all(r["target_forward_ms"] > 0 and r["draft_pass_ms"] > 0 for r in written["rows"])

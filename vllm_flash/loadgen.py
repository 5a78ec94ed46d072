"""Load harness: start `vllm serve` on 127.0.0.1 and drive it with many concurrent OpenAI chat requests.

The mix: text-only (short and long), one image, two images; streaming and not; some clients that drop the
connection mid-stream; some requests that end on max_tokens, some on a stop token. Every loop is bounded in
count and time. Used by tests/test_load.py (CI size) and benchmarks/load.py (larger).
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vllm serve` as a child process on 127.0.0.1; stops itself on exit from the `with` block."""

    def __init__(self, target: str, extra_args: list[str], log_path: Path, startup_timeout: float = 300) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [str(Path(sys.executable).parent / "vllm"), "serve", target, "--host", "127.0.0.1", "--port",
               str(self.port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
               "--limit-mm-per-prompt", '{"image": 2}', *extra_args]
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_healthy(startup_timeout)

    def _wait_healthy(self, timeout: float) -> None:
        import requests

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vllm serve was not healthy after {timeout:.0f} s:\n{self.log_path.read_text()[-3000:]}")

    def memory_bytes(self) -> int:
        """Resident memory of the server and its children (the engine core process)."""
        import psutil

        root = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def png_data_url(seed: int, size: int = 112) -> str:
    from .tiny_targets import random_image

    buf = io.BytesIO()
    random_image(seed, size).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class RequestSpec:
    index: int
    messages: list
    max_tokens: int
    stream: bool
    disconnect_after_chunks: int | None  # drop the connection after this many streamed chunks
    stop_token_ids: list[int] = field(default_factory=list)


def request_mix(n: int, seed: int = 0, stop_token_id: int | None = None) -> list[RequestSpec]:
    from .tiny_targets import CORPUS_WORDS

    rng = random.Random(seed)
    images = [png_data_url(s) for s in range(4)]
    specs = []
    for i in range(n):
        words = " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.choice([3, 8, 60])))
        kind = rng.choice(["text", "text", "image", "two_images"])
        content: list = [{"type": "image_url", "image_url": {"url": rng.choice(images)}}
                         for _ in range({"text": 0, "image": 1, "two_images": 2}[kind])]
        content.append({"type": "text", "text": words})
        stream = rng.random() < 0.5
        specs.append(RequestSpec(
            index=i, messages=[{"role": "user", "content": content}], max_tokens=rng.choice([4, 16, 48]),
            stream=stream, disconnect_after_chunks=rng.choice([1, 3]) if stream and rng.random() < 0.15 else None,
            stop_token_ids=[stop_token_id] if stop_token_id is not None and rng.random() < 0.3 else []))
    return specs


@dataclass
class Outcome:
    index: int
    status: str  # "ok", "disconnected", "error:<code>", "timeout"
    text: str = ""
    finish_reason: str | None = None
    latency_s: float = 0.0
    completion_tokens: int = 0


async def _one(session, base: str, model: str, spec: RequestSpec, timeout: float) -> Outcome:
    import aiohttp

    body = {"model": model, "messages": spec.messages, "max_tokens": spec.max_tokens, "temperature": 0,
            "stream": spec.stream}
    if spec.stop_token_ids:
        body["stop_token_ids"] = spec.stop_token_ids
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            async with session.post(f"{base}/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    return Outcome(spec.index, f"error:{resp.status}", await resp.text())
                if not spec.stream:
                    data = await resp.json()
                    choice = data["choices"][0]
                    return Outcome(spec.index, "ok", choice["message"]["content"] or "", choice["finish_reason"],
                                   time.perf_counter() - start, data["usage"]["completion_tokens"])
                text, finish, chunks, tokens = [], None, 0, 0
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices", []):
                        text.append(choice["delta"].get("content") or "")
                        finish = choice.get("finish_reason") or finish
                    chunks += 1
                    if spec.disconnect_after_chunks is not None and chunks >= spec.disconnect_after_chunks:
                        resp.close()  # the client goes away mid-stream
                        return Outcome(spec.index, "disconnected", "".join(text))
                return Outcome(spec.index, "ok", "".join(text), finish, time.perf_counter() - start, tokens)
    except (asyncio.TimeoutError, TimeoutError):
        return Outcome(spec.index, "timeout")
    except aiohttp.ClientError as err:
        return Outcome(spec.index, f"error:{type(err).__name__}")


async def _drive(base: str, specs: list[RequestSpec], concurrency: int, timeout: float) -> list[Outcome]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"{base}/v1/models") as resp:
            model = (await resp.json())["data"][0]["id"]
        return await asyncio.gather(*(_one(session, base, model, s, timeout) for s in specs))


def run_load(base: str, specs: list[RequestSpec], concurrency: int = 300, timeout: float = 300) -> dict:
    start = time.perf_counter()
    outcomes = asyncio.run(_drive(base, specs, concurrency, timeout))
    wall = time.perf_counter() - start
    done = [o for o in outcomes if o.status == "ok"]
    latencies = sorted(o.latency_s for o in done)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    return {
        "outcomes": outcomes,
        "summary": {
            "requests": len(specs), "concurrency": concurrency, "wall_s": wall, "status_counts": counts,
            "finish_reasons": {r: sum(o.finish_reason == r for o in done) for r in {o.finish_reason for o in done}},
            "output_tokens_per_s": sum(o.completion_tokens for o in done) / wall,
            "requests_per_s": len(done) / wall,
            "latency_s": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
                          "mean": statistics.fmean(latencies) if latencies else float("nan")},
        },
    }

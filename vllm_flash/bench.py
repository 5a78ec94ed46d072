"""`vllm-flash bench`: FLASH against vLLM's own speculative methods on the toy world, side by side in one run.

For each task x method x batch size (greedy) it reports tau, acceptance per draft position, output tokens/s,
the speed-up over `none` at the same batch size, the draft cost c and the speed-up bound; at temperature 1 it
measures tau and acceptance only. Every method has its own vLLM engine, all alive in this one process, and the
methods take turns within each repetition (rotating the order), so slow phases of a noisy machine hit all of
them alike; the median over repetitions is reported. Greedy outputs of every method are checked against
`none`'s.

Definitions:
- tau: tokens produced per verify step (1 + accepted drafts per step).
- c: the drafter's time per step (the model runner's whole `propose_draft_token_ids`: input preparation,
  draft forward(s), sampling) over the target's forward time per decode step, both at batch 1.
- a: the per-token acceptance that gives the measured tau under i.i.d. acceptance,
  tau = (1 - a^(K+1)) / (1 - a); bound = (1 - a^(K+1)) / ((1 - a)(1 + c)) = tau / (1 + c). The gap between
  the achieved speed-up and the bound is what spec-decode bookkeeping and verification of K+1 tokens cost.

Each greedy row also says where an engine step's time went (`step_ms`: the target's forward, the drafter's
proposal, the rest) and how many tokens a step produced: what a speed-up below its bound is lost to, at every
batch size.

Writes RESULTS/latest.json ({machine, vllm_version, rows}), RESULTS/latest.md and RESULTS/speedup.png,
RESULTS/acceptance.png.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from .evaluate import NGRAM, acceptance_summary, engine_env, sum_metrics

METHODS = ("none", "ngram", "eagle3", "flash", "flash_nocompress", "flash_k1")
BATCH_SIZES = (1, 4, 16)
REPO_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "world"


@dataclass
class BenchConfig:
    target: Path
    drafts: dict[str, Path]  # method -> draft directory (eagle3, flash, flash_nocompress, flash_k1)
    tasks: tuple[str, ...]
    methods: tuple[str, ...] = METHODS
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    k: int = 4
    repeats: int = 3
    # batch 1 runs this many requests one after another; with 4, a cell moved by tens of percent between runs,
    # and one odd answer could set a task's figure (VQA's compression read 0.89 of tau, 0.99 held out)
    batch1_requests: int = 8
    max_tokens: int = 128
    sampled: bool = True  # also measure tau at temperature 1


def spec_config(method: str, cfg: BenchConfig) -> dict | None:
    if method == "none":
        return None
    if method == "ngram":
        return {**NGRAM, "num_speculative_tokens": cfg.k}
    if method not in cfg.drafts:
        raise ValueError(f"method {method!r} needs a draft directory (have: {sorted(cfg.drafts)})")
    k = 1 if method == "flash_k1" else cfg.k
    return {"method": "eagle3" if method == "eagle3" else "flash", "model": str(cfg.drafts[method]),
            "num_speculative_tokens": k}


def num_draft_tokens(method: str, cfg: BenchConfig) -> int:
    return 0 if method == "none" else 1 if method == "flash_k1" else cfg.k


class EngineProbe:
    """Per-run measurements from inside the (in-process) engines that are running one at a time: the
    target's forward and the drafter's whole proposal per model-runner call (CPU is synchronous), and the
    scheduler's accept counts. vLLM's Prometheus metrics cannot be used here: they are process-wide, shared
    by all engines in this process."""

    def __init__(self) -> None:
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        self.times: dict[str, list[float]] = {"target_forward": [], "propose": []}
        self.counts: dict = {}
        self._undo = [self._time(GPUModelRunner, "_model_forward", "target_forward"),
                      self._time(GPUModelRunner, "propose_draft_token_ids", "propose"),
                      self._count(Scheduler)]

    def _time(self, cls, name: str, key: str):
        original = getattr(cls, name)
        records = self.times[key]

        def timed(runner, *args, **kwargs):
            start = time.perf_counter()
            out = original(runner, *args, **kwargs)
            records.append(time.perf_counter() - start)
            return out

        setattr(cls, name, timed)
        return lambda: setattr(cls, name, original)

    def _count(self, scheduler_cls):
        original = scheduler_cls.make_spec_decoding_stats
        probe = self

        def counted(scheduler, stats, num_draft_tokens, num_accepted_tokens, *args, **kwargs):
            out = original(scheduler, stats, num_draft_tokens, num_accepted_tokens, *args, **kwargs)
            if num_draft_tokens:
                c = probe.counts
                c.setdefault("num_accepted_tokens_per_pos", [0] * scheduler.num_spec_tokens)
                c["num_drafts"] = c.get("num_drafts", 0) + 1
                c["num_draft_tokens"] = c.get("num_draft_tokens", 0) + num_draft_tokens
                c["num_accepted_tokens"] = c.get("num_accepted_tokens", 0) + num_accepted_tokens
                for i in range(num_accepted_tokens):
                    c["num_accepted_tokens_per_pos"][i] += 1
            return out

        scheduler_cls.make_spec_decoding_stats = counted
        return lambda: setattr(scheduler_cls, "make_spec_decoding_stats", original)

    def reset(self) -> None:
        for values in self.times.values():
            values.clear()
        self.counts = {}

    def median_ms(self, key: str) -> float | None:
        values = self.times[key]
        return statistics.median(values) * 1e3 if values else None

    def step_ms(self, seconds: float) -> dict:
        """Where a run of `seconds` went, per engine step (one target forward each; mean ms): the target's
        forward, the drafter's proposal, and the rest (scheduling, sampling and rejection, input preparation,
        output processing), with the number of steps."""
        steps = max(len(self.times["target_forward"]), 1)
        target, propose = sum(self.times["target_forward"]), sum(self.times["propose"])
        return {"steps": steps, "target_forward": 1e3 * target / steps, "propose": 1e3 * propose / steps,
                "other": 1e3 * (seconds - target - propose) / steps}

    def close(self) -> None:
        for undo in self._undo:
            undo()


def per_token_acceptance(tau: float, k: int) -> float:
    """The a with (1 - a^(K+1)) / (1 - a) = tau (bisection; the left side grows with a)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(mid ** i for i in range(k + 1)) < tau:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def speedup_bound(a: float, k: int, c: float) -> float:
    expected = (k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return expected / (1 + c)


def build_requests(tasks: tuple[str, ...], n: int, target: Path) -> tuple[dict[str, list], dict[str, list[str]]]:
    """Held-out requests per task, at the image size `target` was trained at, and their reference answers."""
    from . import world

    size = world.image_size_of(target)
    pairs = {task: [world.request(task, i, size) for i in range(n)] for task in tasks}
    return ({t: [p[0] for p in ps] for t, ps in pairs.items()}, {t: [p[1] for p in ps] for t, ps in pairs.items()})


def run_bench(cfg: BenchConfig, results_dir: Path, log=print) -> dict:
    engine_env()
    import torch
    from vllm import LLM, SamplingParams

    import vllm

    probe = EngineProbe()
    greedy = SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens)
    sampled = SamplingParams(temperature=1.0, max_tokens=cfg.max_tokens)
    common = dict(model=str(cfg.target), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
                  limit_mm_per_prompt={"image": 1, "video": 1}, disable_log_stats=False,  # the scheduler counts accepts only then
                  enable_prefix_caching=False, max_num_seqs=max(cfg.batch_sizes))
    requests, references = build_requests(cfg.tasks, max(max(cfg.batch_sizes), cfg.batch1_requests), cfg.target)
    log(f"starting {len(cfg.methods)} engines: {', '.join(cfg.methods)}")
    # ngram's engine is built last: its proposer imports numba/llvmlite, and every later engine start in this
    # process would then crash in vLLM's Triton-override scan of sys.modules (llvmlite holds an object whose
    # __dict__ is not a dict: "'_lib_fn_wrapper' object has no attribute 'get'", vLLM 0.32).
    engines = {m: LLM(speculative_config=spec_config(m, cfg), **common)
               for m in sorted(cfg.methods, key=lambda m: m == "ngram")}
    for m, llm in engines.items():  # warm-up: every task, the largest batch
        for task in cfg.tasks:
            llm.generate(requests[task][:max(cfg.batch_sizes)], greedy, use_tqdm=False)

    # samples[(task, method, batch)] -> list of {seconds, tokens, metrics delta, timings}
    samples: dict[tuple, list[dict]] = {}
    outputs: dict[tuple, list[list[int]]] = {}
    for rep in range(cfg.repeats):
        for task in cfg.tasks:
            for batch in cfg.batch_sizes:
                shift = (rep + cfg.batch_sizes.index(batch)) % len(cfg.methods)
                order = cfg.methods[shift:] + cfg.methods[:shift]
                for method in order:
                    llm = engines[method]
                    reqs = requests[task][:cfg.batch1_requests] if batch == 1 else requests[task][:batch]
                    groups = [[r] for r in reqs] if batch == 1 else [reqs]
                    probe.reset()
                    start = time.perf_counter()
                    outs = [o for g in groups for o in llm.generate(g, greedy, use_tqdm=False)]
                    seconds = time.perf_counter() - start
                    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                    step_ms = probe.step_ms(seconds)
                    samples.setdefault((task, method, batch), []).append({
                        "seconds": seconds, "tokens": tokens, "metrics": probe.counts,
                        "target_forward_ms": probe.median_ms("target_forward"),
                        "propose_ms": probe.median_ms("propose"), "step_ms": step_ms,
                        "tokens_per_step": tokens / step_ms["steps"]})
                    outputs[(task, method, batch)] = [list(o.outputs[0].token_ids) for o in outs]
                log(f"rep {rep + 1}/{cfg.repeats} {task} batch {batch}: " + ", ".join(
                    f"{m} {samples[(task, m, batch)][-1]['tokens'] / samples[(task, m, batch)][-1]['seconds']:.0f} tok/s"
                    for m in cfg.methods))

    sampled_metrics: dict[tuple, dict] = {}
    if cfg.sampled:
        for task in cfg.tasks:
            for method in cfg.methods:
                if method == "none":
                    continue
                probe.reset()
                engines[method].generate(requests[task][:max(cfg.batch_sizes)], sampled, use_tqdm=False)
                sampled_metrics[(task, method)] = probe.counts
    probe.close()
    engines_tokenizer = next(iter(engines.values())).get_tokenizer()
    del engines
    gc.collect()

    rows = []
    for task in cfg.tasks:
        none_target_ms = statistics.median(s["target_forward_ms"] for s in samples[(task, "none", 1)]) \
            if "none" in cfg.methods and 1 in cfg.batch_sizes else None
        for batch in cfg.batch_sizes:
            base = None
            if "none" in cfg.methods:
                base = statistics.median(s["tokens"] / s["seconds"] for s in samples[(task, "none", batch)])
            for method in cfg.methods:
                runs = samples[(task, method, batch)]
                k = num_draft_tokens(method, cfg)
                tps = statistics.median(s["tokens"] / s["seconds"] for s in runs)
                row = {"task": task, "method": method, "batch_size": batch, "temperature": 0.0,
                       "output_tokens_per_s": round(tps, 2),
                       "speedup_vs_none": round(tps / base, 3) if base else None,
                       "identical_to_none": (outputs[(task, method, batch)] == outputs[(task, "none", batch)])
                       if "none" in cfg.methods else None,
                       "k": k, "tau": None, "acceptance_per_position": None, "c": None, "a": None, "bound": None,
                       "step_ms": {key: round(statistics.median(s["step_ms"][key] for s in runs), 3)
                                   for key in ("steps", "target_forward", "propose", "other")},
                       "tokens_per_step": round(statistics.median(s["tokens_per_step"] for s in runs), 2)}
                if method != "none":
                    acc = _acceptance(sum_metrics([s["metrics"] for s in runs]), k)
                    row["tau"], row["acceptance_per_position"] = acc["tau"], acc["acceptance_per_position"]
                    propose = [s["propose_ms"] for s in samples[(task, method, 1)] if s["propose_ms"]] \
                        if 1 in cfg.batch_sizes else []
                    if propose and none_target_ms and row["tau"]:
                        c = statistics.median(propose) / none_target_ms
                        a = per_token_acceptance(acc["tau"], k)
                        row.update(c=round(c, 4), a=round(a, 3), bound=round(speedup_bound(a, k, c), 3))
                rows.append(row)
        for method, metrics in ((m, sampled_metrics[(task, m)]) for m in cfg.methods if (task, m) in sampled_metrics):
            k = num_draft_tokens(method, cfg)
            acc = _acceptance(metrics, k)
            rows.append({"task": task, "method": method, "batch_size": max(cfg.batch_sizes), "temperature": 1.0,
                         "tau": acc["tau"], "acceptance_per_position": acc["acceptance_per_position"],
                         "output_tokens_per_s": None, "speedup_vs_none": None, "c": None, "k": k})

    accuracy = {}  # the target's own quality on these requests: its greedy answers against the world's truth
    if "none" in cfg.methods:
        largest = max(cfg.batch_sizes)
        for task in cfg.tasks:
            texts = [engines_tokenizer.decode(ids, skip_special_tokens=True).strip()
                     for ids in outputs[(task, "none", largest)]]
            accuracy[task] = round(sum(t == r for t, r in zip(texts, references[task])) / len(texts), 3)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, "
                   f"torch threads {torch.get_num_threads()}, {'cuda' if torch.cuda.is_available() else 'cpu'}",
        "vllm_version": vllm.__version__,
        "target": str(cfg.target), "repeats": cfg.repeats, "max_tokens": cfg.max_tokens,
        "target_exact_match": accuracy, "batch1_requests": cfg.batch1_requests,
        "rows": rows,
    }
    write_results(result, results_dir)
    return result


def _acceptance(counts: dict, k: int) -> dict:
    """tau and acceptance per position over the verify steps that had drafts (vLLM's definition); None when
    the method proposed nothing at all (ngram finds no match in sampled text, for one)."""
    if not counts.get("num_drafts"):
        return {"tau": None, "acceptance_per_position": None}
    acc = acceptance_summary(counts, k)
    return {"tau": round(acc["tau"], 3), "acceptance_per_position": [round(x, 3) for x in acc["acceptance_per_position"]]}


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(result: dict) -> str:
    lines = [f"Machine: {result['machine']}; vLLM {result['vllm_version']}; median of {result['repeats']} "
             f"repetitions; max_tokens {result['max_tokens']}; batch 1 = {result.get('batch1_requests')} requests "
             f"in turn. Target's greedy answers exactly right on these requests: "
             f"{result.get('target_exact_match') or '-'}.", "",
             "| task | method | batch | temp | tau | acceptance per position | tokens/s | speed-up vs none | c | "
             "bound | speed-up / bound | identical to none |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = (r["speedup_vs_none"] / r["bound"]) if r.get("bound") and r.get("speedup_vs_none") else None
        acc = " / ".join(f"{x:.2f}" for x in r["acceptance_per_position"]) if r.get("acceptance_per_position") else "-"
        same = r.get("identical_to_none")
        lines.append(f"| {r['task']} | {r['method']} | {r['batch_size']} | {r['temperature']:g} | {_fmt(r['tau'])} | "
                     f"{acc} | {_fmt(r['output_tokens_per_s'], '.1f')} | {_fmt(r['speedup_vs_none'])} | "
                     f"{_fmt(r.get('c'), '.3f')} | {_fmt(r.get('bound'))} | {_fmt(ratio)} | "
                     f"{'-' if same is None else 'yes' if same else 'NO'} |")
    return "\n".join(lines) + "\n"


def step_table(result: dict) -> str:
    """Where each engine step's time went, per greedy row: what a speed-up below its bound is lost to."""
    lines = ["Time per engine step (ms; mean over a run's steps, median of repetitions). Each step is one target "
             "forward; tokens per step is about batch x tau.", "",
             "| task | method | batch | steps | tokens per step | target forward | proposer | other | whole step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        t = r.get("step_ms")
        if r["temperature"] != 0.0 or not t:
            continue
        lines.append(f"| {r['task']} | {r['method']} | {r['batch_size']} | {t['steps']:g} | {r['tokens_per_step']:.1f} | "
                     f"{t['target_forward']:.2f} | {t['propose']:.2f} | {t['other']:.2f} | "
                     f"{t['target_forward'] + t['propose'] + t['other']:.2f} |")
    return "\n".join(lines) + "\n"


def targets_table(result: dict) -> str:
    """The project's benchmark targets, checked against this run's greedy rows (per task)."""
    greedy = {(r["task"], r["method"], r["batch_size"]): r for r in result["rows"] if r["temperature"] == 0.0}
    tasks = list(dict.fromkeys(t for t, _, _ in greedy))

    def get(task, method, batch, key):
        row = greedy.get((task, method, batch))
        return row.get(key) if row else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    checks = [  # (what, goal: at least this, value per task)
        ("flash speed-up over none, batch 1", 2.5, lambda t: get(t, "flash", 1, "speedup_vs_none")),
        ("flash over eagle3 speed, batch 1", 1.25,
         lambda t: ratio(get(t, "flash", 1, "output_tokens_per_s"), get(t, "eagle3", 1, "output_tokens_per_s"))),
        ("flash tau / eagle3 tau, batch 1", 1.15,
         lambda t: ratio(get(t, "flash", 1, "tau"), get(t, "eagle3", 1, "tau"))),
        ("flash throughput over none, batch 16", 1.1, lambda t: get(t, "flash", 16, "speedup_vs_none")),
        ("flash speed-up / bound, batch 1", 0.8,
         lambda t: ratio(get(t, "flash", 1, "speedup_vs_none"), get(t, "flash", 1, "bound"))),
        ("flash tau / flash_nocompress tau, batch 1", 0.98,
         lambda t: ratio(get(t, "flash", 1, "tau"), get(t, "flash_nocompress", 1, "tau"))),
    ]
    lines = ["| target | goal | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for name, goal, value in checks:
        cells = []
        for task in tasks:
            v = value(task)
            cells.append("-" if v is None else f"{v:.2f} {'met' if v >= goal else 'missed'}")
        lines.append(f"| {name} | >= {goal} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, results_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    greedy = [r for r in result["rows"] if r["temperature"] == 0.0]
    tasks = list(dict.fromkeys(r["task"] for r in greedy))
    methods = list(dict.fromkeys(r["method"] for r in greedy))
    batches = sorted({r["batch_size"] for r in greedy})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    width = 0.8 / len(methods)
    for ax, task in zip(axes[0], tasks):
        for i, method in enumerate(methods):
            values = [next((r["speedup_vs_none"] or 0 for r in greedy if r["task"] == task and
                            r["method"] == method and r["batch_size"] == b), 0) for b in batches]
            ax.bar([j + i * width for j in range(len(batches))], values, width, label=method)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_title(task)
        ax.set_ylabel("speed-up over none (greedy)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    speedup = results_dir / "speedup.png"
    fig.savefig(speedup, dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in methods:
            row = next((r for r in greedy if r["task"] == task and r["method"] == method and
                        r["batch_size"] == batches[0] and r["acceptance_per_position"]), None)
            if row:
                pos = list(range(1, len(row["acceptance_per_position"]) + 1))
                ax.plot(pos, row["acceptance_per_position"], marker="o", label=method)
        ax.set_title(f"{task} (greedy, batch {batches[0]})")
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance (share of verify steps)")
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    acceptance = results_dir / "acceptance.png"
    fig.savefig(acceptance, dpi=90)
    plt.close(fig)
    return [speedup, acceptance]


def write_results(result: dict, results_dir: Path) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "latest.json").write_text(json.dumps(result, indent=1))
    (results_dir / "latest.md").write_text(markdown_table(result) + "\n" + targets_table(result) + "\n" +
                                           step_table(result))
    plot(result, results_dir)


def default_config(assets: Path = REPO_ASSETS) -> BenchConfig:
    from . import world

    drafts = {m: assets / "drafts" / m for m in ("eagle3", "flash", "flash_nocompress", "flash_k1")}
    return BenchConfig(target=assets / "target", drafts=drafts, tasks=world.TASKS)


def run_bench_cli(args) -> int:
    from . import world

    cfg = default_config(Path(args.assets))
    if args.target:
        cfg.target = Path(args.target)
    for spec in args.draft or []:
        method, _, path = spec.partition("=")
        if method not in METHODS or not path:
            raise SystemExit(f"--draft wants METHOD=DIR with METHOD one of {METHODS[2:]}, got {spec!r}")
        cfg.drafts[method] = Path(path)
    cfg.methods = tuple(args.methods.split(",")) if args.methods else METHODS
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {METHODS}")
    cfg.tasks = tuple(args.tasks.split(",")) if args.tasks else world.TASKS
    bad_tasks = [t for t in cfg.tasks if t not in world.TASKS]
    if bad_tasks:
        raise SystemExit(f"unknown task(s) {bad_tasks}; choose from {world.TASKS}")
    cfg.batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    cfg.repeats, cfg.max_tokens, cfg.sampled = args.repeats, args.max_tokens, not args.greedy_only
    cfg.batch1_requests = args.batch1_requests
    if not (cfg.target / "config.json").exists():
        raise SystemExit(f"no target at {cfg.target}: pass --target, or retrain the world's models with "
                         f"`bash benchmarks/world/retrain.sh`")
    for method in cfg.methods:
        if method in cfg.drafts and not (cfg.drafts[method] / "config.json").exists():
            raise SystemExit(f"no {method} draft at {cfg.drafts[method]}: pass --draft {method}=DIR")
    result = run_bench(cfg, Path(args.results))
    print(markdown_table(result))
    return 0

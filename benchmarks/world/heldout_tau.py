"""FLASH drafts' tau on many held-out rows per task: the measure to compare drafts by.

The bench's few requests a cell and the 60 held-out rows of `build/world/data` move by 0.05 of tau or more with
the mix of rows (on 60 answers the shipped compressor seemed to lose 0.04 of tau that 600 answers did not show).
This writes N held-out rows per task (once, into --rows-dir) and scores each draft on them with
`vllm-flash eval`'s comparison: greedy, against plain vLLM in the same run, so it also checks that every output
is identical. A `speculators` EAGLE-3 draft (`eagle3`) is served by vLLM's eagle3 at K = 4.

    .venv/bin/python benchmarks/world/heldout_tau.py --drafts flash,flash_nocompress,eagle3 [--rows 600] \
        [--tasks image_caption,visual_qa] [--results benchmarks/results]

A draft is a name under ASSETS/drafts or NAME=DIR. Writes RESULTS/heldout_tau.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vllm_flash import world
from vllm_flash.bench import REPO_ASSETS


def heldout_rows(rows_dir: Path, task: str, rows: int, image_size: int) -> Path:
    """The first `rows` held-out rows of `task` as LLaVA JSONL under rows_dir, written unless already there."""
    path = rows_dir / f"{task}-heldout-{rows}.jsonl"
    if not path.exists():
        written = world.write_split(rows_dir, task, "heldout", rows, image_size)
        written.rename(path)
    return path


def score(target: Path, drafts: dict[str, Path], tasks: list[str], rows: int, rows_dir: Path,
          max_tokens: int = 128, k: int = 4) -> dict:
    from vllm_flash.evaluate import compare, engine_env, requests_from_data

    engine_env()
    size = world.image_size_of(target)
    results = {"target": str(target), "rows": rows, "max_tokens": max_tokens, "tasks": {}}
    for task in tasks:
        requests, limits, bad = requests_from_data(str(target), str(heldout_rows(rows_dir, task, rows, size)),
                                                   str(rows_dir))
        if bad:
            raise SystemExit(f"held-out rows of {task} unusable: {bad}")
        for name, draft in drafts.items():
            start = time.perf_counter()
            config = json.loads((draft / "config.json").read_text())
            eagle3 = "speculators_model_type" in config  # a `speculators` EAGLE-3 draft, for vLLM's eagle3
            r = compare(str(target), str(draft), requests, k if eagle3 else min(k, config["num_speculative_tokens"]),
                        max_tokens, engine={"limit_mm_per_prompt": limits}, method="eagle3" if eagle3 else "flash")
            results["tasks"].setdefault(task, {})[name] = {
                "tau": round(r["tau"], 4), "acceptance_per_position": [round(a, 4) for a in r["acceptance_per_position"]],
                "identical_to_none": r["identical_to_none"], "seconds": round(time.perf_counter() - start, 1)}
            print(f"{task} {name}: tau {r['tau']:.3f}, identical to none: {r['identical_to_none']}", flush=True)
    return results


def markdown(results: dict) -> str:
    names = list(next(iter(results["tasks"].values())))
    lines = [f"Held-out tau, {results['rows']} rows per task, greedy, up to {results['max_tokens']} tokens "
             f"(target {results['target']}); every output compared with plain vLLM's.", "",
             "| task | " + " | ".join(names) + " | identical to none |",
             "|---|" + "---|" * (len(names) + 1)]
    for task, by_draft in results["tasks"].items():
        identical = all(r["identical_to_none"] for r in by_draft.values())
        lines.append(f"| {task} | " + " | ".join(f"{by_draft[n]['tau']:.3f}" for n in names) + f" | {identical} |")
    for other in ("flash_nocompress", "eagle3"):
        if "flash" in names and other in names:
            lines += ["", f"flash / {other} tau: " + ", ".join(
                f"{task} {d['flash']['tau'] / d[other]['tau']:.3f}" for task, d in results["tasks"].items())]
    return "\n".join(lines) + "\n"


def parse_drafts(spec: str, assets: Path) -> dict[str, Path]:
    drafts = {}
    for item in spec.split(","):
        name, _, path = item.partition("=")
        drafts[name] = Path(path) if path else assets / "drafts" / name
        if not (drafts[name] / "config.json").exists():
            raise SystemExit(f"no draft at {drafts[name]}")
    return drafts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", default=str(REPO_ASSETS))
    p.add_argument("--drafts", default="flash,flash_nocompress", help="NAME or NAME=DIR, comma-separated")
    p.add_argument("--tasks", default=",".join(world.TASKS))
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--rows-dir", default="build/heldout-rows", help="where the held-out rows are written once")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--results", default="benchmarks/results")
    args = p.parse_args(argv)
    assets = Path(args.assets)
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in world.TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {world.TASKS}")
    results = score(assets / "target", parse_drafts(args.drafts, assets), tasks, args.rows, Path(args.rows_dir),
                    args.max_tokens)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout_tau.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "heldout_tau.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()

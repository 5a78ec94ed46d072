"""FLASH drafts' tau on many held-out rows per task: the measure to compare drafts by.

The bench's few requests a cell and the 60 held-out rows of `build/world/data` move by 0.05 of tau or more with
the mix of rows (on 60 answers the shipped compressor seemed to lose 0.04 of tau that 600 answers did not show).
This writes N held-out rows per task (once, into --rows-dir) and scores each draft on them with
`vllm-flash eval`'s comparison: greedy, against plain vLLM in the same run, so it also checks that every output
is identical. A FLASH draft runs at the K it was built for; a `speculators` EAGLE-3 draft (`eagle3`) is
served by vLLM's eagle3 at K = 4.

    .venv/bin/python benchmarks/world/heldout_tau.py --drafts flash,flash_nocompress,eagle3 [--rows 600] \
        [--tasks image_caption,visual_qa] [--by-question-kind] [--results benchmarks/results] [--output heldout_tau]

A draft is a name under ASSETS/drafts or NAME=DIR. Plain vLLM runs once per task (per question kind with
--by-question-kind), the drafts after it. Writes RESULTS/OUTPUT.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vllm_flash import world
from vllm_flash.bench import REPO_ASSETS
from vllm_flash.evaluate import draft_method


def heldout_rows(rows_dir: Path, task: str, rows: int, image_size: int) -> Path:
    """The first `rows` held-out rows of `task` as LLaVA JSONL under rows_dir, written unless already there."""
    path = rows_dir / f"{task}-heldout-{rows}.jsonl"
    if not path.exists():
        written = world.write_split(rows_dir, task, "heldout", rows, image_size)
        written.rename(path)
    return path


def _shown(path: Path) -> str:
    """`path` relative to the working directory where it lies below it (results name no machine's folders)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def question_parts(path: Path) -> dict[str, Path]:
    """The visual_qa rows in `path` split by `world.question_kind`, each kind written beside it (once)."""
    by_kind: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        question = json.loads(line)["conversations"][0]["value"].removeprefix("<image>\n")
        by_kind.setdefault(world.question_kind(question), []).append(line)
    parts = {}
    for kind, lines in sorted(by_kind.items()):
        parts[kind] = path.with_name(f"{path.stem}-{kind}.jsonl")
        if not parts[kind].exists():
            parts[kind].write_text("\n".join(lines) + "\n")
    return parts


def score(target: Path, drafts: dict[str, Path], tasks: list[str], rows: int, rows_dir: Path,
          max_tokens: int = 128, by_question_kind: bool = False) -> dict:
    """Each draft's tau on the held-out rows of each task. With `by_question_kind`, the answers are scored one
    question kind at a time (results["question_kinds"]), and their task's figures are those parts summed."""
    from vllm_flash.evaluate import (acceptance_summary, compare, draft_config, engine_env, requests_from_data,
                                     sum_metrics)

    engine_env()
    size = world.image_size_of(target)
    runs = {name: draft_config(draft) for name, draft in drafts.items()}  # each FLASH draft at the K it was built for
    results = {"target": _shown(target), "rows": rows, "max_tokens": max_tokens, "tasks": {}, "seconds": {}}
    for task in tasks:
        path = heldout_rows(rows_dir, task, rows, size)
        parts = question_parts(path) if by_question_kind and task == "visual_qa" else {"all": path}
        start = time.perf_counter()
        measured = {name: [] for name in drafts}
        for kind, part in parts.items():
            requests, limits, bad = requests_from_data(str(target), str(part), str(rows_dir))
            if bad:
                raise SystemExit(f"held-out rows of {task} unusable: {bad}")
            r = compare(str(target), runs, requests, max_tokens, engine={"limit_mm_per_prompt": limits})
            for name in drafts:
                measured[name].append((r[name]["metrics"], r[name]["identical_to_none"]))
                if kind != "all":
                    results.setdefault("question_kinds", {}).setdefault(kind, {"rows": len(requests)})[name] = {
                        "tau": round(r[name]["tau"], 4), "verify_steps": r[name]["metrics"]["num_drafts"],
                        "identical_to_none": r[name]["identical_to_none"]}
        for name, parts_measured in measured.items():
            summary = acceptance_summary(sum_metrics([m for m, _ in parts_measured]),
                                         runs[name]["num_speculative_tokens"])
            identical = all(same for _, same in parts_measured)
            results["tasks"].setdefault(task, {})[name] = {
                "tau": round(summary["tau"], 4),
                "acceptance_per_position": [round(a, 4) for a in summary["acceptance_per_position"]],
                "identical_to_none": identical}
            print(f"{task} {name}: tau {summary['tau']:.3f}, identical to none: {identical}", flush=True)
        results["seconds"][task] = round(time.perf_counter() - start, 1)
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
    if "question_kinds" in results:
        lines += ["", "visual_qa by question kind (`world.question_kind`):", "",
                  "| question kind | rows | " + " | ".join(names) + " | identical to none |",
                  "|---|---|" + "---|" * (len(names) + 1)]
        for kind, by_draft in results["question_kinds"].items():
            identical = all(by_draft[n]["identical_to_none"] for n in names)
            lines.append(f"| {kind} | {by_draft['rows']} | " + " | ".join(f"{by_draft[n]['tau']:.3f}" for n in names)
                         + f" | {identical} |")
    return "\n".join(lines) + "\n"


def parse_drafts(spec: str, assets: Path) -> dict[str, Path]:
    drafts = {}
    for item in spec.split(","):
        name, _, path = item.partition("=")
        drafts[name] = Path(path) if path else assets / "drafts" / name
        draft_method(drafts[name])  # refuses a folder that holds no FLASH or EAGLE-3 draft, naming it
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
    p.add_argument("--by-question-kind", action="store_true",
                   help="score the answers one question kind at a time too (where is, what color, how many)")
    p.add_argument("--output", default="heldout_tau", help="RESULTS/OUTPUT.{json,md}")
    args = p.parse_args(argv)
    assets = Path(args.assets)
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in world.TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {world.TASKS}")
    results = score(assets / "target", parse_drafts(args.drafts, assets), tasks, args.rows, Path(args.rows_dir),
                    args.max_tokens, by_question_kind=args.by_question_kind)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.output}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{args.output}.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()

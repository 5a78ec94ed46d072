"""Where the toy target goes wrong: teacher-forced loss and next-token accuracy per task on training and on
held-out rows (equal: under-fitted, train better: over-fitted), and the reference words it misses most.

    .venv/bin/python benchmarks/world/diagnose_target.py --world build/world --stages shallow-4,deep

A stage is any checkpoint folder under WORLD (shallow, shallow-2, ..., deep). About 2 min on 2 cores for one stage
at the default 48 rows per task and split (most of it encoding the rows).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_target  # noqa: E402

from vllm_flash import world as toy_world  # noqa: E402


def rows(world: Path, task: str, split: str, n: int) -> list:
    """The first n rows of a task's split, encoded as the target's training saw them."""
    data = world / "data"
    subset = data / f".diagnose-{task}-{split}.jsonl"  # beside the data: rows name their media relative to it
    subset.write_text("\n".join((data / f"{task}-{split}.jsonl").read_text().splitlines()[:n]) + "\n")
    try:
        return train_target.encode_split(world / "shallow-init", subset)
    finally:
        subset.unlink()


@torch.no_grad()
def diagnose(model, samples: list, tokenizer, batch_size: int = 8) -> dict:
    loss, right, total = 0.0, 0, 0
    missed, seen = collections.Counter(), collections.Counter()
    for i in range(0, len(samples), batch_size):
        batch = train_target.collate(samples[i:i + batch_size])
        logits = model(**batch).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        loss += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        hit = logits[keep].argmax(-1) == labels[keep]
        right += hit.sum().item()
        total += keep.sum().item()
        words = [tokenizer.decode([t]).strip() for t in labels[keep].tolist()]
        seen.update(words)
        missed.update(w for w, h in zip(words, hit.tolist()) if not h)
    worst = [(w, f"{missed[w]}/{seen[w]}") for w, _ in missed.most_common(8)]
    return {"loss": round(loss / total, 4), "token_accuracy": round(right / total, 4), "most_missed": worst}


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default=str(train_target.ROOT / "build" / "world"))
    p.add_argument("--stages", default="deep", help="comma-separated checkpoint folders under WORLD")
    p.add_argument("--rows", type=int, default=48, help="rows per task and split")
    args = p.parse_args(argv)
    world = Path(args.world)
    tokenizer = AutoTokenizer.from_pretrained(world / "shallow-init")
    encoded = {(task, split): rows(world, task, split, args.rows)
               for task in toy_world.TASKS for split in ("train", "heldout")}
    for stage in args.stages.split(","):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(world / stage, dtype=torch.float32).eval()
        for (task, split), samples in encoded.items():
            print(json.dumps({"stage": stage, "task": task, "split": split,
                              **diagnose(model, samples, tokenizer)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

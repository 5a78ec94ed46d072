"""Where the toy target goes wrong: teacher-forced loss and next-token accuracy per task on training and on
held-out rows (equal: under-fitted, train better: over-fitted), the reference words it misses most, and how
often it misses the place an object moves to in a video caption, by whether the move happens inside one of the
frame pairs that Qwen2.5-VL's vision tower sees together or across two pairs.

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


def move_destinations(words: list[str], hits: list[bool]):
    """(where, hit) for each move in one video caption's words ("... moves to the top center."), hit when every
    word naming the destination is. The caption's event k (k = 1, 2, ...; sentence k + 1 after the frame count
    and the first scene) is the change from frame k - 1 to frame k, and the vision tower sees each group of
    FRAMES_PER_GROUP frames (a pair) together."""
    group = train_target.FRAMES_PER_GROUP
    sentence = 0
    for i, word in enumerate(words):
        if word == "moves" and words[i + 1:i + 3] == ["to", "the"]:
            k = sentence - 1
            inside = (k - 1) // group == k // group
            place = slice(i + 3, words.index(".", i))  # "top center", "middle right", or "middle" alone
            yield "inside a frame pair" if inside else "across frame pairs", all(hits[place])
        sentence += word.endswith(".")


@torch.no_grad()
def diagnose(model, samples: list, tokenizer, batch_size: int = 8) -> dict:
    loss, right, total = 0.0, 0, 0
    missed, seen = collections.Counter(), collections.Counter()
    destinations = collections.defaultdict(lambda: [0, 0])  # where -> [missed, seen]
    for i in range(0, len(samples), batch_size):
        batch = train_target.collate(samples[i:i + batch_size])
        for logits, labels in zip(model(**batch).logits[:, :-1], batch["labels"][:, 1:]):
            keep = labels != -100
            logits, labels = logits[keep], labels[keep]
            loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            hits = (logits.argmax(-1) == labels).tolist()
            right += sum(hits)
            total += len(hits)
            words = [tokenizer.decode([t]).strip() for t in labels.tolist()]
            seen.update(words)
            missed.update(w for w, h in zip(words, hits) if not h)
            for where, hit in move_destinations(words, hits):
                destinations[where][0] += not hit
                destinations[where][1] += 1
    worst = [(w, f"{missed[w]}/{seen[w]}") for w, _ in missed.most_common(8)]
    return {"loss": round(loss / total, 4), "token_accuracy": round(right / total, 4), "most_missed": worst,
            "move_destination_missed": {where: f"{m}/{n}" for where, (m, n) in sorted(destinations.items())}}


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

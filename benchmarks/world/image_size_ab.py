"""Does the target read its images better when each grid cell is exactly one visual token?

At 112 px the world's 3x3 grid of cells lies across Qwen2.5-VL's 4x4 grid of merged visual tokens (28 px
each), so an object is spread over up to four tokens that it shares with its neighbours; at 84 px each cell is
one token. This trains the same fresh 4-layer model (same seed, same scenes, same steps and schedule) on one
task's captions (image captions by default) at each size, then scores both teacher-forced on training and
held-out rows: loss, next-token accuracy, and how often the words naming a shape, colour or place are missed;
and serves each (vLLM, bf16, greedy) on the held-out rows for exact match and word accuracy. A short
side-by-side run says which way a retrain from scratch should go; it is not the full recipe.

    .venv/bin/python benchmarks/world/image_size_ab.py --out build/image-size-ab --steps 2000
    .venv/bin/python benchmarks/world/image_size_ab.py --out build/image-size-ab-video --task video_caption \
        --rows 2000 --steps 1500

The two arms train in parallel, one core each; an arm whose model is already there is only scored again.
Writes OUT/result.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import diagnose_target  # noqa: E402
import train_target  # noqa: E402

from vllm_flash import world  # noqa: E402


def arm(out: Path, size: int, task: str, rows: int, steps: int, lr: float, check_rows: int) -> dict:
    """Train one arm at `size` px and score it; returns its scores."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(1)
    recipe = train_target.Recipe(image_size=size)
    out.mkdir(parents=True, exist_ok=True)
    data = {split: world.write_split(out / "data", task, split, n, image_size=size)
            for split, n in (("train", rows), ("heldout", check_rows))}
    init = train_target.build_shallow(out, recipe)  # the same seeded model for every size
    if not (out / "model" / "config.json").exists():
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
        train_target.train(model, train_target.encode_split(init, data["train"]), steps, lr, recipe,
                           out / "train.log", f"{size}px", init, out / "model", fresh_probe=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(init)
    scores = {"task": task, "image_size": size, "visual_tokens": (size // 28) ** 2, "steps": steps,
              "train_rows": rows}
    for split in ("train", "heldout"):  # the first rows of each split
        scores[split] = diagnose_target.diagnose(model, diagnose_target.rows(out, task, split, check_rows),
                                                 tokenizer)
    return scores


def served_accuracy(out: Path, size: int, task: str, rows: int) -> dict:
    """Held-out exact match and word accuracy of an arm's model as vLLM serves it (bf16, greedy)."""
    served = out / "served"
    if not (served / "model.safetensors").exists():
        train_target.export_bf16(out / "model", served, out / "shallow-init")
    return train_target.heldout_accuracy(served, rows, size, tasks=(task,))[task]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(train_target.ROOT / "build" / "image-size-ab"))
    p.add_argument("--sizes", default="112,84")
    p.add_argument("--task", default="image_caption", choices=world.TASKS)
    p.add_argument("--rows", type=int, default=3000, help="training rows")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--check-rows", type=int, default=60, help="rows scored per split")
    args = p.parse_args(argv)
    out = Path(args.out)
    sizes = [int(s) for s in args.sizes.split(",")]
    with multiprocessing.get_context("spawn").Pool(len(sizes)) as pool:
        results = pool.starmap(arm, [(out / f"{size}px", size, args.task, args.rows, args.steps, args.lr,
                                      args.check_rows)
                                     for size in sizes])
    for r in results:  # in this process, one engine at a time
        r["heldout_served"] = served_accuracy(out / f"{r['image_size']}px", r["image_size"], args.task,
                                              args.check_rows)
    (out / "result.json").write_text(json.dumps(results, indent=1))
    for r in results:
        print(json.dumps({"image_size": r["image_size"], "heldout_served": r["heldout_served"],
                          **{split: {k: r[split][k] for k in ("loss", "token_accuracy", "missed_by_kind")}
                             for split in ("train", "heldout")}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

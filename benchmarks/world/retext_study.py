"""Can fresh text layers on the target's trained vision tower learn what the shipped text layers never did, a
shape's count ("How many triangles are there?"), and keep it while they learn captions and clips?

1. Fresh text layers in the architecture of START (cut to --layers), with START's vision tower (frozen),
   embeddings, final norm and LM head, trained on count-heavy questions: every shape question among the first
   --questions training questions and an eighth as many others. Scored teacher-forced on the shape questions
   among a thirtieth as many held-out questions.
2. With --mix-steps, then trained on the three tasks (--mix-rows from WORLD/data/train.jsonl), exported
   in bf16 as a servable target (OUT/target) and, where vLLM is installed, scored greedy on --score-rows
   held-out rows per task.

A study, not a recipe stage: it starts from a trained checkpoint (`build/world/deep-3` by default). It writes
OUT/report.json. On 2 cores the defaults take about 16 min (1) and 35 min (2), plus 10 min of encoding.
    .venv/bin/python benchmarks/world/retext_study.py --out build/world/retext --mix-steps 2500
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_target  # noqa: E402
from vllm_flash import world as toy_world  # noqa: E402


def fresh_text_model(start: Path, layers: int):
    """START's model with `layers` freshly initialised text layers; everything else (vision tower, embeddings,
    final norm, LM head) START's own, the vision tower frozen."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    trained = Qwen2_5_VLForConditionalGeneration.from_pretrained(start, dtype=torch.float32).state_dict()
    model = Qwen2_5_VLForConditionalGeneration(
        train_target.with_text_layers(Qwen2_5_VLConfig.from_pretrained(start), layers)).to(torch.float32)
    state = model.state_dict()
    state.update({k: trained[k] for k in state if not k.startswith(train_target.TEXT_LAYERS)})
    model.load_state_dict(state)
    for p in model.model.visual.parameters():
        p.requires_grad = False
    return model


def count_heavy_questions(folder: Path, split: str, questions: int, others: int) -> Path:
    """The shape questions among the first `questions` generated questions of `split`, and the first `others` of
    the rest, as a data file beside their images."""
    written = toy_world.write_split(folder / split, "visual_qa", split, questions)
    chosen = train_target.shape_questions_first(written.read_text().splitlines(),
                                                lambda line: json.loads(line)["id"], others)
    path = written.with_name(f"{split}-count-heavy.jsonl")
    path.write_text("\n".join(chosen) + "\n")
    return path


@torch.no_grad()
def teacher_forced_counts(model, samples: list) -> dict:
    """Over the shape questions among `samples`, teacher-forced at `train_target.deciding`'s two positions: how
    often "is"/"are" is right, how often both it and the count word are (over all, and where the picture has two
    or more of the shape), and which count words the model says."""
    was_training = model.training
    model.eval()
    found = {"questions": 0, "is_are": 0, "count": 0, "two_or_more": 0, "count_two_or_more": 0}
    said: dict = {}
    for s in samples:
        question = train_target.shape_question(s.row_id)
        if not question:
            continue
        shape, scene = question
        at = train_target.deciding(s)
        guess = model(**train_target.collate([s])).logits[0, at].argmax(-1)
        truth = s.token_ids[at.start + 1:at.stop + 1]
        many = sum(o.shape == shape for o in scene) >= 2
        right = bool((guess == truth).all())
        found["questions"] += 1
        found["is_are"] += int(guess[0] == truth[0])
        found["count"] += int(right)
        found["two_or_more"] += int(many)
        found["count_two_or_more"] += int(right and many)
        said[int(guess[1])] = said.get(int(guess[1]), 0) + 1
    model.train(was_training)
    return {**found, "said": said}


def mix_rows(data: Path, rows: dict) -> Path:
    """The first `rows[task]` rows of each task in `data` (train.jsonl), as a data file beside their images."""
    ids = lambda line: train_target.parse_row_id(json.loads(line)["id"])  # noqa: E731
    lines = [line for line in data.read_text().splitlines() if ids(line)[2] < rows.get(ids(line)[0], 0)]
    path = data.with_name(f"{data.stem}-first-{'-'.join(str(rows[t]) for t in toy_world.TASKS)}.jsonl")
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default=str(train_target.ROOT / "build" / "world"))
    p.add_argument("--start", help="the checkpoint whose vision tower and embeddings are kept (WORLD/deep-3)")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--questions", type=int, default=24000)
    p.add_argument("--count-steps", type=int, default=1500)
    p.add_argument("--count-lr", type=float, default=1e-3)
    p.add_argument("--mix-steps", type=int, default=0)
    p.add_argument("--mix-lr", type=float, default=5e-4)
    p.add_argument("--mix-rows", default="6000,8000,6000",
                   help="step 2's rows of each task (image captions, questions, clips), or one number for all")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--score-rows", type=int, default=200, help="held-out rows per task to score step 2's target on")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.mix_rows.split(",")]
    if len(counts) not in (1, len(toy_world.TASKS)):
        p.error(f"--mix-rows {args.mix_rows}: give one number for every task, or one each for {toy_world.TASKS}")
    per_task = dict(zip(toy_world.TASKS, counts * len(toy_world.TASKS) if len(counts) == 1 else counts))
    world, out = Path(args.world), Path(args.out)
    start = Path(args.start) if args.start else world / "deep-3"
    tokenizer_dir = world / "shallow-init"  # every stage's tokenizer and processor
    out.mkdir(parents=True, exist_ok=True)
    recipe = train_target.Recipe(save_every=10**9, layers=args.layers, shallow_layers=args.layers,
                                 batch_size=args.batch_size)
    report: dict = {"start": str(start), **vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        fit, check = (train_target.encode_split(tokenizer_dir, count_heavy_questions(
            Path(tmp), split, n, others)) for split, n, others in
            (("train", args.questions, args.questions // 8), ("heldout", max(40, args.questions // 30), 0)))
        report["count_rows"], report["encode_s"] = len(fit), round(time.time() - t0)
    model = fresh_text_model(start, args.layers)
    report["before"] = teacher_forced_counts(model, check)
    # `out` holds no vision probe, so none trains beside the frozen tower
    train_target.train(model, fit, args.count_steps, args.count_lr, recipe, out / "train.log", "count", out,
                       out / "count")
    report["after_count"] = teacher_forced_counts(model, check)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if args.mix_steps:
        rows = train_target.first_rows(train_target.encode_split(tokenizer_dir, mix_rows(
            world / "data" / "train.jsonl", per_task)), per_task)
        train_target.train(model, rows, args.mix_steps, args.mix_lr, recipe, out / "train.log", "mix", out,
                           out / "mix")
        report["after_mix"] = teacher_forced_counts(model, check)
        train_target.export_bf16(out / "mix", out / "target", tokenizer_dir)
        import importlib.util

        if args.score_rows and importlib.util.find_spec("vllm") is not None:
            report["after_mix_greedy"] = train_target.heldout_accuracy(
                out / "target", args.score_rows, toy_world.image_size_of(out / "target"))
    print(json.dumps(report), flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

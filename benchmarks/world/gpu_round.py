"""One deep fine-tune of the toy target on a lent GPU, in as many steps as fit a deadline, at one learning rate
and batch size. On 2 cores a fine-tune step of 16 rows takes about 3.6 s (4.4 rows/s); on an H200 a step of 256
rows took 0.52 s (490 rows/s) and one of 64 rows 0.21 s (`--time-batches 16,64,256`): the small model is bound
by per-step overheads, so a large batch comes nearly free. Variants side by side on the one GPU lose more than
they share: two at batch 64 took 0.47-0.54 s a step each, and two at batch 256 1.76-1.83 s (one alone 0.52 s),
each with all the cores' threads; so run one at a time, or give each its share of the cores (as now).

On the GPU machine (PyTorch and transformers, no vLLM), from the repository root: write the data (all cores),
then train until a deadline:
    python3 benchmarks/world/gpu_round.py --work /tmp/w
    python3 benchmarks/world/gpu_round.py --work /tmp/w --results $OUT --deadline $(( $(date +%s) + 420 )) \
        --variant 2e-4:256
Here, build the target from what came back and score it with vLLM:
    .venv/bin/python benchmarks/world/gpu_round.py --assemble RESULTS/lr2e-4_b256 --into build/world/target-gpu

With `--recount TASK=N,...` the round is a recount round instead (`Recipe.recount_rounds`): the shipped target's
trained text layers alone (`train_target.cut_to_trained`) on its frozen vision tower, on rows no round has seen
(`new_rows`: the images and clips where two shapes share a colour, a share of the rest, every question); `--assemble`
then deepens what comes back as the recipe does. It runs on 2 cores too (`--device cpu`), as it did for the round
in benchmarks/world/README.md:
    .venv/bin/python benchmarks/world/gpu_round.py --work W --results R --device cpu --workers 2 \
        --recount video_caption=40000,image_caption=30000,visual_qa=12000 --variant 2e-4:16 --deadline D

A variant writes its bf16 weights in two safetensors parts (what a GPU machine sends back is at most 16 MiB a
file) and `facts.json`: the steps it took, which make the round a `Recipe.deep_rounds` entry
(steps, lr, rows, batch size[, the added layers' lr multiplier]) that `train_target.py` retrains anywhere.
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_target  # noqa: E402

from vllm_flash import world  # noqa: E402
from vllm_flash.data import encode_all  # noqa: E402


ROOT = Path(__file__).resolve().parents[2]
EXPORT_S = 30  # kept back from the budget: saving the fp32 model, then its bf16 parts
WEIGHTS = "model.safetensors"


def step_seconds(model, samples: list, batch_size: int, device: str, steps: int = 12, ready: dict | None = None
                 ) -> float:
    """Seconds one training step of `model` takes at `batch_size` (on a copy; the first two steps warm up), each
    on the next batch, or on the `ready` one alone."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)  # GPU work is queued
    trial = copy.deepcopy(model).to(device).train()
    opt = torch.optim.AdamW(trial.parameters(), lr=1e-6)
    stream = train_target.batch_stream(samples, batch_size, seed=1)
    for step in range(steps):
        if step == 2:
            sync()
            start = time.time()
        batch = ready or {k: v.to(device) for k, v in train_target.collate(next(stream)).items()}
        trial(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return (time.time() - start) / (steps - 2)


def time_batches(samples: list, start: Path, sizes: list[int], device: str) -> None:
    """Seconds per training step at each batch size, with the batch assembled each step and with it ready on
    the device: a step that takes as long at 256 rows as at 16 is bound by per-step overheads (kernel launches,
    Python), not by arithmetic, so larger batches come nearly free."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(start, dtype=torch.float32)
    for size in sizes:
        ready = {k: v.to(device) for k, v in train_target.collate(samples[:size]).items()}
        print(json.dumps({"batch_size": size, "step_s": round(step_seconds(model, samples, size, device), 4),
                          "step_s_batch_ready": round(step_seconds(model, samples, size, device, ready=ready), 4)}),
              flush=True)


def save_parts(model_dir: Path, into: Path, parts: int = 2) -> None:
    """The model's weights in bf16, spread over `parts` files of about equal size."""
    from safetensors.torch import load_file, save_file

    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(model_dir / WEIGHTS).items()}
    bins: list[dict] = [{} for _ in range(parts)]
    size = [0] * parts
    for name in sorted(tensors, key=lambda k: -tensors[k].numel()):
        i = size.index(min(size))
        bins[i][name] = tensors[name].contiguous()
        size[i] += tensors[name].numel()
    into.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(bins):
        save_file(part, into / f"part-{i}.safetensors")


def assemble(parts_dir: Path, into: Path, start: Path) -> None:
    """A servable target: `start`'s config, tokenizer and processor with the weights of `parts_dir`. A recount
    round's parts (with their own config: the trained layers alone) are deepened as the recipe deepens them."""
    from safetensors.torch import load_file, save_file

    tensors: dict = {}
    for part in sorted(parts_dir.glob("part-*.safetensors")):
        tensors.update(load_file(part))
    if (parts_dir / "config.json").exists():
        shallow = into.with_name(into.name + "-shallow")
        train_target.copy_non_weights(start, shallow, keep_config=False)
        shutil.copy(parts_dir / "config.json", shallow / "config.json")
        save_file(tensors, shallow / WEIGHTS, metadata={"format": "pt"})
        deep = into.with_name(into.name + "-deep")
        train_target.deepen(shallow, deep, train_target.Recipe())
        train_target.export_bf16(deep, into, start)
        shutil.rmtree(deep)
        return
    shipped = load_file(start / WEIGHTS)
    if set(tensors) != set(shipped):
        raise ValueError(f"{parts_dir} holds other weights than {start}: {sorted(set(tensors) ^ set(shipped))[:5]}")
    train_target.copy_non_weights(start, into)
    save_file(tensors, into / WEIGHTS, metadata={"format": "pt"})


def new_rows(scanned: dict, others_every: int) -> list[tuple[str, int]]:
    """(task, index) of training rows no round of the recipe has seen: of `scanned[task]` indices after the last
    one the recipe writes, every image or clip where objects of two shapes share a colour (`world.shares_a_colour`:
    nearly every error of the shipped target names the wrong one of two such objects), every `others_every`-th of
    the rest, and every question."""
    first = train_target.train_rows(train_target.Recipe())
    chosen = []
    for task, n in scanned.items():
        for index in range(first[task], first[task] + n):
            keep = task == "visual_qa" or index % others_every == 0 or world.shares_a_colour(
                world.example(task, world.SPLIT_SEEDS["train"] + index)["scenes"])
            if keep:
                chosen.append((task, index))
    return chosen


def write_new_rows(work: Path, chosen: list[tuple[str, int]], image_size: int, workers: int) -> list:
    """`chosen` rows written under WORK/new (rendered by `workers` processes), as `RowLine`s."""
    from vllm_flash.data import RowLine

    data = work / "new"
    for task in {task for task, _ in chosen}:
        (data / f"{task}-train").mkdir(parents=True, exist_ok=True)
    jobs = [(data, task, "train", index, image_size) for task, index in chosen]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        lines = pool.map(world.write_row, jobs, chunksize=max(1, len(jobs) // (8 * workers)))
    return [RowLine(line, data, n) for n, line in enumerate(lines, 1)]


def starting_model(start: Path, recount: bool):
    """The model a variant trains: `start` whole, or (a recount round) its trained text layers alone on its frozen
    vision tower, as `Recipe.recount_rounds` train them (`train_target.cut_to_trained`)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if not recount:
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(start, dtype=torch.float32)
    model = train_target.cut_to_trained(start, train_target.Recipe())
    for param in model.model.visual.parameters():
        param.requires_grad = False
    return model


def run_variant(name: str, lr: float, batch_size: int, samples: list, start: Path, work: Path, results: Path,
                deadline: float, device: str, rows: dict, added_lr_scale: float = 1.0, threads: int | None = None,
                recount: bool = False) -> None:
    if threads:  # variants side by side, each with every core's threads, starve each other's Python (untimed)
        torch.set_num_threads(threads)

    model = starting_model(start, recount)
    seconds = step_seconds(model, samples, batch_size, device)
    steps = max(1, int((deadline - time.time() - EXPORT_S) / seconds))
    print(json.dumps({"variant": name, "step_s": round(seconds, 4), "steps": steps}), flush=True)
    recipe = train_target.Recipe(save_every=10**9)
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{name}.log"
    t0 = time.time()
    train_target.train(model, samples, steps, lr, recipe, log, name, start, work / name, batch_size=batch_size,
                       device=device, added_lr_scale=added_lr_scale)
    train_s = time.time() - t0
    save_parts(work / name, results / name)
    if recount:  # a model of fewer layers than `start`: `assemble` needs its config
        shutil.copy(work / name / "config.json", results / name / "config.json")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    round_ = [steps, lr, rows, batch_size, *([added_lr_scale] if added_lr_scale != 1 else [])]  # as in the recipe
    facts = {"round": round_, "step_s": round(seconds, 4), "train_s": round(train_s),
             "device": torch.cuda.get_device_name() if device.startswith("cuda") else device, "start": str(start),
             "loss": [(line["step"], line["loss"]) for line in lines if line["step"] % 200 == 0 or line is lines[-1]]}
    (results / name / "facts.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps({"variant": name, "done": True, "train_s": round(train_s)}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--start", default=str(ROOT / "assets" / "world" / "target"), help="the target to fine-tune")
    p.add_argument("--work", default="/tmp/gpu_round", help="the data and checkpoints (shared by the variants)")
    p.add_argument("--results", help="where the variant's weights and facts go")
    p.add_argument("--deadline", type=float, help="when (seconds since the epoch) the variant must be done")
    p.add_argument("--variant", action="append", default=[],
                   help="PEAK_LR:BATCH_SIZE[:ADDED_LAYERS_LR_SCALE], e.g. 2e-4:256 or 2e-4:256:5; again for another "
                        "variant, trained beside it on the same encoded rows; without it, only write the data")
    p.add_argument("--rows", type=int, help="at most this many rows per task (default: the last deep round's)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes that write or encode the data")
    p.add_argument("--time-batches", help="only time a step at each of these batch sizes, e.g. 16,64,256")
    p.add_argument("--assemble", help="a variant's results folder, to build a target from (with --into)")
    p.add_argument("--into")
    p.add_argument("--recount", metavar="TASK=N,...",
                   help="a recount round instead: the trained text layers alone on the frozen tower, on new rows "
                        "(`new_rows`) among the N indices of each task after the recipe's, e.g. "
                        "video_caption=40000,image_caption=30000,visual_qa=12000")
    p.add_argument("--others-every", type=int, default=4,
                   help="with --recount: keep every this-th image or clip where no colour is shared")
    args = p.parse_args(argv)
    start, work = Path(args.start), Path(args.work)
    if args.assemble:
        assemble(Path(args.assemble), Path(args.into), start)
        return 0
    t0 = time.time()
    if args.recount:
        scanned = {task: int(n) for task, n in (item.split("=") for item in args.recount.split(","))}
        rows = {"scanned": scanned, "others_every": args.others_every}
        lines = write_new_rows(work, new_rows(scanned, args.others_every), train_target.Recipe.image_size,
                               args.workers)
        print(json.dumps({"written": len(lines), "data_s": round(time.time() - t0)}), flush=True)
        samples = encode_all(start, lines, max_len=1024, workers=args.workers, pixel_dtype=torch.bfloat16)
        # as the recipe's KEEP_COUNT_HEAVY rounds: the shape questions again, lest the counts be given back
        samples = samples + train_target.count_heavy([s for s in samples if s.row_id.startswith("visual_qa")])
        rows["trained"] = dict(Counter(train_target.parse_row_id(s.row_id)[0] for s in samples))
    else:
        rows = dict(train_target.Recipe().deep_rounds[-1][2])
        if args.rows:
            rows = {task: min(n, args.rows) for task, n in rows.items()}
        # written once, then read by every variant: `write_data` keeps data that is already right
        data = train_target.write_rows(work, rows, heldout=1, workers=args.workers)
        if not args.variant and not args.time_batches:
            print(json.dumps({"rows": rows, "data_s": round(time.time() - t0)}), flush=True)
            return 0
        samples = train_target.first_rows(train_target.encode_split(start, data / "train.jsonl", args.workers),
                                          rows)
    print(json.dumps({"encoded": len(samples), "rows": rows, "data_s": round(time.time() - t0)}), flush=True)
    if args.time_batches:
        time_batches(samples, start, [int(b) for b in args.time_batches.split(",")], args.device)
        return 0
    # one process per variant, forked once the rows are encoded (so they are encoded once); the parent has not
    # touched CUDA, so each child starts its own
    children = []
    for variant in args.variant:
        lr, batch_size, *scale = variant.split(":")
        name = f"lr{lr}_b{batch_size}" + (f"_x{scale[0]}" if scale else "")
        child = multiprocessing.get_context("fork").Process(
            target=run_variant, name=name, args=(name, float(lr), int(batch_size), samples, start, work,
                                                 Path(args.results), args.deadline, args.device, rows,
                                                 float(scale[0]) if scale else 1.0,
                                                 max(1, args.workers // len(args.variant)),
                                                 bool(args.recount)))
        child.start()
        children.append(child)
    for child in children:
        child.join()
    failed = {child.name: child.exitcode for child in children if child.exitcode}  # < 0: killed by that signal
    if failed:
        print(json.dumps({"failed": failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

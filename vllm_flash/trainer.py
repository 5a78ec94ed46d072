"""`vllm-flash train`: data -> (optional self-distillation) -> target features -> FLASH draft -> export.

    vllm-flash train --target TARGET_DIR --data train.jsonl --out DRAFT_DIR [--k 4 --latents C --epochs N]

Everything lands in DRAFT_DIR: the exported draft (config.json + model.safetensors, loadable by vLLM as
method 'flash'), features/ (sharded safetensors), trainer/ (resumable state), train.log (one JSON line per
step). A killed run continues with --resume.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

import torch

from .checkpoint import load_target_config, load_target_head, save_draft
from .config import FlashConfig, target_facts
from .data import BadDataReport, Conversation, FeatureShards, ShardWriter, encode_or_report, hf_features, \
    media_limits, read_conversations, row_lines, vllm_request
from .modeling import FlashDraft
from .train import TrainConfig, fit

MIN_FREE_BYTES = 256 * 2**20


def preflight(out: Path) -> None:
    """Fail before any work when the output cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # per process: DDP ranks probe the same folder at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise SystemExit(f"vllm-flash train: cannot write to {out}: {err}") from None
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise SystemExit(f"vllm-flash train: only {free / 2**20:.0f} MiB free under {out}; "
                         f"need at least {MIN_FREE_BYTES / 2**20:.0f} MiB for features and checkpoints")


REGENERATE_CHUNK = 512  # requests handed to vLLM at a time: only their decoded media are held at once


def target_answers(target: Path, conversations: Iterable[Conversation], processor, max_tokens: int,
                   limits: dict) -> list[tuple[str, list[int]]]:
    """The target's own greedy answer (text, token ids) to each conversation's first question, through vLLM, a
    chunk of requests at a time. `limits`: vLLM's `limit_mm_per_prompt` (`media_limits`)."""
    import gc
    import itertools

    from vllm import LLM, SamplingParams

    # On CPU serve in float32, as the benchmarks and tests do: bf16 weights would otherwise run in bf16 there
    # and their greedy answers could differ from the ones the draft is later served against.
    llm = LLM(model=str(target), enforce_eager=True, seed=0, max_model_len=4096, enable_prefix_caching=False,
              dtype="auto" if torch.cuda.is_available() else "float32", limit_mm_per_prompt=limits)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    answers = []
    conversations = iter(conversations)
    while chunk := list(itertools.islice(conversations, REGENERATE_CHUNK)):
        outputs = llm.generate([vllm_request(conv, processor) for conv in chunk], params)
        answers += [(out.outputs[0].text, list(out.outputs[0].token_ids)) for out in outputs]
    del llm
    gc.collect()
    return answers


def with_answer(conv: Conversation, text: str, token_ids: list[int]) -> Conversation:
    """`conv` up to its first answer, answered with `text` (`token_ids`, exactly as the target produced them)."""
    first_answer = next(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
    messages = conv.messages[:first_answer] + [{"role": "assistant", "content": [{"type": "text", "text": text}]}]
    return Conversation(conv.row_id, messages, conv.images, conv.videos, [text], answer_token_ids=token_ids)


def regenerate_answers(target: Path, conversations: list[Conversation], processor, max_tokens: int
                       ) -> list[Conversation]:
    """Each conversation answered by the target itself (`target_answers`)."""
    answers = target_answers(target, conversations, processor, max_tokens, media_limits(conversations))
    return [with_answer(conv, *answer) for conv, answer in zip(conversations, answers)]


# Bump when what a feature directory holds changes meaning, so older directories are refused, not reused.
# 2: video rows carry the M-RoPE positions vLLM serves (1 fps, text resumed past the video's last position).
FEATURES_FORMAT = 2


def extract_features(target: Path, data: Path, feature_dir: Path, *, max_len: int = 2048,
                     image_root: Path | None = None, regenerate: bool = False, regenerate_tokens: int = 128,
                     progress: bool = True, feature_dtype: torch.dtype = torch.float32,
                     target_layer_ids: list[int] | None = None) -> tuple[int, BadDataReport]:
    """Stream the target's features (and with `target_layer_ids` those layers' states, `hf_features`) over the
    data set into `feature_dir`; returns (samples, bad-data report)."""
    from tqdm import tqdm
    from transformers import AutoModelForImageTextToText, AutoProcessor

    report = BadDataReport()
    processor = AutoProcessor.from_pretrained(str(target))
    facts = target_facts(load_target_config(target))
    rows = row_lines(data, image_root)
    answers = None
    if regenerate and rows:
        # a pass of its own, keeping the answers alone: the vLLM engine is gone before the HF model loads, and
        # the rows' media are read again below rather than held (the same usable rows, in the same order)
        answers = iter(target_answers(target, read_conversations(data, BadDataReport(), image_root), processor,
                                      regenerate_tokens, media_limits(rows)))
    # On a GPU the target runs in bf16 (as it is served); on CPU in fp32.
    gpu = torch.cuda.is_available()
    model = AutoModelForImageTextToText.from_pretrained(
        str(target), dtype=torch.bfloat16 if gpu else torch.float32).eval().to("cuda" if gpu else "cpu")
    writer = ShardWriter(feature_dir, dtype=feature_dtype)
    for conv in tqdm(read_conversations(data, report, image_root), desc="features", total=len(rows),
                     disable=not progress, dynamic_ncols=True):
        if answers is not None:
            conv = with_answer(conv, *next(answers))
        encoded = encode_or_report(conv, processor, facts, max_len, report)
        if encoded is None:
            continue
        features, layer_states = hf_features(model, encoded, target_layer_ids)
        writer.add(encoded.token_ids, features, encoded.frames, encoded.target_from, layer_states)
    writer.close({"format": FEATURES_FORMAT, "target": str(Path(target).resolve()), "data": str(data),
                  "bad_rows": dict(report.counts), "target_layer_ids": target_layer_ids})
    return writer.count, report


def _init_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: one process per GPU (NCCL), or per CPU worker (gloo)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.distributed.get_rank(), world, device


def run_train(args) -> int:
    target, out = Path(args.target), Path(args.out)
    preflight(out)
    rank, world, device = _init_distributed()
    feature_dir = Path(args.features) if args.features else out / "features"
    log_path = out / (f"train.rank{rank}.log" if rank else "train.log")
    if rank != 0:  # rank 0 extracts the features; the others wait for them
        torch.distributed.barrier()
        index = json.loads((feature_dir / "index.json").read_text())
        bad_rows = index.get("bad_rows", {})
    elif (args.resume or args.features) and (feature_dir / "index.json").exists():
        # --features naming finished features (from an earlier run on the same target) reuses them, so
        # several drafts can train on exactly the same samples without extracting twice.
        index = json.loads((feature_dir / "index.json").read_text())
        if index.get("target") and Path(index["target"]).resolve() != target.resolve():
            raise SystemExit(f"vllm-flash train: features in {feature_dir} were extracted from {index['target']}, "
                             f"not from {target}")
        if index.get("format", 1) != FEATURES_FORMAT:
            raise SystemExit(f"vllm-flash train: features in {feature_dir} are in format {index.get('format', 1)}, "
                             f"this vllm-flash writes format {FEATURES_FORMAT} (older video features carry "
                             f"positions vLLM does not serve); delete the folder to extract them again")
        if index.get("target_layer_ids") != args.target_layers:
            raise SystemExit(f"vllm-flash train: features in {feature_dir} hold target layers "
                             f"{index.get('target_layer_ids') or 'none (final hidden states only)'}, this run asks "
                             f"for {args.target_layers or 'none'}: pass the same --target-layers, or another "
                             f"--features folder")
        print(f"reusing {index['num_samples']} samples of features in {feature_dir}")
        bad_rows = index.get("bad_rows", {})
    else:
        count, report = extract_features(target, Path(args.data), feature_dir, max_len=args.max_len,
                                         image_root=Path(args.image_root) if args.image_root else None,
                                         regenerate=args.regenerate, regenerate_tokens=args.regenerate_tokens,
                                         feature_dtype=torch.bfloat16 if args.feature_dtype == "bf16"
                                         else torch.float32, target_layer_ids=args.target_layers)
        print(f"features: {count} samples; bad rows: {report.summary()}")
        bad_rows = dict(report.counts)
        if count == 0:
            raise SystemExit("vllm-flash train: no usable samples in the data set")
    if rank == 0 and world > 1:
        torch.distributed.barrier()
    samples = FeatureShards(feature_dir)
    target_config = load_target_config(target)
    config = FlashConfig.for_target(target_config, num_speculative_tokens=args.k, num_latents=args.latents,
                                    fusion=args.fusion, slot_token_mixer=args.token_mixer,
                                    target_layer_ids=args.target_layers,
                                    compressor_exclusion=args.compressor_exclusion,
                                    compressor_saliency=args.compressor_saliency)
    torch.manual_seed(args.seed)
    draft = FlashDraft(config)
    draft.attach_target_head(*load_target_head(target))
    draft.to(device)
    steps = args.steps or args.epochs * math.ceil(len(samples) / args.batch_size)
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup=min(args.warmup, steps // 10),
                      feature_noise=args.noise, seed=args.seed,
                      ce_weight=TrainConfig.ce_weight if args.ce_weight is None else args.ce_weight,
                      bf16=args.dtype == "bf16")
    meta = {"target": str(target.resolve()), "draft_config": config.to_diff_dict()}
    meta["draft_config"].pop("training", None)
    mode = "a" if args.resume else "w"
    with open(log_path, mode) as log:
        def on_step(step, loss, accuracy):
            log.write(json.dumps({"step": step, "loss": round(loss, 6),
                                  "slot_accuracy": [round(a, 4) for a in accuracy], "time": time.time()}) + "\n")
            log.flush()

        losses = fit(draft, samples, cfg, on_step=on_step, checkpoint_dir=out / "trainer",
                     save_every=args.save_every, resume=args.resume, meta=meta, progress=True)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
    draft.config.training = {"data": str(args.data), "samples": len(samples), "bad_rows": bad_rows,
                             "regenerate": bool(args.regenerate), "steps": steps, "batch_size": args.batch_size,
                             "lr": args.lr, "ce_weight": cfg.ce_weight, "seed": args.seed,
                             "final_loss": losses[-1] if losses else None, "target": str(target.resolve())}
    save_draft(draft.to("cpu"), out)
    print(f"exported FLASH draft to {out} (final loss {losses[-1]:.4f}); "
          f"serve it with speculative_config={{'method': 'flash', 'model': '{out}'}}")
    return 0

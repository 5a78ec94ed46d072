"""Train an EAGLE-3 draft with Red Hat's `speculators` (0.9.0) for vLLM's built-in `method: "eagle3"`.

    .venv/bin/python benchmarks/eagle3/train_eagle3.py --target TARGET --data train.jsonl --out DRAFT \
        --epochs 20 [--image-root DIR] [--batch-size 8] [--lr 1e-3] [--max-len 2048] [--seed 0]

The baseline the FLASH drafts are measured against, so it sees exactly their data: the same LLaVA JSONL,
read and tokenised by `vllm_flash.data` (read_conversations + encode), the same supervised positions
(the answer tokens). Steps:
  1. the target's hidden states from an HF transformers forward (fp32 on CPU): the residual stream after
     each auxiliary layer and after the last layer (pre-norm), i.e. what vLLM's `extract_hidden_states`
     saves; written in speculators' own layout (a `datasets` table + hidden_states/hs_<i>.safetensors);
  2. speculators' Eagle3DraftModel, data loader (packing, shift_batch) and Trainer, with its EAGLE-3
     defaults (1 llama layer, norm_before_fc, norm_output, KL loss, Muon + AdamW, linear schedule);
  3. the draft exported with speculators' save_pretrained (bf16 safetensors + a `speculators_config`
     that vLLM reads natively), plus training.json.
Nothing is pickled: vocab mappings are not used (full target vocab) and the trainer's checkpointer, which
torch.saves optimizer states, is bypassed (epochs are driven here; the export happens once at the end).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from vllm_flash.checkpoint import load_target_config  # noqa: E402
from vllm_flash.config import target_facts  # noqa: E402
from vllm_flash.data import BadDataReport, encode_or_report, read_conversations  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="HF directory of the target (Qwen2.5-VL)")
    p.add_argument("--data", required=True, help="LLaVA-format JSONL (the FLASH drafts' training file)")
    p.add_argument("--image-root", default=None, help="media paths are relative to this (default: JSONL's folder)")
    p.add_argument("--out", required=True, help="draft directory to write")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=8,
                   help="samples per step, on average: speculators packs each batch into one sequence of "
                        "batch-size x mean-sample-length tokens")
    p.add_argument("--lr", type=float, default=1e-3, help="speculators' default")
    p.add_argument("--max-len", type=int, default=2048, help="longer samples are skipped and counted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=4, help="TTT steps trained = the draft's default speculative tokens")
    p.add_argument("--aux-layers", type=int, nargs="+", default=None,
                   help="target layer ids for the auxiliary states (default: speculators' [2, L//2, L-3], "
                        "or [1, L//2, L-1] when those collide on a shallow target)")
    p.add_argument("--regenerate", action="store_true",
                   help="replace answers by the target's greedy ones (as `vllm-flash train --regenerate`)")
    p.add_argument("--regenerate-tokens", type=int, default=128)
    p.add_argument("--feature-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="hidden states on disk (4 layers x hidden x 4 bytes per token in fp32); training is fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def default_aux_layers(num_layers: int) -> list[int]:
    ids = [2, num_layers // 2, num_layers - 3]  # speculators' and vLLM's EAGLE-3 default
    if len(set(ids)) == 3 and min(ids) >= 1:
        return ids
    ids = sorted({1, num_layers // 2, num_layers - 1})
    if len(ids) != 3:
        raise SystemExit(f"target has {num_layers} layers: too shallow for 3 distinct auxiliary layers; "
                         f"pass --aux-layers")
    return ids


# ---------------------------------------------------------------------------------------------------------
# 1. Target hidden states -> speculators' data layout
# ---------------------------------------------------------------------------------------------------------
class LayerTaps:
    """Records the residual stream after decoder layer k-1 for each layer id k (0: the embeddings).

    vLLM's aux-hidden-state ids count that way, and its last id (= num_layers) is the final layer's output
    *before* the final norm. HF's output_hidden_states does not give that: its last entry is post-norm."""

    def __init__(self, layers: torch.nn.ModuleList, layer_ids: list[int]) -> None:
        self.states: dict[int, torch.Tensor] = {}
        self.handles = []
        for k in layer_ids:
            if k == 0:
                self.handles.append(layers[0].register_forward_pre_hook(self._pre(k), with_kwargs=True))
            else:
                self.handles.append(layers[k - 1].register_forward_hook(self._post(k)))

    def _pre(self, k):
        def hook(_module, args, kwargs):
            self.states[k] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def _post(self, k):
        def hook(_module, _args, output):
            self.states[k] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook


def write_speculators_data(target: Path, data: Path, image_root: Path | None, data_dir: Path, max_len: int,
                           layer_ids: list[int], regenerate: bool, regenerate_tokens: int,
                           feature_dtype: torch.dtype = torch.float32):
    """The dataset speculators' ArrowDataset reads: rows (input_ids, loss_mask, seq_len) saved with
    `datasets`, and hidden_states/hs_<row>.safetensors = {token_ids: (T,), hidden_states: (T, n, H)} with
    the auxiliary layers first and the last layer last."""
    from datasets import Dataset
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForImageTextToText, AutoProcessor

    report = BadDataReport()
    processor = AutoProcessor.from_pretrained(str(target))
    facts = target_facts(load_target_config(target))
    conversations = list(read_conversations(data, report, image_root))
    if regenerate and conversations:
        from vllm_flash.evaluate import engine_env
        from vllm_flash.trainer import regenerate_answers

        engine_env()  # as `vllm-flash train` does: vLLM in-process, offline, a CPU KV cache that fits
        conversations = regenerate_answers(target, conversations, processor, regenerate_tokens)
    # fp32 on CPU; bf16 on a GPU (as the target is served there), like vllm_flash.trainer.extract_features.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(
        str(target), dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval().to(device)
    taps = LayerTaps(model.model.language_model.layers, layer_ids)
    hs_dir = data_dir / "hidden_states"
    hs_dir.mkdir(parents=True, exist_ok=True)
    rows = {"input_ids": [], "loss_mask": [], "seq_len": []}
    for conv in tqdm(conversations, desc="hidden states", dynamic_ncols=True):
        enc = encode_or_report(conv, processor, facts, max_len, report)
        if enc is None:
            continue
        inputs = {k: v.to(device) for k, v in enc.inputs.items()
                  if isinstance(v, torch.Tensor) and k != "attention_mask"}
        with torch.no_grad():
            model.model(**inputs)  # as vllm_flash.data.hf_features: M-RoPE positions from the grids
        hidden = torch.stack([taps.states[k][0] for k in layer_ids], dim=1)  # (T, n, H)
        hidden = hidden.to(feature_dtype).cpu()
        ids = enc.token_ids.to(torch.long)
        save_file({"token_ids": ids.contiguous(), "hidden_states": hidden.contiguous()},
                  str(hs_dir / f"hs_{len(rows['seq_len'])}.safetensors"))
        # Supervised positions: the answer (>= target_from), exactly FLASH's target mask (media are prompt).
        mask = torch.zeros(len(ids), dtype=torch.long)
        mask[enc.target_from:] = 1
        rows["input_ids"].append(ids.tolist())
        rows["loss_mask"].append(mask.tolist())
        rows["seq_len"].append(len(ids))
    if not rows["seq_len"]:
        raise SystemExit(f"no usable samples in {data}; bad rows: {report.summary()}")
    table = Dataset.from_dict(rows)
    table.set_format(type="torch")  # ArrowDataset compares tensors; the format is saved with the table
    table.save_to_disk(str(data_dir))
    return rows["seq_len"], report


# ---------------------------------------------------------------------------------------------------------
# 2. speculators' trainer, on CPU
# ---------------------------------------------------------------------------------------------------------
def cpu_patches() -> None:
    """speculators' Trainer assumes an accelerator. Patched here, in this process only (not site-packages):
    - it moves the model and batches with `.to(local_rank)`; an int means cuda:<int>, so give it "cpu";
    - its step timer calls torch.accelerator.synchronize(), which raises without an accelerator."""
    import speculators.train.trainer as trainer_module

    if not torch.accelerator.is_available():
        trainer_module.get_local_rank = lambda: torch.device("cpu")
        torch.accelerator.synchronize = lambda *a, **k: None
    # autocast is then asked for device "cuda" (its fallback), which torch disables with a warning: the
    # draft trains in fp32, as FLASH drafts do on CPU.
    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    warnings.filterwarnings("ignore", message=".*pin_memory.*")


class MetricsTap(logging.Handler):
    """Keeps the per-step metric dicts the Trainer logs to 'speculators.metrics'."""

    def __init__(self) -> None:
        super().__init__()
        self.train: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, dict) and "train" in record.msg:
            self.train.append({"step": record.msg["global_step"], **record.msg["train"]})


def train(args, target: Path, data_dir: Path, lengths: list[int], layer_ids: list[int], work: Path):
    from speculators.models.eagle3 import Eagle3DraftModel
    from speculators.models.eagle3.data import shift_batch
    from speculators.train.cli import build_draft_model, set_seed
    from speculators.train.config import TrainConfig
    from speculators.train.data import ArrowDataset
    from speculators.train.dataloader import _setup_dataloader
    from speculators.train.trainer import Trainer, TrainerConfig

    cpu_patches()
    vocab = load_target_config(target).get_text_config().vocab_size
    total_seq_len = max(max(lengths), math.ceil(args.batch_size * sum(lengths) / len(lengths)))
    # speculators' own config type supplies its EAGLE-3 defaults; only CPU and this benchmark's choices
    # are set here (layer_ids already include the last layer, which speculators does not list).
    given = {
        "speculator_type": "eagle3", "seed": args.seed, "verifier_name_or_path": str(target),
        "target_layer_ids": layer_ids[:-1], "ttt_steps": args.k, "lr": args.lr, "epochs": args.epochs,
        "draft_attn_impl": "sdpa",           # FlexAttention has no CPU backward
        "loss_implementation": "eager",      # the fused loss is a GPU (Triton/compiled) kernel
        "num_workers": 0,                    # spawn workers re-import torch per epoch; pointless here
        "hidden_states_dtype": "float32",    # no autocast on CPU: keep data and weights in one dtype
        "full_attention_indices": [0],       # one plain causal layer, as vLLM's Llama EAGLE-3 draft
        "data_path": str(data_dir), "total_seq_len": total_seq_len, "save_path": str(work),
    }
    flat = TrainConfig.from_flat(given).flatten()
    dropped = [k for k, v in given.items() if flat.get(k) != v]  # from_flat ignores unknown names silently
    if dropped:
        raise SystemExit(f"speculators' TrainConfig did not take {dropped}")
    flat = argparse.Namespace(**flat)
    set_seed(args.seed)
    model = build_draft_model(flat, Eagle3DraftModel, None, None, vocab)
    dataset = ArrowDataset(max_len=total_seq_len, datapath=str(data_dir), on_missing="raise", train_ratio=1.0,
                           split="train", hidden_states_dtype=torch.float32)
    loader = _setup_dataloader(dataset, total_seq_len, model.config.transformer_layer_config.hidden_size,
                               num_workers=0, num_target_layers=len(layer_ids) - 1, prefetch_factor=None,
                               preprocess=shift_batch, seed=args.seed)
    train_kwargs, val_kwargs = Eagle3DraftModel.get_trainer_kwargs(**vars(flat))
    trainer_cfg = TrainerConfig(
        lr=flat.lr, num_epochs=flat.epochs, save_path=str(work), resume_from_checkpoint=False,
        train_call_kwargs=train_kwargs, val_call_kwargs=val_kwargs, optimizer=flat.optimizer,
        weight_decay=flat.weight_decay, muon_lr=flat.muon_lr, muon_momentum=flat.muon_momentum,
        muon_weight_decay=flat.muon_weight_decay, muon_ns_steps=flat.muon_ns_steps,
        muon_adjust_lr_fn=flat.muon_adjust_lr_fn, scheduler_type=flat.scheduler_type,
        hidden_states_dtype=torch.float32, log_freq=1)
    tap = MetricsTap()
    logging.getLogger("speculators.metrics").addHandler(tap)
    logging.getLogger("speculators.metrics").setLevel(logging.INFO)
    trainer = Trainer(model, trainer_cfg, loader, None)
    for epoch in range(args.epochs):  # run_training's loop minus the per-epoch (pickle) checkpoints
        trainer.train_epoch(epoch)
    return model, trainer.global_step, tap.train, flat, total_seq_len


# ---------------------------------------------------------------------------------------------------------
# 3. Export
# ---------------------------------------------------------------------------------------------------------
def export(model, out: Path) -> None:
    from speculators.train.checkpointer import convert_float_dtype, patch_config_dtype

    # What speculators' checkpointer writes for an epoch, minus the optimizer: bf16 safetensors + config.
    state = convert_float_dtype(model.state_dict(), torch.bfloat16)
    model.save_pretrained(str(out), state_dict=state)
    patch_config_dtype(out / "config.json", torch.bfloat16)
    # save_pretrained also copies speculators' config.py and points `auto_map` at it (remote code). vLLM
    # reads the config natively (`speculators_model_type`), so the draft ships as data only.
    (out / "config.py").unlink(missing_ok=True)
    config = json.loads((out / "config.json").read_text())
    config.pop("auto_map", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if list(out.glob("*.bin")) or list(out.glob("*.pt")) or list(out.glob("*.py")):
        raise SystemExit(f"{out}: unexpected pickle or code files in the export")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target, out, data = Path(args.target), Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    num_layers = load_target_config(target).get_text_config().num_hidden_layers
    aux = args.aux_layers or default_aux_layers(num_layers)
    if len(set(aux)) != len(aux) or min(aux) < 0 or max(aux) >= num_layers:
        raise SystemExit(f"--aux-layers {aux}: need distinct ids in [0, {num_layers - 1}]")
    layer_ids = list(aux) + [num_layers]  # + the last layer (pre-norm): the loss' teacher
    work = out / "eagle3_work"  # speculators' data dir; kept out of the draft's top level
    shutil.rmtree(work, ignore_errors=True)  # never mix hidden states of an earlier run into this one
    t0 = time.time()
    lengths, report = write_speculators_data(target, data, Path(args.image_root) if args.image_root else None,
                                             work / "data", args.max_len, layer_ids, args.regenerate,
                                             args.regenerate_tokens,
                                             torch.bfloat16 if args.feature_dtype == "bf16" else torch.float32)
    t1 = time.time()
    print(f"hidden states: {len(lengths)} samples, {sum(lengths)} tokens, layers {layer_ids}, "
          f"{t1 - t0:.1f}s; bad rows: {report.summary()}")
    model, steps, metrics, flat, total_seq_len = train(args, target, work / "data", lengths, layer_ids,
                                                       work / "trainer")
    t2 = time.time()
    export(model, out)
    final = metrics[-1] if metrics else {}
    settings = {
        "method": "eagle3 (speculators 0.9.0)", "target": str(target.resolve()), "data": str(data.resolve()),
        "image_root": args.image_root, "regenerate": args.regenerate, "samples": len(lengths),
        "tokens": sum(lengths), "bad_rows": dict(report.counts), "epochs": args.epochs, "steps": steps,
        "batch_size": args.batch_size, "packed_seq_len": total_seq_len, "lr": args.lr, "seed": args.seed,
        "feature_dtype": args.feature_dtype, "ttt_steps": args.k, "aux_layer_ids": aux,
        "optimizer": flat.optimizer, "loss_fn": flat.loss_fn, "scheduler": flat.scheduler_type,
        "num_layers": flat.num_layers,
        "final_loss": final.get("loss"), "final_metrics": final,
        "seconds": {"hidden_states": round(t1 - t0, 1), "train": round(t2 - t1, 1)},
    }
    (out / "training.json").write_text(json.dumps(settings, indent=2))
    with open(out / "train.log", "w") as log:
        for m in metrics:
            log.write(json.dumps(m) + "\n")
    print(f"trained {steps} steps in {t2 - t1:.1f}s, final loss {final.get('loss')}; exported EAGLE-3 draft to "
          f"{out}; serve with speculative_config={{'method': 'eagle3', 'model': '{out}', "
          f"'num_speculative_tokens': {args.k}}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

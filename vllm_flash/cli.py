"""`vllm-flash` command line: init, train, eval, bench, demo, patches."""
from __future__ import annotations

import argparse
import sys

from .bench import REPO_ASSETS, BenchConfig


def cmd_init(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import init_draft_for_target, save_draft

    torch.manual_seed(args.seed)
    overrides = {"num_speculative_tokens": args.k}
    if args.latents is not None:
        overrides["num_latents"] = args.latents
    if args.fusion:
        overrides["fusion"] = args.fusion
    overrides["slot_token_mixer"] = args.token_mixer
    overrides["target_layer_ids"] = args.target_layers
    draft = init_draft_for_target(args.target, **overrides)
    out = save_draft(draft, args.out)
    n = sum(p.numel() for p in draft.parameters())
    print(f"wrote a random FLASH draft ({n / 1e6:.2f}M parameters, K={draft.config.num_speculative_tokens}, "
          f"C={draft.config.num_latents}) for {args.target} to {out}")
    return 0


def layer_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--target-layers {text!r}: expected target layer numbers like 2,12,21")


TARGET_LAYERS_HELP = ("read the target's residual stream after these layers (e.g. 2,12,21), concatenated, as "
                      "EAGLE-3 does, instead of its final hidden states")


def cmd_patches(args: argparse.Namespace) -> int:
    from vllm_flash.patches import apply_all, describe

    apply_all()
    print(describe())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .evaluate import engine_env

    engine_env()
    from .trainer import run_train

    return run_train(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import run_eval

    return run_eval(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench_cli

    return run_bench_cli(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-flash", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a randomly initialised FLASH draft sized for a target")
    p.add_argument("--target", required=True, help="target LMM directory (HF format, safetensors)")
    p.add_argument("--out", required=True, help="draft directory to write")
    p.add_argument("--k", type=int, default=4, help="draft tokens per pass (SAR block size)")
    p.add_argument("--latents", type=int, default=None, help="latent queries per image/frame (0: none)")
    p.add_argument("--fusion", choices=["gated", "linear"], default=None)
    p.add_argument("--token-mixer", action=argparse.BooleanOptionalAction, default=True,
                   help="each draft slot after the first also reads the token drafted before it")
    p.add_argument("--target-layers", type=layer_ids, default=None, help=TARGET_LAYERS_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("train", help="train a FLASH draft for a target on LLaVA-format JSONL data")
    p.add_argument("--target", required=True)
    p.add_argument("--data", required=True, help="JSONL rows with image/video and conversations")
    p.add_argument("--out", required=True, help="draft directory (also holds features/, trainer/, train.log)")
    p.add_argument("--image-root", default=None, help="folder image/video paths are relative to "
                                                     "(default: the JSONL's folder)")
    p.add_argument("--features", default=None,
                   help="feature directory (default: OUT/features); finished features there are reused")
    p.add_argument("--regenerate", action="store_true", help="replace answers by the target's greedy answers")
    p.add_argument("--regenerate-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--latents", type=int, default=36)
    p.add_argument("--fusion", choices=["gated", "linear"], default="gated")
    p.add_argument("--compressor-exclusion", type=float, default=0.0,
                   help="how strongly each latent avoids the tokens the latents before it pooled (0: each pools "
                        "on its own, as FLASH does; see README)")
    p.add_argument("--compressor-saliency", action="store_true",
                   help="every latent also favours the tokens that stand out from their frame (see README)")
    p.add_argument("--token-mixer", action=argparse.BooleanOptionalAction, default=True,
                   help="each draft slot after the first also reads the token drafted before it (see README)")
    p.add_argument("--target-layers", type=layer_ids, default=None, help=TARGET_LAYERS_HELP)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--steps", type=int, default=0, help="total steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--noise", type=float, default=0.1, help="uniform input-feature noise (x feature std)")
    p.add_argument("--ce-weight", type=float, default=None,
                   help="weight of the soft cross-entropy against the target's tokens, beside the feature loss "
                        "(default: TrainConfig's)")
    p.add_argument("--max-len", type=int, default=2048, help="longer samples are skipped and counted")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue from OUT/trainer")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 autocasts the forward pass")
    p.add_argument("--feature-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="how features are stored (bf16 halves the disk; use it for 7B targets)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="tau, acceptance per position and speed-up of a draft in vLLM")
    p.add_argument("--target", required=True)
    p.add_argument("--draft", action="append",
                   help="a FLASH or speculators EAGLE-3 draft directory (the method is read from its config); "
                        "repeat to measure several side by side")
    p.add_argument("--ngram", action="store_true", help="also measure vLLM's ngram prompt lookup")
    p.add_argument("--data", required=True)
    p.add_argument("--image-root", default=None)
    p.add_argument("--k", type=int, default=None,
                   help="draft tokens per step (default: the K a FLASH draft was built for, else 4)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="FLASH vs none / ngram / eagle3 / ablations on the toy world, side by side")
    p.add_argument("--assets", default=str(REPO_ASSETS), help="folder with target/ and drafts/<method>/")
    p.add_argument("--target", default=None, help="target directory (default: ASSETS/target)")
    p.add_argument("--draft", action="append", help="METHOD=DIR, overrides ASSETS/drafts/METHOD")
    p.add_argument("--methods", default=None, help="comma-separated subset of none,ngram,eagle3,flash,"
                                                   "flash_nocompress,flash_k1 (default: all)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of image_caption,visual_qa,video_caption")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch1-requests", type=int, default=BenchConfig.batch1_requests, help="requests run one after another at batch 1")
    p.add_argument("--greedy-only", action="store_true", help="skip the temperature-1 tau rows")
    p.add_argument("--results", default="benchmarks/results", help="where latest.json/.md and the plots go")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("patches", help="list the changes vllm-flash makes to vLLM")
    p.set_defaults(func=cmd_patches)

    p = sub.add_parser("demo", help="serve the shipped toy-world LMM with its FLASH draft; captions + speed-up")
    p.add_argument("--target", default=str(REPO_ASSETS / "target"))
    p.add_argument("--draft", default=str(REPO_ASSETS / "drafts" / "flash"))
    p.add_argument("--images", type=int, default=3, help="held-out images to caption (plus one video)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=160)
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

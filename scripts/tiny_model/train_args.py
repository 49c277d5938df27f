"""Command-line options of the `train` step (kept apart so `--help` needs no torch)."""

from __future__ import annotations

import argparse
import os


def add_train_args(p: argparse.ArgumentParser, default_pack: str) -> None:
    p.add_argument("--pack", default=default_pack, help="folder written by `pack`")
    p.add_argument("--out-dir", default=None, help="HF folder to write (default PACK-export, beside the pack)")
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="also copy the result here (default $OUT; at most 8 files, 16 MB each)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="autocast dtype; master weights and AdamW state stay fp32")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--max-steps", type=int, default=4000,
                   help="at most this many steps; the cosine ends at --max-steps or the deadline, "
                   "whichever comes first")
    p.add_argument("--max-minutes", type=float, default=9.0,
                   help="strict wall-clock limit for the whole command, export included")
    p.add_argument("--export-reserve-s", type=float, default=45.0,
                   help="seconds kept back from --max-minutes for the final eval + export")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-tokens", type=int, default=1 << 18,
                   help="held-out tokens per periodic eval (the final bits/char uses all)")
    p.add_argument("--final-eval-tokens", type=int, default=None,
                   help="cap the final held-out eval (smoke tests only; default: every token)")
    p.add_argument("--patience", type=int, default=4,
                   help="stop after this many evals without a held-out improvement")
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--bias-gamma", type=float, default=1e-3,
                   help="aux-loss-free balancing: bias += gamma * sign(mean_load - load)")
    p.add_argument("--experts-impl", default="auto",
                   help="transformers experts implementation: auto (grouped_mm on CUDA), eager, ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")

#!/usr/bin/env python3
"""Reproduce the bundled model `deepserve/assets/tiny-deepseek-v3`.

A ~10M-parameter model of the real DeepSeek-V3 architecture (MLA with q_lora, V3 MoE with
sigmoid + noaux_tc group routing, a dense first layer, YaRN RoPE, one MTP layer), trained by
the project on offline text, saved in the published HF folder layout.

Steps (CPU ones here, `train` on a GPU machine without internet):

    python scripts/make_tiny_model.py corpus      # gather text, hold out ~1% of files
    python scripts/make_tiny_model.py tokenizer   # 8K byte-level BPE (V3 pre-tokenizer), .npy
    python scripts/make_tiny_model.py pack        # .gpu/tiny: everything `train` needs (<50 MB)
    python scripts/make_tiny_model.py train       # GPU: train, keep best, export HF folder
    python scripts/make_tiny_model.py assemble --from DIR   # files `train` left in $OUT ->
                                                            # deepserve/assets/tiny-deepseek-v3
    python scripts/make_tiny_model.py check       # load with transformers, generate

`train` needs only torch, numpy, safetensors and transformers (DeepseekV3ForCausalLM).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import time
START = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

BUILD = ROOT / ".gpu" / "tiny-build"   # raw corpus + tokenizer work (git-ignored, not carried)
PACK = ROOT / ".gpu" / "tiny"          # what the GPU step needs (git-ignored, carried)
ASSET = ROOT / "deepserve" / "assets" / "tiny-deepseek-v3"


def cmd_corpus(a) -> None:
    from tiny_model.corpus import build_corpus
    manifest = build_corpus(Path(a.build), a.heldout_fraction, a.seed)
    for s in manifest["sources"]:
        print(f"{s['name']:15s} train {s['train']['files']:5d} files {s['train']['bytes']:>11,d} B"
              f"   held-out {s['heldout']['files']:3d} files {s['heldout']['bytes']:>9,d} B")
    t = manifest["total"]
    print(f"{'total':15s} train {t['train']['files']:5d} files {t['train']['bytes']:>11,d} B"
          f"   held-out {t['heldout']['files']:3d} files {t['heldout']['bytes']:>9,d} B")


def cmd_tokenizer(a) -> None:
    from tiny_model.tok import build_tokenizer
    stats = build_tokenizer(Path(a.build), a.vocab_size)
    print(json.dumps(stats, indent=2))


def cmd_pack(a) -> None:
    from tiny_model.pack import pack
    for name, size in pack(Path(a.build), Path(a.pack)):
        print(f"{size:>12,d}  {name}")


def cmd_train(a) -> None:
    from tiny_model.train import train
    a.start_time = START
    train(a)


def cmd_assemble(a) -> None:
    from tiny_model.export import assemble
    assemble(Path(a.src), Path(a.pack), Path(a.dst), keep_shards=a.keep_shards)
    print(f"wrote {a.dst}")


def cmd_check(a) -> None:
    from tiny_model.check import check
    check(Path(a.model), a.prompt)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus", help="gather offline text and split held-out files")
    c.add_argument("--build", default=str(BUILD))
    c.add_argument("--heldout-fraction", type=float, default=0.01)
    c.add_argument("--seed", type=int, default=1234)
    c.set_defaults(fn=cmd_corpus)
    c = sub.add_parser("tokenizer", help="train the BPE and tokenise train / held-out")
    c.add_argument("--build", default=str(BUILD))
    c.add_argument("--vocab-size", type=int, default=8192)
    c.set_defaults(fn=cmd_tokenizer)
    c = sub.add_parser("pack", help="collect what `train` needs into one folder")
    c.add_argument("--build", default=str(BUILD))
    c.add_argument("--pack", default=str(PACK))
    c.set_defaults(fn=cmd_pack)
    c = sub.add_parser("train", help="train + export (GPU machine)")
    from tiny_model.train_args import add_train_args
    add_train_args(c, default_pack=str(PACK))
    c.set_defaults(fn=cmd_train)
    c = sub.add_parser("assemble", help="build the asset folder from train's output files")
    c.add_argument("--from", dest="src", required=True, help="folder with train's $OUT files")
    c.add_argument("--pack", default=str(PACK), help="for the tokenizer files")
    c.add_argument("--dst", default=str(ASSET))
    c.add_argument("--keep-shards", action="store_true", help="do not merge into model.safetensors")
    c.set_defaults(fn=cmd_assemble)
    c = sub.add_parser("check", help="load the folder with transformers and generate")
    c.add_argument("--model", default=str(ASSET))
    c.add_argument("--prompt", default="def fibonacci(n):")
    c.set_defaults(fn=cmd_check)
    a = p.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()

"""`pack` step: everything `train` needs, in one folder (< 50 MB) carried to the GPU machine.

    train.npy heldout.npy        uint16 token streams
    tokenizer.json tokenizer_config.json
    pack.json                    bos id, held-out chars, corpus manifest, token stats
The model config and the training code live in scripts/tiny_model (part of the repo).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

LIMIT = 50 * 1000 * 1000
FILES = ("train.npy", "heldout.npy", "tokenizer.json", "tokenizer_config.json")


def pack(build: Path, dst: Path) -> list[tuple[str, int]]:
    from tokenizers import Tokenizer
    dst.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(build / name, dst / name)
    tok = Tokenizer.from_file(str(build / "tokenizer.json"))
    stats = json.loads((build / "token_stats.json").read_text())
    meta = {"bos_id": tok.token_to_id("<｜begin▁of▁sentence｜>"),
            "eos_id": tok.token_to_id("<｜end▁of▁sentence｜>"),
            "heldout_chars": stats["heldout"]["chars"], "token_stats": stats,
            "manifest": json.loads((build / "manifest.json").read_text())}
    (dst / "pack.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    sizes = [(p.name, p.stat().st_size) for p in sorted(dst.iterdir()) if p.is_file()]
    total = sum(s for _, s in sizes)
    if total > LIMIT:
        raise SystemExit(f"{dst} holds {total:,d} bytes, over the {LIMIT:,d} limit")
    return sizes + [("total", total)]

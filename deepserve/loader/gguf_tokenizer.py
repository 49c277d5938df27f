"""A HF tokenizer (tokenizer.json + tokenizer_config.json) from a GGUF file's `tokenizer.*` metadata.

Byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Llama-3, Qwen2, the R1
distills) are built here with `tokenizers`: the vocabulary and merges as stored, the split regex
chosen by `tokenizer.ggml.pre`, control tokens (type 3) as special added tokens and user-defined
ones (type 4) as plain added tokens. Other vocabularies (SentencePiece "llama") go through
transformers' GGUF tokenizer conversion.
"""

from __future__ import annotations

from typing import Any, Mapping

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from deepserve.loader.errors import LoadError

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# The split patterns of the common pre-tokenizers (cl100k style, with 1-3 or single digits).
_SPLIT_3DIGITS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_1DIGIT = _SPLIT_3DIGITS.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLITS = {"llama-bpe": _SPLIT_3DIGITS, "llama3": _SPLIT_3DIGITS, "smaug-bpe": _SPLIT_3DIGITS,
           "qwen2": _SPLIT_1DIGIT, "deepseek-r1-qwen": _SPLIT_1DIGIT}


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """Pre-tokenizer for `tokenizer.ggml.pre` (GPT-2 byte-level splitting by default)."""
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # GPT-2 splitting, each digit on its own
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _added_tokens(meta: Mapping[str, Any]) -> tuple[list[AddedToken], list[AddedToken]]:
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or ()
    special = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types) if kind == TOKEN_TYPE_CONTROL]
    plain = [AddedToken(t, special=False, normalized=False)
             for t, kind in zip(tokens, types) if kind == TOKEN_TYPE_USER_DEFINED]
    return special, plain


def byte_level_bpe(meta: Mapping[str, Any]) -> Tokenizer:
    """tokenizers.Tokenizer for a "gpt2" (byte-level BPE) GGUF vocabulary."""
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]
    vocab = {token: index for index, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special, plain = _added_tokens(meta)
    tok.add_special_tokens(special)
    tok.add_tokens(plain)
    return tok


def _via_transformers(meta: Mapping[str, Any], source: str) -> Tokenizer:
    try:  # transformers keeps this conversion in an integration module; guard its location
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError as exc:
        raise LoadError(f"{source}: cannot convert this GGUF tokenizer ({exc})") from None
    renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
    try:
        backend, _ = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
    except (ValueError, KeyError, ImportError) as exc:
        raise LoadError(f"{source}: cannot convert this GGUF tokenizer ({exc})") from None
    return backend


def gguf_tokenizer(meta: Mapping[str, Any], source: str = "GGUF file") -> Tokenizer:
    """The raw tokenizers.Tokenizer described by the metadata; LoadError naming `source`."""
    if "tokenizer.ggml.tokens" not in meta:
        raise LoadError(f"{source}: no tokenizer.ggml.tokens metadata; the file holds no tokenizer")
    if meta.get("tokenizer.ggml.model") == "gpt2":
        return byte_level_bpe(meta)
    return _via_transformers(meta, source)


def _token(meta: Mapping[str, Any], key: str) -> str | None:
    index = meta.get(f"tokenizer.ggml.{key}")
    tokens = meta["tokenizer.ggml.tokens"]
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


def gguf_tokenizer_config(meta: Mapping[str, Any], max_length: int | None) -> dict[str, Any]:
    """tokenizer_config.json contents: special tokens, BOS/EOS flags and the chat template."""
    default_bos = meta.get("tokenizer.ggml.model") == "llama"  # sentencepiece files add BOS
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token(meta, "bos_token_id"),
        "eos_token": _token(meta, "eos_token_id"),
        "unk_token": _token(meta, "unknown_token_id"),
        "pad_token": _token(meta, "padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    if max_length:
        config["model_max_length"] = int(max_length)
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config

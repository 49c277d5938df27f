"""Tokenizer of a checkpoint folder: tokenizer.json + tokenizer_config.json (+ generation_config.json).

    tok = load_tokenizer(folder)
    ids = tok.encode("Hello", add_special_tokens=True)     # BOS as tokenizer_config says
    text = tok.apply_chat_template(messages)               # sandboxed jinja2 (transformers)
    tok.eos_token_ids, tok.backend                         # backend: raw tokenizers.Tokenizer

Encoding and decoding use the raw `tokenizers.Tokenizer` (what tokenizer.json says, plus the
`add_bos_token` / `add_eos_token` flags of tokenizer_config.json); the chat template is rendered by
transformers' `apply_chat_template`, which runs jinja2 in a sandboxed environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import tokenizers

from deepserve.config import read_json_object
from deepserve.loader.errors import LoadError


class ChatTemplateError(ValueError):
    """A chat template that is missing or fails to render these messages (a client error)."""


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    return read_json_object(path, LoadError, required)


@dataclass(frozen=True)
class GenerationDefaults:
    """Defaults from generation_config.json; None where the file says nothing."""

    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None


def _opt(raw: Mapping[str, Any], key: str, kind: type) -> Any:
    return kind(raw[key]) if raw.get(key) is not None else None


def load_generation_defaults(folder: str | Path) -> GenerationDefaults:
    """GenerationDefaults of a folder; an absent file gives empty defaults."""
    raw = _read_json(Path(folder) / "generation_config.json", required=False)
    try:
        return GenerationDefaults(
            eos_token_ids=_ids(raw.get("eos_token_id")), bos_token_id=_opt(raw, "bos_token_id", int),
            temperature=_opt(raw, "temperature", float), top_p=_opt(raw, "top_p", float),
            top_k=_opt(raw, "top_k", int), repetition_penalty=_opt(raw, "repetition_penalty", float),
            max_new_tokens=_opt(raw, "max_new_tokens", int))
    except (TypeError, ValueError) as exc:
        raise LoadError(f"{Path(folder) / 'generation_config.json'}: bad value ({exc})") from None


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Encode / decode / chat template of one model; build with `load_tokenizer(folder)`."""

    def __init__(self, hf_tokenizer: Any, config: Mapping[str, Any], generation: GenerationDefaults,
                 model_eos: tuple[int, ...] = (), model_bos: int | None = None, folder: Path | None = None):
        self.hf_tokenizer = hf_tokenizer  # transformers PreTrainedTokenizerFast (chat templates)
        self.backend: tokenizers.Tokenizer = hf_tokenizer.backend_tokenizer
        self.config = config
        self.generation = generation
        self.folder = folder
        self.bos_token_id = self._special_id("bos_token", generation.bos_token_id, model_bos)
        self.eos_token_ids = self._eos_ids(model_eos)
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_token_id is not None
        self.add_eos = bool(config.get("add_eos_token", False)) and bool(self.eos_token_ids)

    def _special_id(self, key: str, *fallbacks: int | None) -> int | None:
        text = _token_text(self.config.get(key))
        token_id = self.backend.token_to_id(text) if text else None
        return token_id if token_id is not None else next((f for f in fallbacks if f is not None), None)

    def _eos_ids(self, model_eos: tuple[int, ...]) -> tuple[int, ...]:
        """generation_config's, then tokenizer_config's, then config.json's EOS ids, deduplicated."""
        own = self._special_id("eos_token")
        return tuple(dict.fromkeys(self.generation.eos_token_ids + _ids(own) + model_eos))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf_tokenizer, "chat_template", None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        if add_special_tokens and self.add_eos and (not ids or ids[-1] != self.eos_token_ids[0]):
            ids.append(self.eos_token_ids[0])
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None, chat_template: str | None = None,
                            **template_kwargs: Any) -> str:
        """The prompt text for `messages` (OpenAI-style dicts); ChatTemplateError if it cannot render."""
        if chat_template is None and not self.chat_template:
            where = self.folder / "tokenizer_config.json" if self.folder else "tokenizer_config.json"
            raise ChatTemplateError(f"{where}: no chat_template; pass one explicitly")
        import jinja2

        try:
            return self.hf_tokenizer.apply_chat_template(
                [dict(m) for m in messages], tools=list(tools) if tools else None, chat_template=chat_template,
                add_generation_prompt=add_generation_prompt, tokenize=False, **template_kwargs)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template error: {exc}") from None


def _load_hf(folder: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # tokenizers / transformers raise many types for a bad file
        raise LoadError(f"{folder / 'tokenizer.json'}: cannot load the tokenizer "
                        f"({type(exc).__name__}: {exc})") from None


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The Tokenizer of a checkpoint folder; LoadError naming the file that is missing or bad."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoadError(f"{folder}: model folder does not exist")
    if not (folder / "tokenizer.json").is_file():
        raise LoadError(f"{folder / 'tokenizer.json'}: tokenizer.json not found in the model folder")
    config = _read_json(folder / "tokenizer_config.json", required=False)
    model = _read_json(folder / "config.json", required=False)
    generation = load_generation_defaults(folder)
    return Tokenizer(_load_hf(folder), config, generation, _ids(model.get("eos_token_id")),
                     model.get("bos_token_id"), folder)

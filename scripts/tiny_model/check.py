"""`check`: the exported folder loads with transformers' DeepseekV3ForCausalLM and generates,
and its tensor names are DeepSeek-V3's published ones."""

from __future__ import annotations

import json
import re
from pathlib import Path

# Every tensor name in a published DeepSeek-V3 checkpoint matches one of these (minus FP8's
# weight_scale_inv, which a bf16 checkpoint does not have).
PUBLISHED = [
    r"model\.embed_tokens\.weight", r"model\.norm\.weight", r"lm_head\.weight",
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    r"model\.layers\.\d+\.self_attn\.(q_a_proj|q_a_layernorm|q_b_proj|kv_a_proj_with_mqa"
    r"|kv_a_layernorm|kv_b_proj|o_proj)\.weight",
    r"model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight",
    r"model\.layers\.\d+\.mlp\.gate\.(weight|e_score_correction_bias)",
    r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight",
    r"model\.layers\.\d+\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight",
    r"model\.layers\.\d+\.(embed_tokens\.weight|enorm\.weight|hnorm\.weight|eh_proj\.weight"
    r"|shared_head\.norm\.weight|shared_head\.head\.weight)",
]


def tensor_names(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    from safetensors import safe_open
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def check_names(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    names = tensor_names(folder)
    bad = [k for k in names if not any(re.fullmatch(p, k) for p in PUBLISHED)]
    assert not bad, f"unpublished names: {bad[:5]}"
    n = cfg["num_hidden_layers"]
    mtp = [k for k in names if k.startswith(f"model.layers.{n}.")]
    for part in ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight",
                 "shared_head.norm.weight", "shared_head.head.weight", "self_attn.q_a_proj.weight",
                 "mlp.gate.e_score_correction_bias", "mlp.experts.0.gate_proj.weight"):
        assert f"model.layers.{n}.{part}" in names, part
    dtypes = {d for d in (v[0] for v in names.values())}
    total = sum(__import__("math").prod(s) for _, s in names.values())
    print(f"{len(names)} tensors ({len(mtp)} in the MTP layer), {total:,d} params, dtypes {sorted(dtypes)}")


def check(folder: Path, prompt: str) -> None:
    import torch
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM
    check_names(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = DeepseekV3ForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    ids = [0] + tok(prompt, add_special_tokens=False).input_ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
    print(repr(tok.decode(out[0])))
    chat = tok.apply_chat_template([{"role": "user", "content": "Who is Hamlet?"}],
                                   add_generation_prompt=True, tokenize=False)
    print(repr(chat))


def roundtrip(tmp: Path) -> None:
    """Random TinyV3 -> export -> from_pretrained: same logits (bf16 weights on both sides)."""
    import torch
    from transformers import DeepseekV3ForCausalLM
    from .export import published_state_dict, save_weights
    from .model import CONFIG, TinyV3, hf_config
    torch.manual_seed(0)
    model = TinyV3(hf_config(CONFIG)).to(torch.bfloat16).float().eval()
    tmp.mkdir(parents=True, exist_ok=True)
    save_weights(published_state_dict(model), tmp, shard_bytes=None)
    (tmp / "config.json").write_text(json.dumps(CONFIG))
    loaded = DeepseekV3ForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
    with torch.no_grad():
        for r in [m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]:
            r.e_score_correction_bias.normal_(0, 0.01)      # make the bias matter
        save_weights(published_state_dict(model), tmp, shard_bytes=None)
        loaded = DeepseekV3ForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        ids = torch.randint(0, CONFIG["vocab_size"], (2, 32))
        a, b = model.lm(input_ids=ids).logits, loaded(input_ids=ids).logits
    err = ((a - b).abs().max() / a.abs().max()).item()
    print(f"roundtrip max |logit diff| / max |logit| = {err:.2e}, "
          f"experts impl {loaded.config._experts_implementation}")
    assert err < 1e-3, err

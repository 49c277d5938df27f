"""README.md (model card) of deepserve/assets/tiny-deepseek-v3, rendered from metrics.json."""

from __future__ import annotations

from .model import CONFIG

TEMPLATE = """\
---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [deepseek_v3, mla, moe, mtp, tiny, test-model]
---

# tiny-deepseek-v3

A {main_m:.1f}M-parameter model of the real DeepSeek-V3 architecture, trained from scratch by the
deepserve project so that the engine has a small, real (not random) checkpoint in the exact
published layout of `deepseek-ai/DeepSeek-V3`: `config.json` (`DeepseekV3ForCausalLM`,
`model_type: deepseek_v3`), bf16 safetensors with the published tensor names, DeepSeek-V3's
tokenizer pipeline, special tokens and chat template. It writes Python-ish code, reST and
Elizabethan verse badly; it is for tests, demos and benchmarks of the serving path, not for use.

Reproduce: `python scripts/make_tiny_model.py --help` (corpus, tokenizer, pack, train, assemble).

## Architecture

| | |
|---|---|
| layers | {num_hidden_layers} (first {first_k_dense_replace} dense, intermediate {intermediate_size}; rest MoE) + {num_nextn_predict_layers} MTP layer (`model.layers.{num_hidden_layers}.*`) |
| hidden | {hidden_size}, vocab {vocab_size}, untied embeddings |
| attention | MLA, {num_attention_heads} heads, q_lora_rank {q_lora_rank}, kv_lora_rank {kv_lora_rank}, qk_nope {qk_nope_head_dim}, qk_rope {qk_rope_head_dim}, v {v_head_dim} |
| RoPE | theta {rope_theta}, YaRN factor {yarn_factor} over {yarn_orig} positions (max {max_position_embeddings}) |
| MoE | {n_routed_experts} routed experts (intermediate {moe_intermediate_size}), top-{num_experts_per_tok}, {n_shared_experts} shared; sigmoid scores, `noaux_tc` with `e_score_correction_bias`, {n_group} groups / top-{topk_group}, norm_topk_prob, routed_scaling_factor {routed_scaling_factor} |
| parameters | main model {main:,d}; MTP layer's own {mtp_own:,d}; checkpoint total {ckpt:,d} (the MTP layer stores copies of the embedding and head, as DeepSeek-V3 does) |

## Training

Next-token loss + {mtp_weight} x MTP loss (predicting t+2), AdamW on fp32 master weights
({dtype} compute), cosine LR from {lr}, batch {batch_size} x {seq_len} tokens, seed {seed};
routers balanced without an auxiliary loss (bias += {bias_gamma} * sign(mean load - load) per
step). {steps} steps in {train_minutes} min on {device}; best held-out loss at step {best_step}
kept (torch {torch}, transformers {transformers}).

Tokenizer: byte-level BPE, {vocab_size} tokens, trained on the training split with DeepSeek-V3's
normalizer / pre-tokenizer / decoder; DeepSeek-V3/R1's special tokens at ids 0-19
(`<｜begin▁of▁sentence｜>` = 0, `<｜end▁of▁sentence｜>` = 1).

## Held-out result

**{bpc:.4f} bits per character** on {held_files} held-out files ({held_chars:,d} characters,
{held_tokens:,d} scored tokens; {nats:.4f} nats/token): the main model's total loss in bits
over every held-out token, divided by the number of characters. Files were held out by a
fixed seed ({split_seed}), about {frac:.0%} per source.

## Corpus

| source | licence | train files | train bytes | held-out files | held-out bytes |
|---|---|---:|---:|---:|---:|
{corpus_rows}
| total | | {train_files:,d} | {train_bytes:,d} | {held_files:,d} | {held_bytes:,d} |

Origins:
{origins}

## Licence

The weights and code are Apache-2.0 (the deepserve licence). The training text: CPython code and
documentation under the PSF License 2.0; Shakespeare's plays and poems are in the public domain;
the fortunes files per Debian's copyright file for `fortunes`.
"""


def _corpus(manifest: dict) -> tuple[str, str]:
    rows, origins = [], []
    for s in manifest["sources"]:
        tr, he = s["train"], s["heldout"]
        rows.append(f"| {s['name']} | {s['licence'].split(' (')[0]} | {tr['files']:,d} | "
                    f"{tr['bytes']:,d} | {he['files']:,d} | {he['bytes']:,d} |")
        origins.append(f"- {s['name']}: {s['origin']}; licence: {s['licence']}")
    return "\n".join(rows), "\n".join(origins)


def render_readme(m: dict) -> str:
    man, p, h = m["corpus"], m["params"], m["hparams"]
    rows, origins = _corpus(man)
    rope = CONFIG["rope_scaling"]
    fields = dict(CONFIG, main_m=p["main_model"] / 1e6, main=p["main_model"], mtp_own=p["mtp_own"],
                  ckpt=p["checkpoint_total"], yarn_factor=rope["factor"],
                  yarn_orig=rope["original_max_position_embeddings"], **h,
                  steps=m["steps"], train_minutes=m["train_minutes"], device=m["device"],
                  best_step=m["best_step"], torch=m["torch"], transformers=m["transformers"],
                  bpc=m["heldout_bits_per_char"], held_chars=m["heldout_chars"],
                  held_tokens=m["heldout_tokens_scored"], nats=m["heldout_loss_nats_per_token"],
                  split_seed=man["seed"], frac=man["heldout_fraction"], corpus_rows=rows,
                  origins=origins, train_files=man["total"]["train"]["files"],
                  train_bytes=man["total"]["train"]["bytes"],
                  held_files=man["total"]["heldout"]["files"],
                  held_bytes=man["total"]["heldout"]["bytes"])
    return TEMPLATE.format(**fields)

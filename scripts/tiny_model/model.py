"""The tiny DeepSeek-V3: config.json (published field names), MTP layer, training wrapper.

Main model = transformers' DeepseekV3ForCausalLM. MTP (DeepSeek-V3 paper, sec. 2.2), one depth:

    h'_i  = eh_proj(concat(enorm(embed(t_{i+1})), hnorm(h_i)))     [B, T, 2H] -> [B, T, H]
    h''_i = DecoderLayer_N(h'_i)                                  layer index N = num_hidden_layers
    p_i   = head(shared_head.norm(h''_i))  predicts t_{i+2}

with h_i the main model's final (normed) hidden state, and embed / head shared with the main
model while training (the published checkpoint stores copies under model.layers.N.*).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 8192,
    "hidden_size": 256,
    "intermediate_size": 768,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 128,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "ep_size": 1,
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 4.0, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 512,
                     "type": "yarn"},
    "rms_norm_eps": 1e-06,
    "initializer_range": 0.02,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "pretraining_tp": 1,
    "use_cache": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
}

GENERATION_CONFIG = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
                     "temperature": 0.6, "top_p": 0.95}


def hf_config(cfg: dict = CONFIG, experts_impl: str | None = None):
    from transformers import DeepseekV3Config
    kw = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    c = DeepseekV3Config(**kw)
    c._attn_implementation = "sdpa"
    if experts_impl:
        c._experts_implementation = experts_impl
    return c


def _decoder_layer(config, idx: int) -> nn.Module:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer
    return DeepseekV3DecoderLayer(config, layer_idx=idx)


def _rms_norm(config) -> nn.Module:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm
    return DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class SharedHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = _rms_norm(config)


class MTPLayer(nn.Module):
    """One DeepSeek-V3 MTP depth; parameter names mirror model.layers.N.* in the checkpoint
    (`block.` is stripped on export)."""

    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.enorm = _rms_norm(config)
        self.hnorm = _rms_norm(config)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.block = _decoder_layer(config, config.num_hidden_layers)
        self.shared_head = SharedHead(config)

    def forward(self, h: torch.Tensor, emb_next: torch.Tensor, position_embeddings) -> torch.Tensor:
        """h, emb_next: [B, T, H] -> [B, T, H] (normed, ready for the head)."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h)], dim=-1))
        x = self.block(x, attention_mask=None, position_embeddings=position_embeddings)
        x = x[0] if isinstance(x, tuple) else x
        return self.shared_head.norm(x)


def init_mtp(mtp: MTPLayer, std: float) -> None:
    with torch.no_grad():
        for name, p in mtp.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)   # RMSNorm weights
            else:
                p.normal_(0.0, std)


class TinyV3(nn.Module):
    """DeepseekV3ForCausalLM + one MTP layer. forward(ids [B, T+2]) -> (main_loss, mtp_loss)."""

    def __init__(self, config):
        super().__init__()
        from transformers import DeepseekV3ForCausalLM
        self.lm = DeepseekV3ForCausalLM(config)
        self.mtp = MTPLayer(config)
        init_mtp(self.mtp, config.initializer_range)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inp, tgt1, tgt2 = ids[:, :-2], ids[:, 1:-1], ids[:, 2:]        # [B, T] each
        h = self.lm.model(input_ids=inp, use_cache=False).last_hidden_state   # [B, T, H]
        main = F.cross_entropy(self.lm.lm_head(h).float().flatten(0, 1), tgt1.flatten())
        pos = torch.arange(inp.shape[1], device=ids.device)[None]            # [1, T]
        pe = self.lm.model.rotary_emb(h, pos)
        m = self.mtp(h, self.lm.model.embed_tokens(tgt1), pe)
        mtp = F.cross_entropy(self.lm.lm_head(m).float().flatten(0, 1), tgt2.flatten())
        return main, mtp

    @torch.no_grad()
    def token_nats(self, inp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Main-model loss per target token: inp, tgt [B, T] -> [B, T] fp32 nats."""
        logits = self.lm(input_ids=inp, use_cache=False).logits.float()      # [B, T, V]
        return F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")


def routers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]


class BiasBalancer:
    """Aux-loss-free load balancing (DeepSeek-V3 sec. 2.1.2): after each step,
    bias_e += gamma * sign(mean_load - load_e), per MoE layer. Loads come from forward hooks."""

    def __init__(self, model: nn.Module, gamma: float):
        self.gamma = gamma
        self.routers = routers(model)
        self.counts = {id(r): None for r in self.routers}
        self.handles = []

    def attach(self) -> "BiasBalancer":
        self.handles = [r.register_forward_hook(self._hook) for r in self.routers]
        return self

    def _hook(self, router, _inp, out) -> None:
        if not router.training:
            return
        idx = out[2].flatten()                                           # [tokens * top_k]
        c = torch.bincount(idx, minlength=router.num_experts).float()
        prev = self.counts[id(router)]
        self.counts[id(router)] = c if prev is None else prev + c

    @torch.no_grad()
    def step(self) -> float:
        """Update the biases; returns the worst max_load / mean_load over layers (1.0 = even)."""
        worst = 0.0
        for r in self.routers:
            load = self.counts[id(r)]
            if load is None:
                continue
            mean = load.mean()
            r.e_score_correction_bias += self.gamma * torch.sign(mean - load)
            worst = max(worst, float(load.max() / mean.clamp(min=1)))
            self.counts[id(r)] = None
        return worst


def count_params(model: TinyV3) -> dict:
    n = lambda mod: sum(p.numel() for p in mod.parameters())
    main, mtp = n(model.lm), n(model.mtp)
    shared = model.lm.model.embed_tokens.weight.numel() + model.lm.lm_head.weight.numel()
    experts = sum(p.numel() for name, p in model.lm.named_parameters() if ".experts." in name)
    return {"main_model": main, "mtp_own": mtp, "mtp_stored_copies": shared,
            "checkpoint_total": main + mtp + shared, "main_routed_experts": experts}

"""`train` step (GPU machine, no internet): train TinyV3, keep the best held-out checkpoint,
export the HF folder, compute held-out bits/char.

Loop: random windows of seq_len+2 tokens from train.npy; loss = main + mtp_weight * mtp;
AdamW on fp32 master weights (model params in --dtype); cosine LR with warmup; after every
step the routers' e_score_correction_bias moves by the aux-loss-free rule; every --eval-every
steps the held-out loss is measured, the best weights kept, and training stops after
--patience evals without improvement or at the wall-clock deadline.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .model import CONFIG, BiasBalancer, TinyV3, count_params, hf_config, routers

LN2 = math.log(2.0)


class MixedAdamW:
    """AdamW over fp32 master copies of low-precision params (identity when params are fp32)."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_()
                       for p in self.params]
        decay = [m for m in self.master if m.dim() >= 2]
        no_decay = [m for m in self.master if m.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=lr, betas=(0.9, 0.95), eps=1e-8)

    def step(self, lr: float, clip: float = 1.0) -> float:
        for p, m in zip(self.params, self.master):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        norm = torch.nn.utils.clip_grad_norm_(self.master, clip)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                if m is not p:
                    p.copy_(m)
        return float(norm)

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.master):
            p.grad = None
            m.grad = None


def lr_at(step: int, a, time_frac: float = 0.0) -> float:
    """Linear warmup, then cosine to min_lr_ratio * lr. Progress is the larger of the step
    fraction and the fraction of the training time used, so the decay ends at the deadline."""
    if step < a.warmup_steps:
        return a.lr * (step + 1) / a.warmup_steps
    t = max((step - a.warmup_steps) / max(1, a.max_steps - a.warmup_steps), time_frac)
    t = min(1.0, t)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def build_model(a, device: torch.device) -> TinyV3:
    impl = a.experts_impl
    if impl == "auto":
        impl = "grouped_mm" if device.type == "cuda" and a.dtype == "bfloat16" else "eager"
    torch.manual_seed(a.seed)
    model = TinyV3(hf_config(CONFIG, impl))
    model.to(device=device, dtype=getattr(torch, a.dtype))
    for r in routers(model):              # router weight + bias stay fp32 (as transformers keeps them)
        r.weight.data = r.weight.data.float()
        r.e_score_correction_bias.data = r.e_score_correction_bias.data.float()
    return model


class Batches:
    """Random windows of seq_len+2 tokens from a token stream, fixed seed."""

    def __init__(self, tokens: np.ndarray, a, device: torch.device):
        self.data = torch.from_numpy(tokens.astype(np.int64)).to(device)
        self.n, self.b, self.t = a.seq_len + 2, a.batch_size, a.seq_len
        self.gen = torch.Generator(device="cpu").manual_seed(a.seed)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, self.data.numel() - self.n, (self.b,), generator=self.gen)
        idx = starts.to(self.data.device)[:, None] + torch.arange(self.n, device=self.data.device)
        return self.data[idx]                                             # [B, T+2]


@torch.no_grad()
def heldout_nats(model: TinyV3, tokens: torch.Tensor, seq_len: int, batch: int,
                 bos_id: int, max_tokens: int | None = None) -> tuple[float, int]:
    """Sum of main-model nats over every held-out target except BOS, each token predicted once
    (non-overlapping windows: window k predicts tokens k*T+1 .. k*T+T). Returns (nats, count)."""
    was = model.training
    model.eval()
    n = tokens.numel() if max_tokens is None else min(tokens.numel(), max_tokens + 1)
    starts = list(range(0, n - 1, seq_len))
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        group = starts[i:i + batch]
        full = [s for s in group if s + seq_len + 1 <= n]
        rows = [tokens[s:s + seq_len + 1] for s in full]
        for s in (s for s in group if s + seq_len + 1 > n):               # the last, short window
            total, count = _add(model, tokens[s:n][None], bos_id, total, count)
        if rows:
            total, count = _add(model, torch.stack(rows), bos_id, total, count)
    model.train(was)
    return total, count


def _add(model, w: torch.Tensor, bos_id: int, total: float, count: int) -> tuple[float, int]:
    nats = model.token_nats(w[:, :-1], w[:, 1:])                         # [B, T]
    keep = w[:, 1:] != bos_id
    return total + float(nats[keep].sum()), count + int(keep.sum())


def _snapshot(model: TinyV3) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def run_loop(model, a, train_b: Batches, held: torch.Tensor, deadline: float, meta: dict) -> dict:
    opt = MixedAdamW(model, a.lr, a.weight_decay)
    bal = BiasBalancer(model, a.bias_gamma).attach()
    best = {"loss": float("inf"), "step": -1, "state": _snapshot(model)}
    history, bad, step, t_last = [], 0, 0, time.monotonic()
    t0 = time.monotonic()
    time_frac = lambda: (time.monotonic() - t0) / max(1e-9, deadline - t0)
    model.train()
    while step < a.max_steps and (step == 0 or time.monotonic() < deadline):
        main, mtp = model(train_b.next())
        (main + a.mtp_weight * mtp).backward()
        lr = lr_at(step, a, time_frac())
        gnorm = opt.step(lr)
        opt.zero_grad()
        imbalance = bal.step()
        step += 1
        if step % 50 == 0:
            dt, t_last = time.monotonic() - t_last, time.monotonic()
            print(f"step {step:6d} loss {main.item():.4f} mtp {mtp.item():.4f} gnorm {gnorm:.2f} "
                  f"lr {lr:.2e} max/mean load {imbalance:.2f} {50 / dt:.1f} it/s", flush=True)
        if step % a.eval_every == 0 or step == a.max_steps:
            nats, cnt = heldout_nats(model, held, a.seq_len, a.batch_size, meta["bos_id"], a.eval_tokens)
            loss = nats / cnt
            history.append({"step": step, "heldout_loss": round(loss, 5),
                            "train_loss": round(main.item(), 5), "minutes": round(meta["elapsed"]() / 60, 2)})
            print(f"eval step {step} held-out loss {loss:.4f} (best {best['loss']:.4f})", flush=True)
            if loss < best["loss"] - 1e-4:
                best, bad = {"loss": loss, "step": step, "state": _snapshot(model)}, 0
            else:
                bad += 1
                if bad >= a.patience:
                    print("held-out loss stopped improving", flush=True)
                    break
    return {"best": best, "history": history, "steps": step}


def train(a) -> None:
    start = getattr(a, "start_time", None) or time.monotonic()
    budget = a.max_minutes * 60
    deadline = start + budget - min(a.export_reserve_s, 0.25 * budget)
    device = torch.device(a.device)
    pack = Path(a.pack)
    meta = json.loads((pack / "pack.json").read_text())
    meta["elapsed"] = lambda: time.monotonic() - start
    model = build_model(a, device)
    params = count_params(model)
    print("params:", json.dumps(params), flush=True)
    train_b = Batches(np.load(pack / "train.npy"), a, device)
    held = torch.from_numpy(np.load(pack / "heldout.npy").astype(np.int64)).to(device)
    res = run_loop(model, a, train_b, held, deadline, meta)
    if res["best"]["step"] < 0 or res["steps"] % a.eval_every:            # evaluate the last weights too
        nats, cnt = heldout_nats(model, held, a.seq_len, a.batch_size, meta["bos_id"], a.eval_tokens)
        if nats / cnt < res["best"]["loss"]:
            res["best"] = {"loss": nats / cnt, "step": res["steps"], "state": _snapshot(model)}
    model.load_state_dict(res["best"]["state"])
    nats, cnt = heldout_nats(model, held, a.seq_len, a.batch_size, meta["bos_id"], a.final_eval_tokens)
    chars = meta["heldout_chars"]
    if a.final_eval_tokens is not None:          # a smoke test: scale the characters to the tokens seen
        chars = chars * cnt / int((held[1:] != meta["bos_id"]).sum())
    metrics = {
        "heldout_bits_per_char": nats / LN2 / chars,
        "heldout_partial": a.final_eval_tokens is not None,
        "heldout_loss_nats_per_token": nats / cnt, "heldout_tokens_scored": cnt,
        "heldout_chars": meta["heldout_chars"], "best_step": res["best"]["step"],
        "steps": res["steps"], "history": res["history"], "params": params,
        "train_minutes": round(meta["elapsed"]() / 60, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "hparams": {k: getattr(a, k) for k in ("seed", "batch_size", "seq_len", "lr", "min_lr_ratio",
                    "warmup_steps", "weight_decay", "max_steps", "mtp_weight", "bias_gamma", "dtype")},
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "corpus": meta["manifest"], "tokens": meta["token_stats"],
    }
    print(f"held-out: {metrics['heldout_bits_per_char']:.4f} bits/char, "
          f"{metrics['heldout_loss_nats_per_token']:.4f} nats/token (best step {res['best']['step']})", flush=True)
    from .export import export
    out_dir = Path(a.out_dir) if a.out_dir else pack.parent / f"{pack.name}-export"
    export(model, pack, out_dir, metrics, out=Path(a.out) if a.out else None)
    print(f"done in {meta['elapsed']() / 60:.2f} min -> {out_dir}" + (f" and {a.out}" if a.out else ""), flush=True)

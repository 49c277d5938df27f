"""How much does the dp4a GEMV's activation form (kernels/gemv_dp4a.py: int16 per group of 16, power-of-two scale)
move the default model's outputs? CPU, float32 compute, the accuracy gate's text and prompts, teacher-forced:
every W8A16 linear's input rounded to bf16 (as on a GPU) -> reference; then also written in the int16 form and
back (`quant_groups_ref`) -> candidate. (On a GPU only decode rows of <= 2 take the form; here every row does.)
    python benchmarks/dp4a_act_accuracy.py [int16] [float32]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from deepserve.kernels.dp4a import GROUP, quant_groups_ref  # noqa: E402
from deepserve.loader.tokenizer import load_tokenizer  # noqa: E402
from deepserve.quant import eval as E  # noqa: E402
from deepserve.quant.int8 import Int8WeightOnlyMethod  # noqa: E402

REAL_APPLY = Int8WeightOnlyMethod.apply  # the method's own apply, wrapped by `run`


def bf16_rows(x):
    return x.to(torch.bfloat16).to(x.dtype)


def int16_form(x):
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    q, s = quant_groups_ref(rows)
    return (q.double() * s.double().repeat_interleave(GROUP, dim=1)).to(x.dtype).view(x.shape)


def run(transform):
    Int8WeightOnlyMethod.apply = lambda self, layer, x, bias: REAL_APPLY(self, layer, transform(x), bias)
    model, folder = E.load_spec(E.ModelSpec(None, "int8-weight-only"))
    return model, folder


def main() -> None:
    model, folder = run(bf16_rows)
    tok = load_tokenizer(folder)
    text_ids = tok.encode(E.read_eval_text(None))
    prompt_ids = E._prompt_ids(tok, None)
    ref = E._reference_pass(model, text_ids, prompt_ids, E.DEFAULT_WINDOW)
    del model
    candidates = {"int16": (int16_form, "inputs bf16 -> int16 form"),
                  "float32": (lambda x: x, "inputs float32, unrounded (the noise floor: bf16's own rounding)")}
    for name in (sys.argv[1:] or ["int16"]):
        transform, what = candidates[name]
        model, _ = run(transform)
        cand = E._candidate_pass(model, ref, text_ids, prompt_ids, E.DEFAULT_WINDOW)
        del model
        report = E.judge(ref, cand, 0.97, 0.02)
        print(f"W8A16, inputs bf16 (reference) vs {what} (candidate):")
        print(E.format_report(report, "int8-weight-only, bf16 inputs", f"int8-weight-only, {what}"), flush=True)


if __name__ == "__main__":
    main()

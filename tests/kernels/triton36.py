"""Make the Triton interpreter front end behave like Triton 3.6's where the two differ in ways that
a GPU run (torch 2.11, triton 3.6, sm90) showed and the interpreter tests (a newer triton) missed:

  * unary minus on floats is `0 - x` in 3.6 (`TritonSemantic.minus`), so `-(+0.0)` is +0.0; later
    releases emit a real negation (-0.0). A kernel that re-applies a sign with `tl.where(neg, -r, r)`
    loses the sign of zero on 3.6.
  * `tl.dot(a, b, acc)` defaults `out_dtype` to float32 in 3.6 and asserts acc's dtype equals it, so
    an int32 accumulator needs `out_dtype=tl.int32`; later releases infer out_dtype from acc.

`triton_3_6_semantics(monkeypatch)` patches the front end the interpreter shares with the compiler
(interpreted kernels re-run their Python body on every launch, so the patch applies at once). On a
CUDA machine (kernels compiled, not interpreted) it does nothing: the installed Triton's own
semantics apply, and the 3.6 compiler has no `make_tensor` for the patched minus to call.
"""

from __future__ import annotations

import triton.language as tl
from triton.language.semantic import TritonSemantic

from tests.kernels.interpret import INTERPRET


def _minus_3_6(self, input):
    scalar = input.type.scalar
    if scalar.is_ptr():
        raise ValueError(f"wrong type argument to unary minus ({scalar!r})")
    zero = self.make_tensor(self.builder.get_null_value(scalar.to_ir(self.builder)), scalar)
    return self.sub(zero, input, True)


def triton_3_6_semantics(monkeypatch) -> None:
    if not INTERPRET:
        return
    dot = TritonSemantic.dot

    def dot_3_6(self, lhs, rhs, acc, input_precision, max_num_imprecise_acc, out_dtype):
        return dot(self, lhs, rhs, acc, input_precision, max_num_imprecise_acc,
                   tl.float32 if out_dtype is None else out_dtype)

    monkeypatch.setattr(TritonSemantic, "minus", _minus_3_6)
    monkeypatch.setattr(TritonSemantic, "dot", dot_3_6)

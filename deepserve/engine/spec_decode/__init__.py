"""Speculative decoding: a draft model proposes k tokens per greedy decode, the main model verifies
them in its next step (one run of k + 1 tokens per sequence, sampled at every position).

    loader.py     load_mtp(config, main_model): the checkpoint's MTP layer as a DeepseekMTP
    budget.py     DraftTokenBudget: the scheduler's budget term (drafts fed, lookahead slots)
    verifier.py   which logits rows sample, per-row sampling requests, greedy acceptance, stats
    proposer.py   MTPProposer: runs the MTP layer over the step's hidden states, chains k drafts

Only greedy requests speculate (SamplingParams.greedy); the others run exactly as without
speculation. Greedy verification keeps the longest prefix of drafts equal to the main model's
argmax choices plus the bonus token, so outputs are those of plain greedy decoding.
"""

from deepserve.engine.spec_decode.budget import DraftTokenBudget
from deepserve.engine.spec_decode.proposer import MTPProposer
from deepserve.engine.spec_decode.verifier import SpecDecodeStats, accept_greedy

__all__ = ["DraftTokenBudget", "MTPProposer", "SpecDecodeStats", "accept_greedy"]

"""Every default and prior edgespec plans and drafts with, and the limits options are checked
against, in one place.

Options (edge_spec.options.EngineOptions, the backends' option classes), the planner
(edge_spec.plan) and the runtime's Controller read these names; nothing else spells the numbers.
"""

from __future__ import annotations

import types

N_CTX = 4096            # context tokens, as llama.cpp's default for chat
MAX_DRAFT = 16          # longest draft the planner weighs and the Controller may draft

# Per-token acceptance assumed until measured, by source (Controller keys: "model" is a draft
# model, "ngram" a short prompt-lookup match in the reply, "ngram:prompt" one in the prompt,
# "ngram:long" a long one; "/hot" after a draft that was accepted whole). Read-only: the
# Controller copies it.
PRIOR_ACCEPTANCE = types.MappingProxyType({
    "model": 0.7, "model/hot": 0.8, "ngram": 0.5, "ngram/hot": 0.65, "ngram:prompt": 0.5, "ngram:prompt/hot": 0.65,
    "ngram:long": 0.85, "ngram:long/hot": 0.95})
# acceptance assumed for a low-bit copy of the target (a self-drafter) not built yet, by its bits;
# a built one records its own agreement (build/quant.py), which replaces these. Measured (T = 0
# agreement with the source's greedy tokens, 791 held-out positions of the calibration replies,
# build/skip.agreement) on copies of Qwen2.5-Coder-1.5B F16: q4_0 0.943, q3_k_m 0.951, q2_k 0.877.
# Checked on another model, copies of Qwen2.5-Coder-0.5B Q8_0: q4_0 0.914 (these say 0.94). Its
# k-quant copies (q3_k_m 0.938, q2_k 0.919) keep wider types for its 896-wide rows, so they check
# nothing. SELF_DRAFTER_BITS are the copies the planner weighs (plan/choose.trade_off).
SELF_DRAFTER_PRIOR = 0.9
SELF_DRAFTER_PRIORS = types.MappingProxyType({"q4_0": 0.94, "q3_k_m": 0.95, "q2_k": 0.88})
SELF_DRAFTER_BITS = tuple(SELF_DRAFTER_PRIORS)
SELF_DRAFTER_KV = "q8_0"  # the KV cache a self-drafter runs with (its build records it)
# the acceptance the draft budget is sized for: a long n-gram match, the most confident source
BUDGET_ACCEPTANCE = 0.95

# what the planner assumes of a trimmed drafter not built yet (bench/trim.py, 0.5B for the 1.5B:
# K=49,152 kept 0.948 of the held-out mass and drafted best end to end with --bits q4_0)
SUGGESTED_K, SUGGESTED_COVERAGE = 49152, 0.95
# a model stored with fewer bits per weight than this gains too little from a 4-bit self-drafter
MIN_SOURCE_BITS = 6.0

# Best-first token trees (core/drafters/spectree.py), weighed by the planner where a target pass costs
# about the same for 1 or 100 tokens (a paged target). Budgets tried, and the prior for how much a
# node's extra children catch: each further sibling is taken to catch TREE_SIBLING_CATCH of what
# the ones before it missed. 0.2: with the 0.70 acceptance prior a 64-node tree is predicted 6.1
# tokens per pass; bench/paged.py measured 6.04 / 6.05 (T=0 / 0.8) over its 14 default prompts
# (0.4 predicted 10.5). The Controller corrects drafting online.
TREE_BUDGETS = (16, 32, 64, 128)
TREE_SIBLING_CATCH = 0.2
TREE_MAX_DEPTH = 32     # deepest node drafted; also the most drafter passes one tree takes

# --- choices and limits the options are checked against -----------------------------------------
BACKENDS = ("llama", "torch", "onnx")  # llama.cpp, torch, onnxruntime
# weights of the models onnxruntime runs: float32 as exported, or quantized by onnxruntime's own
# tools (backends/onnx_backend.py says how)
ONNX_WEIGHTS = ("float32", "int8", "int8-dynamic")
# "sequential": draft, then verify; "parallel": the draft model drafts in a thread of its own
# while the target verifies (core/drafters/ahead.py)
SCHEDULES = ("sequential", "parallel")
# llama.cpp's limit on sequences in one context (LLAMA_MAX_SEQ): a token tree verified in one pass
# puts each leaf's branch in a sequence of its own, so trees have at most 255 leaves
MAX_SEQUENCES = 256
MAX_TREE_BUDGET = 511  # nodes of a best-first tree: one pass over them and the pending token fits a batch of 512

# --- structured output (core/grammar.py, core/llg.py) ---------------------------------------------
# the longest a grammar or JSON schema may take to compile before the request is refused (llguidance
# compiles the schemas of bench/structured_items.json in about 1 ms each)
GRAMMAR_COMPILE_SECONDS = 5.0
GRAMMARS_CACHED = 32    # compiled grammars an engine keeps (a client sends the same schema again and again)
# JSON replies are written on one line with these separators (json.dumps's): no whitespace for a model
# to loop on, and the separators join the keys in spans the grammar forces (drafted for free)
JSON_SEPARATORS = (", ", ": ")

"""Stage 2, plan: the plan for this machine (plan/choose.py), the drafter to load, each model's
backend options (what the user set, else the plan's choice, else llama.cpp's defaults), and how
the runtime decodes (`decoding`: draft budget, trees, n-gram drafts), each derived here, once."""

from __future__ import annotations

from dataclasses import dataclass, replace

from edge_spec.backends.llama_cpp import LlamaOptions
from edge_spec.backends.onnx_backend import OnnxOptions
from edge_spec.backends.torch_backend import TorchOptions
from edge_spec.core.runtime import Decoding
from edge_spec.defaults import MAX_DRAFT, MAX_SEQUENCES
from edge_spec.models.modelfile import ModelFile
from edge_spec.options import EngineOptions, Progress
from edge_spec.pipeline.resolve import Resolved
from edge_spec.plan import choose, costmodel
from edge_spec.plan.planner import Plan

BackendOptions = LlamaOptions | TorchOptions | OnnxOptions


@dataclass(frozen=True)
class Planned:
    plan: Plan | None                  # None: planning was off
    draft: ModelFile | None            # the drafter to load: the plan's, or the one named
    target_options: BackendOptions
    draft_options: BackendOptions
    decoding: Decoding                 # its schedule is the assembly's to decide (it needs the backends)
    notes: tuple[str, ...]             # what was decided on the user's behalf, for them to see


def plan(options: EngineOptions, resolved: Resolved, report: Progress) -> Planned:
    notes: list[str] = []
    the_plan, draft = None, resolved.draft
    if options.planning.plan:
        opened: dict = {}
        the_plan = choose.plan_for(options, resolved.target, draft, notes, report, opened=opened)
        draft = opened[the_plan.drafter.path] if the_plan.drafter is not None else None
        if the_plan.chosen.strategy != "draft" and options.model.draft is None:
            draft = None  # the plan leaves the default drafter out; an explicit -md stays
    decode = decoding(options, the_plan)
    t_opts, d_opts = backend_options(options, the_plan, resolved.target, draft, decode)
    if options.model.rpc and not (t_opts.kind == "llama" and t_opts.rpc):
        notes.append("the RPC workers are not used: the target fits in memory here, and a worker would add "
                     "network time to every pass (-ngl N puts N of its layers on them anyway)")
    if the_plan is None:  # the planner checks memory for its plans; without one, check here
        choose.check_memory(resolved.target, draft, t_opts, d_opts, options.memory.budget)
    if t_opts.kind == "onnx" and t_opts.weights == "int8-dynamic" and not options.drafting.plain:
        notes.append("the target runs onnx int8-dynamic weights, whose activation scales span a whole pass: "
                     "its logits depend on the other tokens verified with them, so speculation can change "
                     "its greedy output (onnx_weights='int8' or 'float32' for a target; int8-dynamic is for drafters)")
    return Planned(the_plan, draft, t_opts, d_opts, decode, tuple(notes))


def decoding(options: EngineOptions, the_plan: Plan | None, most_nodes: int | None = None) -> Decoding:
    """How the runtime decodes: the options' values, else the plan's. `most_nodes`: the largest
    tree the contexts were made for (after loading, a later plan may shrink trees, never grow them)."""
    d = options.drafting
    drafting = the_plan is not None and the_plan.chosen.strategy == "draft"
    tree_budget = d.tree_budget if d.tree_budget is not None else the_plan.chosen.tree_budget if drafting else 0
    if most_nodes is not None:
        tree_budget = min(tree_budget, most_nodes)
    known = the_plan.knowledge if the_plan is not None else None
    measured = known is not None and known.acceptance is not None and not known.acceptance_source.startswith("prior")
    return Decoding(ngram=d.ngram and not d.plain, grammar_drafts=not d.plain,
                    max_draft=d.max_draft or (the_plan.max_draft if the_plan is not None else 0) or MAX_DRAFT,
                    draft_length=d.draft_length, tree_budget=tree_budget, max_leaves=sequences(tree_budget) - 1,
                    overlap=tree_budget > 0 and d.overlap, model_acceptance=known.acceptance if measured else None)


def sequences(tree_budget: int) -> int:
    """n_seq_max of the target's and the drafter's contexts: one sequence per tree leaf, and one
    for the context."""
    return min(max(tree_budget, 0) + 1, MAX_SEQUENCES)


def backend_options(options: EngineOptions, the_plan: Plan | None, target: ModelFile, draft: ModelFile | None,
                    decode: Decoding) -> tuple[BackendOptions, BackendOptions]:
    """(target options, drafter options): LlamaOptions for llama.cpp, TorchOptions for torch,
    OnnxOptions for onnxruntime (CPU provider; weights as options.model.onnx_weights)."""
    m, n_ctx = options.model, options.memory.n_ctx
    t_opts, d_opts = llama_options(options, the_plan, draft, decode)
    placement = the_plan.chosen.target if the_plan is not None else None
    if placement is not None and placement.offload:  # the plan streams the target (SpecExec)
        t_opts = TorchOptions(n_ctx=n_ctx, n_threads=t_opts.n_threads, device=f"cuda:{placement.gpu}",
                              dtype="bfloat16",
                              device_budget_bytes=placement.gpu_layers * costmodel.torch_layer_bytes(target.shape, 2))
    elif m.backend == "torch":
        t_opts = TorchOptions(n_ctx=n_ctx, n_threads=t_opts.n_threads, device="auto")
    elif m.backend == "onnx":
        t_opts = OnnxOptions(n_ctx=n_ctx, n_threads=t_opts.n_threads, weights=m.onnx_weights)
    if m.draft_backend == "torch":
        d_opts = TorchOptions(n_ctx=n_ctx, n_threads=d_opts.n_threads, device="auto")
    elif m.draft_backend == "onnx":
        d_opts = OnnxOptions(n_ctx=n_ctx, n_threads=d_opts.n_threads, weights=m.onnx_weights)
    return t_opts, d_opts


def llama_options(options: EngineOptions, the_plan: Plan | None, draft: ModelFile | None,
                  decode: Decoding) -> tuple[LlamaOptions, LlamaOptions]:
    """llama.cpp's options for both models: what the user set, else the plan's choice, else
    llama.cpp's defaults. A built self-drafter runs with the KV cache type its metadata names
    (QuantSpec: q8_0)."""
    m, mem = options.model, options.memory
    c = the_plan.chosen if the_plan is not None else None
    t_ngl = c.target.ngl(the_plan.target) if c is not None else 0
    d_ngl = c.drafter.ngl(the_plan.drafter) if c is not None and c.drafter is not None else 0
    type_k = mem.type_k or (the_plan.type_k if the_plan else "f16")
    type_v = mem.type_v or (the_plan.type_v if the_plan else "f16")
    threads = m.n_threads or (the_plan.threads if the_plan else None)
    # n_gpu_layers go to the workers when the plan split the target across them or -ngl was given
    # with --rpc (llama.cpp's meaning); otherwise they are the plan's GPU layers, workers unused
    user_split = m.n_gpu_layers is not None and m.n_gpu_layers > 0
    on_workers = bool(m.rpc) and (user_split or (c is not None and c.target.rpc_layers > 0))
    t_ngl = t_ngl if m.n_gpu_layers is None else m.n_gpu_layers
    n_seq = sequences(decode.tree_budget)
    target = LlamaOptions(n_ctx=mem.n_ctx, n_threads=threads, n_gpu_layers=t_ngl,
                          type_k=type_k, type_v=type_v, n_seq_max=n_seq, rpc=m.rpc if on_workers else ())
    d_kv = draft.provenance.get("kv_cache") if draft is not None and mem.type_k is None and mem.type_v is None else None
    drafter = LlamaOptions(n_ctx=mem.n_ctx, n_threads=m.n_threads_draft or threads,
                           n_gpu_layers=d_ngl if m.n_gpu_layers_draft is None else m.n_gpu_layers_draft,
                           type_k=d_kv or type_k, type_v=d_kv or type_v, n_seq_max=n_seq)
    if c is not None and c.target.n_batch:  # a target that fits only just: the batch it was counted with
        target = replace(target, n_batch=c.target.n_batch)
    if c is not None and c.target.disk_bytes:  # a paged target (plan/planner.py, backends/paging.py)
        unplanned = unplanned_drafter_bytes(the_plan, draft, mem.n_ctx, drafter.type_k, drafter.type_v)
        target = replace(target, disk_bytes=c.target.disk_bytes + unplanned, read_ahead=mem.read_ahead,
                         drop_behind=mem.drop_behind)
        # the drafter in memory of its own, never paged out, with the compute buffer the plan counted
        drafter = replace(drafter, use_mmap=False, n_batch=costmodel.PAGED_DRAFTER_BATCH)
    return target, drafter


def unplanned_drafter_bytes(the_plan: Plan, draft: ModelFile | None, n_ctx: int, type_k: str, type_v: str) -> int:
    """The memory of a drafter loaded next to a paged target although the plan left it out (an
    explicit -md the plan found not paying): it comes out of the pinned weights, as far as they
    go, or the pinned pages and the drafter together would overrun the budget (a cgroup kills)."""
    if draft is None or the_plan.chosen.drafter is not None:
        return 0
    drafter = costmodel.memory_need(draft.shape, costmodel.Placement(-1, 0), n_ctx,
                                    type_k, type_v, costmodel.PAGED_DRAFTER_BATCH).ram
    return min(drafter, costmodel.pass_bytes(the_plan.target) - the_plan.chosen.target.disk_bytes)

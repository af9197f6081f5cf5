"""Chooses how to run a target (and a drafter) on a machine: strategy, placement, draft budget.

For each strategy and placement that fits in memory, the planner predicts decode tokens/s:

    plain          1 / t_target(1)
    ngram          plain * g_ngram          (free prompt-lookup drafts; g from past sessions, else 1)
    draft          E(k) / (k * t_draft(1) + t_target(k + 1)) * g_ngram     (edge_spec.core.speculation)
    draft, in parallel   E(k) / (P * max(t_v, (k + 1) * t_d) + (1 - P) * (t_v + k * t_d)) * g_ngram

with pass costs from calibrations when present (`edge_spec.plan.costmodel` otherwise), acceptance a
measured in past sessions with this pair (`edge_spec.plan.history`) or the prior, and k
the draft length that maximises the rate (DuoDecoding's hardware-aware budget). It keeps the
fastest; n-gram drafting wins ties (within NGRAM_TOLERANCE) with plain decoding because the
runtime's controller stops it when it does not pay. Placements: every model on the CPU, or as many layers as fit on each GPU
(all of them when they fit, llama.cpp's split otherwise), drafter on the other device or on the
same one; threads are the physical cores (one model computes at a time in a sequential schedule).
KV caches stay f16 unless memory only fits with q8_0.

The parallel schedule (edge_spec.core.drafters.ahead) drafts while the target verifies. After a draft
wholly accepted and followed by the drafter's own next token (P = a^(k+1)) the next draft was
made during the verification t_v = t_target(k + 1), so the cycle costs the longer of the two;
after any rejection it costs what the sequential cycle does. It is weighed where drafter and
target compute on different devices (all of the target on a GPU and the drafter on the CPU, or
the reverse), and on a CPU alone with the cores split between them: each pass then costs its
all-threads cost times all threads / its threads. That is compute-bound scaling, and the
measured slow-down of fewer threads is larger still (bench/threads.py), because the two models
also share the memory bandwidth.

Offloading (SpecExec): where torch is installed (`offload=True`), a GPU torch can drive (CUDA or
ROCm) exists and the target does not fit in its VRAM, the target may also run on the torch
backend with every layer computed on the GPU, as many resident as fit and the rest streamed
from RAM at every pass (costmodel.predict_offload_pass: flat in the number of tokens, so it pays
with long drafts and high acceptance, and rarely against a fast CPU: the torch backend streams
bfloat16, ~3.5x the bytes of a 4-bit GGUF).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from edge_spec.core.speculation import best_length, best_parallel_length, tree_draft_cost, tree_expected_tokens
from edge_spec.defaults import (
    BUDGET_ACCEPTANCE,
    MAX_DRAFT,
    N_CTX,
    PRIOR_ACCEPTANCE,
    TREE_BUDGETS,
    TREE_MAX_DEPTH,
    TREE_SIBLING_CATCH,
)
from edge_spec.models.shape import ModelShape
from edge_spec.plan import costmodel
from edge_spec.plan.costmodel import Placement
from edge_spec.plan.profile import Calibration, Profile
from edge_spec.types import EdgespecError

RAM_HEADROOM = 0.9     # share of available RAM a plan may use (the OS and the app need the rest)
VRAM_HEADROOM = 0.95   # share of free VRAM (drivers allocate a little per context)
NGRAM_TOLERANCE = 0.03  # a measured n-gram "loss" this small is session-to-session noise
GiB = 2**30


@dataclass(frozen=True)
class Alternative:
    strategy: str                   # "plain", "ngram", "draft"
    target: Placement
    drafter: Placement | None = None
    draft_length: int = 0           # k the plan drafts with a model (0 = none)
    acceptance: float | None = None
    tokens_per_second: float = 0.0
    step_seconds: float = 0.0       # one plain target step
    costs: str = "predicted"        # "calibrated" when every cost used was measured
    ram: int = 0
    vram: int = 0
    why: str = ""
    drafter_model: str = ""         # the draft model's file name
    schedule: str = "sequential"    # "parallel": the drafter drafts while the target verifies
    tree_budget: int = 0            # > 0: best-first token trees of up to this many nodes (a paged target)

    def describe(self, target: ModelShape, drafter: ModelShape | None) -> str:
        where = f"target {self.target.describe(target)}"
        if self.strategy == "plain":
            return f"plain decoding, {where}"
        if self.strategy == "ngram":
            return f"n-gram drafts, {where}"
        name = f" {self.drafter_model}" if self.drafter_model else ""
        shape = f"trees of {self.tree_budget} nodes" if self.tree_budget else f"k={self.draft_length}"
        out = f"draft model{name} {shape} on {self.drafter.describe(drafter)} + n-gram, {where}"
        if self.schedule == "parallel":
            split = self.target.gpu < 0 and self.drafter.gpu < 0
            out += (f", in parallel ({self.drafter.threads} drafter / {self.target.threads} target threads)"
                    if split else ", in parallel")
        return out


@dataclass(frozen=True)
class Knowledge:
    """What past sessions measured (edge_spec.plan.history), or priors."""

    acceptance: float | None = None     # per-token acceptance of the draft model for this pair
    acceptance_source: str = "prior"
    ngram_gain: float = 1.0             # speed-up of n-gram drafting over plain in past sessions
    ngram_source: str = "prior"


@dataclass(frozen=True)
class Plan:
    profile: str
    target: ModelShape
    drafter: ModelShape | None
    chosen: Alternative
    alternatives: tuple[Alternative, ...]
    rejected: tuple[str, ...]          # placements that do not fit, and why
    n_ctx: int
    type_k: str
    type_v: str
    threads: int
    max_draft: int
    knowledge: Knowledge = field(default_factory=Knowledge)
    disk_read_gbs: float | None = None  # the profile's, for paged plans
    drafters: tuple = ()               # drafter_search.Verdict for each local model weighed or left out
    self_drafters: tuple = ()          # choose.SelfDrafter: each low-bit copy of the target weighed as its drafter

    @property
    def paged(self) -> bool:
        return bool(self.chosen.target.disk_bytes)

    @property
    def plain(self) -> Alternative:
        return next(a for a in self.alternatives if a.strategy == "plain")

    def reasons(self) -> list[str]:
        c, base = self.chosen, self.plain.tokens_per_second
        out = [(f"chosen: {c.describe(self.target, self.drafter)}: {c.tokens_per_second:.1f} tok/s predicted "
                f"({c.tokens_per_second / base:.2f}x plain), costs {c.costs}"), c.why]
        drafts = [a for a in self.alternatives if a.strategy == "draft"]
        if drafts and c.strategy != "draft":
            best = max(drafts, key=lambda a: a.tokens_per_second)
            out.append(f"a draft model does not pay here: at best {best.tokens_per_second / base:.2f}x plain "
                       f"({best.why})")
        if self.paged:
            disk = (f"{self.disk_read_gbs:.2f} GB/s (measured)" if self.disk_read_gbs else
                    f"{costmodel.DEFAULT_DISK_GBS:.2f} GB/s (assumed: run `edgespec profile` to measure it)")
            reading = self.chosen.target.disk_bytes / ((self.disk_read_gbs or costmodel.DEFAULT_DISK_GBS) * 1e9
                                                       * costmodel.DISK_EFFICIENCY)
            step = self.chosen.step_seconds
            share = (f"{reading:.2f} s of each {step:.2f} s pass" if reading <= step else
                     f"{reading:.2f} s at that speed, though a pass measured {step:.2f} s (read ahead while computing, "
                     "and part of it still cached)")
            out.append(f"the target does not fit in memory: {self.chosen.target.disk_bytes / 2**30:.2f} GiB of its weights "
                       f"are read from disk at every pass, at {disk}: {share}, whether it verifies 1 token or many")
        t = self.chosen.target
        if t.n_batch:
            out.append(f"the target fits only just: {self.chosen.ram / GiB:.2f} GiB as it runs, with a {t.n_batch}-token "
                       f"batch and a {self.type_k} KV cache; a draft model beside it would leave part of it to be "
                       "read from disk at every pass, which costs more than drafting gains (n-gram drafts take no memory)")
        if t.rpc_layers:
            net = costmodel.network_seconds(self.target, t, 1)
            out.append(f"the target does not fit in memory here: its last {min(t.rpc_layers, self.target.n_layers)} "
                       f"layers{' and head' if t.rpc_layers > self.target.n_layers else ''} on RPC workers "
                       f"{', '.join(f'{w.endpoint} ({w.free_bytes / GiB:.1f} GiB free, {w.rtt_seconds * 1e3:.2f} ms round trip)' for w in t.workers)}; "
                       f"the network adds about {net * 1e3:.1f} ms to each pass, whether it verifies 1 token or many")
        out.append(f"threads {self.threads}; KV cache {self.type_k}/{self.type_v} "
                   f"for {self.n_ctx} tokens; draft budget up to {self.max_draft} tokens")
        return [r for r in out if r]


def plan(target: ModelShape, profile: Profile, drafter: ModelShape | None = None, *, n_ctx: int = N_CTX,
         knowledge: Knowledge = Knowledge(), calibrations: tuple[Calibration, ...] = (),
         max_draft: int = MAX_DRAFT, gpu: bool = True, threads: int | None = None, offload: bool = False,
         workers: tuple[costmodel.Remote, ...] = (), rpc_layers: int | None = None,
         drafter_kv: str | None = None) -> Plan:
    """The plan with the highest predicted tokens/s that fits; EdgespecError when nothing fits.

    `calibrations` add to the profile's (e.g. the engine's cached measurements); `gpu=False`
    keeps llama.cpp on the CPU (built without GPU support); `threads` defaults to the physical
    cores; `offload=True` (torch is installed) adds the torch backend's offloaded target where
    it applies (see the module docstring); `workers`: RPC workers a CPU target that does not fit
    here may put its last layers on (as few as make the rest fit; see _rpc_split), or exactly
    `rpc_layers` of them (-ngl with --rpc); `drafter_kv`: the KV cache type the drafter runs
    with when it is not the plan's (a self-drafter's provenance names q8_0: pipeline/planning.py)."""
    if calibrations:
        profile = profile.model_copy(update={"calibrations": [*calibrations, *profile.calibrations]})
    threads = threads or profile.cpu.physical_cores
    gpus = range(len(profile.gpus)) if gpu else range(0)
    rejected: list[str] = []
    # resident with an f16 KV cache, else q8_0; then the target alone if it fits only just; only then
    # paged (reading weights from disk at every pass costs far more than a quantized cache or a
    # draft model left out: a drafter that pages a target which fits alone loses, measured 0.25x)
    for tier, (type_k, type_v) in (("resident", ("f16", "f16")), ("resident", ("q8_0", "q8_0")),
                                   ("tight", ("q8_0", "q8_0")), ("paged", ("f16", "f16")), ("paged", ("q8_0", "q8_0"))):
        if tier == "tight":
            options = _tight(target, profile, threads, n_ctx) if not (workers or offload) else []
        else:
            options = _placements(target, drafter, profile, gpus, threads, n_ctx, type_k, type_v, rejected, offload,
                                  tier == "paged", workers, rpc_layers, drafter_kv)
        if options:
            break
    else:
        raise EdgespecError(_does_not_fit(target, drafter, profile, n_ctx))
    alternatives: list[Alternative] = []
    for tp, dp, ram, vram in options:
        alternatives.extend(_alternatives(target, drafter, profile, tp, dp, ram, vram, knowledge, max_draft))
    chosen = max(alternatives, key=lambda a: a.tokens_per_second)
    if chosen.strategy == "plain":  # n-gram drafting within NGRAM_TOLERANCE of plain still wins:
        ngram = next(a for a in alternatives if a.strategy == "ngram" and a.target == chosen.target)
        if ngram.tokens_per_second >= chosen.tokens_per_second * (1 - NGRAM_TOLERANCE):
            chosen = ngram  # the controller turns it off where it does not pay, and it may pay later
    budget = _draft_budget(chosen, target, profile, max_draft)
    return Plan(profile.name, target, drafter, chosen, tuple(dedupe(alternatives)), tuple(rejected),
                n_ctx, type_k, type_v, threads, budget, knowledge, profile.disk_read_gbs)


def _placements(target, drafter, profile, gpus, threads, n_ctx, type_k, type_v, rejected, offload=False,
                allow_paged=False, workers=(), rpc_layers=None, drafter_kv=None):
    """(target placement, drafter placement or None, RAM, VRAM) for each combination that fits."""
    d_k, d_v = (drafter_kv, drafter_kv) if drafter_kv else (type_k, type_v)
    ram_budget = profile.ram_available_bytes * RAM_HEADROOM
    out = []
    target_options = [Placement(-1, 0, threads)]
    if workers and rpc_layers:  # the user's split (-ngl with --rpc) in place of the CPU alone
        target_options = [Placement(-1, 0, threads, rpc_layers=rpc_layers, workers=tuple(workers))]
        gpus = ()
    for g in gpus:
        layers = _layers_that_fit(target, profile, g, n_ctx, type_k, type_v, reserve=0)
        if layers > 0:
            target_options.append(Placement(g, layers, threads))
        else:
            rejected.append(f"target on GPU{g}: not one layer fits in {profile.gpus[g].vram_free_bytes / GiB:.1f} GiB free")
    if offload:
        target_options.extend(_offload_placements(target, profile, threads, n_ctx, type_k, type_v, rejected))
    for tp in target_options:
        t_need = costmodel.memory_need(target, tp, n_ctx, type_k, type_v)
        drafter_options: list[Placement | None] = [None]
        if drafter is not None:
            drafter_options.append(Placement(-1, 0, threads))
            for g in gpus:
                used = t_need.vram if tp.gpu == g else 0
                layers = _layers_that_fit(drafter, profile, g, n_ctx, d_k, d_v, reserve=used)
                if layers >= drafter.n_layers:  # a split drafter is never worth its sync cost
                    drafter_options.append(Placement(g, layers, threads))
        for dp in drafter_options:
            need = t_need
            if dp is not None:
                d = costmodel.memory_need(drafter, dp, n_ctx, d_k, d_v)
                need = costmodel.MemoryNeed(need.ram + d.ram, need.vram + d.vram)
            ram = need.ram + costmodel.RUNTIME_BYTES
            unified = any(profile.gpus[p.gpu].unified_memory for p in (tp, dp) if p is not None and p.gpu >= 0)
            if unified:  # VRAM is carved out of the same RAM
                ram += need.vram
            if ram > ram_budget and workers and tp.gpu < 0 and not tp.offload and (dp is None or dp.gpu < 0):
                others = ram - t_need.ram  # the drafter and the process
                split = _rpc_split(target, tp, workers, ram_budget - others, n_ctx, type_k, type_v, rejected)
                if split is not None:
                    out.append((split, dp, int(others + costmodel.memory_need(target, split, n_ctx, type_k, type_v).ram),
                                int(need.vram)))
                    continue
            if ram > ram_budget and allow_paged:
                others = ram - t_need.ram  # the drafter and the process
                if dp is not None:  # next to a paged target the drafter runs with a small batch (backends/load.py)
                    others -= d.ram - costmodel.memory_need(drafter, dp, n_ctx, d_k, d_v,
                                                            costmodel.PAGED_DRAFTER_BATCH).ram
                paged = _paged(target, tp, dp, others, ram_budget, n_ctx, type_k, type_v)
                if paged is not None:
                    paged_ram = others + costmodel.memory_need(target, paged, n_ctx, type_k, type_v).ram
                    out.append((paged, dp, int(paged_ram), int(need.vram)))
                    continue
            if ram > ram_budget:
                what = "target" + (" + drafter" if dp else "")
                rejected.append(f"{what} with {tp.describe(target)}: needs {ram / GiB:.1f} GiB RAM, "
                                f"{ram_budget / GiB:.1f} GiB usable (KV {type_k})")
                continue
            out.append((tp, dp, int(ram), int(need.vram)))
    return out


def _tight(target, profile, threads, n_ctx) -> list:
    """A CPU target, alone, that fits only just: by what it touches as it runs with a small batch
    and a q8_0 cache (costmodel.touched_need), within all of the budget. What llama.cpp allocates
    beyond that is never written, and the headroom the other tiers keep is page cache here: at a
    full context the little that overflows is read back by the kernel, as any mapped file is,
    which costs far less than pinning part of it and reading the rest at every pass."""
    need = costmodel.touched_need(target, n_ctx, "q8_0", "q8_0")
    if need > profile.ram_available_bytes:
        return []
    return [(Placement(-1, 0, threads, n_batch=costmodel.TIGHT_BATCH), None, need, 0)]


def _rpc_split(target, tp, workers, room: float, n_ctx, type_k, type_v, rejected) -> Placement | None:
    """A CPU target that does not fit here with RPC workers: the fewest last layers on the workers
    that leave the rest fitting in `room` (each worker adds network to every pass, so as much
    stays here as fits); None when the workers cannot hold what does not fit."""
    remote_free = sum(w.free_bytes for w in workers) * costmodel.RPC_HEADROOM
    for layers in range(1, target.n_layers + 2):
        split = Placement(-1, 0, tp.threads, rpc_layers=layers, workers=tuple(workers))
        need = costmodel.rpc_need(target, split, n_ctx, type_k, type_v)
        if need.ram <= room:
            if need.vram <= remote_free:
                return split
            rejected.append(f"target split across RPC workers: {need.vram / GiB:.1f} GiB would go to the workers, "
                            f"{remote_free / GiB:.1f} GiB free there")
            return None
    return None


def _paged(target, tp, dp, others: float, ram_budget: float, n_ctx, type_k, type_v) -> Placement | None:
    """A CPU target that does not fit: as much of what every pass reads pinned in RAM as the
    budget holds next to `others` (the drafter, the process), the rest read from disk at every
    pass (backends/paging.py); None when even the caches and the drafter leave no room."""
    if tp.gpu >= 0 or tp.offload or (dp is not None and dp.gpu >= 0):
        return None
    every_pass = costmodel.pass_bytes(target)
    fixed = costmodel.memory_need(target, Placement(-1, 0, disk_bytes=every_pass), n_ctx, type_k, type_v).ram
    room = ram_budget - others - fixed  # bytes of weights that can stay pinned
    if room < 0:
        return None
    return Placement(-1, 0, tp.threads, disk_bytes=int(every_pass - min(room, every_pass)) or 1)


def _offload_placements(target, profile, threads, n_ctx, type_k, type_v, rejected):
    """The torch backend streaming the target through each GPU torch drives that cannot hold it
    (llama.cpp would split it): as many layers on the GPU as fit, at least one streaming slot."""
    for g, gpu in enumerate(profile.gpus):
        if gpu.api not in ("cuda", "rocm") or _layers_that_fit(target, profile, g, n_ctx, type_k, type_v, 0) >= target.n_layers:
            continue
        free = gpu.vram_free_bytes * VRAM_HEADROOM
        fixed = costmodel.memory_need(target, Placement(g, 0, offload=True), n_ctx).vram  # head, KV, buffers
        layers = min(int((free - fixed) // costmodel.torch_layer_bytes(target)), target.n_layers)
        if layers < 1:
            rejected.append(f"target streamed through GPU{g} (torch): not one layer fits next to its head and KV cache")
            continue
        yield Placement(g, layers, threads, offload=True)


def _layers_that_fit(shape: ModelShape, profile: Profile, g: int, n_ctx: int, type_k: str, type_v: str,
                     reserve: int) -> int:
    free = profile.gpus[g].vram_free_bytes * VRAM_HEADROOM - reserve
    for layers in range(shape.n_layers, 0, -1):
        if costmodel.memory_need(shape, Placement(g, layers), n_ctx, type_k, type_v).vram <= free:
            return layers
    return 0


def _alternatives(target, drafter, profile, tp, dp, ram, vram, knowledge, max_draft):
    sizes = range(1, max_draft + 2)
    t_costs, t_src = costmodel.pass_costs(target, profile, tp, sizes)
    step = t_costs[1]
    plain_rate = 1.0 / step
    common = {"target": tp, "step_seconds": step, "ram": ram, "vram": vram}
    if dp is None:
        yield Alternative("plain", tokens_per_second=plain_rate, costs=t_src, why="", **common)
        gain = knowledge.ngram_gain
        yield Alternative("ngram", tokens_per_second=plain_rate * gain, costs=t_src, **common,
                          why=f"n-gram drafts cost nothing to make; gain {gain:.2f}x from {knowledge.ngram_source} "
                              "(it depends on how much a reply repeats its prompt)")
        return
    d_costs, d_src = costmodel.pass_costs(drafter, profile, dp, [1])
    a = knowledge.acceptance if knowledge.acceptance is not None else PRIOR_ACCEPTANCE["model"]
    best_k, best_rate = best_length(a, d_costs[1], t_costs.__getitem__, max_draft)
    costs = "calibrated" if t_src == d_src == "calibrated" else "predicted"
    why = (f"acceptance {a:.2f} ({knowledge.acceptance_source}); a drafted token costs "
           f"{d_costs[1] / step:.2f} target steps, verifying {best_k + 1} tokens {t_costs[best_k + 1] / step:.2f} steps")
    yield Alternative("draft", drafter=dp, draft_length=best_k, acceptance=a, drafter_model=os.path.basename(drafter.path),
                      tokens_per_second=best_rate * knowledge.ngram_gain, costs=costs, why=why, **common)
    # a pass reads the disk whatever it verifies: trees of the drafter's best guesses, from a
    # drafter that holds trees (a trimmed one, seen through backends/trimmed.py, holds none)
    if tp.disk_bytes and drafter.vocab_size >= target.vocab_size:
        yield from _tree_alternatives(target, drafter, profile, tp, dp, a, d_costs[1], knowledge, common, costs)
    for ptp, pdp, pt, pd in _parallel_placements(target, drafter, profile, tp, dp, t_costs, d_costs[1], max_draft):
        k, rate = best_parallel_length(a, pd, pt.__getitem__, max_draft)
        if k == 0:
            continue
        why = (f"acceptance {a:.2f} ({knowledge.acceptance_source}); drafting overlaps verification after "
               f"{a ** (k + 1):.0%} of drafts; a drafted token costs {pd / step:.2f} and verifying {k + 1} tokens "
               f"{pt[k + 1] / step:.2f} of today's target steps")
        yield Alternative("draft", target=ptp, drafter=pdp, draft_length=k, acceptance=a, schedule="parallel",
                          drafter_model=os.path.basename(drafter.path), step_seconds=step, ram=ram, vram=vram,
                          tokens_per_second=rate * knowledge.ngram_gain, costs="predicted" if pt is not t_costs else costs,
                          why=why)


def _tree_alternatives(target, drafter, profile, tp, dp, a, d_cost, knowledge, common, costs):
    """Best-first trees (core/drafters/spectree.py) of each budget in TREE_BUDGETS, the best one kept:
    E from speculation.tree_expected_tokens, cost one target pass over the tree plus growing it."""
    sizes = [b + 1 for b in TREE_BUDGETS]
    t_costs, _ = costmodel.pass_costs(target, profile, tp, sizes)
    rates = {b: tree_expected_tokens(a, b, TREE_MAX_DEPTH, TREE_SIBLING_CATCH)
             / (t_costs[b + 1] + tree_draft_cost(b, d_cost, TREE_MAX_DEPTH)) for b in TREE_BUDGETS}
    b = max(rates, key=rates.get)
    step = common["step_seconds"]
    why = (f"acceptance {a:.2f} ({knowledge.acceptance_source}); a tree of {b} nodes is predicted to yield "
           f"{tree_expected_tokens(a, b, TREE_MAX_DEPTH, TREE_SIBLING_CATCH):.1f} tokens per pass, verified in "
           f"{t_costs[b + 1] / step:.2f} target steps and grown in {tree_draft_cost(b, d_cost, TREE_MAX_DEPTH) / step:.2f}")
    yield Alternative("draft", drafter=dp, draft_length=TREE_MAX_DEPTH, acceptance=a, tree_budget=b,
                      drafter_model=os.path.basename(drafter.path), tokens_per_second=rates[b] * knowledge.ngram_gain,
                      costs=costs, why=why, **common)


def _parallel_placements(target, drafter, profile, tp, dp, t_costs, d_cost, max_draft):
    """(target placement, drafter placement, target pass costs, drafter step) for running the two
    at once: on different devices as placed, or on the CPU with its threads split."""
    def whole_gpu(p, shape):
        return p.gpu >= 0 and (p.offload or p.gpu_layers >= shape.n_layers)

    def cpu_only(p):
        return p.gpu < 0 or (p.gpu_layers == 0 and not p.offload)

    if (whole_gpu(tp, target) and cpu_only(dp)) or (cpu_only(tp) and whole_gpu(dp, drafter)) or (
            whole_gpu(tp, target) and whole_gpu(dp, drafter) and tp.gpu != dp.gpu):
        yield tp, dp, t_costs, d_cost
        return
    if not (cpu_only(tp) and cpu_only(dp)) or tp.rpc_layers:
        return  # the same GPU, or a target split across GPU and CPU or workers: the two would contend
    threads = tp.threads or profile.cpu.physical_cores
    sizes = range(1, max_draft + 2)
    disk = tp.disk_bytes / costmodel.disk_read_bps(profile)  # a paged target's reading does not scale with threads
    for d_threads in range(1, threads):
        ptp, pdp = Placement(-1, 0, threads - d_threads, disk_bytes=tp.disk_bytes), Placement(-1, 0, d_threads)
        d_full = dp.threads or profile.cpu.physical_cores
        yield (ptp, pdp, {k: disk + max(t_costs[k] - disk, 0.0) * threads / (threads - d_threads) for k in sizes},
               d_cost * d_full / d_threads)


def _draft_budget(chosen: Alternative, target: ModelShape, profile: Profile, max_draft: int) -> int:
    """The most tokens worth drafting in one step: the best length for a long n-gram match (the
    controller's most confident source, BUDGET_ACCEPTANCE) on this placement's verify curve."""
    if chosen.strategy == "plain":
        return 0
    costs, _ = costmodel.pass_costs(target, profile, chosen.target, range(1, max_draft + 2))
    best_k, _ = best_length(BUDGET_ACCEPTANCE, 0.0, costs.__getitem__, max_draft)
    return max(best_k, 1, chosen.draft_length)


def dedupe(alternatives: list[Alternative]) -> list[Alternative]:
    """Plain and n-gram alternatives repeat once per drafter placement: keep one of each."""
    seen, out = set(), []
    for a in sorted(alternatives, key=lambda a: -a.tokens_per_second):
        key = (a.strategy, a.target, a.drafter, a.drafter_model, a.schedule, a.tree_budget)
        if key not in seen:
            seen.add(key)
            out.append(a)
    return out


def _does_not_fit(target: ModelShape, drafter: ModelShape | None, profile: Profile, n_ctx: int) -> str:
    usable = profile.ram_available_bytes * RAM_HEADROOM
    # the least it can run with: every weight read from disk at every pass (a paged target)
    streamed = Placement(disk_bytes=costmodel.pass_bytes(target))
    need = costmodel.memory_need(target, streamed, n_ctx, "q8_0", "q8_0").ram + costmodel.RUNTIME_BYTES
    kv = target.kv_bytes_per_token("q8_0", "q8_0")
    spare = usable - (need - kv * n_ctx)
    hints = []
    if spare > 256 * kv:
        hints.append(f"a context of {int(spare / kv) // 256 * 256} tokens (-c)")
    vram = max((g.vram_free_bytes for g in profile.gpus), default=0)
    hints.append(f"a smaller quantization of the model (weights are {target.file_bytes / GiB:.1f} GiB)")
    gpu_note = f" and {vram / GiB:.1f} GiB free VRAM" if vram else ""
    return (f"{target.name} does not fit on {profile.name!r}: it needs {need / GiB:.1f} GiB of RAM at "
            f"{n_ctx} tokens of context even with a q8_0 KV cache and its weights read from disk at every pass "
            f"(KV cache, compute buffers, a streaming window), and {usable / GiB:.1f} GiB is usable"
            f"{gpu_note}; what would fit: " + " or ".join(hints))

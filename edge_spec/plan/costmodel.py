"""Predicts what a target pass over k tokens costs on a device, from a GGUF file and a profile.

One pass of a decoder over k tokens reads every weight once and does about 2 * params * k
floating-point operations. Reading and computing overlap for the first token (a decode step is
bound by whichever is slower: memory on big models, compute on small ones); every further token
in the pass adds its compute:

    t(k) = overhead + max(streamed_bytes / bandwidth, c) + (k - 1) * c,   c = 2 * params / throughput

with the bandwidth and throughput a profile measured (STREAM triad, BLAS f32 GEMM) scaled by how
much of them llama.cpp's quantized kernels reach. The efficiencies were fitted on this project's
CI machine against the calibrations in its profile, taken in the same hour (profiles/ci-2core.json;
the README's "Planning" section gives the fit and its error). The real curve has steps where
llama.cpp switches kernels, so calibrated measurements replace this formula whenever they exist.
A split placement (n layers on the GPU, the rest on the CPU) costs the sum of both parts.

An offloaded target (SpecExec; the torch backend, backends/offload.py) computes every layer on
the GPU and streams the layers that are not resident from host memory at every pass; copying
overlaps compute, so

    t(k) = overhead + max(streamed_bytes / host_to_device, t_gpu(k))

which stays flat in k up to large trees (t_gpu grows by 2 * params / throughput per token). The
torch backend holds weights dequantized (bfloat16 on a GPU: 2 bytes per parameter, not the
GGUF's ~0.6), which this term and its memory counts include.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from edge_spec.defaults import MAX_DRAFT
from edge_spec.models.shape import ModelShape, model_shape
from edge_spec.plan.profile import Calibration, Gpu, Profile
from edge_spec.types import EdgespecError

# share of the measured triad bandwidth / f32 GEMM throughput that llama.cpp's quantized kernels
# reach (fitted here, see the module docstring); GPUs: typical of llama.cpp's CUDA/Metal kernels
CPU_BANDWIDTH_EFFICIENCY = 0.62
CPU_COMPUTE_EFFICIENCY = 0.62
GPU_BANDWIDTH_EFFICIENCY = 0.7
GPU_COMPUTE_EFFICIENCY = 0.3
CPU_OVERHEAD_S = 0.002           # graph build, thread wake-up, sampling: per pass
GPU_OVERHEAD_PER_LAYER_S = 5e-5  # kernel launches per layer and pass
SPLIT_SYNC_S = 5e-4              # a pass that crosses devices waits for the copy of activations
RUNTIME_BYTES = 300 * 2**20      # the process itself, libraries, token buffers
TORCH_OFFLOAD_SLOTS = 2          # device buffers that streamed layers pass through (offload.py)
STREAM_WINDOW_BYTES = 256 * 2**20  # page cache a paged target's streamed weights pass through
PAGED_DRAFTER_BATCH = 64         # next to a paged target a drafter's compute buffer is sized for this many tokens
# A CPU target that fits only just (planner._tight): it runs alone, with this batch, and is counted
# by what it touches rather than what llama.cpp allocates. Measured here (Qwen2.5-Coder-1.5B Q8_0,
# --plain, 4096-token f16 cache): 206 MiB of anonymous memory after a 40-token prompt, 270 MiB after
# 1623 tokens; less the 112 MiB cache, the process and the touched compute buffer are 94-158 MiB.
TIGHT_BATCH = 128
TOUCHED_RUNTIME_BYTES = 96 * 2**20  # the interpreter, llama.cpp's context and vocabulary, token buffers
DEFAULT_DISK_GBS = 0.5           # sequential read when the profile has none measured
DISK_EFFICIENCY = 0.9            # of the measured sequential read, reading tensor by tensor
# an RPC worker's share of a pass: the activations go there and back (ggml's scheduler copies them
# at each split), plus the commands around its graph; measured with bench/rpc.py's latency proxy
RPC_ROUND_TRIPS = 2
RPC_DEFAULT_BPS = 1e9 / 8        # transfer speed to a worker never measured: gigabit Ethernet
RPC_HEADROOM = 0.9               # share of a worker's free memory a plan may use
# --- shapes of drafters not built yet (what the planner weighs before `edgespec drafter build`) ---

# bits per weight of each quantization a drafter can be built with (K-quant mixes: llama.cpp's own
# sizes for Llama-7B; the planner reads a built drafter's real size from its file)
BITS = {"q2_k": 3.5, "q3_k_m": 3.9, "q4_0": 4.5, "q4_1": 5.0, "q4_k_m": 4.85, "q5_k_m": 5.7, "q8_0": 8.5}


def source_bits(model: ModelShape | str | os.PathLike) -> float:
    """Mean bits per weight of a GGUF's block tensors (what a drafter would shrink)."""
    shape = model if isinstance(model, ModelShape) else model_shape(model)
    params = shape.layer_params + shape.output_params
    return 8 * (sum(shape.layer_bytes) + shape.output_bytes) / max(params, 1)


def requantized_shape(shape: ModelShape, scale: float, path: str) -> ModelShape:
    """`shape` with every tensor's bytes scaled by `scale` (its weights requantized), saved as `path`."""
    return dataclasses.replace(
        shape, path=path, file_bytes=int(shape.file_bytes * scale), output_bytes=int(shape.output_bytes * scale),
        layer_bytes=tuple(int(b * scale) for b in shape.layer_bytes), embedding_bytes=int(shape.embedding_bytes * scale))


def trimmed_shape(shape: ModelShape, k: int, layer_scale: float = 1.0, head_scale: float = 1.0) -> ModelShape:
    """`shape` with a K-row head and embedding table (edge_spec.build.trim), its blocks' and
    embedding's bytes scaled by `layer_scale` (requantized), its head's by `head_scale` (a
    requantized trim keeps its head at q8_0); the file shrinks in proportion (a drafter next to a
    paged target is loaded whole)."""
    f = k / shape.vocab_size
    cut = dataclasses.replace(shape, path=f"{shape.path}.trim-{k}", vocab_size=k,
                              layer_bytes=tuple(int(b * layer_scale) for b in shape.layer_bytes),
                              output_bytes=int(shape.output_bytes * f * head_scale),
                              output_params=int(shape.output_params * f),
                              embedding_bytes=int(shape.embedding_bytes * f * layer_scale))

    def weights(s: ModelShape) -> int:
        return sum(s.layer_bytes) + s.output_bytes + s.embedding_bytes

    return dataclasses.replace(cut, file_bytes=int(shape.file_bytes * weights(cut) / max(weights(shape), 1)))

# --- devices and placements --------------------------------------------------------------------

@dataclass(frozen=True)
class Remote:
    """An RPC worker the target's layers can go to (backends/rpc.py probes it)."""

    endpoint: str
    free_bytes: int
    rtt_seconds: float
    bytes_per_second: float | None = None


@dataclass(frozen=True)
class Placement:
    """Where a model runs: `gpu_layers` of its blocks on GPU `gpu` (-1 = CPU only); when every
    block is on the GPU the LM head goes there too, as llama.cpp does with -ngl > n_layers.
    `offload`: the torch backend computes every block on the GPU with room for `gpu_layers` of
    them there (TORCH_OFFLOAD_SLOTS of those are streaming buffers), streaming the others."""

    gpu: int = -1
    gpu_layers: int = 0
    threads: int | None = None
    offload: bool = False
    disk_bytes: int = 0     # paged (CPU only): weights read from disk at every pass, the rest pinned in RAM
    n_batch: int = 0        # tokens per llama.cpp batch when not its default 512 (TIGHT_BATCH: a target that fits only just)
    # a CPU target split across RPC workers: its last rpc_layers blocks on `workers` (by their free
    # memory, llama.cpp's split), the head too when every block is there; the rest on this CPU
    rpc_layers: int = 0
    workers: tuple[Remote, ...] = ()

    def describe(self, shape: ModelShape) -> str:
        if self.rpc_layers:
            n = min(self.rpc_layers, shape.n_layers)
            s = "s" if len(self.workers) > 1 else ""
            return f"CPU {shape.n_layers - n}/{shape.n_layers} layers + {n} on {len(self.workers)} RPC worker{s}"
        if self.offload:
            return f"GPU{self.gpu} torch, {self.streamed(shape)}/{shape.n_layers} layers streamed"
        if self.disk_bytes:
            return f"CPU paged ({self.disk_bytes / 2**30:.2f}G from disk per pass)"
        if self.gpu < 0 or self.gpu_layers == 0:
            return f"CPU (fits only just, batch {self.n_batch})" if self.n_batch else "CPU"
        if self.gpu_layers >= shape.n_layers:
            return f"GPU{self.gpu}"
        return f"GPU{self.gpu} {self.gpu_layers}/{shape.n_layers}+CPU"

    def streamed(self, shape: ModelShape) -> int:
        """Blocks copied to the GPU at every pass (offload)."""
        if not self.offload or self.gpu_layers >= shape.n_layers:
            return 0
        return shape.n_layers - max(self.gpu_layers - TORCH_OFFLOAD_SLOTS, 0)

    def ngl(self, shape: ModelShape) -> int:
        """The value for llama.cpp's n_gpu_layers (0 for the torch backend's offloading; the blocks
        on the workers for a split across RPC workers)."""
        if self.rpc_layers:
            return shape.n_layers + 1 if self.rpc_layers >= shape.n_layers else self.rpc_layers
        if self.gpu < 0 or self.offload:
            return 0
        return shape.n_layers + 1 if self.gpu_layers >= shape.n_layers else self.gpu_layers


def _cpu_pass(profile: Profile, streamed: float, params: float, k: int, threads: int | None) -> float:
    cpu = profile.cpu
    cores = cpu.physical_cores
    share = min(threads or cores, cores) / cores  # compute scales with cores; bandwidth saturates
    gflops = cpu.matmul_gflops.get("f32") or 8.0 * cores  # 8 GFLOP/s per core if never measured
    bw = cpu.memory_bandwidth_gbs * 1e9 * CPU_BANDWIDTH_EFFICIENCY
    return _roofline(streamed / bw, 2 * params / (gflops * 1e9 * CPU_COMPUTE_EFFICIENCY * share), k)


def _roofline(read_s: float, token_s: float, k: int) -> float:
    """The first token's compute overlaps reading the weights; later tokens add theirs."""
    return max(read_s, token_s) + (k - 1) * token_s


def _gpu_pass(gpu: Gpu, streamed: float, params: float, k: int, layers: int) -> float:
    gflops = gpu.matmul_gflops.get("f16") or gpu.matmul_gflops.get("f32") or 10_000.0
    bw = gpu.memory_bandwidth_gbs * 1e9 * GPU_BANDWIDTH_EFFICIENCY
    return layers * GPU_OVERHEAD_PER_LAYER_S + _roofline(streamed / bw, 2 * params / (gflops * 1e9 * GPU_COMPUTE_EFFICIENCY), k)


def torch_layer_bytes(shape: ModelShape, dtype_bytes: int = 2) -> int:
    """One block's weights as the torch backend holds them (matrices in its dtype, vectors f32),
    rounded up: the offloading budget of n layers is n times this."""
    vectors = 16 * shape.n_embd * 4  # norms and biases, generously
    return -(-shape.layer_params // shape.n_layers) * dtype_bytes + vectors


def predict_offload_pass(shape: ModelShape, profile: Profile, placement: Placement, k: int) -> float:
    """An offloaded pass: the streamed blocks' copy overlaps the GPU's compute of all of them."""
    g = profile.gpus[placement.gpu]
    copy_s = placement.streamed(shape) * torch_layer_bytes(shape) / (g.host_to_device_gbs * 1e9)
    resident = shape.n_layers * torch_layer_bytes(shape) + shape.output_params * 2
    compute_s = _gpu_pass(g, resident, shape.n_params, k, shape.n_layers)
    return CPU_OVERHEAD_S + max(copy_s, compute_s)


def predict_pass(shape: ModelShape, profile: Profile, placement: Placement, k: int) -> float:
    """Predicted seconds of one pass over k tokens (k = 1: a decode step)."""
    if placement.rpc_layers:  # the workers assumed as fast as this CPU; the network on top
        local = dataclasses.replace(placement, rpc_layers=0, workers=())
        return predict_pass(shape, profile, local, k) + network_seconds(shape, placement, k)
    if placement.offload:
        return predict_offload_pass(shape, profile, placement, k)
    n_gpu = min(placement.gpu_layers, shape.n_layers) if placement.gpu >= 0 else 0
    if n_gpu and placement.gpu >= len(profile.gpus):
        raise EdgespecError(f"the profile {profile.name!r} has no GPU {placement.gpu}")
    gpu_bytes = sum(shape.layer_bytes[shape.n_layers - n_gpu:]) if n_gpu else 0  # llama.cpp offloads the last layers
    cpu_bytes = sum(shape.layer_bytes) - gpu_bytes
    frac_gpu = gpu_bytes / max(sum(shape.layer_bytes), 1)
    head_on_gpu = n_gpu >= shape.n_layers
    head_bytes, head_params = shape.output_bytes + shape.other_bytes, shape.output_params
    t = CPU_OVERHEAD_S
    if n_gpu:
        g = profile.gpus[placement.gpu]
        t += _gpu_pass(g, gpu_bytes + (head_bytes if head_on_gpu else 0),
                       shape.layer_params * frac_gpu + (head_params if head_on_gpu else 0), k, n_gpu)
    if not head_on_gpu:
        t += _cpu_pass(profile, cpu_bytes + head_bytes, shape.layer_params * (1 - frac_gpu) + head_params,
                       k, placement.threads)
        if n_gpu:
            t += SPLIT_SYNC_S
    if placement.disk_bytes:  # read by the pass's page faults, at the disk's speed (backends/paging.py)
        t += placement.disk_bytes / (disk_read_bps(profile))
    return t


def network_seconds(shape: ModelShape, placement: Placement, k: int) -> float:
    """What the RPC workers' network adds to a pass over k tokens: RPC_ROUND_TRIPS round trips
    per worker, and the activations ([k, n_embd] float32) sent to each worker and back (the
    logits too when the head is there)."""
    if not placement.rpc_layers:
        return 0.0
    t = 0.0
    hops = len(placement.workers) + 1  # into the first worker, between workers, back to this CPU
    for w in placement.workers:
        t += RPC_ROUND_TRIPS * w.rtt_seconds
    bps = min((w.bytes_per_second or RPC_DEFAULT_BPS) for w in placement.workers) if placement.workers else RPC_DEFAULT_BPS
    sent = hops * k * shape.n_embd * 4 + (k * shape.vocab_size * 4 if placement.rpc_layers >= shape.n_layers else 0)
    return t + sent / bps


def disk_read_bps(profile: Profile) -> float:
    """Bytes/s a paged target reads its weights at (the profile's sequential read, else a SATA SSD)."""
    return (profile.disk_read_gbs or DEFAULT_DISK_GBS) * 1e9 * DISK_EFFICIENCY


def pass_bytes(shape: ModelShape) -> int:
    """Weight bytes every pass reads: all but the token embedding table, whose rows are only
    looked up (when it is not also the LM head)."""
    return sum(shape.layer_bytes) + shape.output_bytes + shape.other_bytes


def pass_costs(shape: ModelShape, profile: Profile, placement: Placement, sizes) -> tuple[dict[int, float], str]:
    """Seconds per pass for each k in `sizes` and where they come from ("calibrated" when the
    profile has a matching measurement for this model on this device, else "predicted")."""
    device = ("rpc" if placement.rpc_layers else
              "cpu" if placement.gpu < 0 or placement.gpu_layers == 0 else f"gpu{placement.gpu}")
    name = os.path.basename(shape.path)
    cal = next((c for c in profile.calibrations if not placement.offload  # calibrations are llama.cpp's
                and c.model == name and c.device == device and _matches(c, shape, placement)), None)
    if cal is not None:
        return {k: interpolate(cal, k) for k in sizes}, "calibrated"
    return {k: predict_pass(shape, profile, placement, k) for k in sizes}, "predicted"


def _matches(cal: Calibration, shape: ModelShape, placement: Placement) -> bool:
    all_layers = shape.n_layers + 1  # -ngl above the block count puts every layer and the head on the GPU
    paged_alike = abs(cal.disk_bytes - placement.disk_bytes) <= 0.05 * max(placement.disk_bytes, 1)
    return cal.model_bytes == shape.file_bytes and min(cal.n_gpu_layers, all_layers) == placement.ngl(shape) and (
        placement.threads is None or cal.threads is None or cal.threads == placement.threads) and paged_alike


def interpolate(cal: Calibration, k: int) -> float:
    """Seconds of a k-token pass from a calibration: measured, interpolated, or the last slope."""
    points = {1: cal.step_seconds, **{int(n): s for n, s in cal.verify_seconds.items()}}
    if k in points:
        return points[k]
    known = sorted(points)
    below = max((n for n in known if n < k), default=known[0])
    above = min((n for n in known if n > k), default=None)
    if above is None:
        if len(known) < 2:
            return points[below] * k
        a, b = known[-2], known[-1]
        return points[b] + (points[b] - points[a]) / (b - a) * (k - b)
    return points[below] + (points[above] - points[below]) * (k - below) / (above - below)


# --- memory ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryNeed:
    ram: int
    vram: int


def torch_memory_need(shape: ModelShape, n_ctx: int, dtype_bytes: int = 4, kv_cache: str = "plain",
                      budget: int | None = None, device: str = "cpu") -> MemoryNeed:
    """The torch backend: weights dequantized to its dtype (an untied embedding table stays
    quantized), KV cache (int8x2: ~1 byte per element), activations of a 512-token batch; on a
    GPU, `budget` bytes of layers there and all of them in (pinned) host memory."""
    layers = shape.n_layers * torch_layer_bytes(shape, dtype_bytes)
    head = shape.output_params * dtype_bytes + shape.embedding_bytes + shape.other_bytes
    elements = shape.n_layers * shape.n_head_kv * (shape.head_dim_k + shape.head_dim_v) * n_ctx
    kv = elements * (dtype_bytes if kv_cache == "plain" else 1 + 2 / min(shape.head_dim_k, shape.head_dim_v))
    compute = shape.compute_buffer_bytes(min(512, n_ctx))
    if device == "cpu":
        return MemoryNeed(ram=int(layers + head + kv + compute), vram=0)
    on_gpu = layers if budget is None else min(budget, layers)
    ram = layers if budget is not None else 0
    return MemoryNeed(ram=int(ram + compute), vram=int(on_gpu + head + kv + compute))


def memory_need(shape: ModelShape, placement: Placement, n_ctx: int, type_k: str = "f16",
                type_v: str = "f16", n_ubatch: int = 512) -> MemoryNeed:
    """Bytes a model needs on each side: weights, KV cache of n_ctx tokens, compute buffers. (A
    target split across RPC workers: this machine's side; rpc_need gives the workers'.)"""
    if placement.rpc_layers:
        return MemoryNeed(ram=rpc_need(shape, placement, n_ctx, type_k, type_v, n_ubatch).ram, vram=0)
    if placement.offload:  # the torch backend in bfloat16
        budget = min(placement.gpu_layers, shape.n_layers) * torch_layer_bytes(shape, 2)
        return torch_memory_need(shape, n_ctx, 2, "plain", budget, device="cuda")
    n_gpu = min(placement.gpu_layers, shape.n_layers) if placement.gpu >= 0 else 0
    gpu_layer_bytes = sum(shape.layer_bytes[shape.n_layers - n_gpu:]) if n_gpu else 0
    head_on_gpu = n_gpu >= shape.n_layers
    head = shape.output_bytes + shape.other_bytes
    kv_gpu = shape.kv_bytes_per_token(type_k, type_v, n_gpu) * n_ctx
    kv_cpu = shape.kv_bytes_per_token(type_k, type_v, shape.n_layers - n_gpu) * n_ctx
    compute = shape.compute_buffer_bytes(min(placement.n_batch or n_ubatch, n_ctx))
    vram = gpu_layer_bytes + (head if head_on_gpu else 0) + kv_gpu + (compute if n_gpu else 0)
    ram = (shape.file_bytes - gpu_layer_bytes - (head if head_on_gpu else 0)) + kv_cpu + compute
    if placement.disk_bytes:  # paged: what is pinned, and room for the pages streaming through
        window = min(STREAM_WINDOW_BYTES, placement.disk_bytes // 4)
        ram = pass_bytes(shape) - placement.disk_bytes + window + kv_cpu + compute
    return MemoryNeed(ram=int(ram), vram=int(vram))


def touched_need(shape: ModelShape, n_ctx: int, type_k: str = "q8_0", type_v: str = "q8_0",
                 n_ubatch: int = TIGHT_BATCH) -> int:
    """Bytes a CPU target with mapped weights really holds once warm, the worst context included
    (what a cgroup charges, not what llama.cpp allocates): the weights every pass reads, a page per
    embedding row looked up, the KV cache (cleared at load: all of it touched), and of the compute
    buffer what a batch of n_ubatch tokens writes: its attention scores over the whole context,
    the activations (about 16 floats per embedding dimension: the FFN's two widths and the
    residuals) and the logits of the rows a pass outputs (up to the planner's longest draft, and
    their copy out). The logits of a whole batch, which the allocation is sized for, are never
    written: only output rows are computed. Plus the process itself (TOUCHED_RUNTIME_BYTES).
    Weights llama.cpp repacks at load (Q4_0, Q4_K) move from the page cache to memory of its own,
    their file pages never read again: counted once either way."""
    rows = min(shape.embedding_bytes, n_ctx * 4096)
    kv = shape.kv_bytes_per_token(type_k, type_v) * n_ctx
    attention = n_ubatch * n_ctx * shape.n_head * 4
    activations = n_ubatch * 16 * shape.n_embd * 4
    logits = 2 * (MAX_DRAFT + 1) * shape.vocab_size * 4
    return int(pass_bytes(shape) + rows + kv + attention + activations + logits + TOUCHED_RUNTIME_BYTES)


def rpc_need(shape: ModelShape, placement: Placement, n_ctx: int, type_k: str = "f16", type_v: str = "f16",
             n_ubatch: int = 512) -> MemoryNeed:
    """A target split across RPC workers: `ram` here, `vram` on the workers together (counted as
    a GPU holding the same layers would be)."""
    return memory_need(shape, Placement(0, placement.rpc_layers), n_ctx, type_k, type_v, n_ubatch)


def onnx_memory_need(shape: ModelShape, n_ctx: int, weights: str = "float32") -> int:
    """RAM of a model on the onnx backend: matrices in float32 (int8: 1 byte and a float scale
    per 32), a float32 embedding table (tied models: besides the LM head), float32 KV cache, a
    batch's activations. The first use's export needs about twice the float32 weights on top
    (torch's copy)."""
    per_weight = 4 if weights == "float32" else 1 + 4 / 32
    matrices = (shape.layer_params + shape.output_params) * per_weight + shape.vocab_size * shape.n_embd * 4
    kv = shape.n_layers * shape.n_head_kv * (shape.head_dim_k + shape.head_dim_v) * n_ctx * 4
    return int(matrices + shape.other_bytes + kv + shape.compute_buffer_bytes(min(512, n_ctx)))

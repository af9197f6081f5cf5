"""Target offloading (SpecExec): a budget's worth of transformer layers resident on the compute
device, the others streamed from host memory one or two layers ahead of use.

Vocabulary. A *resident* layer's weights stay on the device. A *streamed* layer's weights live in
host memory (pinned when the device is CUDA) and are copied, at every pass, into one of the
device *slots*: buffers shaped like one layer, allocated once. With two slots the copy of
streamed layer j + 2 starts as soon as layer j has been computed, so copying overlaps compute;
the first slots are filled while the resident layers compute (resident layers come first).

One pass streams each streamed layer exactly once, whatever the number of tokens in it: a tree
of 500 draft tokens costs about one pass of weight traffic, which is why SpecExec drafts large
trees for an offloaded target (the cost model's `offloaded pass` term says the same).

Budget: `budget_bytes` of device memory for layer weights (embeddings, the LM head and the KV
cache are outside it): floor(budget / layer bytes) layers fit; when that is fewer than all of
them, two of those go to slots (one when only one fits) and the rest are resident.

The copy: on CUDA a side stream with events (the copy into a slot waits for the compute stream
to be done with the slot's previous layer; the compute stream waits for the copy before using
it). Elsewhere the "device" is simulated: the same slots, filled by a prefetch thread (one
worker, futures for the events), so CPU tests exercise the code path a GPU runs.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from edge_spec.types import EdgespecError

MiB = 2**20


@dataclass
class StreamStats:
    """Counters for tests and benchmarks."""

    passes: int = 0
    bytes_copied: int = 0          # host → device, all passes
    layers_copied: int = 0
    peak_layers_on_device: int = 0  # resident layers + slots holding or receiving a layer, at most


def layer_bytes(layer: dict) -> int:
    return sum(t.numel() * t.element_size() for t in layer.values() if t is not None)


class LayerStreamer:
    """Yields each layer's weights on the device, in order, streaming what is not resident."""

    def __init__(self, torch, layers: list[dict], device, budget_bytes: int, max_slots: int = 2):
        self.torch, self.device = torch, device
        per_layer = max(layer_bytes(w) for w in layers)
        fit = budget_bytes // per_layer
        if fit < 1:
            raise EdgespecError(
                f"a device budget of {budget_bytes / MiB:.1f} MiB holds no transformer layer (one needs "
                f"{per_layer / MiB:.1f} MiB): give at least {per_layer} bytes, or no budget to keep every "
                "layer on the device")
        n = len(layers)
        n_slots = 0 if fit >= n else min(max_slots, fit)
        n_resident = min(fit, n) - n_slots
        self.layer_bytes = per_layer
        self.budget_layers = min(fit, n)
        self.resident = [_to(w, device) for w in layers[:n_resident]]
        cuda = device.type == "cuda"
        self.host = [_pinned(w) if cuda else w for w in layers[n_resident:]]
        if self.host and any(_shapes(w) != _shapes(self.host[0]) for w in self.host):
            raise EdgespecError("the torch backend streams layers of one shape only; this model's layers "
                                "differ: load it without a device budget")
        self.slots = [{k: None if t is None else torch.empty_like(t, device=device) for k, t in self.host[0].items()}
                      for _ in range(n_slots)] if self.host else []
        self.copier = _CudaCopier(torch, device) if cuda else _ThreadCopier(torch)
        self.stats = StreamStats(peak_layers_on_device=n_resident)
        self._filled: set[int] = set()

    @property
    def device_bytes(self) -> int:
        """Layer weights held on the device: resident layers and slots."""
        return sum(layer_bytes(w) for w in self.resident) + sum(layer_bytes(s) for s in self.slots)

    def layers(self):
        """(layer index, weights on the device) for every layer in order; the slots' copies are
        waited for before each use, and drained if the pass stops early."""
        n_resident, n_streamed, k = len(self.resident), len(self.host), len(self.slots)
        self.stats.passes += 1
        inflight: list[Future | object | None] = [None] * k
        try:
            for j in range(min(k, n_streamed)):  # overlaps the resident layers' compute
                inflight[j] = self._load(j, j)
            yield from enumerate(self.resident)
            for j in range(n_streamed):
                s = j % k
                self.copier.wait(inflight[s])
                inflight[s] = None
                yield n_resident + j, self.slots[s]
                if j + k < n_streamed:  # the slot is free once layer j is computed
                    inflight[s] = self._load(j + k, s)
        finally:
            for handle in inflight:
                if handle is not None:
                    self.copier.drain(handle)

    def _load(self, j: int, slot: int):
        self.stats.bytes_copied += layer_bytes(self.host[j])
        self.stats.layers_copied += 1
        self._filled.add(slot)  # a slot holds (or receives) a layer from its first copy on
        on_device = len(self.resident) + len(self._filled)
        self.stats.peak_layers_on_device = max(self.stats.peak_layers_on_device, on_device)
        return self.copier.copy(self.slots[slot], self.host[j])

    def close(self) -> None:
        self.copier.close()
        self.resident = self.host = self.slots = []


def _to(layer: dict, device) -> dict:
    return {k: None if t is None else t.to(device) for k, t in layer.items()}


def _pinned(layer: dict) -> dict:
    return {k: None if t is None else t.pin_memory() for k, t in layer.items()}


def _shapes(layer: dict):
    return {k: None if t is None else (tuple(t.shape), t.dtype) for k, t in layer.items()}


def _copy_layer(dst: dict, src: dict, non_blocking: bool = False) -> None:
    for key, t in src.items():
        if t is not None:
            dst[key].copy_(t, non_blocking=non_blocking)


class _CudaCopier:
    """Copies on a side stream; events order them against the compute stream."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.stream = torch.cuda.Stream(device)

    def copy(self, dst: dict, src: dict):
        torch = self.torch
        free = torch.cuda.Event()
        free.record(torch.cuda.current_stream(self.device))  # the slot's previous layer has been used
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(free)
            _copy_layer(dst, src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def wait(self, done) -> None:
        self.torch.cuda.current_stream(self.device).wait_event(done)  # the host does not block

    def drain(self, done) -> None:
        done.synchronize()

    def close(self) -> None:
        pass


class _ThreadCopier:
    """The simulated device: one prefetch thread fills the slots; a future is the event."""

    def __init__(self, torch):
        self.torch = torch
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="edgespec-prefetch")

    def copy(self, dst: dict, src: dict) -> Future:
        def work():
            with self.torch.inference_mode():
                _copy_layer(dst, src)
        return self.pool.submit(work)

    def wait(self, done: Future) -> None:
        done.result()

    drain = wait

    def close(self) -> None:
        self.pool.shutdown(wait=True)

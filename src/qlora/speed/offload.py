"""Checkpointed layer inputs offloaded to pinned host memory between a layer's forward and its
backward (SpeedPlan.offload_activations).

With layer checkpointing a step keeps one tensor per layer until backward: the layer's input,
[tokens, hidden]. At long sequences those are most of the step's memory: Llama-3-8B at 65,536
tokens keeps 32 x 512 MiB = 16 GiB. Offloaded, each goes to host memory as its layer starts (a
copy on a side stream, overlapping the layer's forward) and comes back one layer ahead of its
backward (layer i-1's input is copied in while layer i's backward runs: double buffered). The
GPU then holds two of them at any time: in forward the one still being copied out and the next
layer's; in backward the one in use and the one arriving. The last layer's input stays on the
GPU: its backward comes first.

How: the checkpoint saves its inputs through saved-tensor hooks like any other saved tensor
(torch.utils.checkpoint's `save_inputs`), so a `saved_tensors_hooks` context around the
checkpoint call sees the layer input (and cos/sin, the mask, which it leaves alone); the
checkpoint's own hooks, innermost, still see everything the layer saves (kept attention's hooks
too: what it keeps stays on the GPU). The model's `keeping_layer_input` (models/decoder.py) puts
this context around each checkpoint call, the reference's and the fast path's alike.

Streams and memory: a GPU tensor read by a side-stream copy is released only after the compute
stream has waited for that copy (an event), so the allocator cannot hand its memory to later
work before the copy is done; the same holds for the buffers a copy writes. Everything the side
stream does is waited for by the compute stream, which is what a CUDA-graph capture needs (the
side stream forks from and joins the capturing stream). Host buffers are pinned once per layer
(page_locked: exactly their size, not rounded up to a power of two as torch's pinned allocator
rounds) and reused (grown, never freed, so a captured graph's addresses stay valid); a capture whose
warm-up ran at the same shape allocates nothing. On the CPU the same code runs with plain copies,
and releases each input as the GPU does (at the next layer's copy out), so CPU tests check it.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from qlora.errors import QloraError


def page_locked(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor of `numel` values, page-locked for asynchronous copies, pinning only its own
    size. torch's pinned allocator (pin_memory=True) rounds each block up to a power of two:
    Llama-3-8B's layer input at 327,680 tokens, 2.5 GiB, would pin 4 GiB, 124 GiB for its 31
    offloaded layers, more than a 128 GiB host has. Plain host memory registered with CUDA
    (cudaHostRegister) pins exactly what it holds, and is unregistered when the tensor goes.
    A failure is an error, not a fallback: the runtime keeps a failed call's error for the next
    kernel launch to report, and the allocator would fail where registration did (the host is
    out of lockable memory; memory.check_host_offload refuses most such runs before loading)."""
    t = torch.empty(numel, dtype=dtype)
    if numel == 0:
        return t
    cudart = torch.cuda.cudart()
    nbytes = numel * t.element_size()
    # flags 0: cudaHostRegisterDefault (page-locked, for this process's CUDA contexts)
    code = int(cudart.cudaHostRegister(t.data_ptr(), nbytes, 0))
    if code != 0:
        raise QloraError(f"offload_activations: page-locking {nbytes / 2**30:.2f} GiB of host memory "
                         f"for a layer's input failed (CUDA error {code}: "
                         f"{cudart.cudaGetErrorString(cudart.cudaError(code))}); free host memory, shorten "
                         "max_seq_length, or set offload_activations: false")
    weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
    return t


class _SavedInput:
    """A layer input as its checkpoint saved it: in `host` memory (None: kept on the GPU), and on
    the GPU as `gpu` while it is being copied out or back (`event`: when that copy is done)."""

    __slots__ = ("host", "gpu", "event", "previous")

    def __init__(self, host, gpu, event, previous):
        self.host, self.gpu, self.event, self.previous = host, gpu, event, previous


class LayerInputOffload:
    """The layer inputs of one model's checkpointed forward, in host memory until backward."""

    def __init__(self):
        self.stream: torch.cuda.Stream | None = None
        self.buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self.retired: list[torch.Tensor] = []  # outgrown buffers a captured graph may still use
        self.copying: _SavedInput | None = None  # the input whose copy out last started
        self.latest: _SavedInput | None = None  # this forward's previous layer's input

    @contextlib.contextmanager
    def saving(self, x: torch.Tensor, index: int, last: bool):
        """Around layer `index`'s checkpoint call: its input `x` goes to host memory (kept on
        the GPU when `last`)."""
        if index == 0:
            self.latest = None  # a new forward
        # Every tensor saved under these hooks (x, cos, sin, the mask) holds `pack` until its
        # backward: a pack that held x would keep the device copy alive as long as the host one,
        # and free nothing. It knows x by a weak reference only.
        layer_input = weakref.ref(x)

        def pack(t):
            if t is not layer_input():
                return t  # cos, sin, the mask: shared by every layer, small
            saved = self._keep(t) if last else self._offload(t, index)
            self.latest = saved
            return saved

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            yield
        if last:  # the forward's inputs are its checkpoints' now; none is held here past it
            self.latest = None

    def _keep(self, t: torch.Tensor) -> _SavedInput:
        self._finish_copy_out()
        return _SavedInput(None, t, None, self.latest)

    def _offload(self, t: torch.Tensor, index: int) -> _SavedInput:
        # the previous layer's copy has had that layer's forward to run in; its GPU tensor goes now
        self._finish_copy_out()
        host = self._host_buffer(index, t)
        event = None  # on the CPU the copy is done when copy_ returns
        if t.device.type == "cuda":
            stream = self._side_stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t is made
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
        else:
            host.copy_(t)
        # released by _finish_copy_out on either device: the CPU runs the GPU's release logic
        self.copying = _SavedInput(host, t, event, self.latest)
        return self.copying

    def _finish_copy_out(self) -> None:
        saved, self.copying = self.copying, None
        if saved is not None:
            if saved.event is not None:
                torch.cuda.current_stream(saved.gpu.device).wait_event(saved.event)
            saved.gpu, saved.event = None, None  # its memory may go to work after the copy

    def _unpack(self, saved):
        if not isinstance(saved, _SavedInput):
            return saved
        if saved.host is None:  # kept on the GPU
            x = saved.gpu
        else:
            if saved.gpu is None:  # not fetched ahead (the first offloaded one, or a 2nd backward)
                self._fetch(saved)
            if saved.event is not None:
                torch.cuda.current_stream(saved.gpu.device).wait_event(saved.event)
            x, saved.gpu, saved.event = saved.gpu, None, None
        if saved.previous is not None and saved.previous.host is not None:
            self._fetch(saved.previous)  # the next layer backward needs, while this one runs
        return x

    def _fetch(self, saved: _SavedInput) -> None:
        """Start bringing `saved` back to the GPU (nothing if it is on its way)."""
        if saved.gpu is not None:
            return
        host = saved.host
        device = self._device
        if device is None:
            saved.gpu = host.clone()
            return
        # allocated in the compute stream's order; written by the side stream after everything
        # the compute stream has queued so far, read only after the compute stream waits for it
        gpu = torch.empty(host.shape, dtype=host.dtype, device=device)
        stream = self._side_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            gpu.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        saved.gpu, saved.event = gpu, event

    _device: torch.device | None = None  # the GPU of the inputs (None: they are on the CPU)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self.stream is None:
            self.stream, self._device = torch.cuda.Stream(device), device
        return self.stream

    def _host_buffer(self, index: int, t: torch.Tensor) -> torch.Tensor:
        """A host tensor of t's shape for layer `index`: a view of that layer's buffer."""
        key = (index, t.dtype)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < t.numel():
            if buffer is not None:
                self.retired.append(buffer)
            buffer = (page_locked(t.numel(), t.dtype) if t.device.type == "cuda"
                      else torch.empty(t.numel(), dtype=t.dtype))
            self.buffers[key] = buffer
        return buffer[:t.numel()].view(t.shape)

    def host_bytes(self) -> int:
        """Host memory the buffers hold."""
        return sum(b.numel() * b.element_size() for b in (*self.buffers.values(), *self.retired))

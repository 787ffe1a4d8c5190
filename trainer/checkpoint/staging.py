"""Host memory holding one copy of a worker's tensor state, allocated once and reused by every copy.

A save blocks training only while the state is copied here; the copy runs at memcpy speed because the
memory already exists (a copy into a fresh allocation runs several times slower, page faults included).
Contiguous CPU tensors are copied by a plain single-threaded ``memmove`` (the GIL released): as fast here as
torch's two-thread copy on an idle host (0.10 s against 0.08 to 0.10 s for 618 MB), and ten times faster when
another process holds a core, where a multi-threaded copy stalls at its barriers (0.8 to 1.4 s measured).
The buffer is a single allocation (pinned when the state lives on an accelerator), so the host memory a
worker needs for staging is exactly one copy of its state (:attr:`StagingBuffers.nbytes`).

Each staged tensor is handed out with a storage of its own over its slice of that allocation, so that
``torch.save`` and DCP write its bytes and no more (a view of a larger storage would be saved whole).

The copies of the tensors that only the optimizer's step changes (its parameters and its state;
``overlap`` below) run alongside the next step's forward and backward, and are fenced just before the
optimizer's next step, by a step pre-hook on that optimizer:

* on a CUDA device, on a stream of their own, through the copy engine; the device's current stream waits
  for them (on the device: the host never does);
* on the CPU, on a thread of their own (``memmove``, the GIL released); the optimizer's next step waits for
  it. The save call then blocks only for the rest (a few milliseconds), not for a copy of the state.

Everything else (buffers, which a forward may change, the task's extra tensors) is copied in order with
training. The writer waits for the copies where it reads them: :meth:`StagingBuffers.wait_copied`. Other
accelerators copy on their current stream and are synchronised by the caller.
"""

from __future__ import annotations

import ctypes
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.tensor import DTensor

#: Alignment of each tensor in the buffer.
_ALIGN = 64
#: Tensors of at least this many bytes start on a page (the file writer's ``BLOCK``), so that a write
#: with O_DIRECT takes their bytes from where they lie instead of copying them (``dcp_writer``).
_PAGE_ALIGNED_MIN = 64 << 10
_PAGE = 4096


class StagingBuffers:
    """The staging copy of a state (``{key: tensor}``). Not thread-safe: the owner makes sure a copy
    never starts while the previous one is still being read (the async writer waits for its write)."""

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None
        self._layout: list[tuple[str, torch.Size, torch.dtype]] = []
        self._pinned = False
        #: The staged tensors, one own storage each, all inside one allocation.
        self.tensors: dict[str, torch.Tensor] = {}
        self._stream: Any = None  # CUDA: the side stream of the overlapped copies (made on first use)
        #: CUDA: events after the copies on the current stream and on the side stream.
        self._copied: list[Any] = []
        #: The step pre-hook that fences the overlapped copies, and (a weak reference to) its optimizer.
        #: It stays registered: a hook that took itself down while the optimizer ran its hooks would
        #: change the dict being iterated (an error when another hook follows).
        self._hook: Any = None
        self._hooked: weakref.ref[torch.optim.Optimizer] | None = None
        #: The overlapped copies in flight: CUDA's side stream's event; the CPU copies' thread's future.
        self._side_done: Any = None
        self._host_done: Future[None] | None = None
        self._host_thread: ThreadPoolExecutor | None = None  # made on first use
        #: Keys of the last copy made beside training (fenced before the optimizer's next step).
        self.overlapped: list[str] = []

    @property
    def nbytes(self) -> int:
        """Host memory held for staging, in bytes."""
        return 0 if self._flat is None else self._flat.untyped_storage().nbytes()

    def copy(
        self, tensors: dict[str, torch.Tensor], overlap: torch.optim.Optimizer | None = None
    ) -> dict[str, torch.Tensor]:
        """Copy ``tensors`` into the buffers (allocated on the first call, and again only when keys,
        shapes or dtypes change); returns the staged tensors by key, valid until the next copy.
        Copies from an accelerator are issued non-blocking: call :meth:`wait_copied` before reading them.
        ``overlap``: the optimizer whose parameters and state are among ``tensors``; on CUDA their copies
        overlap with training until that optimizer's next step (see the module's docstring)."""
        self.fence()  # a previous copy still in flight must land before these buffers are written again
        layout = [(k, t.shape, t.dtype) for k, t in tensors.items()]
        pinned = torch.cuda.is_available() and any(t.device.type != "cpu" for t in tensors.values())
        if layout != self._layout or pinned != self._pinned:
            self._allocate(layout, pinned)
        side = self._side_stream(tensors, overlap)
        stepped = _stepped_by(overlap) if overlap is not None else set()
        overlapped: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        in_order: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        behind: list[tuple[int, int, int]] = []  # CPU copies for the copy thread: (to, from, bytes)
        self.overlapped = []
        for key, tensor in tensors.items():
            source, target = tensor.detach(), self.tensors[key]
            if type(source) is torch.Tensor and source.device.type == "cpu" and source.is_contiguous():
                if source.data_ptr() in stepped:
                    behind.append((target.data_ptr(), source.data_ptr(), target.nbytes))
                    self.overlapped.append(key)
                else:
                    ctypes.memmove(target.data_ptr(), source.data_ptr(), target.nbytes)
            elif type(source) is not torch.Tensor:  # tensor subclasses: as torch copies them
                target.copy_(source, non_blocking=source.device.type != "cpu")
            else:
                beside = side is not None and source.data_ptr() in stepped
                group = overlapped if beside else in_order
                group[0].append(target)
                group[1].append(source)
                if beside:
                    self.overlapped.append(key)
        _copy_all(*in_order)
        if overlapped[0]:
            assert side is not None
            with torch.cuda.stream(side):
                _copy_all(*overlapped)
            for source in overlapped[1]:
                source.record_stream(side)  # its memory is not reused before the side stream read it
        self._copied = []
        if any(t.device.type == "cuda" for t in tensors.values()):
            self._copied.append(_recorded(torch.cuda.current_stream()))
        if side is not None:
            self._side_done = _recorded(side)
            self._copied.append(self._side_done)
        if behind:
            if self._host_thread is None:
                self._host_thread = ThreadPoolExecutor(1, thread_name_prefix="staging-copy")
            self._host_done = self._host_thread.submit(_memmove_all, behind)
        if overlap is not None and (side is not None or behind):
            self._hook_onto(overlap)
        return dict(self.tensors)

    def _hook_onto(self, optimizer: torch.optim.Optimizer) -> None:
        if self._hooked is not None and self._hooked() is optimizer:
            return
        if self._hook is not None:
            self._hook.remove()  # an optimizer built since (a restore, a hand-over) steps the state now
        self._hook = optimizer.register_step_pre_hook(lambda *_: self.fence())
        self._hooked = weakref.ref(optimizer)

    def _side_stream(self, tensors: dict[str, torch.Tensor], overlap: Any) -> Any:
        device = next((t.device for t in tensors.values() if t.device.type == "cuda"), None)
        if overlap is None or device is None:
            return None
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))  # the state as training left it
        return self._stream

    def fence(self) -> None:
        """Hold the state back until the overlapped copies have read it: the device's current stream waits
        for them (CUDA, on the device), the calling thread for the copy thread (CPU). Called by the
        optimizer's step pre-hook, and before anything else writes the state in place (a load)."""
        if self._side_done is not None:
            torch.cuda.current_stream().wait_event(self._side_done)
            self._side_done = None
        if self._host_done is not None:
            self._host_done.result()
            self._host_done = None

    def wait_copied(self) -> None:
        """Block the calling thread until every copy of the last :meth:`copy` has landed in the buffers."""
        for event in self._copied:
            event.synchronize()
        host_done = self._host_done
        if host_done is not None:
            host_done.result()

    def _allocate(self, layout: list[tuple[str, torch.Size, torch.dtype]], pinned: bool) -> None:
        self._flat, self.tensors = None, {}  # the old buffer goes before the new one comes
        offsets = []
        total = 0
        for _key, shape, dtype in layout:
            nbytes = shape.numel() * _element_size(dtype)
            align = _PAGE if nbytes >= _PAGE_ALIGNED_MIN else _ALIGN
            total = -(-total // align) * align
            offsets.append((total, nbytes))
            total += nbytes
        raw = torch.empty(total + _PAGE, dtype=torch.uint8, pin_memory=pinned)
        shift = -raw.data_ptr() % _PAGE  # the offsets count from a page boundary
        flat = raw[shift : shift + total]
        memory = flat.numpy()
        for (key, shape, dtype), (offset, nbytes) in zip(layout, offsets, strict=True):
            own = torch.from_numpy(memory[offset : offset + nbytes])  # a storage of its own
            self.tensors[key] = own.view(dtype).view(shape)
        self._flat, self._layout, self._pinned = flat, layout, pinned


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``targets[i].copy_(sources[i])`` for all, in one call where torch can (thousands of tensors: the
    per-call overhead of a Python loop is what the save would block for); non-blocking from a device."""
    if not targets:
        return
    non_blocking = any(s.device.type != "cpu" for s in sources)
    try:
        torch._foreach_copy_(targets, sources, non_blocking=non_blocking)
    except (RuntimeError, TypeError):  # mixed shapes of views, an older torch: one by one
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source, non_blocking=source.device.type != "cpu")


def _memmove_all(copies: list[tuple[int, int, int]]) -> None:
    for target, source, nbytes in copies:
        ctypes.memmove(target, source, nbytes)


def _recorded(stream: Any) -> Any:
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _stepped_by(optimizer: Any) -> set[int]:
    """Addresses of the tensors ``optimizer.step()`` writes: its parameters and its state's tensors (of a
    sharded one's, the local shards: what a rank's sharded save copies)."""
    addresses = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            addresses.add(_address(param))
            addresses.update(
                _address(v) for v in optimizer.state.get(param, {}).values() if torch.is_tensor(v)
            )
    return addresses


def _address(tensor: torch.Tensor) -> int:
    return int((tensor.to_local() if isinstance(tensor, DTensor) else tensor).data_ptr())

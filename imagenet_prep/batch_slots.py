"""The torch backend's batch hand-off: a ring of shared-memory batch slots, made once.

A worker writes its batch's pixels straight into a slot and hands back only the slot's
number; the main process reads the slot in place. Nothing is allocated per batch (a fresh
shared-memory tensor per batch costs a file, its zero-filled pages and a mapping in each
process), and on CUDA the slots are page-locked once (`cudaHostRegister`), so the copy to
the device is asynchronous and no pin-memory thread copies each batch once more.

On CUDA the slots are pinned only after the workers have forked (`pin`), and unpinned
before new ones fork (`unpin`): CUDA drivers may keep page-locked ranges out of a forked
child (MADV_DONTFORK), which would leave a worker without its slots.

When a slot may be written again (docs/design.md, "Loaders"):
- CUDA: when the event recorded after its copy to the device has completed.
- CPU: the trainer is handed the slot itself (no copy). A slot that something outside
  the ring still references when its turn comes (a caller that keeps its batches, as
  `list(loader.epoch(0))` does) is left to that caller and replaced by a fresh one, which
  travels to the workers with the next plan that uses it.

The slots' shared memory is unlinked from /dev/shm as it is made (torch's
file_descriptor strategy): a crash, of a worker or of the main process, leaves nothing
there.
"""
from __future__ import annotations

import torch


def storage_users(tensor: torch.Tensor) -> int:
    """How many tensors hold `tensor`'s memory (views included)."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


class BatchSlots:
    """`count` shared-memory tensors of `shape`, handed out in turn (`take`)."""

    def __init__(self, count: int, shape: tuple, dtype: torch.dtype, device: torch.device, shared: bool = True):
        """shared=False: plain memory, for a ring this process alone writes (DALI's host
        rendering)."""
        if count < 1:
            raise ValueError(f"a ring needs at least one slot, not {count}")
        self.shape, self.dtype, self.device, self.shared = tuple(shape), dtype, device, shared
        self.pinned = False  # CUDA: page-locked (pin, after the workers fork)
        self.slots = [self._make() for _ in range(count)]
        self.moved = [False] * count  # replaced since the workers forked: the plan carries it
        self.replaced = 0  # slots left to a caller that kept them (CPU)
        self._events: list = [None] * count  # CUDA: the copy of the slot's last batch
        self._turn = 0
        self._owned = storage_users(self.slots[0])  # the ring's own references to a slot's memory

    def _make(self) -> torch.Tensor:
        slot = torch.empty(self.shape, dtype=self.dtype)
        slot = slot.share_memory_() if self.shared else slot
        if self.pinned:
            self._register(slot)
        return slot

    @staticmethod
    def _register(slot: torch.Tensor) -> None:
        # Page-locked, so that each copy to the device is a DMA that returns at once. The
        # memory is shared with the workers; registering it in this process alone
        # suffices, as only this process copies it.
        code = torch.cuda.cudart().cudaHostRegister(slot.data_ptr(), slot.untyped_storage().nbytes(), 0)
        if int(code) != 0:
            raise RuntimeError(f"cudaHostRegister failed with CUDA error {int(code)}")

    def pin(self) -> None:
        """CUDA: page-lock the slots (once the workers have forked); elsewhere nothing."""
        if self.device.type == "cuda" and not self.pinned:
            for slot in self.slots:
                self._register(slot)
            self.pinned = True

    def unpin(self) -> None:
        """Let the slots be paged again (before new workers fork), once their copies are done."""
        self._wait_all()
        if self.pinned:
            for slot in self.slots:
                torch.cuda.cudart().cudaHostUnregister(slot.data_ptr())
            self.pinned = False

    def _wait_all(self) -> None:
        for number, event in enumerate(self._events):
            if event is not None:
                event.synchronize()
                self._events[number] = None

    def __len__(self) -> int:
        return len(self.slots)

    def take(self) -> tuple[int, torch.Tensor | None]:
        """The next slot a worker may write: (its number, the tensor when the workers do
        not hold it yet, else None). Waits for the slot's last copy to the device (the
        ring is deeper than the batches in flight, so that wait is normally over already)."""
        number = self._turn % len(self.slots)
        self._turn += 1
        event = self._events[number]
        if event is not None:
            event.synchronize()  # a host wait, for a copy queued a ring's length ago
            self._events[number] = None
        if self.device.type == "cpu" and self.held(number):
            self.slots[number] = self._make()  # the old one is the caller's now; freed with it
            self.moved[number] = True
            self.replaced += 1
        return number, self.slots[number] if self.moved[number] else None

    def held(self, number: int) -> bool:
        """Whether something outside the ring references slot `number`'s memory."""
        return storage_users(self.slots[number]) > self._owned

    def batch(self, number: int, size: int) -> torch.Tensor:
        """The first `size` images of slot `number` (the last batch of an epoch is short)."""
        return self.slots[number][:size]

    def copied(self, number: int, stream=None) -> None:
        """CUDA: the slot's batch was queued for the device on `stream` (the current one by
        default); it is written again only once that copy has completed."""
        event = torch.cuda.Event()
        event.record(stream)
        self._events[number] = event

    def close(self) -> None:
        """Unpin and let go of the slots (their memory goes with the last reference)."""
        self.unpin()
        self.slots, self._events, self.moved = [], [], []

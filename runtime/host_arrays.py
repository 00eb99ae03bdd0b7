"""Host memory a call hands back for the next call on the same model: the decoder's buffer block, its
logits and the encoder outputs repeated for beam search, the arrays of a call that grow with its rows.

Why: numpy asks the kernel for transparent huge pages on arrays of 4 MB and more, and a fresh array's
pages are faulted and zeroed when first written, which for the block is inside the call's first
decoder step. At 32 rows (greedy batch 32, beam 4 x batch 8) on t5-small the block is ~51 MB, and
that first step took 15-92 ms against ~10 ms for the others (int8, 2 threads, scratch timer around
`run_with_iobinding`), the spread being the kernel compacting memory for huge pages. An array reused
from the call before has its pages mapped already. Likewise the encoder outputs repeated for beam 4 at
batch 32 (~108 MB: the cross-attention K/V of 128 rows): repeating them into fresh memory took 13-65 ms
a call before the first decoder step (scratch timer around `TensorOps.take`), 9-10 ms into a spare.

Holds at most `keep` arrays (the largest), and frees the largest spare before allocating for a
request that none fits (so a call's peak memory stays what it was). Thread-safe. The spares are
allocator state, not a call's: what a call left in them is never read (the decoder reads only the
positions it wrote in this call).
"""

from __future__ import annotations

import sys
import threading
from math import prod

import numpy as np
from numpy.typing import DTypeLike

# sys.getrefcount in `give` when nothing else holds the array or its memory: for the array, the
# caller's name, `give`'s parameter and getrefcount's argument; for its memory, the array's `.base`,
# `give`'s local name and getrefcount's argument.
_UNSHARED = 3
_ALIGN = 64  # bytes: where each array `repeat` writes starts in its memory


class SpareArrays:
    def __init__(self, keep: int = 3):
        self._keep = keep
        self._spares: list[np.ndarray] = []  # each a 1-D uint8 array owning its memory
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...] | list[int], dtype: DTypeLike) -> np.ndarray:
        """An uninitialised C-contiguous array of `shape`, over a spare's memory when one is large enough."""
        dtype = np.dtype(dtype)
        nbytes = prod(shape) * dtype.itemsize
        with self._lock:
            fitting = [s for s in self._spares if s.nbytes >= nbytes]
            # the smallest spare that fits; when none does, the largest, to be freed: this request outgrew it
            memory = min(fitting, key=_size) if fitting else max(self._spares, key=_size, default=None)
            self._spares = [s for s in self._spares if s is not memory]
        if memory is None or memory.nbytes < nbytes:
            memory = None  # freed before the new allocation
            memory = np.empty(nbytes, dtype=np.uint8)
        return memory[:nbytes].view(dtype).reshape(shape)

    def repeat(self, arrays: dict[str, np.ndarray], times: int,
               axes: dict[str, int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Each array with every item of its axis in `axes` repeated `times` times in place (np.repeat),
        all written into one `empty` array of bytes; returns them by name, and that array, to `give` back
        when none of them is used any more. A broadcast copy, not np.take: 9-10 ms against 17 for t5-small's
        encoder outputs at beam 4 x batch 32 (~108 MB, scratch timing)."""
        shapes = {name: [d * times if i == axes[name] else d for i, d in enumerate(a.shape)]
                  for name, a in arrays.items()}
        sizes = {name: prod(shapes[name]) * a.dtype.itemsize for name, a in arrays.items()}
        starts, offset = {}, 0
        for name, size in sizes.items():
            starts[name], offset = offset, offset + -(-size // _ALIGN) * _ALIGN
        memory = self.empty((offset,), np.uint8)
        repeated = {}
        for name, a in arrays.items():
            axis = axes[name]
            out = memory[starts[name]:starts[name] + sizes[name]].view(a.dtype).reshape(shapes[name])
            split = [*a.shape[:axis], a.shape[axis], times, *a.shape[axis + 1:]]
            out.reshape(split)[...] = np.expand_dims(a, axis + 1)  # item k of the axis into rows k*times ..
            repeated[name] = out
        return repeated, memory

    def give(self, array: np.ndarray) -> None:
        """Hand back an array `empty` made, by the caller's last reference to it (a local name it drops
        after). It is kept only if nothing else holds it or its memory (no view of it, no OrtValue over
        it); else it is left to be freed."""
        memory = array.base
        if not isinstance(memory, np.ndarray) or memory.base is not None or memory.dtype != np.uint8:
            return
        if sys.getrefcount(array) != _UNSHARED or sys.getrefcount(memory) != _UNSHARED:
            return
        with self._lock:
            # the largest `keep` stay (sorted by size: list.remove would compare arrays by value)
            self._spares = sorted([*self._spares, memory], key=_size)[-self._keep:]


def _size(memory: np.ndarray) -> int:
    return memory.nbytes

"""The engine's one backbone cache, shared by every session: one row ("slot") per session.

`Lfm2Model.forward` steps B rows at once when they sit in one `Lfm2Cache`, each row at its own
position (`lengths` per row, masks per row). A decode step therefore needs the decoding rows
in one tensor: we keep them packed at the front, rows [0, n_decoding), and slice that block
(slices along dim 0 are views, so the step writes straight into the shared buffers). A row
that starts or stops decoding swaps places with the row at the block's edge; a swap copies
only the positions the two rows hold, once per reply, never per step. Rows being prefilled
together sit side by side just after that block, for the same reason.

Everything here runs on the engine thread.
"""

from __future__ import annotations


from ..model.lfm2 import Lfm2Cache


class SlotCache:
    def __init__(self, lfm, slots: int, capacity: int, dtype=None, device=None):
        self.cache = lfm.new_cache(slots, capacity, dtype=dtype, device=device)
        self.slots, self.capacity = slots, capacity
        self.lengths = [0] * slots  # host mirror of cache.lengths: positions each row holds

    def block(self, start: int, stop: int) -> Lfm2Cache:
        """Rows [start, stop) as one cache: the decoding block for a step, or the rows being
        prefilled together."""
        c = self.cache
        return Lfm2Cache(
            conv=[t[start:stop] for t in c.conv],
            keys=[t[start:stop] for t in c.keys],
            values=[t[start:stop] for t in c.values],
            lengths=c.lengths[start:stop],
            max_len=max(self.lengths[start:stop]),
        )

    def advanced(self, rows, by: int = 1) -> None:
        """Record on the host that `rows` each took `by` positions (the forward pass already
        advanced the device lengths)."""
        for r in rows:
            self.lengths[r] += by

    def swap(self, a: int, b: int) -> None:
        if a == b:
            return
        n = max(self.lengths[a], self.lengths[b])
        c = self.cache
        for t in c.keys + c.values:
            tmp = t[a, :, :n].clone()
            t[a, :, :n] = t[b, :, :n]
            t[b, :, :n] = tmp
        for t in c.conv:
            tmp = t[a].clone()
            t[a] = t[b]
            t[b] = tmp
        la, lb = c.lengths[a].clone(), c.lengths[b].clone()
        c.lengths[a], c.lengths[b] = lb, la
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def clear(self, r: int) -> None:
        """Forget row r: a new session starts there from position 0. Stale keys and values may
        stay: a row only ever attends to positions it has written itself."""
        self.cache.reset(rows=r)
        self.lengths[r] = 0

"""Batch consumer of a BPF ring buffer of fixed-size records, into numpy.

bcc's RingBuf.open_ring_buffer() calls back into Python once per record; at a
million records a second that is the whole budget. The ring buffer's memory
layout is kernel ABI (kernel/bpf/ringbuf.c): a consumer-position page (rw),
then a producer-position page and the data area mapped twice in a row (ro), so
that a span that wraps around is contiguous. We map the data area once: each
mapped page counts in the process's resident memory (the default 16 MiB ring
would count 32), and a batch that wraps is joined in the copy consume() makes
anyway. With every record the same size, one numpy view covers a whole batch.
"""
import mmap
import select

from kvmlockprof.lazy import np

BUSY_BIT = 1 << 31        # reserved, not yet submitted
DISCARD_BIT = 1 << 30     # submitted as discarded
HDR_SIZE = 8              # u32 len | flags, u32 page offset


class BatchRingBuffer:
    def __init__(self, map_fd, data_size, dtype):
        self.map_fd = map_fd
        page = mmap.PAGESIZE
        self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod_map = mmap.mmap(map_fd, page + data_size, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=page)
        self._views(np.frombuffer(self._cons_map, dtype=np.uint64, count=1),
                    np.frombuffer(self._prod_map, dtype=np.uint64, count=1),
                    np.frombuffer(self._prod_map, dtype=np.uint8, offset=page), data_size,
                    dtype)
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def _views(self, cons, prod, data, data_size, dtype):
        """The positions (one uint64 each) and the data area (data_size bytes) as the
        decoder reads them."""
        self.dtype = np.dtype(dtype)
        self.data_size = data_size
        self.mask = data_size - 1
        self.stride = (self.dtype.itemsize + HDR_SIZE + 7) & ~7
        self._cons, self._prod, self._data = cons, prod, data
        self._rec = np.dtype({"names": ["len", "ev"], "formats": [np.uint32, self.dtype],
                              "offsets": [0, HDR_SIZE], "itemsize": self.stride})

    def __reduce__(self):             # (a handover: mapped again from the fd it brings)
        return _reopen, (self.map_fd, self.data_size, self.dtype)

    def wait(self, timeout):
        """Sleep until the kernel wakes us (the ring is filling) or timeout."""
        return bool(self._epoll.poll(timeout))

    def consume(self):
        """Every submitted record since the last call, as a structured array copy."""
        # x86 is TSO: plain loads of prod/len see the producer's smp_store_release
        # in order. A weakly ordered CPU would need acquire loads here.
        cons = int(self._cons[0])
        avail = int(self._prod[0]) - cons
        if avail <= 0:
            return np.empty(0, self.dtype)
        if avail % self.stride:
            raise RuntimeError(f"ring buffer holds records of another size "
                               f"({avail} bytes pending, stride {self.stride})")
        if avail > self.data_size:
            raise RuntimeError(f"ring buffer positions are inconsistent ({avail} bytes "
                               f"pending in a {self.data_size}-byte ring)")
        start = cons & self.mask
        if start + avail <= self.data_size:
            raw = self._data[start:start + avail]
        else:                                           # (wraps: joined, a copy)
            raw = np.concatenate((self._data[start:], self._data[:start + avail - self.data_size]))
        recs = raw.view(self._rec)
        lens = recs["len"]
        busy = np.flatnonzero(lens & BUSY_BIT)
        n = int(busy[0]) if busy.size else len(recs)    # stop at the first in flight
        ready = recs[:n]
        sizes = ((ready["len"] & ~np.uint32(BUSY_BIT | DISCARD_BIT)) + (HDR_SIZE + 7)) // 8 * 8
        if (sizes != self.stride).any():        # the kernel rounds len + header to 8
            raise RuntimeError(f"ring buffer holds records of another size (a record of "
                               f"{int(sizes[sizes != self.stride][0])} bytes, stride "
                               f"{self.stride})")
        keep = (ready["len"] & DISCARD_BIT) == 0
        out = ready["ev"][keep] if not keep.all() else ready["ev"].copy()
        self._cons[0] = cons + n * self.stride          # frees the space for the kernel
        return out

    def close(self):
        self._epoll.close()
        self._cons = self._prod = self._data = None
        self._cons_map.close()
        self._prod_map.close()


def _reopen(map_fd, data_size, dtype):
    from kvmlockprof.kernel.handles import remap
    return BatchRingBuffer(remap(map_fd), data_size, dtype)

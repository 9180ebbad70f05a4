"""Threads of one process that map, touch and unmap memory at once: its mm's
mmap_lock contended (faults take it for read, munmap for write). The libc calls go
through ctypes, which lets go of the GIL, so the threads really run together.
Usage: python mmap_storm.py SECONDS [THREADS]"""
import ctypes
import sys
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
PROT_RW, MAP_PRIVATE_ANON = 0x3, 0x22
SIZE = 1 << 20


def storm(until):
    while time.monotonic() < until:
        p = libc.mmap(None, SIZE, PROT_RW, MAP_PRIVATE_ANON, -1, 0)
        libc.memset(p, 1, SIZE)             # page faults: mmap_lock (or its VMA lock) read
        libc.munmap(p, SIZE)                # mmap_lock write


if __name__ == "__main__":
    until = time.monotonic() + float(sys.argv[1])
    threads = [threading.Thread(target=storm, args=(until,))
               for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

"""Threads that map, touch and unmap memory at once: their mm's mmap_lock contended
(faults take it for read, munmap for write). With --processes, as many processes of
them, each filling --mb MiB a round: pages allocated and freed in bulk on every CPU,
through the page allocator's zone locks. The libc calls go through ctypes, which lets
go of the GIL, so the threads really run together.
Usage: python mmap_storm.py SECONDS [THREADS] [--processes N] [--mb M]"""
import argparse
import ctypes
import os
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
PROT_RW, MAP_PRIVATE_ANON = 0x3, 0x22


def storm(until, size):
    while time.monotonic() < until:
        p = libc.mmap(None, size, PROT_RW, MAP_PRIVATE_ANON, -1, 0)
        libc.memset(p, 1, size)             # page faults: mmap_lock (or its VMA lock) read
        libc.munmap(p, size)                # mmap_lock write


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("seconds", type=float)
    ap.add_argument("threads", type=int, nargs="?", default=4)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--mb", type=int, default=1)
    a = ap.parse_args()
    until = time.monotonic() + a.seconds
    children = []
    for _ in range(a.processes - 1):
        pid = os.fork()
        if pid == 0:                # a child runs the storm, forks no more
            children = None
            break
        children.append(pid)
    threads = [threading.Thread(target=storm, args=(until, a.mb << 20))
               for _ in range(a.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if children is None:
        os._exit(0)
    for pid in children:
        os.waitpid(pid, 0)

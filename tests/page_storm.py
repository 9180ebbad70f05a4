"""Processes that map, fill and unmap 64 MiB at once, over and over: pages allocated
and freed in bulk on every CPU, through the page allocator's zone locks.
Usage: python page_storm.py SECONDS [PROCESSES]"""
import ctypes
import os
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
PROT_RW, MAP_PRIVATE_ANON = 0x3, 0x22
SIZE = 64 << 20

if __name__ == "__main__":
    until = time.monotonic() + float(sys.argv[1])
    children = []
    for _ in range((int(sys.argv[2]) if len(sys.argv) > 2 else 3) - 1):
        pid = os.fork()
        if pid == 0:
            children = None
            break
        children.append(pid)
    while time.monotonic() < until:
        p = libc.mmap(None, SIZE, PROT_RW, MAP_PRIVATE_ANON, -1, 0)
        libc.memset(p, 1, SIZE)
        libc.munmap(p, SIZE)
    if children is None:
        os._exit(0)
    for pid in children:
        os.waitpid(pid, 0)

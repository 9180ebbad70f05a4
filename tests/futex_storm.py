"""Threads of one process on one futex word at once, over and over: each FUTEX_WAIT
with a value the word does not hold takes the word's hash bucket lock and returns
EAGAIN, and a FUTEX_WAKE after it takes it again when anyone waits; a condition
variable's waits and wakes besides (the process's private hash on kernels that have
one, 6.16+). The futex calls go through ctypes, which lets go of the GIL, so the
threads really are in the kernel together.
Usage: python futex_storm.py SECONDS [THREADS]"""
import ctypes
import errno
import os
import sys
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_futex = {"x86_64": 202, "aarch64": 98}[os.uname().machine]
FUTEX_WAIT_PRIVATE, FUTEX_WAKE_PRIVATE = 128, 129
word = ctypes.c_uint32(0)


def futex_loop(until):
    addr = ctypes.addressof(word)
    while time.monotonic() < until:
        for _ in range(200):
            if libc.syscall(SYS_futex, ctypes.c_void_p(addr), FUTEX_WAIT_PRIVATE, 1,
                            None, None, 0) == -1 and ctypes.get_errno() != errno.EAGAIN:
                raise OSError(ctypes.get_errno(), "futex")


def cv_loop(cv, until):
    while time.monotonic() < until:
        with cv:
            cv.notify_all()
            cv.wait(0.0005)


if __name__ == "__main__":
    until = time.monotonic() + float(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    cv = threading.Condition()
    threads = [threading.Thread(target=futex_loop if i % 2 else cv_loop,
                                args=(until,) if i % 2 else (cv, until)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

"""Threads contending locks inside slab objects the process allocates as it starts:
one pipe written by all (its pipe_inode_info, kmalloc'd: pipe->mutex) and one file
read by all through a shared offset (its struct file, from the filp cache:
f_pos_lock). os.read/os.write let go of the GIL, so the threads really contend.
Usage: python slab_storm.py SECONDS [THREADS]"""
import os
import sys
import tempfile
import threading
import time


def writer(fd, until):
    block = b"x" * 512
    while time.monotonic() < until:
        os.write(fd, block)


def drain(fd, until):
    while time.monotonic() < until + 1:
        if not os.read(fd, 1 << 16):
            return


def reader(fd, until):
    while time.monotonic() < until:
        if not os.read(fd, 4096):           # (the shared offset: f_pos_lock)
            os.lseek(fd, 0, os.SEEK_SET)


if __name__ == "__main__":
    seconds = float(sys.argv[1])
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    until = time.monotonic() + seconds
    r, w = os.pipe()
    with tempfile.TemporaryFile() as f:
        f.write(os.urandom(1 << 20))
        f.flush()
        fd = f.fileno()
        ts = [threading.Thread(target=writer, args=(w, until)) for _ in range(threads)]
        ts += [threading.Thread(target=reader, args=(fd, until)) for _ in range(threads)]
        d = threading.Thread(target=drain, args=(r, until))
        for t in ts + [d]:
            t.start()
        for t in ts:
            t.join()
        os.close(w)
        d.join()

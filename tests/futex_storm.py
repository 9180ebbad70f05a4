"""Threads of one process waking each other through one condition variable, over and
over: futex waits and wakes on its futex hash buckets (the process's private hash
on kernels that have one, 6.16+).
Usage: python futex_storm.py SECONDS [THREADS]"""
import sys
import threading
import time


def work(cv, until):
    while time.monotonic() < until:
        with cv:
            cv.notify_all()
            cv.wait(0.0005)


if __name__ == "__main__":
    until = time.monotonic() + float(sys.argv[1])
    cv = threading.Condition()
    threads = [threading.Thread(target=work, args=(cv, until))
               for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

"""The command line's entry (`kvmlockprof`, `python -m kvmlockprof`). For the live
commands, bcc is imported in a thread while the rest loads: its libraries (libbcc,
LLVM) load outside the GIL, and the probes attach that much sooner."""
import sys

LIVE = ("record", "top", "exporter")


def main():
    if sys.argv[1:2] and sys.argv[1] in LIVE:
        from kvmlockprof.kernel.bpfload import prefetch_bcc
        prefetch_bcc()
    from kvmlockprof.cli import main as cli
    cli()


if __name__ == "__main__":
    main()

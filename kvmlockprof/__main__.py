"""The command line's entry (`kvmlockprof`, `python -m kvmlockprof`). bcc is not
imported here: the live commands load their probes in a child process
(kernel/handover.py), and only it maps libbcc and LLVM."""


def main():
    from kvmlockprof.cli import main as cli
    cli()


if __name__ == "__main__":
    main()

from kvmlockprof.cli import main

main()

"""Recording: `record`'s loop (recorder), the signals that stop a session and the
live views' attach and detach (session), the on-disk store `record` writes and `load`
reads (store), and what names a recording's locks, stacks and processes."""

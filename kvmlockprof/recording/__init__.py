"""Recording: `record`'s loop (recorder), the on-disk store it writes and `load`
reads (store), and what names a recording's locks, stacks and processes."""

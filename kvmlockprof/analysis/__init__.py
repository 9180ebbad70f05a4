"""Analysis, one module per domain, DataFrames in and out: the contended locks
(locks) and before/after comparisons (compare). Each function probe's own analysis
is in its module under kvmlockprof.probes."""

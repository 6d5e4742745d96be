"""Records of decisions: sweeps of a kernel's launch constants, lower bounds and probes. Each
chose or explains a constant in chronicals/ops, whose comment cites it; rerun one when that
constant is questioned: `python -m benchmarks.tuning.<script>`."""

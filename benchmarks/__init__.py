"""Benchmarks of Chronicals' ops, attention, packing and training step (see README.md); run as
`python -m benchmarks.<script>` from the repository root."""

"""Development tools that are neither tests nor benchmarks (``python -m tools.soak``)."""

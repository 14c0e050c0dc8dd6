"""Measured comparisons, run by hand (a regular package: a dependency installs a top-level
`benchmarks` package of its own, which would otherwise shadow this folder)."""

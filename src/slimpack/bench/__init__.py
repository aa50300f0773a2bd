"""Benchmarks behind `slimpack bench ...`; figures go to BENCHMARKS.md with machine and date."""

"""Benchmarks of the pack's methods: FLOPs on the meta device, wall time and peak memory.

Run ``bash scripts/bench.sh`` (or ``python -m benchmarks --help`` inside the venv); see
BENCHMARKS.md for the tables and how they are measured.
"""

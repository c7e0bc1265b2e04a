"""Benchmarks of `trl_diffusion_opd`. Run them all with `make bench` (`python -m benchmarks.run_all`).

Each benchmark writes `benchmarks/results/<name>.json` and appends a markdown table to `benchmarks/RESULTS.md`.
"""

"""The GPU check (`python benchmarks/gpu/check.py`): see README.md."""

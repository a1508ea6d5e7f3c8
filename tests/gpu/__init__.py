"""Real-hardware tests: ``python -m pytest -m gpu -q`` on a CUDA machine; skipped elsewhere."""

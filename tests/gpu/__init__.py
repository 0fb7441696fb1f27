"""CUDA tests (make test-gpu); a package so its conftest does not shadow tests/conftest.py."""

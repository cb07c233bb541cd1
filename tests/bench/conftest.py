"""Micro-benchmarks (pytest-benchmark): run by `pytest --benchmark-only` (or `--benchmark-enable`), skipped in a
normal test run, where they would only slow the suite down and assert nothing."""
import importlib.util

import pytest

if importlib.util.find_spec("pytest_benchmark") is None:
    # Without the plugin there is no `benchmark` fixture: leave these files out rather than error.
    collect_ignore_glob = ["test_*.py"]


def benchmarking(config):
    return bool(config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False))


@pytest.fixture(autouse=True)
def _only_when_benchmarking(request):
    if not benchmarking(request.config):
        pytest.skip("micro-benchmark: runs with `pytest --benchmark-only` (or --benchmark-enable)")

"""The benchmark suite's smoke run, first half: `FIRST_HALF` (see
`benchmark_smoke.py`; the other half runs in `test_benchmarks_quick_b.py`)."""

import pytest
from benchmark_smoke import FIRST_HALF, listed_benchmarks, run_quick_suite


@pytest.mark.slow
def test_quick_suite_runs_the_first_half(tmp_path):
    names = [name for name in listed_benchmarks() if name in FIRST_HALF]
    run_quick_suite(names, tmp_path)

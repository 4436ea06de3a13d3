"""The benchmark suite's smoke run, second half: every other benchmark (see
`benchmark_smoke.py`; the other half runs in `test_benchmarks_quick_a.py`)."""

import pytest
from benchmark_smoke import (
    FIRST_HALF,
    RUN_ELSEWHERE,
    listed_benchmarks,
    run_quick_suite,
)


@pytest.mark.slow
def test_quick_suite_runs_every_other_benchmark(tmp_path):
    names = [
        name
        for name in listed_benchmarks()
        if name not in FIRST_HALF and name not in RUN_ELSEWHERE
    ]
    assert names, "the second half is empty"
    run_quick_suite(names, tmp_path)

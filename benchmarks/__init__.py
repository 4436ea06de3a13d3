"""The benchmark suite: `python -m benchmarks` runs the scripts of this directory (see
`_suite.py`); each also runs alone, `python benchmarks/<name>.py`. Not collected by
`pytest` (its `testpaths` is `tests`)."""

"""Speed benchmarks (not part of the test suite): ``python -m benchmarks`` or ``make bench``.

Every figure is the min and median of several timed rounds after warm-up, and every ratio
compares two things measured in the same run. See ``benchmarks/RESULTS.md``.
"""

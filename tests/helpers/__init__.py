"""Set-up shared by the tests and the benchmarks (never a test file: benchmarks import from here).

Tests import it as `helpers` (pytest puts `tests/` on the path); a benchmark adds `tests/` to `sys.path` first.
"""

"""fastrl's benchmark runner: ``python -m fastrl.bench --help``.

Benchmark definitions live outside the package, in ``benchmarks/bench_<family>.py``; each defines
``cases(ctx: Context) -> list[Case]``. See :mod:`fastrl.bench.case` for the API,
:mod:`fastrl.bench.measure` for what each number means, and ``benchmarks/README.md``.
"""
from fastrl.bench.case import Case, Context, Skip, allclose, same_partition, try_import

__all__ = ["Case", "Context", "Skip", "allclose", "same_partition", "try_import", "main"]


def main(argv=None) -> int:
    """The command line (``python -m fastrl.bench``); returns the exit status."""
    from fastrl.bench.runner import main as _main

    return _main(argv)

"""Reproducible measurements of sandkernel, each against its baseline in the same run.

Run them from the repository root with ``python -m benchmarks`` (see
``benchmarks/__main__.py``). Every benchmark module has a function::

    def run(*, quick: bool) -> dict[str, Any]

returning a JSON-serialisable dict with at least:

- ``title``: one line saying what was measured;
- ``machine``: :func:`benchmarks._stats.machine_info` taken at the start;
- ``table``: ``{"columns": [...], "rows": [[...], ...]}`` of display strings,
  printed as a Markdown table;
- ``notes``: a list of sentences that qualify the figures.

Anything else (raw samples, settings, versions) is kept in the JSON file
``benchmarks/out/<name>.json``.
"""

"""Benchmarks for QNTX, run with ``bin/bench <name>`` (SPEC §7).

Every benchmark starts real actor processes in a throwaway home, measures the raw
limit it is judged against in the same run (``bench.raw``), and prints each figure
beside that limit and their ratio: these machines are noisy, so only ratios from
one run compare. Shared by every benchmark: ``bench.report`` (the table and JSON
output), ``bench.actors`` (temporary homes, starting and stopping processes) and
``bench.probe`` (where a stage's time went: actor CPU, machine CPU, commits).
"""

"""Benchmarks that print tables: `hnal bench score` (the exact kernels against the GEMM roofline,
naive peers, pruned and approximate modes, Ray scaling).

Owns: the benchmark paths (`paths`), the experiment and its checks (`score`), the printed table
(`table`) and the command line (`cli`). It sits above `cluster` (whose Ray rows it calls) and the
pure stages; nothing below it imports it.
"""

"""Glue between the four packages: a spec in, rows out (CLI -> spec -> workload -> profiler -> rows).

Each runner uses only the public functions of `profiler`, `workloads` and `results`.
"""

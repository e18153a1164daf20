"""W2A8 GEMV launch configurations chosen inside the packed decode step's CUDA graph, per GPU model.

The autotuner times each launch shape alone with plain launches, and its picks vary from call to
call; in the step, launches overlap (programmatic dependent launch) and share the caches. These
tables come from `scripts/tune_packed_step.py` on the named GPU (the trials are committed under
`results/<gpu>/kernels/`): for each launch shape of a preset's step, every candidate configuration
was pinned in turn and the replayed step timed; the fastest was kept. Keys are (N, K, parts,
epilogue), values (BLOCK_N, BLOCK_KW, num_warps). Shapes and GPUs not listed are autotuned.
"""

TUNED: dict[str, dict[tuple, tuple]] = {
    # H200, 2026-11-28 (results/h200/kernels/tune-packed-step/), for the masked-in-place kernel with
    # row finishing: 1.3b from tune6-682c9b2.csv, 2.7b and 13b from tune7-e5c0978.csv (13b: a pass from
    # tune6's picks)
    "NVIDIA H200": {
        # 1.3b: d 2048, intermediate 5632, vocab 32000
        (2048, 2048, 3, "mlgru"): (64, 128, 8),
        (2048, 2048, 1, "residual"): (32, 128, 8),
        (5632, 2048, 2, "glu"): (32, 128, 8),
        (2048, 5632, 1, "residual"): (128, 32, 4),
        (32000, 2048, 1, "store"): (256, 32, 4),
        # 2.7b: d 2560, intermediate 6912
        (2560, 2560, 3, "mlgru"): (128, 16, 4),
        (2560, 2560, 1, "residual"): (128, 32, 4),
        (6912, 2560, 2, "glu"): (128, 32, 4),
        (2560, 6912, 1, "residual"): (128, 64, 4),
        (32000, 2560, 1, "store"): (256, 32, 4),
        # 13b: d 5120, intermediate 13824
        (5120, 5120, 3, "mlgru"): (128, 32, 2),
        (5120, 5120, 1, "residual"): (64, 128, 8),
        (13824, 5120, 2, "glu"): (128, 32, 4),
        (5120, 13824, 1, "residual"): (128, 32, 4),
        (32000, 5120, 1, "store"): (128, 64, 4),
    },
}

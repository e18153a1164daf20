"""mmprof: what MatMul-free language models really cost on GPUs.

Layout: `mmprof/cli.py` (the commands; thin), `mmprof/profiler/` (NVML and host sampling, energy
windows, memory tracker, timing), `mmprof/workloads/` (the two models, presets, training step,
decoding, checkpoints), `mmprof/kernels/` (Triton kernels, each beside its plain-PyTorch twin),
`mmprof/results/` (run folders, schema, report, export, plots), `mmprof/runners/` (the glue of a
command: spec in, rows out, using only the public functions of the four packages). Measurements
from real GPUs are committed under `results/<gpu>/`; `scripts/gpu-check.sh` runs the GPU tests and
benchmarks in one call. How it measures: docs/measuring.md; kernel internals: docs/kernels.md.
"""

__version__ = "0.1.0"

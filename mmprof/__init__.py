"""mmprof: what MatMul-free language models really cost on GPUs."""

__version__ = "0.1.0"

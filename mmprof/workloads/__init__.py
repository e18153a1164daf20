"""What mmprof measures: the MatMul-free LM and Transformer++ at named sizes, a training step,
a decoding loop and checkpoint folders. Plain PyTorch; knows nothing of measuring."""

from mmprof.kernels.bitlinear import BitLinear, bitlinear
from mmprof.workloads.build import build_model, init_weights
from mmprof.workloads.checkpoint import load_checkpoint, save_checkpoint
from mmprof.workloads.decode import Decoder, generate, sample, weight_bytes
from mmprof.workloads.layers import ModelOutput
from mmprof.workloads.mlgru_scan import mlgru_scan, mlgru_scan_naive
from mmprof.workloads.mmfree import MMFreeLM
from mmprof.workloads.precision import PRECISIONS, MetaAutocast, forward_context, param_dtype
from mmprof.workloads.presets import ARCHS, PRESETS, ModelConfig, get_config, glu_intermediate_size
from mmprof.workloads.train import TrainSpec, Trainer, make_trainer, model_flops_per_token
from mmprof.workloads.transformer import KVCache, TransformerLM

__all__ = [
    "ARCHS", "PRECISIONS", "PRESETS", "BitLinear", "Decoder", "KVCache", "MMFreeLM", "MetaAutocast",
    "ModelConfig", "ModelOutput", "TrainSpec", "Trainer", "TransformerLM", "bitlinear", "build_model",
    "forward_context", "generate", "get_config", "glu_intermediate_size", "init_weights",
    "load_checkpoint", "make_trainer", "mlgru_scan", "mlgru_scan_naive", "model_flops_per_token",
    "param_dtype", "sample", "save_checkpoint", "weight_bytes",
]  # fmt: skip

"""What mmprof measures: the MatMul-free LM and Transformer++ at named sizes, a training step,
a decoding loop and checkpoint folders. Plain PyTorch; knows nothing of measuring."""

from mmprof.kernels.bitlinear import BitLinear, bitlinear
from mmprof.kernels.mlgru_scan import mlgru_scan, mlgru_scan_naive
from mmprof.workloads.build import build_model, init_weights
from mmprof.workloads.checkpoint import load_checkpoint, save_checkpoint
from mmprof.workloads.decode import Decoder, GraphDecoder, generate, make_decoder, sample
from mmprof.workloads.layers import ModelOutput
from mmprof.workloads.mmfree import MMFreeLM
from mmprof.workloads.packed import PackedMMFreeLM
from mmprof.workloads.precision import PRECISIONS, MetaAutocast, forward_context, param_dtype
from mmprof.workloads.presets import ARCHS, PRESETS, ModelConfig, get_config, glu_intermediate_size
from mmprof.workloads.train import TrainSpec, Trainer, make_trainer, model_flops_per_token
from mmprof.workloads.transformer import KVCache, TransformerLM
from mmprof.workloads.weight_bytes import streamed_bytes, weight_bytes

__all__ = [
    "ARCHS", "PRECISIONS", "PRESETS", "BitLinear", "Decoder", "GraphDecoder", "KVCache", "MMFreeLM",
    "MetaAutocast", "ModelConfig", "ModelOutput", "PackedMMFreeLM", "TrainSpec", "Trainer", "TransformerLM",
    "bitlinear", "build_model", "forward_context", "generate", "get_config", "glu_intermediate_size",
    "init_weights", "load_checkpoint", "make_decoder", "make_trainer", "mlgru_scan", "mlgru_scan_naive",
    "model_flops_per_token", "param_dtype", "sample", "save_checkpoint", "streamed_bytes", "weight_bytes",
]  # fmt: skip

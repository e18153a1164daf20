"""Checks of command-line options made before anything is measured: one function per option or clash.

Each raises UserError (one line, exit 2). The memory bounds are lower bounds worked out from the
model's shape, so they refuse only what cannot fit; an estimate on meta that fits no device is
still a row, its note naming the bound (`fit_note`).
"""

from __future__ import annotations

import dataclasses
import json
import math

import click

from mmprof.errors import UserError

GIB = 2**30           # as mmprof.profiler.GIB (this module is imported by the CLI before torch is)
MAX_STEPS = 100_000   # --steps, --warmup, --repeats: more is a typo, not a measurement
MAX_SECONDS = 3600.0  # --min-window-s, --idle-s: an hour at most
# The most memory one accelerator holds today (AMD MI355X, NVIDIA B300: 288 GB of HBM3e).
LARGEST_DEVICE_BYTES = 288 * 10**9
INT64_MAX = 2**63 - 1


class FiniteFloat(click.FloatRange):
    """click.FloatRange that also refuses nan and inf."""

    name = "finite float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


def check_path_option(name: str, value: str | None) -> None:
    """--out / --resume: absent is fine, an empty or blank path is not (it would mean the default)."""
    if value is not None and not value.strip():
        raise UserError(f"--{name}: empty path; give a folder or leave the option out")


def check_device_choice(device: str, choices: tuple[str, ...], command: str, why: str = "") -> None:
    """The --device values a command accepts (decode-power measures, so it has no meta)."""
    if device in choices:
        return
    if device in ("auto", "cuda", "cpu", "meta"):
        hint = f": {why}" if why else ""
        raise UserError(f"--device {device}: {command} does not run on {device}{hint}; choose {', '.join(choices)}")
    raise UserError(f"--device: unknown device {device!r}; {command} takes {', '.join(choices)}")


def check_estimate(estimate: bool, device: str) -> None:
    if estimate and device == "meta":
        raise UserError("--estimate puts the no-GPU estimate beside a measurement; on meta every row "
                        "already is the estimate (leave --estimate out, or measure on cuda)")


# ----- memory bounds -----

def get_config(size):
    """The shape of a size preset, a ModelConfig as given, or a --checkpoint's config.json."""
    from mmprof.workloads import PRESETS, ModelConfig
    from mmprof.workloads.build import resolve_config

    if isinstance(size, ModelConfig) or size in PRESETS:
        return resolve_config(size)
    from mmprof.workloads.checkpoint import read_config, resolve_checkpoint

    return read_config(resolve_checkpoint(size))[1]


def min_params(size: str) -> int:
    """A lower bound on either model's parameters: embedding and lm_head, 4 d x d projections and a
    3 d x I GLU per layer (norms left out)."""
    c = get_config(size)
    return 2 * c.vocab_size * c.hidden_size + c.num_layers * (4 * c.hidden_size ** 2
                                                               + 3 * c.hidden_size * c.intermediate_size)


def device_capacity(device: str) -> tuple[int, str] | None:
    """(bytes, description) of what the device can hold; None on meta (nothing is allocated)."""
    if device.startswith("cuda"):
        import torch

        from mmprof.profiler import cuda_index

        props = torch.cuda.get_device_properties(cuda_index(device) or 0)
        return props.total_memory, f"{device} ({props.name}) holds {props.total_memory / GIB:.1f} GiB"
    if device == "cpu":
        import psutil

        total = psutil.virtual_memory().total
        return total, f"this host's RAM is {total / GIB:.1f} GiB"
    return None


def train_min_bytes(size: str, batch: int, seq: int, precision: str, world_size: int = 1) -> int:
    """Lower bound of one rank's training step: weights, gradients and AdamW's two states (sharded
    over `world_size`), plus every block's input kept for backward at >= 2 bytes an element."""
    c = get_config(size)
    state = 4 * (2 if precision == "bf16" else 4) * min_params(size) // world_size
    return state + c.num_layers * batch * seq * c.hidden_size * 2


def _check_elements(what: str, *dims: int) -> None:
    if math.prod(dims) > INT64_MAX:
        raise UserError(f"{what}: a tensor of {' x '.join(map(str, dims))} elements is past what torch can index (2^63)")


def train_unfit(size: str, batch: int, seq: int, precision: str, device: str, world_size: int = 1) -> str | None:
    """Why one training configuration cannot fit `device` (None when it may): the bound named."""
    cap = device_capacity(device)
    need = train_min_bytes(size, batch, seq, precision, world_size)
    if cap is None or need <= cap[0]:
        return None
    return (f"not run: batch {batch} x seq {seq} of {size} needs at least {need / GIB:.1f} GiB "
            f"(weights, gradients, AdamW state, each block's input), but {cap[1]}")


def check_train_fits(size: str, batches, seq: int, precision: str, device: str, world_size: int = 1) -> None:
    """Refuse a batch or sequence that no tensor index can hold, or whose smallest batch the device
    cannot hold; larger batches past the device become `oom` rows that name the bound (train_unfit)."""
    c = get_config(size)
    for b in batches:
        _check_elements(f"--batch {b} --seq {seq}", b, seq, max(c.vocab_size, 2 * c.intermediate_size))
    why = train_unfit(size, min(batches), seq, precision, device, world_size)
    if why is not None:
        raise UserError(f"--batch {min(batches)} --seq {seq}: {why.removeprefix('not run: ')}")


def decode_min_bytes(arch: str, size: str, weights: str, batch: int, prompt_len: int, new_tokens: int,
                     device: str) -> int:
    """Lower bound of decoding: weights (2 bits each when packed), the KV cache (Transformer++) or the
    recurrent state (MatMul-free), the prompt's hidden states and one row of logits per sequence."""
    c = get_config(size)
    elem = 2 if device.startswith("cuda") else 4
    wbytes = min_params(size) // 4 if weights == "packed" else min_params(size) * elem
    if arch == "transformer":
        cache = 2 * c.num_layers * batch * (prompt_len + new_tokens) * c.kv_heads * c.head_dim * elem
    else:
        cache = c.num_layers * batch * c.hidden_size * 4
    return wbytes + cache + batch * prompt_len * c.hidden_size * elem + batch * c.vocab_size * elem


def check_decode_fits(configs, batch: int, prompt_len: int, new_tokens: int, device: str) -> None:
    """`configs`: (arch, size, weights) of each row. Refuse what the device cannot hold."""
    cap = device_capacity(device)
    for arch, size, weights in configs:
        c = get_config(size)
        _check_elements(f"--batch {batch} --prompt-len {prompt_len}", batch, prompt_len + new_tokens,
                        max(c.hidden_size, c.vocab_size))
        if cap is None:
            continue
        need = decode_min_bytes(arch, size, weights, batch, prompt_len, new_tokens, device)
        if need > cap[0]:
            raise UserError(f"--batch {batch}: decoding {arch} {size} needs at least {need / GIB:.1f} GiB "
                            f"(weights, cache, prompt states, logits), but {cap[1]}")


def fit_note(peak_gib: float | None) -> str:
    """For an estimate: say so when its peak is more than any one device holds."""
    if peak_gib is None or peak_gib * GIB <= LARGEST_DEVICE_BYTES:
        return ""
    return (f"estimated peak {peak_gib:.1f} GiB fits no single device (the largest hold "
            f"{LARGEST_DEVICE_BYTES / GIB:.1f} GiB, {LARGEST_DEVICE_BYTES / 1e9:.0f} GB)")


# ----- --resume against the folder -----

# Fields of a spec that are not compared on --resume: how a result is labelled or extended, not what it is.
RESUME_IGNORED = {"gpu_name", "estimate", "graph", "sample_hz", "max_repeats", "seed"}


def spec_record(spec) -> dict:
    """The spec as meta.json keeps it (JSON values), with derived fields (precision, cuda_graph) resolved."""
    record = {k: v for k, v in dataclasses.asdict(spec).items() if k not in RESUME_IGNORED}
    for prop in ("precision", "cuda_graph"):
        if hasattr(type(spec), prop) and isinstance(getattr(type(spec), prop), property):
            record[prop] = getattr(spec, prop)
    return json.loads(json.dumps(record, default=str))


def _option(field: str) -> str:
    return "--graph/--no-graph" if field == "cuda_graph" else "--" + field.replace("_", "-")


def _text(value) -> str:
    if isinstance(value, bool) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    return str(value)


def check_resume(run, spec, swept: set[str]) -> None:
    """Refuse a --resume whose options contradict the folder: its meta.json spec where it has one, and
    the single value its rows hold in each spec column. `swept`: fields a resume may extend (lists)."""
    record = {k: v for k, v in spec_record(spec).items() if k not in swept}
    stored = run.meta.get("spec") or {}
    for field, value in record.items():
        if field in stored and stored[field] != value:
            raise UserError(f"--resume {run.path}: {_option(field)} {_text(value)} contradicts the run's "
                            f"{_text(stored[field])} (meta.json); resume with its options or start a new --out")
    df = run.df
    for field, value in record.items():
        if field in df.columns and not isinstance(value, (list, dict)):
            held = {_text(v) for v in df[field] if _text(v) not in ("", "nan")}
            if len(held) == 1 and held != {_text(value)}:
                raise UserError(f"--resume {run.path}: {_option(field)} {_text(value)} contradicts the run's "
                                f"rows ({field}={held.pop()}); resume with its options or start a new --out")


def model_config(spec):
    """A train-memory spec's model shape: its size's (or its config.json's) with the --set overrides applied."""
    from mmprof.workloads import get_config
    from mmprof.workloads.overrides import apply_overrides

    return apply_overrides(spec.model or get_config(spec.size), spec.overrides)

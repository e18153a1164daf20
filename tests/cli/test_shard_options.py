"""--shard, --world-size and torchrun: every clash is one line and exit code 2, before anything is written."""

import pytest
import torch

from mmprof.runners.shard_plan import plan
from tests.cli.helpers import assert_rejected_before_writing

TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}


def _env(monkeypatch, env: dict) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize("env, args, needle", [
    ({}, ["--shard", "fsdp", "--device", "cpu"], "runs under torchrun"),
    ({}, ["--shard", "fsdp", "--device", "meta"], "needs --world-size"),
    ({}, ["--world-size", "2", "--device", "meta"], "--world-size applies to --shard fsdp"),
    ({}, ["--shard", "zero3", "--device", "meta"], "--shard"),
    ({}, ["--checkpointing", "full", "--device", "meta"], "unknown value 'full'"),
    (TORCHRUN, ["--device", "cpu"], "torchrun started 2 processes: add --shard fsdp"),
    (TORCHRUN, ["--shard", "fsdp", "--device", "meta", "--world-size", "2"], "start it without torchrun"),
    (TORCHRUN, ["--shard", "fsdp", "--device", "cpu", "--world-size", "4"], "does not match torchrun's 2"),
    (TORCHRUN, ["--shard", "fsdp", "--device", "cpu", "--gpus", "1"], "--gpus does not apply under torchrun"),
    pytest.param(TORCHRUN, ["--shard", "fsdp", "--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
])
def test_clashes_are_one_line_exit_2(tmp_path, monkeypatch, env, args, needle):
    _env(monkeypatch, env)
    assert_rejected_before_writing(tmp_path, ["train-memory", "--size", "tiny", *args], needle)


def test_plan_resolves_the_device_of_each_mode(monkeypatch):
    _env(monkeypatch, {})
    assert plan("fsdp", 4, "meta", None) == plan("fsdp", 4, "meta", None)
    p = plan("fsdp", 4, "meta", None)
    assert (p.shard, p.world_size, p.distributed, p.device) == ("fsdp", 4, False, "meta")
    assert plan("none", None, "cpu", None).device == "cpu"
    _env(monkeypatch, TORCHRUN)
    p = plan("fsdp", None, "cpu", None)
    assert (p.world_size, p.distributed, p.device) == (2, True, "cpu")
    _env(monkeypatch, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert not plan("none", None, "cpu", None).distributed         # torchrun with one process: as usual


@pytest.mark.parametrize("env, args, needle", [
    ({}, ["--shard", "replicate", "--device", "cpu"], "runs under torchrun"),
    (TORCHRUN, ["--device", "cpu"], "torchrun started 2 processes: add --shard replicate"),
    (TORCHRUN, ["--shard", "replicate", "--device", "meta"], "does not run on meta"),
    (TORCHRUN, ["--shard", "fsdp", "--device", "cpu"], "--shard"),
])
def test_decode_clashes_are_one_line_exit_2(tmp_path, monkeypatch, env, args, needle):
    _env(monkeypatch, env)
    assert_rejected_before_writing(tmp_path, ["decode-power", "--size", "tiny", *args], needle)

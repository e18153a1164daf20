"""The agreement rules of a torchrun job, on a one-rank job over an in-memory store."""

from datetime import timedelta

import pytest
import torch

from mmprof.errors import UserError
from mmprof.runners.distributed import Job, decide


class DictStore:
    """The four calls of a c10d store that Job uses."""

    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        return self.data[key]

    def check(self, keys):
        return all(k in self.data for k in keys)

    def wait(self, keys, timeout: timedelta):
        missing = [k for k in keys if k not in self.data]
        if missing:
            raise TimeoutError(missing)


def _job() -> Job:
    return Job(rank=0, world_size=1, local_rank=0, device="cpu", store=DictStore(), timeout_s=1.0)


def _report(status, drained=True, note=""):
    return {"status": status, "drained": drained, "note": note}


def test_decide():
    assert decide([_report("ok"), _report("ok")]).status == "ok"
    out = decide([_report("peer", note="stopped"), _report("oom", note="OutOfMemoryError: x")])
    assert (out.status, out.poisoned) == ("oom", False)
    assert out.note == "rank 0: stopped; rank 1: OutOfMemoryError: x"
    out = decide([_report("peer", drained=False, note="left waiting"), _report("oom")])
    assert (out.status, out.poisoned) == ("oom", True)                    # a collective was left half-done
    assert decide([_report("ok"), _report("error", note="boom")]).status == "error"


def test_phase_turns_failures_into_agreed_outcomes():
    job = _job()
    out = job.phase(lambda: 42)
    assert out.ok and out.value == 42 and not out.poisoned

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    out = job.phase(oom)
    assert out.status == "oom" and "OutOfMemoryError" in out.note and not out.poisoned
    assert job.store.check(["mmprof/3/phase/fail"])                       # announced to the other ranks
    out = job.phase(lambda: 1 / 0)
    assert out.status == "error" and "ZeroDivisionError" in out.note


def test_a_rank_stops_queueing_once_another_failed():
    job = _job()
    steps = []

    def steps_until_a_peer_fails():
        for k in range(5):
            steps.append(k)
            if k == 1:
                job.store.set(f"{job._phase_key}/fail", "1")              # what rank 1 does when it fails
            job.check_peers()

    out = job.phase(steps_until_a_peer_fails)
    assert steps == [0, 1] and out.status == "error" and "stopped when another rank failed" in out.note
    assert not out.poisoned                                               # it stopped between steps, drained


def test_exchange_and_share_keep_ranks_in_step():
    job = _job()
    assert job.exchange({"a": 1.5}) == [{"a": 1.5}]
    assert job.share([["x", "1"]]) == [["x", "1"]]

    def refuse():
        raise UserError("run folder exists")

    with pytest.raises(UserError, match="run folder exists"):          # rank 0's refusal, raised on every rank
        job.share_call(refuse)

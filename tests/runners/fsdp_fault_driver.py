"""One rank of a torchrun job running `mmprof ARGS...`, with an out-of-memory error injected on rank 1.

    torchrun --nproc-per-node 2 tests/runners/fsdp_fault_driver.py {build|step} BATCH -- train-memory ...

build: rank 1 fails while building the mmfree model at BATCH (before any collective of that
configuration). step: rank 1 fails at the start of its first timed step at BATCH, while rank 0
enters the step's first all-gather, which rank 1 never joins.
"""

import os
import sys

import torch

from mmprof.runners import train_memory_fsdp


def inject(where: str, batch: int) -> None:
    trainer = train_memory_fsdp.ShardedTrainer
    init, step = trainer.__init__, trainer.step

    def failing_init(self, tspec, checkpointing, job):
        if tspec.arch == "mmfree" and tspec.batch == batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected on rank 1)")
        init(self, tspec, checkpointing, job)

    def failing_step(self):
        self.calls = getattr(self, "calls", 0) + 1
        if self.tokens.shape[0] == batch and self.calls == 2:      # warm-up is 1 step: the first timed one
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected on rank 1)")
        step(self)

    if where == "build":
        trainer.__init__ = failing_init
    else:
        trainer.step = failing_step


if __name__ == "__main__":
    where, batch, sep, *args = sys.argv[1:]
    assert sep == "--" and where in ("build", "step")
    if os.environ.get("RANK") == "1":
        inject(where, int(batch))
    from mmprof.cli import main

    main(args, prog_name="mmprof")

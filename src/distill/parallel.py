"""Data parallelism for the commands that fill an output piece by piece with a local model:
``distill logits --teacher`` and ``distill generate`` with a local teacher.

Under ``accelerate launch --num_processes N`` (one node or several) each process is a rank of
accelerate's ``PartialState`` (NCCL on GPUs, gloo on CPUs). Rank 0 holds the output's lock for the
launch and first folds in the part files an earlier, killed launch left; after a barrier every
rank reads what the output holds and takes every N-th piece of the work still pending
(``Launch.share``), which it writes to its own part under that part's lock, resumably, as one
process writes the output. After a final barrier rank 0 merges the parts into the output. Since
the split is over the *pending* work, a launch with another process count resumes from whatever
any earlier rank finished: nothing is redone, nothing written twice.

A plain process (no launcher, or ``--num_processes 1``) is rank 0 of 1: no parts, no collectives.
"""

from __future__ import annotations

import atexit
import os
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from distill.errors import DistillError
from distill.outputs import exclusive


@dataclass(frozen=True)
class Launch:
    """This process's place in the launch."""

    rank: int = 0
    world_size: int = 1
    device: str | None = None  # the rank's own accelerator; None: distill.models' default

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def share(self, pending: list) -> list:
        """This rank's part of the pending work: every ``world_size``-th item from its rank on."""
        return pending[self.rank::self.world_size]

    def barrier(self) -> None:
        if self.parallel:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def from_main(self, obj):
        """Rank 0's ``obj``, on every rank."""
        if not self.parallel:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.parallel:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def record(self, split: str) -> dict:
        """For the run record: how the work was spread."""
        return {"world_size": self.world_size, "split": split if self.parallel else "one process"}


def launched() -> bool:
    """Whether this process is one of several ranks (``WORLD_SIZE`` set by ``accelerate launch`` / torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch() -> Launch:
    """The launch this process belongs to (``WORLD_SIZE`` set by ``accelerate launch`` / torchrun)."""
    if not launched():
        return Launch()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # gloo where there is no GPU
    return Launch(state.process_index, state.num_processes, str(state.device) if torch.cuda.is_available() else None)


def leave(code: int) -> NoReturn:
    """Ends a rank of a launch once its work is done and its outputs are closed: the exit handlers
    run, then the process exits without finalizing the interpreter. A collective's worker thread
    (gloo's) may release a finished collective's tensors just after the caller's wait()
    returned, and those hold Python objects; should that fall after finalization began, taking the
    GIL there ends the thread inside a C++ destructor and the rank aborts (SIGABRT, "terminate called
    without an active exception") with its work done. Destroying the process group does not prevent
    it: modules that took the group as a default argument keep it, and its threads, alive."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def exclusive_launch(launch: Launch, output: str | Path, part: str | Path, claim=None):
    """Rank 0 holds ``output``'s lock for the launch and, holding it, asks ``claim()`` whether the
    output may be written (``outputs.claim``); if another run holds the lock or the claim is refused,
    every rank stops at once (before any writes). Each rank of a data-parallel launch also holds its
    ``part``'s lock. Yields the claim's answer, on every rank."""
    with ExitStack() as held:
        refused = answer = None
        if launch.main:
            try:
                held.enter_context(exclusive(output))
                answer = claim() if claim else None
            except DistillError as e:
                refused = str(e)
        refused, answer = launch.from_main((refused, answer))
        if refused:
            raise DistillError(refused)
        if launch.parallel:
            held.enter_context(exclusive(part))
        yield answer

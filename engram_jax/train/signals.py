"""Stopping between steps: SIGTERM (checkpoint, then exit 0), and the tests' fault injection.

`ENGRAM_JAX_FAULT_AT_STEP=SIGNAL:STEP` makes a run send itself SIGKILL or SIGTERM after that step
(for SIGKILL, after that step's checkpoint is on disk): how the tests kill a run at a known point.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "ENGRAM_JAX_FAULT_AT_STEP"


class StopSignals:
    """Remembers a SIGTERM, and the step of an injected fault, until `restore`."""

    def __init__(self):
        self.terminate = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        fault = os.environ.get(FAULT_ENV)
        self.fault = None
        if fault:
            name, step = fault.split(":")
            self.fault = (getattr(signal, name), int(step))

    def _handle(self, signum, frame):
        self.terminate = True

    def stop_after(self, step: int) -> bool:
        """Whether to checkpoint and stop after `step`."""
        return self.terminate or (self.fault is not None and self.fault[1] == step)

    def inject(self, step: int) -> None:
        """Sends the injected signal when `step` is the fault's step."""
        if self.fault is not None and self.fault[1] == step:
            os.kill(os.getpid(), self.fault[0])

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)

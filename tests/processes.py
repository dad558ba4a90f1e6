"""Helpers for tests that start several local processes."""

import socket
import subprocess

# Time for a worker of the multi-process tests: several times what they take on an idle 2-core
# machine (about 40-90 s), so that they pass with the machine twice as busy.
WORKER_TIMEOUT_S = 900


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collect(workers: list[subprocess.Popen], timeout: float = WORKER_TIMEOUT_S) -> list[str]:
    """Waits for every worker; on a time-out kills them all and fails with what each printed
    (so a hung worker shows where it stopped). Asserts each exited 0 and returns their
    standard outputs."""
    outputs, hung = [], []
    for i, worker in enumerate(workers):
        try:
            outputs.append(worker.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            hung.append(i)
            for w in workers:
                if w.poll() is None:
                    w.kill()
            outputs.append(worker.communicate())
    for worker in workers:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    report = "\n".join(f"--- worker {i} (exit {w.returncode}) stdout:\n{out[-2000:]}\n"
                       f"stderr:\n{err[-3000:]}"
                       for i, (w, (out, err)) in enumerate(zip(workers, outputs)))
    assert not hung, f"workers {hung} did not finish in {timeout} s:\n{report}"
    for w, (_, err) in zip(workers, outputs):
        assert w.returncode == 0, report
    return [out for out, _ in outputs]

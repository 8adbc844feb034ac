"""The tests' multi-process runs (gloo on 127.0.0.1): a free coordinator port, and waiting for
processes without ever blocking the suite."""

import socket
import subprocess
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def finish(processes: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
  """Each process's (stdout, stderr) within `timeout` seconds in all; one still running then is
  killed, so a hung gloo collective fails the test instead of blocking it."""
  deadline = time.monotonic() + timeout
  try:
    return [p.communicate(timeout=max(deadline - time.monotonic(), 1)) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()

"""The tests' multi-process runs (gloo on 127.0.0.1): a free coordinator port, and waiting for
processes without ever blocking the suite."""

import pathlib
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


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


def run_entry_point(module: str, flags: list[str], env: dict, processes: int = 2,
                    timeout: float = 240) -> list[tuple[str, str]]:
  """`python -m <module> <flags>` as `processes` gloo processes on this host (the coordinator
  flags of `experiments/distributed.py` added), each one's (stdout, stderr); asserts that every
  one exited 0, showing the failing one's stderr."""
  address = f'127.0.0.1:{free_port()}'
  started = [subprocess.Popen(
      [sys.executable, '-m', module, *flags, f'--coordinator_address={address}',
       f'--num_processes={processes}', f'--process_id={i}'], cwd=ROOT, env=env, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(processes)]
  outputs = finish(started, timeout)
  for p, (_, err) in zip(started, outputs):
    assert p.returncode == 0, err[-3000:]
  return outputs

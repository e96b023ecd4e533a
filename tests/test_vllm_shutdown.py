"""An engine the program never closed shuts down quietly at interpreter exit.

The program runs in its own interpreter, since what is tested is that interpreter's
exit. It binds vLLM's log handler to a stream that is closed before exit, as pytest's
output capture does (vLLM's handler keeps the ``sys.stdout`` of the moment vLLM is
imported): each line vLLM then logs while stopping an engine used to become "---
Logging error --- ValueError: I/O operation on closed file", and the engine-core
process, given vLLM's default 5 s, was force-killed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from backend_settings import engine_kwargs

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROGRAM = textwrap.dedent("""
    import json
    import sys
    import tempfile

    import psutil

    if __name__ == "__main__":
        capture = tempfile.TemporaryFile("w+")
        sys.stdout = capture  # vLLM's log handler binds to this stream when it is imported
        from nnterp import StandardizedTransformer

        model = StandardizedTransformer(sys.argv[1], backend="vllm", **json.loads(sys.argv[2]))
        with model.trace("The capital of France is"):
            logits = model.logits.save()
        sys.stdout = sys.__stdout__
        capture.close()
        children = psutil.Process().children(recursive=True)
        print("CHILDREN", *(child.pid for child in children), flush=True)
        print("LOGITS", tuple(logits.shape), flush=True)
        # exits here, without model.close()
""")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_an_engine_left_open_stops_quietly_at_exit(tmp_path, tiny_dir):
    pytest.importorskip("vllm")
    script = tmp_path / "left_open.py"
    script.write_text(PROGRAM)
    # the suite's engine settings: on a GPU shared with other test sessions, vLLM's
    # default memory share would not be free
    settings = json.dumps(engine_kwargs(tiny=True))
    done = subprocess.run([sys.executable, str(script), str(tiny_dir("llama")), settings], capture_output=True,
                          text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOGITS (1, 1, 49152)" in done.stdout
    for sign in ("Logging error", "force killing", "exited unexpectedly", "leaked shared_memory"):
        assert sign not in output, f"{sign!r} at exit:\n{output[-3000:]}"
    children = [int(pid) for line in done.stdout.splitlines() if line.startswith("CHILDREN")
                for pid in line.split()[1:]]
    assert children, "the program should have started the engine's processes"
    deadline = time.monotonic() + 5  # a reaped process may take a moment to disappear
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [pid for pid in children if _alive(pid)] == []

"""The README, as a reader runs it: every ```python block exits 0, and the command line
that draws a logit-lens heatmap writes a PNG.

Each Python block runs alone, in a fresh interpreter, in an empty temporary folder (with
a copy of ``examples/``), with the repository root on ``PYTHONPATH``. Blocks write files
only into their working folder, so nothing lands in the checkout. A block that needs vLLM
or a GPU is marked by the HTML comment ``<!-- not run: needs vLLM -->`` (or ``needs a
GPU``) on the line right before its opening fence, and is skipped. Shell blocks are not run,
except the ``python -m nnterp run ... --plot ...`` command lines.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT = 300
#: the fewest Python blocks the README must run, so an extraction bug cannot pass vacuously
MIN_BLOCKS = 6

_SKIP = re.compile(r"^<!--\s*not run:\s*needs (vLLM|a GPU)\s*-->$")
_FENCE = re.compile(r"^```(\w*)\s*$")


def _blocks(language: str) -> list[tuple[int, str, bool]]:
    """``(line number, code, skipped)`` for every fenced block of ``language``."""
    lines = README.read_text().splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if match is None or not match.group(1):
            index += 1
            continue
        start, lang = index, match.group(1)
        end = start + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"README.md:{start + 1}: the ```{lang} block is never closed")
        if lang == language:
            marker = lines[start - 1].strip() if start > 0 else ""
            blocks.append((start + 1, "\n".join(lines[start + 1:end]) + "\n", bool(_SKIP.match(marker))))
        index = end + 1
    return blocks


PYTHON_BLOCKS = [(line, code) for line, code, skipped in _blocks("python") if not skipped]


def _plot_commands() -> list[tuple[int, list[str]]]:
    """The README's ``python -m nnterp run ... --plot FILE`` command lines, as argv lists."""
    commands = []
    for line, code, _ in _blocks("bash"):
        for offset, text in enumerate(code.splitlines()):
            argv = shlex.split(text, comments=True) if text.startswith("python -m nnterp run ") else []
            if "--plot" in argv:  # a whole token: the synopsis's "[--plot FILE.png]" is not a command
                commands.append((line + 1 + offset, argv))
    return commands


PLOT_COMMANDS = _plot_commands()


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def _workdir(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    return tmp_path


def _run_block(code: str, cwd: Path, label: str) -> None:
    script = cwd / "readme_block.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, script.name], cwd=cwd, env=_environment(), capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, (f"{label} exited {result.returncode}\n--- code ---\n{code}"
                                    f"--- stderr (end) ---\n{result.stderr[-4000:]}")


def test_the_readme_runs_enough_python_blocks():
    assert len(PYTHON_BLOCKS) >= MIN_BLOCKS, f"only {len(PYTHON_BLOCKS)} runnable ```python blocks in README.md"


def test_skip_markers_are_spelled_right():
    """A misspelt marker would silently run a vLLM block on CPU, or skip nothing; catch it."""
    text = README.read_text()
    for comment in re.findall(r"<!--.*?-->", text):
        if "not run" in comment:
            assert _SKIP.match(comment.strip()), f"unrecognised marker {comment!r}"


@pytest.mark.slow
@pytest.mark.parametrize("line,code", PYTHON_BLOCKS, ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs(line, code, tmp_path):
    _run_block(code, _workdir(tmp_path), f"the ```python block at README.md:{line}")


@pytest.mark.slow
def test_the_readme_shows_a_plot_command():
    assert PLOT_COMMANDS, "README.md has no `python -m nnterp run ... --plot FILE` command line"
    assert any("examples/lens.json" in argv for _, argv in PLOT_COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("line,argv", PLOT_COMMANDS, ids=[f"README.md:{line}" for line, _ in PLOT_COMMANDS])
def test_plot_command_writes_a_png(line, argv, tmp_path):
    cwd = _workdir(tmp_path)
    graph = argv[4]
    if not (cwd / graph).exists():
        # the graph is written by a README Python block: run the one that names it
        makers = [(at, code) for at, code in PYTHON_BLOCKS if f'"{graph}"' in code or f"'{graph}'" in code]
        assert makers, f"README.md:{line}: {graph} is neither in examples/ nor written by a ```python block"
        at, code = makers[0]
        _run_block(code, cwd, f"the ```python block at README.md:{at}")
    png = cwd / argv[argv.index("--plot") + 1]
    result = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=_environment(), capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"README.md:{line}: {shlex.join(argv)}\n{result.stderr[-4000:]}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png.name} is not a PNG"
    assert png.stat().st_size > 10_000, f"{png.name} is only {png.stat().st_size} bytes"
    assert "plotted" in result.stdout

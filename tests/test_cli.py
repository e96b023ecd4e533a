"""The command line: every command in this process through `nnterp.cli.main`, and the
demo once as a user runs it, in a new interpreter (that run is the one that proves the
quieting of vLLM, torch and transformers, whose settings are read at import time)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest

from nnterp.cli import main


@pytest.fixture
def nnterp_cli(capfd):
    """``nnterp_cli(*args)`` -> (exit status, stdout, stderr) of ``nnterp ARGS``, run here.

    A command quiets its libraries as a program may (environment variables, the ``vllm``
    logger, a warnings filter, transformers' progress bars and verbosity); all of it is
    put back afterwards, so the rest of the session runs as it would without this test.
    stdout and stderr are captured at the file descriptors, so C++ and child-process
    output counts too.
    """
    from transformers.utils import logging as hf_logging

    environ = dict(os.environ)
    vllm_level = logging.getLogger("vllm").level
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()

    def call(*args):
        capfd.readouterr()
        status = main([str(arg) for arg in args])
        out, err = capfd.readouterr()
        return status, out, err

    with warnings.catch_warnings():
        yield call
    os.environ.clear()
    os.environ.update(environ)
    logging.getLogger("vllm").setLevel(vllm_level)
    hf_logging.set_verbosity(verbosity)
    if bars:
        hf_logging.enable_progress_bar()


def _assert_one_line_error(status, err):
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    assert "Traceback" not in err


def test_demo_on_hf_prints_paris_then_steers_to_london_and_nothing_on_stderr():
    result = subprocess.run([sys.executable, "-m", "nnterp", "demo", "--backend", "hf"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == ""
    last_layer = [line for line in result.stdout.splitlines() if line.strip().startswith("29 ")][0]
    assert "' Paris'" in last_layer and "' London'" in last_layer
    assert "hf greedy:  'The capital of France is' + ' Paris." in result.stdout
    assert "hf steered: 'The capital of France is' + ' London." in result.stdout


@pytest.mark.vllm
@pytest.mark.slow
def test_demo_on_vllm_is_quiet_too():
    # the engine runs in child processes, which inherit the quieting through the environment
    result = subprocess.run([sys.executable, "-m", "nnterp", "demo", "--backend", "vllm", "--max-tokens", "3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == ""
    assert "vllm greedy:  'The capital of France is' + ' Paris." in result.stdout


def test_run_writes_results_and_a_readable_heatmap(tmp_path, nnterp_cli):
    graph = tmp_path / "lens.json"
    graph.write_text('{"nnterp_dsl": 1, "graph": [{"op": "lens", "layers": "all", "positions": [0, 1, 2, 3, 4], '
                     '"top_k": 1}]}')
    plot, out = tmp_path / "lens.png", tmp_path / "out"
    status, stdout, stderr = nnterp_cli("run", graph, "--prompt", "The capital of France is", "--plot", plot,
                                        "--out", out)
    assert status == 0, stderr
    assert stderr == ""  # no progress without --verbose
    assert "-> ' Paris'" in stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000
    assert (out / "manifest.json").is_file() and (out / "tensors.safetensors").is_file()
    status, stdout, stderr = nnterp_cli("run", graph, "--prompt", "The capital of France is", "--verbose")
    assert status == 0, stderr
    assert "nnterp: loading 'bundled'" in stderr  # progress goes to stderr, with --verbose only
    assert "-> ' Paris'" in stdout


def test_validate_reports_every_problem_on_one_line(tmp_path, nnterp_cli):
    graph = tmp_path / "bad.json"
    graph.write_text('{"nnterp_dsl": 1, "graph": [{"op": "lens", "layers": [40]}, {"op": "grad", '
                     '"site": "layers[0].output", "target": 5}]}')
    status, _, err = nnterp_cli("validate", graph, "--backend", "vllm")
    _assert_one_line_error(status, err)
    assert "2 problems" in err and "nodes[1] Grad" in err
    ok = tmp_path / "ok.json"
    ok.write_text('{"nnterp_dsl": 1, "graph": [{"op": "lens"}]}')
    status, out, err = nnterp_cli("validate", ok, "--backend", "vllm")
    assert status == 0 and "valid for 'bundled'" in out and err == ""


def test_bad_input_is_one_line_and_no_traceback(tmp_path, nnterp_cli):
    truncated = tmp_path / "t.json"
    truncated.write_text('{"nnterp_dsl": 1, "graph": [')
    lens = tmp_path / "lens.json"
    lens.write_text('{"nnterp_dsl": 1, "graph": [{"op": "lens"}]}')
    for args in (("run", tmp_path / "missing.json", "--prompt", "x"),
                 ("run", truncated, "--prompt", "x"),
                 ("validate", truncated),
                 ("run", truncated, "--prompt", "x", "--model", tmp_path / "no-model"),
                 ("run", truncated),
                 ("validate", lens, "--model", tmp_path / "no-model"),
                 ("run", lens, "--prompt", "x", "--max-tokens", "0"),
                 ("run", lens, "--prompt", "x", "--prompt", ""),
                 ("demo", "--prompt", "")):
        status, _, err = nnterp_cli(*args)
        _assert_one_line_error(status, err)


def test_lens_prints_the_top_tokens_of_each_layer(nnterp_cli):
    status, out, err = nnterp_cli("lens", "--prompt", "The capital of France is", "--layers", "0,-1", "--top-k", "3")
    assert status == 0 and err == "", err
    lines = out.strip().splitlines()
    assert lines[0].startswith("'The capital of France is': top 3")
    assert lines[1].split()[0] == "0" and lines[2].split()[0] == "29"
    assert lines[2].lstrip().startswith("29  ' Paris'")  # the last layer's first choice


def test_steer_prints_both_continuations(nnterp_cli, tmp_path):
    import torch

    status, out, err = nnterp_cli("steer", "--prompt", "The capital of France is", "--layer", "25", "--token", " London",
                                  "--scale", "90", "--max-tokens", "6")
    assert status == 0 and err == "", err
    assert "unsteered: ' Paris" in out and "steered:   ' London" in out
    vector = tmp_path / "zero.pt"
    torch.save(torch.zeros(576), vector)
    status, out, _ = nnterp_cli("steer", "--prompt", "The capital of France is", "--layer", "3", "--vector", vector,
                                "--max-tokens", "3")
    unsteered, steered = (line.split(":", 1)[1].split("(layer")[0].strip() for line in out.splitlines()[1:3])
    assert status == 0 and unsteered == steered  # a zero vector changes nothing


def test_sampling_flags_a_version_and_a_plot_refused_before_loading(nnterp_cli, tmp_path):
    read = tmp_path / "read.json"
    read.write_text('{"nnterp_dsl": 1, "graph": [{"op": "read", "site": "layers[0].output"}]}')
    # no Lens: refused before the (missing) model is looked at
    status, _, err = nnterp_cli("run", read, "--prompt", "x", "--plot", tmp_path / "x.png", "--model", tmp_path / "no")
    _assert_one_line_error(status, err)
    assert "no Lens node" in err
    runs = [nnterp_cli("run", read, "--prompt", "Hi", "--max-tokens", "4", "--temperature", "1.0", "--top-p", "0.9",
                       "--seed", str(seed)) for seed in (7, 7)]
    assert runs[0][0] == 0 and runs[0][1] == runs[1][1]
    with pytest.raises(SystemExit) as exited:
        nnterp_cli("--version")
    assert exited.value.code == 0


def test_run_streams_a_prompts_file_to_disk_and_resumes(tmp_path, nnterp_cli):
    from nnterp.dsl import open_results

    graph = tmp_path / "read.json"
    graph.write_text('{"nnterp_dsl": 1, "graph": [{"op": "read", "site": "layers[3].output"}]}')
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Fact {i}: Paris is the capital of\n" for i in range(12)))
    out = tmp_path / "acts"
    status, stdout, stderr = nnterp_cli("run", graph, "--prompts", prompts, "--out", out, "--shard-prompts", "5")
    assert status == 0 and stderr == "", stderr  # no progress bar when stderr is not a terminal
    assert "12 prompts in" in stdout and "layers[3].output" in stdout
    stored = open_results(out)
    assert stored.complete and stored["layers[3].output"].shape == (12, 576)
    # the same command again finds the run complete; another file is refused in one line
    assert nnterp_cli("run", graph, "--prompts", prompts, "--out", out, "--shard-prompts", "5")[0] == 0
    other = tmp_path / "other.txt"
    other.write_text("Another prompt\n")
    status, _, err = nnterp_cli("run", graph, "--prompts", other, "--out", out, "--shard-prompts", "5")
    _assert_one_line_error(status, err)
    assert "holds results for other prompts" in err
    status, _, err = nnterp_cli("run", graph, "--prompts", prompts)
    _assert_one_line_error(status, err)
    assert "give --out DIR" in err

"""The command line: ``python -m nnterp demo|lens|steer|run|validate|serve`` (also the
``nnterp`` script).

Every command turns bad input into one line on stderr and a non-zero exit: a
researcher mistyping a path should read what is wrong, not a traceback. Unexpected
internal errors still show their traceback, since those are bugs to report.

Commands are quiet unless given ``--verbose``: without it, stderr carries only errors,
so a script can treat anything written there as a problem. The libraries a command
loads (vLLM and its engine processes, torch, transformers, tqdm) are quieted through
the settings each reads itself (`QUIET_ENV`). A program may do that; the library never
does: importing nnterp configures no logging.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from nnterp.quiet import QUIET_ENV, quiet_libraries  # noqa: F401 (QUIET_ENV: documented here)

__all__ = ["main"]

DEMO_PROMPT = "The capital of France is"

class CommandError(Exception):
    """A user-facing failure of a command: printed as one line, exit status 2."""


def _demo(args: argparse.Namespace) -> int:
    from nnterp.demo import run_demo

    backends = ("hf", "vllm") if args.backend == "both" else (args.backend,)
    if not args.prompt:
        raise CommandError("--prompt is empty: give some text to run")
    run_demo(backends=backends, prompt=args.prompt, max_tokens=args.max_tokens, out=sys.stdout)
    return 0


def _progress(args: argparse.Namespace, message: str) -> None:
    if args.verbose:
        print(f"nnterp: {message}", file=sys.stderr, flush=True)


def _load_graph(path: str):
    from nnterp.dsl import load
    from nnterp.errors import GraphFormatError

    if not os.path.isfile(path):
        raise CommandError(f"no graph file at {path!r}")
    try:
        return load(path)
    except GraphFormatError as err:
        raise CommandError(f"{path}: {_one_line(err)}") from None
    except OSError as err:
        raise CommandError(f"cannot read {path!r}: {err.strerror}") from None


def _one_line(err: BaseException) -> str:
    return " | ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _model_error(model: str, err: BaseException) -> CommandError:
    return CommandError(f"cannot load model {model!r}: {_one_line(err)}")


def _validate(args: argparse.Namespace) -> int:
    from nnterp.dsl import validate
    from nnterp.errors import ValidationError

    graph = _load_graph(args.graph)
    try:
        spec = validate(graph, args.model, backend=args.backend)
    except ValidationError as err:
        raise CommandError(_one_line(err)) from None
    except (OSError, ValueError) as err:
        raise _model_error(args.model, err) from None
    print(f"{args.graph}: {len(graph)} nodes, valid for {args.model!r} ({spec.describe()})")
    return 0


def _run(args: argparse.Namespace) -> int:
    from nnterp.dsl import Lens

    graph = _load_graph(args.graph)
    if args.prompts:
        return _run_streamed(args, graph)
    _check_prompts(args.prompt)
    if args.plot and not any(isinstance(node, Lens) for node in graph):
        raise CommandError("--plot draws a logit lens, and this graph has no Lens node")
    sampling = _sampling(args)
    model, result = _load_and_run(args, graph, args.prompt, sampling)
    for row, (prompt, text) in enumerate(zip(args.prompt, result.texts)):
        print(f"{prompt!r} -> {text!r}")
        for name in result.keys():
            print(f"  {name}: {_describe(result[name])}")
            node = graph[_node_named(graph, name)]
            if isinstance(node, Lens):
                print(_lens_table(result[name], row, model.tokenizer, node.layer_indices(model.num_layers),
                                  indent="    "))
    if args.out:
        result.save(args.out)
        print(f"saved to {args.out}/manifest.json and {args.out}/tensors.safetensors")
    if args.plot:
        _plot(result, model.tokenizer, args)
    return 0


def _run_streamed(args: argparse.Namespace, graph) -> int:
    """``run GRAPH --prompts FILE --out DIR``: the file's prompts streamed into ``DIR`` a
    shard at a time (resumed when ``DIR`` holds an earlier run of the same command), with
    a progress bar on a terminal."""
    from pathlib import Path

    from nnterp.dsl import run
    from nnterp.errors import NnterpError, ValidationError

    if args.prompt:
        raise CommandError("give prompts with --prompt or --prompts FILE, not both")
    if not args.out:
        raise CommandError("--prompts streams the results to disk: give --out DIR")
    if args.plot:
        raise CommandError("--plot draws one run's lens; with --prompts, read the results with open_results")
    if not os.path.isfile(args.prompts):
        raise CommandError(f"no prompts file at {args.prompts!r}")
    sampling = _sampling(args)
    model, _ = _load_and_run(args, graph, None, sampling)
    try:
        stored = run(graph, model, Path(args.prompts), sampling=sampling, out=args.out,
                     shard_prompts=args.shard_prompts, progress=args.verbose or sys.stderr.isatty())
    except (ValidationError, NnterpError, TypeError, ValueError) as err:
        raise CommandError(_one_line(err)) from None
    print(f"{len(stored)} prompts in {args.out}: {len(stored.keys())} outputs ({', '.join(stored.keys())}); "
          f"read them with nnterp.dsl.open_results({args.out!r})")
    return 0


def _check_prompts(prompts: list[str]) -> None:
    if not prompts:
        raise CommandError("give at least one --prompt")
    empty = [i for i, prompt in enumerate(prompts) if not prompt]
    if empty:
        raise CommandError(f"--prompt number {empty[0] + 1} is empty: give some text to run")


def _sampling(args: argparse.Namespace):
    from nnterp.dsl import Sampling

    try:
        return Sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except ValueError as err:
        raise CommandError(str(err)) from None


def _load_and_run(args: argparse.Namespace, graph, prompts: list[str], sampling):
    """Validate ``graph`` against the model's configuration (fast, before any weight is
    read), load the model `run` would load, and run: ``(model, result)``."""
    from nnterp.dsl import run, validate
    from nnterp.dsl.running import model_for
    from nnterp.errors import NnterpError, ValidationError

    try:
        validate(graph, args.model, backend=args.backend)  # from the configuration: fails fast
    except ValidationError as err:
        raise CommandError(_one_line(err)) from None
    except (OSError, ValueError) as err:
        raise _model_error(args.model, err) from None
    _progress(args, f"loading {args.model!r} on the {args.backend} backend")
    try:
        # the model `run` itself would load for this graph; it stays loaded (and its
        # engine up) until the process ends
        model = model_for(args.model, backend=args.backend, graph=graph)
    except (OSError, NnterpError, ValueError) as err:
        raise _model_error(args.model, err) from None
    if prompts is None:  # loaded only: the caller runs
        return model, None
    _progress(args, f"running {len(graph)} nodes on {len(prompts)} prompt(s), {sampling.max_tokens} token(s)")
    try:
        return model, run(graph, model, prompts, sampling=sampling)
    except (ValidationError, IndexError, ValueError) as err:
        raise CommandError(_one_line(err)) from None


def _node_named(graph, name: str) -> int:
    return next(i for i, node in enumerate(graph) if node.output_name == name)


def _lens_table(value, row: int, tokenizer, layers: tuple[int, ...], indent: str = "") -> str:
    """One prompt's lens as text: a line per layer, its top tokens and probabilities (the
    first position read, the prompt pass)."""
    import torch

    if isinstance(value, tuple):
        probs, ids = value[0][row], value[1][row]
    else:
        probs, ids = torch.topk(value[row].float(), k=min(5, value.shape[-1]), dim=-1)
    if isinstance(probs, list) or probs.dim() != 2:
        return f"{indent}(a lens over several positions or steps: see --out)"
    lines = []
    for layer, p, i in zip(layers, probs.tolist(), ids.tolist()):
        tops = "  ".join(f"{tokenizer.decode([t])!r} {q:.3f}" for t, q in zip(i, p))
        lines.append(f"{indent}{layer:>3}  {tops}")
    return "\n".join(lines)


def _lens(args: argparse.Namespace) -> int:
    """``nnterp lens MODEL --prompt P``: the logit lens of the last token, a table of the top
    tokens per layer, and a heatmap with ``--plot``."""
    from nnterp.dsl import Graph, Lens, Sampling

    _check_prompts(args.prompt)
    layers = "all" if args.layers is None else _layer_list(args.layers)
    graph = Graph([Lens(layers=layers, top_k=args.top_k)])
    model, result = _load_and_run(args, graph, args.prompt, Sampling())
    for row, prompt in enumerate(args.prompt):
        print(f"{prompt!r}: top {args.top_k} next tokens by layer (logit lens, last position)")
        print(_lens_table(result["lens"], row, model.tokenizer, graph[0].layer_indices(model.num_layers), "  "))
    if args.plot:
        _plot(result, model.tokenizer, args)
    return 0


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise CommandError(f"--layers takes layer indices like '0,5,-1', got {text!r}") from None


def _steer(args: argparse.Namespace) -> int:
    """``nnterp steer MODEL --prompt P --layer L (--vector FILE.pt | --token WORD) --scale S``:
    the unsteered and the steered continuations, side by side."""
    import torch

    from nnterp.dsl import Graph, Read, Steer

    _check_prompts(args.prompt)
    sampling = _sampling(args)
    plain_graph = Graph([Read(f"layers[{args.layer}].output", name="plain")])
    model, plain = _load_and_run(args, plain_graph, args.prompt, sampling)
    if args.vector is not None:
        try:
            vector = torch.load(args.vector, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as err:
            raise CommandError(f"cannot read a tensor from {args.vector!r}: {_one_line(err)}") from None
        if not isinstance(vector, torch.Tensor):
            raise CommandError(f"{args.vector!r} holds a {type(vector).__name__}, not a tensor")
    else:
        ids = model.tokenizer(args.token, add_special_tokens=False)["input_ids"]
        if not ids:
            raise CommandError(f"--token {args.token!r} has no tokens")
        vector = model.weight("unembedding")[ids[0]].float()
        vector = vector / vector.norm()  # a unit direction towards the token
    _, steered = _load_and_run(args, Graph([Steer(args.layer, vector.flatten(), scale=args.scale)]),
                               args.prompt, sampling)
    for prompt, before, after in zip(args.prompt, plain.texts, steered.texts):
        print(f"{prompt!r}")
        print(f"  unsteered: {before!r}")
        print(f"  steered:   {after!r}  (layer {args.layer}, scale {args.scale:g})")
    return 0


def _plot(result, tokenizer, args: argparse.Namespace) -> None:
    from nnterp.plot import lens_for_plot, plot_lens

    found = lens_for_plot(result)
    if found is None:
        raise CommandError("--plot draws a logit lens, and this graph has no Lens node")
    name, lens, positions = found
    first = (lens[0][0], lens[1][0]) if isinstance(lens, tuple) else lens[0]
    if isinstance(first, list):
        raise CommandError("--plot draws the prompt pass; this lens reads several steps")
    labels = None
    if isinstance(positions, list):
        tokens = [repr(tokenizer.decode(t))[1:-1] for t in tokenizer(args.prompt[0])["input_ids"]]
        labels = [tokens[p] for p in positions]
    plot_lens(first, tokenizer, args.plot, title=f"{name}: {args.prompt[0]!r}", column_labels=labels)
    print(f"plotted {name} for {args.prompt[0]!r} to {args.plot}")


def _describe(value) -> str:
    if hasattr(value, "shape"):
        return f"tensor{list(value.shape)}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    if isinstance(value, list):
        return f"list of {len(value)}: [{_describe(value[0])}, ...]" if value else "[]"
    return type(value).__name__


def _verbose_flag(command: argparse.ArgumentParser) -> None:
    command.add_argument("--verbose", action="store_true",
                         help="show progress, and the log lines, warnings and progress bars of "
                              "the libraries (vLLM, torch, transformers)")


def _sampling_flags(command: argparse.ArgumentParser, max_tokens: int) -> None:
    command.add_argument("--max-tokens", type=int, default=max_tokens)
    command.add_argument("--temperature", type=float, default=0.0)
    command.add_argument("--top-p", type=float, default=1.0)
    command.add_argument("--seed", type=int, default=None, help="makes a sampled run reproducible")


def _parser() -> argparse.ArgumentParser:
    from nnterp import __version__

    parser = argparse.ArgumentParser(prog="nnterp", description="Standardized interpretability on nnsight.")
    parser.add_argument("--version", action="version", version=f"nnterp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="a lens + steer graph on the bundled model, on both backends")
    demo.add_argument("--backend", choices=("hf", "vllm", "both"), default="both")
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--max-tokens", type=int, default=10)
    _verbose_flag(demo)
    demo.set_defaults(handler=_demo)

    lens = commands.add_parser("lens", help="the logit lens of a prompt's last token, layer by layer")
    lens.add_argument("model", nargs="?", default="bundled", help="a model folder, hub name or 'bundled'")
    lens.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    lens.add_argument("--layers", help="layer indices, e.g. '0,10,-1' (default: all)")
    lens.add_argument("--top-k", type=int, default=5)
    lens.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    lens.add_argument("--plot", help="PNG file for a heatmap of the lens (first prompt)")
    _verbose_flag(lens)
    lens.set_defaults(handler=_lens)

    steer = commands.add_parser("steer", help="a continuation with and without a steering vector")
    steer.add_argument("model", nargs="?", default="bundled", help="a model folder, hub name or 'bundled'")
    steer.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    steer.add_argument("--layer", type=int, required=True)
    direction = steer.add_mutually_exclusive_group(required=True)
    direction.add_argument("--vector", help="a .pt file holding a [hidden] tensor")
    direction.add_argument("--token", help="steer towards this token's unembedding direction (unit norm)")
    steer.add_argument("--scale", type=float, default=8.0)
    steer.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    _sampling_flags(steer, max_tokens=10)
    _verbose_flag(steer)
    steer.set_defaults(handler=_steer)

    run = commands.add_parser("run", help="run a graph (JSON) on prompts")
    run.add_argument("graph", help="a graph document (.json)")
    run.add_argument("--model", default="bundled")
    run.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    run.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    _sampling_flags(run, max_tokens=1)
    run.add_argument("--prompts", help="a text file (a prompt per line) or a .jsonl file: stream the results "
                                        "to --out a shard at a time, resumable")
    run.add_argument("--shard-prompts", type=int, default=None, help="prompts per shard with --prompts (8192)")
    run.add_argument("--out", help="folder to save the manifest and tensors in")
    run.add_argument("--plot", help="PNG file for a heatmap of the graph's logit lens (first prompt)")
    _verbose_flag(run)
    run.set_defaults(handler=_run)

    check = commands.add_parser("validate", help="check a graph against a model's configuration")
    check.add_argument("graph")
    check.add_argument("--model", default="bundled")
    check.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    _verbose_flag(check)
    check.set_defaults(handler=_validate)

    serve = commands.add_parser("serve", help="serve a model: vLLM's OpenAI API with graphs, and /nnterp/run")
    serve.add_argument("model", nargs="?", default="bundled", help="a model folder, hub name or 'bundled'")
    serve.add_argument("--backend", choices=("vllm",), default="vllm")
    serve.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--dtype", default=None)
    serve.add_argument("--api-key", action="append", default=[], help="a key clients must send; repeat for several")
    serve.add_argument("--api-key-file", help="a file of keys, one per line")
    for name, help_text in (("document-bytes", "bytes of a graph document"), ("nodes", "nodes per graph"),
                            ("tensor-bytes", "bytes of a request's tensors"), ("prompts", "prompts per run request"),
                            ("max-tokens", "tokens one request may generate"),
                            ("output-bytes", "bytes of one run's results"),
                            ("concurrent-runs", "/nnterp/run requests worked on at once (more wait)")):
        flag = name if name.startswith("max-") else f"max-{name}"
        serve.add_argument(f"--{flag}", type=int, default=None, help=f"limit: {help_text}")
    serve.add_argument("--shutdown-timeout", type=int, default=10,
                       help="seconds in-flight requests get to finish on SIGTERM")
    _verbose_flag(serve)
    serve.set_defaults(handler=_serve)
    return parser


def _serve(args: argparse.Namespace) -> int:
    import attrs

    from nnterp.serve.limits import ServeLimits

    keys = list(args.api_key)
    if args.api_key_file:
        try:
            with open(args.api_key_file) as handle:
                keys += [line.strip() for line in handle if line.strip() and not line.startswith("#")]
        except OSError as err:
            raise CommandError(f"cannot read --api-key-file {args.api_key_file!r}: {err.strerror}") from None
        if not keys:
            raise CommandError(f"--api-key-file {args.api_key_file!r} holds no key")
    if os.environ.get("VLLM_API_KEY"):  # vLLM's own setting guards its routes: nnterp's too
        keys.append(os.environ["VLLM_API_KEY"])
    chosen = {field.name: getattr(args, "max_tokens" if field.name == "max_tokens" else f"max_{field.name}")
              for field in attrs.fields(ServeLimits)}
    try:
        limits = ServeLimits(**{k: v for k, v in chosen.items() if v is not None})
    except ValueError as err:
        raise CommandError(str(err)) from None
    if args.host not in (None, "127.0.0.1", "localhost", "::1") and not keys:
        print(f"nnterp serve: listening on {args.host} without an API key: anyone who can reach it may use the "
              "model (pass --api-key)", file=sys.stderr)
    from nnterp.serve.server import serve

    serve(args.model, host=args.host, port=args.port, dtype=args.dtype, api_keys=keys, limits=limits,
          shutdown_timeout=args.shutdown_timeout, log_level="info" if args.verbose else "warning")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # tokenizers warns when the process forks after using its thread pool
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.verbose:
        quiet_libraries()  # before the libraries are imported: some read it only then
    try:
        return args.handler(args)
    except CommandError as err:
        print(f"nnterp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nnterp {args.command}: interrupted", file=sys.stderr)
        return 130

"""Where a run's prompts come from: a list, any iterable or generator, a text or JSONL file,
or a column of a Hugging Face ``datasets`` dataset.

`iter_prompts` turns any of them into an iterator of checked prompts, read as the run
consumes them: a file of a million lines, or a dataset streamed from disk, is never held
in memory by a streamed run (``run(..., out=DIR)``). A bad prompt is reported with where
it is: ``prompts[12]``, or ``data.jsonl:13``.

* A ``pathlib.Path`` (any ``os.PathLike``) is a file: ``.jsonl`` holds one JSON value per
  line, a string or an object with a ``"prompt"`` or ``"text"`` field; any other file
  holds one prompt per line (its line break removed). Blank lines are skipped. A plain
  ``str`` is always a prompt, never a file name.
* A dataset column is what ``dataset["text"]`` returns (a list, or in ``datasets`` 4 a
  lazy column): an iterable of strings like any other. A whole dataset iterates rows
  (dicts), which is refused with the fix.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator

__all__ = ["iter_prompts", "count_prompts"]

#: the fields of a JSONL object that hold its prompt, in order of preference
JSONL_FIELDS = ("prompt", "text")


def count_prompts(prompts: Any) -> int | None:
    """How many prompts ``prompts`` holds, where that is known without reading it (a
    list, a dataset column); None for a file or a generator."""
    if isinstance(prompts, str):
        return 1
    if isinstance(prompts, os.PathLike):
        return None
    try:
        return len(prompts)
    except TypeError:
        return None


def iter_prompts(prompts: Any, where: str = "run") -> Iterator[str]:
    """Every prompt of ``prompts``, checked as it is read.

    Raises:
        TypeError: a prompt that is not a non-empty string, or an input that is not
            prompts; the message says which and where.
        ValueError: a malformed JSONL line; the message gives the file and line.
        FileNotFoundError: a path to no file.
    """
    if isinstance(prompts, str):
        yield _checked(prompts, f"{where}: the prompt")
        return
    if isinstance(prompts, os.PathLike):
        yield from _from_file(os.fspath(prompts))
        return
    if isinstance(prompts, (bytes, dict)) or not isinstance(prompts, Iterable):
        raise TypeError(f"{where}: prompts must be a string, an iterable of strings, a dataset column "
                        f"(dataset['text']) or a pathlib.Path to a text or JSONL file, "
                        f"got {type(prompts).__name__}")
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, dict):
            raise TypeError(f"{where}: prompts[{index}] is a dict ({', '.join(map(str, list(prompt)[:4]))}); a "
                            f"dataset iterates rows: pass one column, dataset['text']")
        yield _checked(prompt, f"{where}: prompts must be non-empty strings; prompts[{index}]")


def _checked(prompt: Any, what: str) -> str:
    if not isinstance(prompt, str) or not prompt:
        raise TypeError(f"{what} is {prompt!r:.60}")
    return prompt


def _from_file(path: str) -> Iterator[str]:
    jsonl = path.endswith(".jsonl")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            where = f"{path}:{number}"
            if not jsonl:
                yield text
                continue
            try:
                value = json.loads(text)
            except ValueError as err:
                raise ValueError(f"{where}: not a JSON value ({err})") from None
            if isinstance(value, dict):
                field = next((f for f in JSONL_FIELDS if f in value), None)
                if field is None:
                    raise ValueError(f"{where}: a JSON object needs a {' or '.join(map(repr, JSONL_FIELDS))} "
                                     f"field, it has {', '.join(map(repr, list(value)[:6])) or 'none'}")
                value = value[field]
            yield _checked(value, f"{where}: a prompt must be a non-empty string; the line's prompt")

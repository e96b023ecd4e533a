"""``python -m nnterp``: see `nnterp.cli`."""

from nnterp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Entry point for ``python -m l2l``."""

from l2l.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m meswitch``: the CLI where the console script is not installed (the GPU machine runs the tree as is)."""

from meswitch.cli import main

raise SystemExit(main())

"""`python -m textgen`: the `textgen` command (train, generate, eval, info, plot, serve, export). The only module
of the package that imports cli."""
import sys

from .cli import textgen_main

sys.exit(textgen_main())

"""Generate text from a trained model: `python generate.py --prompt "..."`; see --help."""
import sys

from textgen.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())

import sys

from .cli import textgen_main

sys.exit(textgen_main())

"""Train a character-level LSTM: `python train.py [TEXT_FILE] [flags]`; see --help."""
import sys

from textgen.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())

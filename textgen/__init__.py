"""textgen: a character-level LSTM text generator.

    import textgen
    model = textgen.train("my.txt", steps=1000)          # or textgen.load("checkpoints/<run>")
    print(model.generate("ROMEO:", length=200, temperature=0.8))

The names below are imported on first use, so `import textgen` (and `textgen --version` or
`--help`) does not load PyTorch until something needs it.
"""
import importlib

__version__ = "0.1.0"

_WHERE = {"TextModel": "api", "generate": "api", "load": "api", "train": "api",
          "OutputError": "errors", "SettingError": "errors", "StopTraining": "errors", "UsageError": "errors",
          "CharLSTM": "lstm", "ModelConfig": "lstm", "CharTokenizer": "tokenizer",
          "SampleConfig": "generation.sampling"}

__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'textgen' has no attribute {name!r}")


def __dir__():
    return __all__

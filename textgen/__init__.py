"""textgen: a character-level LSTM text generator.

    import textgen
    model = textgen.train("my.txt", steps=1000)          # or textgen.load("checkpoints/<run>")
    print(model.generate("ROMEO:", length=200, temperature=0.8))
"""
__version__ = "0.1.0"

from .api import TextModel, generate, load, train  # noqa: E402
from .errors import OutputError, SettingError, StopTraining, UsageError  # noqa: E402
from .model import CharLSTM, ModelConfig  # noqa: E402
from .tokenizer import CharTokenizer  # noqa: E402

__all__ = ["CharLSTM", "CharTokenizer", "ModelConfig", "OutputError", "SettingError", "StopTraining", "TextModel",
           "UsageError", "generate", "load", "train", "__version__"]

"""textgen: a character-level LSTM text generator."""
__version__ = "0.1.0"

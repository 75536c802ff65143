"""The layout models are shared in: a folder of model.safetensors, config.json and vocab.json.

model.safetensors holds the model's state dict as it is (named like nn.LSTM: ``lstm.weight_ih_l0``,
...; the adaptive head's ``head.rank`` in int64), the weights generation uses; config.json the model
config's fields, flat, with ``model_type`` and textgen's version; vocab.json each character and its
id, ``{"\\n": 0, " ": 1, ...}``. ``textgen.load(FOLDER)`` reads it back (``read``): there is no
digest here, but safetensors is a checked format (a header of names, dtypes, shapes and offsets that
must match the bytes), and every tensor's name and shape, the config and the vocabulary are checked
against each other, each mismatch one sentence.
"""
from __future__ import annotations

import json
import os
from dataclasses import fields

from ..errors import UsageError
from ..files import write_bytes, write_text
from ..lstm import CharLSTM, ModelConfig
from ..tokenizer import CharTokenizer
from . import require

WEIGHTS, CONFIG, VOCAB = "model.safetensors", "config.json", "vocab.json"
MODEL_TYPE = "textgen-char-lstm"


def write(folder: str, model, info: dict) -> list[str]:
    """The three files in folder (new, or empty); returns their paths."""
    safetensors_torch = require("safetensors.torch", "safetensors")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    data = safetensors_torch.save(state, metadata={"format": "pt", "textgen_version": info["textgen_version"]})
    config = {"model_type": MODEL_TYPE, **info["model_config"], "textgen_version": info["textgen_version"],
              "step": info["step"]}
    vocab = {ch: i for i, ch in enumerate(info["vocab"])}
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot make the folder {folder}: {(e.strerror or str(e)).lower()}") from None
    paths = [os.path.join(folder, name) for name in (WEIGHTS, CONFIG, VOCAB)]
    write_bytes(paths[0], data)
    write_text(paths[1], json.dumps(config, indent=2) + "\n")
    write_text(paths[2], json.dumps(vocab, ensure_ascii=False, indent=0) + "\n")
    return paths


def is_export(path: str) -> bool:
    """A safetensors export: a folder holding model.safetensors, or a .safetensors file."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, WEIGHTS))) or \
        (os.path.isfile(path) and path.endswith(".safetensors"))


def read(path: str) -> tuple[CharLSTM, CharTokenizer, dict]:
    """The model, tokenizer and config.json of an export folder (or its model.safetensors); UsageError
    with one sentence for anything that does not fit."""
    folder, weights = (path, os.path.join(path, WEIGHTS)) if os.path.isdir(path) else (os.path.dirname(path), path)
    config_path, vocab_path = os.path.join(folder, CONFIG), os.path.join(folder, VOCAB)
    config_json, vocab_json = _json(config_path), _json(vocab_path)
    if not isinstance(config_json, dict) or config_json.get("model_type") != MODEL_TYPE:
        raise UsageError(f"{config_path} does not describe a textgen model (model_type is not {MODEL_TYPE!r})")
    known = {f.name for f in fields(ModelConfig)}
    try:
        config = ModelConfig(**{k: v for k, v in config_json.items() if k in known})
        config.cutoffs, config.style_names = tuple(config.cutoffs), tuple(config.style_names)
        model = CharLSTM(config)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{config_path} holds an invalid model configuration: {e}") from None
    chars = _vocabulary(vocab_json, vocab_path)
    if len(chars) != config.vocab_size:
        raise UsageError(f"{vocab_path} has {len(chars)} characters but {config_path} says vocab_size "
                         f"{config.vocab_size}; the files come from different models")
    tokenizer = CharTokenizer("".join(chars))
    if tokenizer.chars != "".join(chars):
        raise UsageError(f"{vocab_path} does not number the characters in code-point order, as textgen does")
    model.load_state_dict(_tensors(weights, model), strict=True)
    return model.eval(), tokenizer, config_json


def _json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path} is missing; a safetensors export is a folder of {WEIGHTS}, {CONFIG} and "
                         f"{VOCAB}") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not readable JSON ({str(e).splitlines()[0]})") from None


def _vocabulary(vocab_json, path: str) -> list[str]:
    """vocab.json's characters in id order: every id from 0 up once, every key one character."""
    if not isinstance(vocab_json, dict) or not vocab_json:
        raise UsageError(f"{path} must map each character to its id")
    by_id = sorted((i, ch) for ch, i in vocab_json.items() if isinstance(i, int) and len(ch) == 1)
    if len(by_id) != len(vocab_json) or [i for i, _ in by_id] != list(range(len(by_id))):
        raise UsageError(f"{path} must map single characters to the ids 0 to {len(vocab_json) - 1}, each once")
    return [ch for _, ch in by_id]


def _tensors(weights: str, model: CharLSTM) -> dict:
    """model.safetensors' tensors, each name, dtype and shape checked against the config's model."""
    safetensors_torch = require("safetensors.torch", "safetensors")
    try:
        with open(weights, "rb") as f:
            state = safetensors_torch.load(f.read())
    except FileNotFoundError:
        raise UsageError(f"{weights} is missing") from None
    except Exception as e:        # SafetensorError and the header's own errors: a damaged or foreign file
        raise UsageError(f"{weights} is not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        what = f"lacks {', '.join(missing[:3])}" if missing else f"has tensors the model lacks: {', '.join(extra[:3])}"
        raise UsageError(f"{weights} does not fit config.json: it {what}")
    for name in expected:                 # in the model's order: the first layer that differs is named
        tensor = state[name]
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise UsageError(f"{weights} does not fit config.json: {name} is {tensor.dtype} "
                             f"{tuple(tensor.shape)}, the model needs {expected[name].dtype} "
                             f"{tuple(expected[name].shape)}")
    return state

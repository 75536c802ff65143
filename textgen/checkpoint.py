"""All checkpoint I/O: the one module that calls torch.save and torch.load.

A checkpoint is one file holding a plain dict of tensors, numbers, strings,
lists and dicts (so it loads with ``torch.load(weights_only=True)``, which
never runs code from the file):

    format, version          "textgen", FORMAT_VERSION
    model_config             asdict(ModelConfig): the only description of the architecture
    train_config             asdict(TrainConfig)
    vocab                    {"chars": the vocabulary in id order}
    model, optimizer         state dicts
    averaged_model           (runs with --ema) the averaged weights: what validation scored, what generation uses
    step, plan               steps done; total steps the schedule is planned over
    planned, replans         whether a time budget has been turned into the plan; how often it was timed again
    loader                   {"train": {...}, "val": {...}} positions
    carried_state            [[h, c], ...] per layer, the state each training stream ended in
    rng                      torch (cpu and cuda), numpy and Python generator states
    history                  logged metrics, one dict per log line
    best_val_loss, elapsed, corpus, created
    integrity                {"sha256": ...} of everything above (``digest``), checked on every load:
                             a bit that changed on disk is found, not trained or sampled from

Every load also checks what each field textgen reads holds (``_FIELDS``: a step is a whole number,
the vocabulary text, the weights tensors): a digest can be written again by anybody, so a file
that was changed and "signed" is refused in one sentence naming the field, not met as a
TypeError wherever the field is read.

A run folder holds ``latest.pt``, the last ``keep`` step checkpoints
``step-0001234.pt`` (hard links to what latest.pt was when written, so
keeping them costs no extra disk) and ``best.pt``; their names, and finding
a run's checkpoint, are run_folder's.

Imports model (to rebuild it), tokenizer, settings (the declared kinds), files (the one writer),
run_folder (the layout) and errors; never training, sampling or cli.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import sys
import zipfile
from dataclasses import fields

import torch

from . import files, settings
from .errors import UsageError
from .run_folder import BEST, LATEST, STEP_FILE, resolve, step_filename
from .lstm import DROPOUT_FIELDS, CharLSTM, ModelConfig
from .tokenizer import CharTokenizer

FORMAT = "textgen"
FORMAT_VERSION = 2          # 2: every checkpoint carries its digest (1: written before digests, loads unchecked)


def digest(payload: dict) -> str:
    """sha256 of a checkpoint's contents, integrity aside: every key, number, string and tensor
    (dtype, shape and bytes), walked in a fixed order, so the same contents give the same digest
    before torch.save and after torch.load."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "integrity"})
    return h.hexdigest()


def _feed(h, value) -> None:
    if isinstance(value, torch.Tensor) and value.layout != torch.strided:
        # textgen writes none, but a file may hold a sparse tensor: digest its indices and values (as a
        # tensor of strided layout is digested, ordinary checkpoints keep the digest they were written with)
        t = value.detach().cpu()
        t = t if t.layout == torch.sparse_coo else t.to_sparse()
        h.update(f"S{value.layout}{t.dtype}{tuple(t.shape)};".encode())
        _feed(h, t._indices())
        _feed(h, t._values())
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(b"D%d;" % len(value))
        for key in sorted(value, key=repr):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(b"L%d;" % len(value))
        for item in value:
            _feed(h, item)
    else:            # str, int, float (repr is exact), bool, None
        h.update(f"{type(value).__name__}:{value!r};".encode())


def atomic_save(payload: dict, path: str) -> None:
    """Write payload, with its digest, to path so that a crash at any moment leaves the old file or the new one."""
    payload = {**payload, "integrity": {"sha256": digest(payload)}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with files.output(path, "wb", replace="checkpoint") as f:
        torch.save(payload, f)


def save_run_checkpoint(payload: dict, run_dir: str, keep: int, is_best: bool) -> str:
    """Write latest.pt, keep the last `keep` step files and, if is_best, best.pt."""
    latest = os.path.join(run_dir, LATEST)
    for name in os.listdir(run_dir):
        if name.startswith(f".{LATEST}.tmp-"):
            os.unlink(os.path.join(run_dir, name))   # left by a run killed mid-save
    atomic_save(payload, latest)
    if keep > 0:
        files.link(latest, os.path.join(run_dir, step_filename(payload["step"])))
        steps = sorted(f for f in os.listdir(run_dir) if STEP_FILE.fullmatch(f))
        for old in steps[:-keep]:
            os.unlink(os.path.join(run_dir, old))
    if is_best:
        files.link(latest, os.path.join(run_dir, BEST))
    files.fsync_folder(run_dir)
    return latest


def load(path: str, map_location="cpu", note=None) -> dict:
    """Load and check a checkpoint file, its digest included; every way it can be wrong is a UsageError.

    note(message) hears that a checkpoint from before digests loaded unchecked (default: stderr)."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder; pass a checkpoint file or use resolve()")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        # torch.save writes a zip archive; anything else (random bytes, a bare or legacy
        # pickle) is not ours, and is never handed to the unpickler at all.
        raise UsageError(f"{path} is not a textgen checkpoint (not a PyTorch checkpoint file)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "Unsupported operand" in str(e):
            raise UsageError(
                f"{path} was refused: it contains Python objects that could run code when loaded, "
                f"which textgen checkpoints never do"
            ) from None
        raise UsageError(f"{path} is corrupt ({_first_line(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise UsageError(f"{path} is truncated or corrupt: {_first_line(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UsageError(f"{path} is a PyTorch file but not a textgen checkpoint")
    version = ckpt.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UsageError(
            f"{path} was written by a newer textgen (checkpoint format {version}; this version reads "
            f"up to {FORMAT_VERSION}); upgrade textgen to use it"
        )
    for key in ("model_config", "vocab", "model", "step"):
        if key not in ckpt:
            raise UsageError(f"{path} is an incomplete textgen checkpoint (no {key!r})")
    _check_integrity(ckpt, path, note)
    _check_fields(ckpt, path)
    return ckpt


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return _whole(value) or isinstance(value, float)


def _tensors(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                           and t.layout == torch.strided for k, t in value.items())


# Each field textgen reads from a checkpoint: what it must be, in words, and the test. A digest says only
# that the file is as it was written; anybody can write a file and its digest ("sign" it), so what the
# fields hold is checked here, once, rather than met as a TypeError wherever a field is read. A field
# left out passes: checkpoints from before it existed have none.
_FIELDS = {
    "model_config": ("a dict of the model's settings", lambda v: isinstance(v, dict)),
    "train_config": ("a dict of the training settings", lambda v: isinstance(v, dict)),
    "vocab": ('a dict holding the vocabulary as "chars"', lambda v: isinstance(v, dict)),
    "model": ("a dict of tensors", _tensors),
    "averaged_model": ("a dict of tensors, or None", lambda v: v is None or _tensors(v)),
    "optimizer": ("a dict", lambda v: isinstance(v, dict)),
    "step": ("a whole number of 0 or more", lambda v: _whole(v) and v >= 0),
    "plan": ("a whole number, or None", lambda v: v is None or _whole(v)),
    "replans": ("a whole number", _whole),
    "validations": ("a whole number", _whole),
    "elapsed": ("a number of seconds", _number),
    "eval_seconds": ("a number of seconds", _number),
    "best_val_loss": ("a number, or None", lambda v: v is None or _number(v)),
    "first_loss": ("a number, or None", lambda v: v is None or _number(v)),
    "history": ("a list of dicts", lambda v: isinstance(v, list) and all(isinstance(row, dict) for row in v)),
    "loader": ('a dict holding the "train" stream\'s position',
               lambda v: isinstance(v, dict) and isinstance(v.get("train"), dict)
               and _whole(v["train"].get("position")) and 0 <= v["train"]["position"] < 2**62),
    "carried_state": ("a list of (h, c) tensor pairs, or None",
                      lambda v: v is None or isinstance(v, (list, tuple)) and all(
                          isinstance(pair, (list, tuple)) and len(pair) == 2
                          and all(isinstance(t, torch.Tensor) for t in pair) for pair in v)),
    "rng": ("a dict of random generator states", lambda v: isinstance(v, dict)),
    "interval_sums": ("a dict of numbers", lambda v: isinstance(v, dict) and all(map(_number, v.values()))),
    "scaler": ("a dict, or None", lambda v: v is None or isinstance(v, dict)),
    "corpus": ("a dict describing the text",
               lambda v: isinstance(v, dict) and all(isinstance(v[k], str) for k in ("path", "sha256") if k in v)
               and all(_whole(v[k]) for k in ("size_bytes", "characters") if k in v)),
    "created": ("a date as text, or None", lambda v: v is None or isinstance(v, str)),
}


def _described(value) -> str:
    """A field's value as a sentence shows it: 'thirty', 5, a list, a sparse tensor."""
    if value is None or isinstance(value, (str, int, float)):
        return settings.shown(value)
    if isinstance(value, torch.Tensor):
        return "a tensor" if value.layout == torch.strided else "a sparse tensor"
    return "a dict" if isinstance(value, dict) else "a list" if isinstance(value, (list, tuple)) else \
        f"a {type(value).__name__}"


def _check_fields(ckpt: dict, path: str) -> None:
    """UsageError, one sentence naming the field, for a field that does not hold what textgen writes there."""
    def need(label: str, value, ok: bool, expected: str) -> None:
        if not ok:
            raise UsageError(f"{path} is not a valid textgen checkpoint: its {label} is {_described(value)}, "
                             f"not {expected}")
    for key, (expected, test) in _FIELDS.items():
        if key in ckpt:
            value = ckpt[key]
            if test is _tensors and isinstance(value, dict):        # name the entry that is not a plain tensor
                for name, tensor in value.items():
                    need(f"{key}'s {name}", tensor, _tensors({name: tensor}), "a tensor")
            need(key, value, test(value), expected)
    chars = ckpt["vocab"].get("chars")
    need("vocabulary", chars, isinstance(chars, str) and len(chars) > 0 and len(set(chars)) == len(chars),
         "text holding each of its characters once")
    config = ckpt["model_config"]
    need("model_config's vocab_size", config.get("vocab_size"), _whole(config.get("vocab_size")), "a whole number")
    names = config.get("style_names", ())
    need("model_config's style_names", names, isinstance(names, (list, tuple)) and len(set(names)) == len(names)
         and all(isinstance(name, str) and name for name in names), "a list of distinct style names")
    for f in settings.declared(ModelConfig):
        if f.name in config:
            expected = settings.kind_problem(f, config[f.name])
            need(f"model_config's {f.name}", config[f.name], expected is None, expected or "")


def _check_integrity(ckpt: dict, path: str, note) -> None:
    saved = ckpt.get("integrity")
    if saved is None and ckpt.get("version", 1) < 2:
        (note or _note_once)(f"{path} was written before checkpoints carried a digest, so it is loaded unchecked")
        return
    if not isinstance(saved, dict) or saved.get("sha256") != digest(ckpt):
        sibling = _older_sibling(path)
        advice = (f"{sibling}, another step checkpoint of the same run, is a separate file: resume or "
                  f"generate from it" if sibling else "no other step checkpoint of the run is a separate file")
        raise UsageError(f"{path} is corrupt: its contents no longer match the digest written with them (a bit "
                         f"changed on disk or on the way); {advice}")


_NOTED: set[str] = set()


def _note_once(message: str) -> None:
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"note: {message}", file=sys.stderr, flush=True)


def _older_sibling(path: str) -> str | None:
    """The newest step-*.pt beside path that is not the same file under another name (step files are
    hard links to what latest.pt was, so the newest is often this very file)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        this = os.stat(path)
        names = sorted((n for n in os.listdir(folder) if STEP_FILE.fullmatch(n)), reverse=True)
    except OSError:
        return None
    own = os.path.basename(path)
    for name in names:
        if own.startswith("step-") and name >= own:
            continue                          # a corrupt step file: only earlier steps are "before" it
        other = os.path.join(folder, name)
        try:
            if not os.path.samestat(this, os.stat(other)):
                return os.path.join(os.path.dirname(path), name)
        except OSError:
            continue
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def model_config_of(ckpt: dict) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    # Unknown keys (from a later minor version) are ignored so old code reads new files;
    # missing keys fall back to the dataclass defaults so new code reads old files.
    saved = dict(ckpt["model_config"])
    saved.setdefault("head", "full")          # written before the adaptive head existed
    saved.setdefault("residual", False)       # written before layers had residual connections
    saved["style_names"] = tuple(saved.get("style_names", ()))     # () before styles: the model it always was
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


def parameter_count(ckpt: dict) -> int:
    """The model's parameters, counted from its saved tensors (not the adaptive head's integer ranks)."""
    return sum(t.numel() for t in ckpt["model"].values() if t.is_floating_point())


def summary(ckpt: dict, path: str = "checkpoint") -> dict:
    """What a checkpoint holds (a loaded one, its fields checked), without building its model: what
    `textgen info` prints and the server's model list returns."""
    try:
        config = model_config_of(ckpt)
        config.resolve_head()
    except (TypeError, ValueError, ArithmeticError) as e:
        raise UsageError(f"{path} has an invalid model configuration: {_first_line(e)}") from None
    averaged = ckpt.get("averaged_model") is not None
    return {
        "layers": config.layers, "hidden_size": config.hidden_size, "embed_size": config.embed_size,
        "residual": config.residual, "head": config.head, "styles": list(config.style_names),
        "cutoffs": list(config.cutoffs) if config.head == "adaptive" else [],
        "regularisers": {name: getattr(config, name) for name in DROPOUT_FIELDS if getattr(config, name)},
        "locked_dropout": config.locked_dropout,
        "averaged_weights": averaged, "ema": ckpt.get("train_config", {}).get("ema") if averaged else None,
        "parameters": parameter_count(ckpt), "vocab": list(ckpt["vocab"]["chars"]),
        "corpus": ckpt.get("corpus", {}), "steps": ckpt["step"], "plan": ckpt.get("plan"),
        "best_val_loss": ckpt.get("best_val_loss"), "elapsed": ckpt.get("elapsed", 0.0),
        "created": ckpt.get("created"), "version": ckpt.get("version"),
    }


def build_model(ckpt: dict, path: str = "checkpoint", averaged: bool = True) -> tuple[CharLSTM, CharTokenizer]:
    """The model and tokenizer a checkpoint describes, weights loaded (on the CPU).

    A run trained with an average of its weights (--ema) saves both: the averaged weights, what
    validation scored and what generation should use (``averaged``), and the training weights
    the run resumes from (``averaged=False``)."""
    try:
        config = model_config_of(ckpt)
        tokenizer = CharTokenizer.from_dict(ckpt["vocab"])
        model = CharLSTM(config)
    except (TypeError, ValueError, KeyError) as e:
        raise UsageError(f"{path} has an invalid model configuration: {_first_line(e)}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise UsageError(f"{path}: its vocabulary has {tokenizer.vocab_size} characters but its config says "
                         f"{config.vocab_size}")
    weights = ckpt.get("averaged_model") if averaged else None
    try:
        model.load_state_dict(weights if weights is not None else ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: its tensors do not match its model config ({_first_line(e)})") from None
    return model, tokenizer


def load_model(path: str, prefer_best: bool = True, device="cpu") -> tuple[CharLSTM, CharTokenizer, dict]:
    """Resolve, load and build in one call: what generate, evaluate and the API use."""
    file = resolve(path, prefer_best=prefer_best)
    ckpt = load(file)
    model, tokenizer = build_model(ckpt, file)
    model.to(device).eval()
    return model, tokenizer, ckpt

"""Build or restore a run: `build_run` claims the folder, prepares the corpus, chooses the size,
builds the model, its average and optimizer, and restores a checkpoint's state, returning a `Run`
that the loop (loop.py) only has to step.

The order is the contract: settings are merged and checked first, the folder is claimed (locked,
checked) before anything is prepared, so a second trainer or a run into a finished run's folder
stops at once having written nothing; a failure after the claim gives the folder back.
"""
from __future__ import annotations

import copy
import os
import sys

import numpy as np
import torch

from .. import checkpoint
from . import schedule, sizing
from . import distributed as dist_util
from ..corpus import PreparedCorpus, prepare
from ..data import StreamLoader, check_trainable, split_tokens
from ..devices import check_fits, native_bf16, resolve_device, resolve_dtype
from ..errors import SettingError, UsageError
from ..lstm import AdaptiveHead, CharLSTM, ModelConfig
from ..rng import seed_everything
from ..styles import style_map
from ..run_folder import RunFolder, checkpoint_folder, default_path, resolve, run_path
from ..tokenizer import CharTokenizer, UnknownCharactersError
from .config import (LOW_PRECISION, TrainConfig, check_architecture, check_resumable_in_place, check_steps_left,
                     corpus_stem, DEFAULT_CORPUS, merge_resumed_config, model_setting_error)
from .state import Progress, Run, restore


def build_run(model_config: ModelConfig | None, config: TrainConfig, resume: str | None = None,
              explicit: set[str] = frozenset(), log=print, overwrite: bool = False) -> Run:
    """A ready run, new (model_config: the architecture asked for; None for the defaults) or resumed
    from the checkpoint `resume` names (explicit: the settings given, which a resume may change)."""
    dist = dist_util.context()
    log = log if dist.is_main else (lambda message: None)   # only rank 0 speaks
    if overwrite and resume is not None:
        raise UsageError("{overwrite} starts a new run; it cannot be combined with {resume}", overwrite=True,
                         resume=...)
    ckpt = None
    if resume is not None:
        ckpt = checkpoint.load(resolve(resume, prefer_best=False))
        config = merge_resumed_config(ckpt, config, set(explicit), log)
        model_config = check_architecture(ckpt, model_config, set(explicit))
    config.validate()
    if ckpt is not None:
        check_steps_left(ckpt, config, resume)
    folder = claim_folder(dist, config, resume, overwrite)
    try:
        return _build(dist, folder, model_config, config, ckpt, resume, set(explicit), log)
    except BaseException:
        folder.abandon()
        raise


def claim_folder(dist, config: TrainConfig, resume: str | None, overwrite: bool) -> RunFolder:
    """Rank 0 chooses and locks the run folder; every rank learns the folder or the refusal."""
    error, path, created = None, None, False
    if dist.is_main:
        try:
            resumed_from = checkpoint_folder(resume) if resume is not None else None
            if config.out or config.name:
                path = config.out or run_path(config.name)
            elif resumed_from is not None:
                path = resumed_from
            else:
                path, created = default_path(corpus_stem(config.text)), True
            folder = RunFolder(path, created=created)
            # Resuming with --out elsewhere forks the run: the new folder gets a new run's rules.
            same = resumed_from is not None and os.path.realpath(path) == os.path.realpath(resumed_from)
            if same:
                check_resumable_in_place(resolve(resume, prefer_best=False), path)
            folder.claim(new_run=not same, overwrite=overwrite)
        except UsageError as e:
            error = e                        # sent whole, so every front end still words it
    error, path = dist.broadcast((error, path))
    if error:
        raise error
    return folder if dist.is_main else RunFolder(path)      # other ranks never write it


def _build(dist, folder: RunFolder, model_config: ModelConfig | None, config: TrainConfig, ckpt: dict | None,
           resume: str | None, explicit: set[str], log) -> Run:
    device = dist.device if dist.enabled else resolve_device(config.device)
    config.dtype = resolve_dtype(config.dtype, device)     # recorded as resolved, so resume keeps it

    corpus = prepare_corpus(dist, config, ckpt, log)
    tokenizer = corpus.tokenizer
    style_names, styles = style_map(corpus) if config.styles else ((), None)     # its refusals come first
    train_tokens, val_tokens = split_tokens(corpus.tokens, config.val_fraction)     # read-only memory maps
    if config.eval_chars:
        if config.eval_chars < config.seq_len < len(val_tokens):     # the cut, not the tail, is short
            raise SettingError("eval_chars", f"must be 0 (all of the tail) or at least one chunk, "
                                             f"{config.seq_len:,} characters, got {config.eval_chars:,}")
        # The same leading stretch of the tail every time, so evaluations stay comparable.
        val_tokens = val_tokens[: config.eval_chars + 1]
    check_trainable(len(train_tokens), len(val_tokens), config.batch_size, config.seq_len, config.val_fraction)

    if ckpt is None:
        seed_everything(config.seed)
        model_config = model_config or ModelConfig(vocab_size=tokenizer.vocab_size)
        model_config.vocab_size = tokenizer.vocab_size
        model_config.style_names = style_names
        try:
            model_config.resolve_head()
            model_config.validate()
            choose_size(model_config, config, explicit, dist, train_tokens, device, log)
        except ValueError as e:
            raise model_setting_error(e) from None
        check_fits(model_config.num_parameters(), device)      # before a byte is allocated
        model = CharLSTM(model_config)
        if isinstance(model.head, AdaptiveHead):
            counts = np.bincount(train_tokens, minlength=tokenizer.vocab_size)
            model.head.order_by_frequency(torch.from_numpy(counts))
    else:
        model, _ = checkpoint.build_model(ckpt, averaged=False)
        if tuple(model.config.style_names) != style_names:
            raise UsageError(f"{corpus.info['path']} gives the styles {', '.join(style_names) or '(none)'}, but the "
                             f"run learnt {', '.join(model.config.style_names) or '(none)'}; pass the files it "
                             f"was trained on, or start a new run")
    model.to(device)
    averaged = None
    if config.ema > 0:
        averaged = copy.deepcopy(model).eval().requires_grad_(False)
        if ckpt is not None and ckpt.get("averaged_model") is not None:
            averaged.load_state_dict(ckpt["averaged_model"])
    model.lstm.matmul_dtype = LOW_PRECISION.get(config.dtype)
    # float16's narrow range needs loss scaling: the scaler multiplies the loss before
    # backward, skips a step whose gradients overflowed and adapts the scale. It is a
    # no-op for float32 and bfloat16 (which has float32's range).
    scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == "float16")
    if dist.is_main:
        warn_about_dtype(config.dtype, device)
    first, count = dist.stream_share(config.batch_size)
    train_model = dist.wrap(model)
    if config.compile:
        # Compiles on the first steps (a slow start); the checkpoint keeps the plain model's state.
        train_model = torch.compile(train_model)
    run = Run(config=config, model_config=model.config, dist=dist, folder=folder, device=device, corpus=corpus,
              train_tokens=train_tokens, val_tokens=val_tokens, model=model, averaged=averaged,
              train_model=train_model, optimizer=make_optimizer(model, config, device), scaler=scaler,
              loader=StreamLoader(train_tokens, config.batch_size, config.seq_len, first_stream=first,
                                  num_streams=count, styles=styles),
              val_styles=styles.shifted(len(train_tokens)) if styles is not None else None,
              progress=Progress(budget=schedule.TimeBudget.start(config.time_budget, config.steps)))
    if ckpt is not None:
        restore(run, ckpt, resume)
    return run


def warn_about_dtype(dtype: str, device: torch.device) -> None:
    if dtype == "float16" and device.type == "cpu":
        print("warning: --dtype float16 is meant for GPUs; most CPUs emulate it, slower than float32 "
              "(use bfloat16 or float32 on a CPU)", file=sys.stderr)
    if dtype == "bfloat16" and device.type == "cpu" and not native_bf16(device):
        # auto never chooses it here; a user who asks gets trained, but told why it crawls.
        print("warning: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so --dtype bfloat16 is emulated "
              "and many times slower than float32 (30x on an AMD EPYC Zen 3); --dtype auto picks float32 here",
              file=sys.stderr)


def make_optimizer(model: CharLSTM, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # No weight decay on biases and the embeddings (of characters and styles): decaying them only hurts.
    embedding = ("embedding", "style_embedding")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith(embedding)]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith(embedding)]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99), foreach=device.type != "cpu" or None)


def prepare_corpus(dist, config: TrainConfig, ckpt: dict | None, log) -> PreparedCorpus:
    """The corpus tokenized (and cached), in the checkpoint's vocabulary when resuming; rank 0
    prepares the cache and the other ranks then find it ready."""
    spec = config.text or DEFAULT_CORPUS
    imposed = CharTokenizer.from_dict(ckpt["vocab"]) if ckpt is not None else None

    def attempt() -> PreparedCorpus:
        try:
            return prepare(spec, config.cache_dir, config.separator, tokenizer=imposed,
                           progress=dist.is_main and not config.quiet and sys.stderr.isatty(),
                           log=None if config.quiet else log)
        except UnknownCharactersError as e:
            if not config.allow_new_text:
                raise UsageError(f"{spec} is not the text this run was trained on (it has characters the "
                                 f"run never saw); pass that text, or start a new run") from None
            raise UsageError(f"{spec}: {e}; a resumed run cannot learn new characters, "
                             f"start a new run instead") from None

    if dist.is_main:
        try:
            corpus = attempt()
        finally:
            dist.barrier()
    else:
        dist.barrier()
        corpus = attempt()
    if ckpt is not None:
        check_corpus(ckpt, corpus, config.allow_new_text, log)
    return corpus


def check_corpus(ckpt: dict, corpus: PreparedCorpus, allow_new_text: bool, log) -> None:
    old = ckpt.get("corpus", {})
    if old.get("sha256") == corpus.sha256:
        return
    if allow_new_text:
        log(f"continuing on new text {corpus.info['path']} with the checkpoint's vocabulary")
        return
    raise UsageError(
        f"{corpus.info['path']} is not the text this run was trained on ({old.get('path', 'unknown')}, "
        f"sha256 {old.get('sha256', '?')[:12]}); pass that text, or {{allow_new_text}} to continue on this one",
        allow_new_text=True
    )


def choose_size(model_config: ModelConfig, cfg: TrainConfig, explicit: set[str], dist, train_tokens,
                device: torch.device, log) -> None:
    """--size: the hidden size, layers and dropout the user did not give, chosen for this text
    and budget (sizing.py), and one log line saying what and why."""
    fixed = {name: getattr(model_config, name)
             for name in ("layers", "hidden_size", "dropout", *sizing.REGULARISERS) if name in explicit}
    given = sizing.parse_size(cfg.size)
    if given is not None:
        fixed.setdefault("layers", given[0])
        fixed.setdefault("hidden_size", given[1])
    if {"layers", "hidden_size", "dropout"} <= fixed.keys():
        model_config.layers, model_config.hidden_size, model_config.dropout = \
            fixed["layers"], fixed["hidden_size"], fixed["dropout"]
        return
    chars_per_step = cfg.batch_size * cfg.seq_len
    timed = sizing.timed_config(model_config, fixed)
    measured: dict[tuple[int, int], float] = {}

    def seconds_per_unit(config: ModelConfig) -> float:
        """Seconds per character and unit of cost: timed on the main process, the same on every one."""
        key = (config.layers, config.hidden_size)
        if key not in measured:
            seconds = None
            if dist.is_main:
                streams = dist.stream_share(cfg.batch_size)[1]
                size = streams * (cfg.seq_len + 1)
                window = np.resize(train_tokens[:size], size).astype(np.int64)
                window = torch.from_numpy(window).view(streams, cfg.seq_len + 1).to(device)
                seconds = sizing.measure(config, (window[:, :-1], window[:, 1:]), LOW_PRECISION.get(cfg.dtype),
                                         device) / dist.world_size
            measured[key] = dist.broadcast(seconds)
        return measured[key]

    def budget_chars(config: ModelConfig) -> float:
        by_steps = cfg.steps * chars_per_step
        if cfg.time_budget is None:
            return by_steps
        # Models smaller than the reference use the cores less well than its time scaled by
        # multiply-adds says (0.1 MB of code: 416 passes planned, 292 read, and dropout one step
        # too high), and they take a fraction of a second to time themselves.
        own = sizing.cost_per_char(config) < sizing.cost_per_char(timed)
        per_unit = seconds_per_unit(config if own else timed)
        by_time = sizing.TRAINING_SHARE * cfg.time_budget / (per_unit * sizing.cost_per_char(config))
        return min(by_steps, by_time)

    choice = sizing.choose(model_config, len(train_tokens), budget_chars, fixed)
    model_config.layers, model_config.hidden_size, model_config.dropout = \
        choice.layers, choice.hidden_size, choice.dropout
    for name, value in (choice.regularisers or {}).items():
        setattr(model_config, name, value)
    log(f"size {cfg.size}: {choice.layers}x{choice.hidden_size}, dropout {choice.dropout:g}; {choice.reason}")

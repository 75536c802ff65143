"""One training step and one validation of a run: the functions the loop calls, over a `Run`.

Each step takes the next chunk of every stream, runs the model from the state the previous chunk
ended in, steps the optimizer and detaches the state, which then carries on to the next chunk for
the whole run (validation has its own state and leaves this one alone). The one deliberate
exception: each step one stream, in turn, starts from a zero state (`restart_one_stream` says why).
"""
from __future__ import annotations

import math

import torch

from ..errors import StopTraining
from ..evaluate import cross_entropy
from ..lstm import detach_state
from ..generation.generator import sample
from ..generation.sampling import SampleConfig
from .config import lr_at
from .state import Run

# float16 gradients underflow without loss scaling: when the scale has been halved
# this far (from 65536) the gradients overflow whatever the scale, i.e. training diverged.
MIN_LOSS_SCALE = 1.0


def train_step(run: Run) -> tuple[float, float | None]:
    """One optimizer step: (the loss, the gradient norm; None where float16 overflowed and the step was skipped)."""
    p, config = run.progress, run.config
    x, y, styles = run.loader.next_labelled_batch()
    x = torch.from_numpy(x).to(run.device, non_blocking=True)
    y = torch.from_numpy(y).to(run.device, non_blocking=True)
    styles = torch.from_numpy(styles).to(run.device, non_blocking=True) if styles is not None else None
    lr = lr_at(p.step, p.budget.plan, config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss, state = run.train_model(x, restart_one_stream(p.state, p.step, config.batch_size, run.dist), targets=y,
                                  styles=styles)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)               # clip the true gradients, not the scaled ones
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip))
    loss_value = run.dist.mean(loss.detach())
    overflow = run.scaler.is_enabled() and not math.isfinite(grad_norm)
    if p.first_loss is None:
        p.first_loss = loss_value
    guard(p.step + 1, loss_value, 0.0 if overflow else grad_norm, p.first_loss)
    run.scaler.step(run.optimizer)                    # with float16, skipped if the gradients overflowed
    run.scaler.update()
    if overflow and run.scaler.get_scale() < MIN_LOSS_SCALE:
        raise StopTraining(f"training diverged at step {p.step + 1}: the float16 gradients overflow at "
                           f"every loss scale; latest.pt still holds the last good state. Try {{dtype}} "
                           f"(or float32), or a lower {{lr}}", dtype="bfloat16", lr=...)
    p.state = detach_state(state)
    p.step += 1
    if run.averaged is not None and not overflow:
        update_average(run.averaged, run.model, config.ema, p.step)
    return loss_value, None if overflow else grad_norm


@torch.no_grad()
def update_average(averaged: torch.nn.Module, model: torch.nn.Module, ema: float, step: int) -> None:
    """averaged += (1 - decay) (weights - averaged), the decay ramping up over the first
    steps ((1 + t) / (10 + t)) so early, random weights are soon forgotten."""
    decay = min(ema, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(averaged.parameters()), [w.detach() for w in model.parameters()], 1 - decay)


def restart_one_stream(state, step: int, batch_size: int, dist):
    """The carried state with one stream zeroed, each step the next stream in turn.

    The state otherwise carries across chunks for the whole run, so without
    this the model would meet a zero state only at step 1, while generation
    always starts from one: samples from a short prompt could derail into
    noise it never learned to leave. Resetting stream (step mod B) keeps every
    stream's text contiguous and its context long (B chunks between resets).
    The index is global, so a distributed run resets the same stream.
    """
    if state is None:
        return None
    first, count = dist.stream_share(batch_size)
    stream = step % batch_size - first
    if not 0 <= stream < count:
        return state
    restarted = []
    for h, c in state:
        h, c = h.clone(), c.clone()
        h[stream] = 0
        c[stream] = 0
        restarted.append((h, c))
    return tuple(restarted)


def guard(step: int, loss: float, grad_norm: float, first_loss: float) -> None:
    """Stop before a diverged step can reach the parameters or a checkpoint."""
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        raise StopTraining(f"training diverged at step {step}: the loss is {loss} "
                           f"(gradient norm {grad_norm}); latest.pt still holds the last good state. "
                           f"Try a lower {{lr}} or {{grad_clip}}", lr=..., grad_clip=...)
    if loss > 3 * first_loss + 1:
        raise StopTraining(f"training diverged at step {step}: the loss {loss:.3f} is far above "
                           f"its starting value {first_loss:.3f}; latest.pt still holds the last good "
                           f"state. Try a lower {{lr}}", lr=...)


def validate(run: Run) -> float | None:
    """Mean cross-entropy (nats/char) of the validation tail, read from a zero state; None without one."""
    config = run.config
    if len(run.val_tokens) <= config.seq_len:
        return None
    # Validation is float32 whatever --dtype says, so its figures compare across runs and with textgen-eval.
    model = run.inference_model()
    matmul_dtype, model.lstm.matmul_dtype = model.lstm.matmul_dtype, None
    try:
        total, count = cross_entropy(model, run.val_tokens, config.batch_size, config.seq_len, run.device,
                                     shard=run.dist.shard_for_eval(), styles=run.val_styles)
    finally:
        model.lstm.matmul_dtype = matmul_dtype
    total, count = run.dist.sum_pair(total, count)
    return total / count


def sample_text(run: Run) -> str:
    """The sample a report shows: from a newline where the text has one, seeded by the step (in the first
    style, for a run with styles)."""
    prompt = "\n" if "\n" in run.tokenizer.chars else ""
    style = run.model_config.style_names[0] if run.model_config.style_names else None
    return sample(run.inference_model(), run.tokenizer, prompt,
                  SampleConfig(length=run.config.sample_length, temperature=0.8,
                               seed=run.config.seed + run.progress.step, style=style))[0]

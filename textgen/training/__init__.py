"""Training: a run is built or restored (build.py), then stepped by a loop that reads top to bottom
(loop.py). config.py declares the settings, state.py holds a run's state and its checkpoint, step.py
one step and one validation, reporter.py what a run tells.

Composes model, data, corpus, checkpoint, sampling, schedule, rng, devices, run_folder and
distributed; never cli.
"""
from .build import build_run
from .config import TrainConfig, model_setting_error
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "build_run", "model_setting_error", "train"]

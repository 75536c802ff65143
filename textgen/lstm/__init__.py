"""The LSTM and its fast path: what the rest of textgen imports from here.

model.py is the model a reader meets first: the cell gate by gate, the layer, the stack and CharLSTM,
and config.py the ModelConfig that describes it; heads.py the adaptive output layer, stepper.py generation's
one-character step. fused_lstm.py is the fast path (fused products, bf16),
proven against that cell; native_kernel.py compiles and checks lstm_kernel.c, the pointwise step in C;
rows_step.py is generation's whole step in one C call, and the draw of each row's next character.
Only this folder imports fused_lstm, and only fused_lstm and rows_step import native_kernel.
"""
from .fused_lstm import KernelUnavailable, describe_step_path
from .heads import AdaptiveHead
from .config import ADAPTIVE_FROM, DROPOUT_FIELDS, ModelConfig
from .model import CharLSTM, State, detach_state
from .rows_step import sample_rows
from .stepper import Stepper

__all__ = ["ADAPTIVE_FROM", "DROPOUT_FIELDS", "AdaptiveHead", "CharLSTM", "KernelUnavailable", "ModelConfig",
           "State", "Stepper", "describe_step_path", "detach_state", "sample_rows"]

"""The LSTM and its fast path: what the rest of textgen imports from here.

model.py is the model a reader meets first: the cell gate by gate, the layer, the stack and CharLSTM,
and config.py the ModelConfig that describes it; heads.py the adaptive output layer, stepper.py generation's
one-character step. fused_lstm.py is the fast path (fused products, bf16), proven against that cell,
with its matrix products in products.py and a step's pointwise work in steps.py; native_kernel.py
compiles and checks lstm_kernel.c, the C kernel (a step's pointwise work, a small layer's whole time
loop); rows_step.py is generation's whole step in one C call, and the draw of each row's next character;
buffers.py keeps a chunk's large buffers for the next (release_buffers gives them back).
Nothing outside this folder imports any of those but through this face.
"""
from .buffers import release as release_buffers
from .native_kernel import KernelUnavailable
from .steps import describe_step_path
from .heads import AdaptiveHead
from .config import ADAPTIVE_FROM, DROPOUT_FIELDS, ModelConfig
from .model import CharLSTM, State, detach_state
from .rows_step import sample_rows
from .stepper import Stepper

__all__ = ["ADAPTIVE_FROM", "DROPOUT_FIELDS", "AdaptiveHead", "CharLSTM", "KernelUnavailable", "ModelConfig",
           "State", "Stepper", "describe_step_path", "detach_state", "release_buffers", "sample_rows"]

"""Settings declared once (textgen/settings.py): each front end is built from the same fields."""
from dataclasses import fields

import pytest

from textgen import settings
from textgen.cli import cli_words, generate_parser, train_parser
from textgen.errors import SettingError
from textgen.lstm.model import ModelConfig
from textgen.generation.sampling import SampleConfig
from textgen.training import TrainConfig


def test_train_py_has_a_flag_for_every_setting_with_the_fields_default():
    parsed = vars(train_parser().parse_args([]))
    for cls, defaults in ((ModelConfig, ModelConfig(vocab_size=1)), (TrainConfig, TrainConfig())):
        for f in settings.declared(cls):
            assert f.name in parsed, f"train.py has no flag for {cls.__name__}.{f.name}"
            assert parsed[f.name] == getattr(defaults, f.name), (f.name, parsed[f.name], getattr(defaults, f.name))
    # Every field but the vocabulary and the style names (read from the text) and the text (the TEXT argument)
    # is a setting.
    assert {f.name for f in fields(ModelConfig)} - {f.name for f in settings.declared(ModelConfig)} == \
        {"vocab_size", "style_names"}
    assert {f.name for f in fields(TrainConfig)} - {f.name for f in settings.declared(TrainConfig)} == {"text"}


def test_generate_py_and_the_server_take_every_sampling_setting():
    from textgen.serving.server import FIELDS
    parsed = vars(generate_parser().parse_args([]))
    for f in settings.declared(SampleConfig):
        assert parsed[f.name] == getattr(SampleConfig(), f.name) and f.name in FIELDS


def test_a_flag_word_of_its_own_and_a_parsed_default():
    train_parser()
    assert settings.flag_of("time_budget") == "--time" and settings.flag_of("top_p") == "--top-p"
    args = train_parser().parse_args(["--time", "15m", "--separator", "\\n---\\n", "--cutoffs", "8,16"])
    assert (args.time_budget, args.separator, args.cutoffs) == (900.0, "\n---\n", (8, 16))


@pytest.mark.parametrize("config, field", [
    (TrainConfig(lr=20.0), "lr"), (TrainConfig(keep=-1), "keep"), (TrainConfig(dtype="float8"), "dtype"),
    (SampleConfig(top_p=0.0), "top_p"), (SampleConfig(length=0), "length"), (TrainConfig(time_budget=-1.0), "time_budget"),
])
def test_a_declared_range_is_checked_and_names_its_field(config, field):
    with pytest.raises(SettingError) as raised:
        config.validate()
    assert raised.value.field == field and str(raised.value).startswith(f"{field} must be")
    assert raised.value.worded(cli_words).startswith(settings.flag_of(field) + " must be")

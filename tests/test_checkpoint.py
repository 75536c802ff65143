"""Checkpoints: identical logits after a round trip, and every broken or hostile file refused."""
import os
import pathlib

import pytest
import torch

from textgen import run_folder
from textgen import checkpoint
from textgen.errors import UsageError
from textgen.lstm.model import CharLSTM, ModelConfig
from textgen.tokenizer import CharTokenizer


def make_payload(hidden=16):
    tok = CharTokenizer.from_text("abcdefgh \n")
    model = CharLSTM(ModelConfig(vocab_size=tok.vocab_size, embed_size=8, hidden_size=hidden, layers=2))
    payload = {"format": checkpoint.FORMAT, "version": checkpoint.FORMAT_VERSION,
               "model_config": {"vocab_size": tok.vocab_size, "embed_size": 8, "hidden_size": hidden,
                                "layers": 2, "dropout": 0.1, "residual": True},
               "vocab": tok.to_dict(), "model": model.state_dict(), "step": 7}
    return model, payload


def test_save_load_gives_identical_logits_and_loads_weights_only(tmp_path):
    model, payload = make_payload()
    path = str(tmp_path / "latest.pt")
    checkpoint.atomic_save(payload, path)
    raw = torch.load(path, weights_only=True)          # loads with weights_only=True as it is
    assert raw["step"] == 7
    loaded, tok = checkpoint.build_model(checkpoint.load(path), path)
    tokens = torch.randint(0, tok.vocab_size, (2, 9))
    model.eval(), loaded.eval()
    assert torch.equal(model(tokens)[0], loaded(tokens)[0])


def test_a_checkpoint_from_before_residual_connections_loads_as_the_plain_stack_it_was(tmp_path):
    """Files written before ModelConfig.residual existed have no such key: their models had no
    residual connections, and must load (and generate) as they were trained, not as today's default."""
    tok = CharTokenizer.from_text("abcdefgh \n")
    torch.manual_seed(0)
    old = CharLSTM(ModelConfig(vocab_size=tok.vocab_size, embed_size=8, hidden_size=16, layers=3, residual=False))
    payload = {"format": checkpoint.FORMAT, "version": checkpoint.FORMAT_VERSION,
               "model_config": {"vocab_size": tok.vocab_size, "embed_size": 8, "hidden_size": 16, "layers": 3},
               "vocab": tok.to_dict(), "model": old.state_dict(), "step": 7}
    path = str(tmp_path / "old.pt")
    checkpoint.atomic_save(payload, path)
    loaded, _ = checkpoint.build_model(checkpoint.load(path), path)
    assert loaded.config.residual is False and loaded.lstm.residual is False
    tokens = torch.randint(0, tok.vocab_size, (2, 9))
    assert torch.equal(old.eval()(tokens)[0], loaded.eval()(tokens)[0])
    assert checkpoint.summary(checkpoint.load(path))["residual"] is False


def test_run_folder_keeps_last_k_and_best(tmp_path):
    _, payload = make_payload()
    for step in range(1, 6):
        payload["step"] = step
        checkpoint.save_run_checkpoint(payload, str(tmp_path), keep=3, is_best=(step == 2))
    names = sorted(os.listdir(tmp_path))
    assert names == ["best.pt", "latest.pt", "step-0000003.pt", "step-0000004.pt", "step-0000005.pt"]
    assert checkpoint.load(str(tmp_path / "best.pt"))["step"] == 2
    assert checkpoint.load(run_folder.resolve(str(tmp_path), prefer_best=False))["step"] == 5


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _, payload = make_payload()
    payload["extra"] = Evil(str(marker))
    torch.save(payload, path)
    with pytest.raises(UsageError, match="could run code"):
        checkpoint.load(str(path))
    assert not marker.exists()


def broken_files(tmp_path):
    _, payload = make_payload()
    good = tmp_path / "good.pt"
    checkpoint.atomic_save(payload, str(good))
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    torch.save({**payload, "version": checkpoint.FORMAT_VERSION + 1}, tmp_path / "newer.pt")
    torch.save({"state_dict": payload["model"]}, tmp_path / "foreign.pt")
    # Written with its own digest, as a buggy writer would: its tensors fit another config.
    checkpoint.atomic_save({**payload, "model_config": {**payload["model_config"], "hidden_size": 32}},
                           str(tmp_path / "mismatch.pt"))


@pytest.mark.parametrize("name, message", [
    ("truncated.pt", "truncated or corrupt"),
    ("random.pt", "not a textgen checkpoint"),
    ("newer.pt", "newer textgen"),
    ("foreign.pt", "not a textgen checkpoint"),
    ("mismatch.pt", "do not match its model config"),
    ("missing.pt", "no such checkpoint"),
])
def test_broken_checkpoints_get_one_clear_sentence(tmp_path, name, message):
    broken_files(tmp_path)
    path = str(tmp_path / name)
    with pytest.raises(UsageError, match=message):
        checkpoint.build_model(checkpoint.load(path), path)

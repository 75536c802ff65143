import numpy as np
import pytest

from textgen.corpus import read_text
from textgen.data import StreamLoader, check_trainable, eval_chunks, split_tokens
from textgen.errors import UsageError


def test_chunk_k_plus_1_continues_chunk_k_in_every_stream():
    ring = np.arange(1000)
    loader = StreamLoader(ring, batch_size=4, seq_len=10)
    x1, y1 = loader.next_batch()
    x2, _ = loader.next_batch()
    assert (x2[:, 0] == x1[:, -1] + 1).all()              # contiguous across chunks
    assert (y1 == x1 + 1).all()                           # targets are the next characters
    assert (x1[:, 0] == np.arange(4) * 250).all()         # heads spaced N // B apart


def test_wrapping_keeps_every_stream_contiguous():
    ring = np.arange(100)
    loader = StreamLoader(ring, batch_size=3, seq_len=7)
    seen = [loader.next_batch()[0] for _ in range(40)]    # several epochs
    stream = np.concatenate([x[2] for x in seen])        # the last head runs off the end
    steps = np.diff(stream)
    assert set(steps.tolist()) <= {1, -99}                # only the corpus end joins its start
    assert loader.epoch > 2
    resumed = StreamLoader(ring, 3, 7)
    resumed.load_state_dict(loader.state_dict())
    assert (resumed.next_batch()[0] == loader.next_batch()[0]).all()


def test_a_rank_reads_its_share_of_the_global_streams():
    ring = np.arange(400)
    full = StreamLoader(ring, batch_size=4, seq_len=5).next_batch()[0]
    second_half = StreamLoader(ring, batch_size=4, seq_len=5, first_stream=2, num_streams=2).next_batch()[0]
    assert (second_half == full[2:]).all()


def test_eval_chunks_cover_the_text_in_contiguous_streams():
    tokens = np.arange(103)
    chunks = list(eval_chunks(tokens, batch_size=4, seq_len=10))
    xs = np.concatenate([x for x, _ in chunks], axis=1)
    ys = np.concatenate([y for _, y in chunks], axis=1)
    assert xs.shape == (4, 25) and (ys == xs + 1).all()
    assert (np.diff(xs, axis=1) == 1).all()
    assert ys.size >= len(tokens) - 1 - 3


def test_validation_is_the_tail():
    train, val = split_tokens(np.arange(100), 0.1)
    assert (val == np.arange(90, 100)).all() and len(train) == 90


def test_too_short_text_says_how_short_and_what_to_change():
    with pytest.raises(UsageError, match="need at least 520.*batch_size"):
        check_trainable(300, 100, batch_size=8, seq_len=64, val_fraction=0.1)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"hello\x00world", "binary"),
    (b"caf\xc3\xa9 ok \xff bad", "offset 9"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "f.txt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        read_text(str(path))


def test_missing_and_directory(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        read_text(str(tmp_path / "nope.txt"))
    with pytest.raises(UsageError, match="directory"):
        read_text(str(tmp_path))

import numpy as np
import pytest
import torch

from recycore.data import (DistributedTokenLoader, ShardError, load_validation_tokens, local_batch_tokens,
                           read_shard, write_shard)


def test_shard_round_trip_and_layout(tmp_path):
    tokens = np.random.randint(0, 65536, size=1001).astype(np.uint16)
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * 1001
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert list(header[:3]) == [20240520, 1, 1001] and not header[3:].any()
    assert np.array_equal(read_shard(path).numpy(), tokens)


def _corrupt(path, how):
    raw = bytearray(path.read_bytes())
    if how == "magic":
        raw[0] ^= 0xFF
    elif how == "version":
        raw[4] = 7
    elif how == "truncated":
        raw = raw[:-3]
    elif how == "header":
        raw = raw[:100]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how, message", [("magic", "bad magic"), ("version", "unsupported shard version"),
                                          ("truncated", "truncated or corrupt"), ("header", "shorter than")])
def test_corrupt_shards_name_the_file(tmp_path, how, message):
    path = tmp_path / "bad_train_000000.bin"
    write_shard(path, np.arange(50))
    _corrupt(path, how)
    with pytest.raises(ShardError, match=message) as info:
        read_shard(path)
    assert str(path) in str(info.value)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DistributedTokenLoader(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no shards matching"):
        DistributedTokenLoader(tmp_path)


def _write_stream(tmp_path, sizes):
    stream = np.random.randint(0, 1024, size=sum(sizes))
    start = 0
    for i, n in enumerate(sizes):
        write_shard(tmp_path / f"t_train_{i:06d}.bin", stream[start:start + n])
        start += n
    return torch.from_numpy(stream)


def test_rank_slicing_and_wraparound(tmp_path):
    stream = _write_stream(tmp_path, [70, 45, 33])  # 148 tokens, batches cross shard boundaries
    world, seq, accum, global_tokens = 2, 4, 2, 32
    loaders = [DistributedTokenLoader(tmp_path, rank=r, world_size=world) for r in range(world)]
    local = global_tokens // (world * accum)
    span = local + 1
    offset = 0
    for _ in range(7):  # 7 * 18 tokens > 148: wraps around to the first shard
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch(global_tokens, seq, accum)
            expected = torch.cat([stream, stream])[offset + r * span: offset + (r + 1) * span]
            assert x.shape == (local // seq, seq)
            assert torch.equal(x.reshape(-1), expected[:-1]) and torch.equal(y.reshape(-1), expected[1:])
        offset = (offset + span * world) % stream.numel()


def test_loader_state_round_trip(tmp_path):
    _write_stream(tmp_path, [40, 40])
    a = DistributedTokenLoader(tmp_path)
    for _ in range(3):
        a.next_batch(16, 4, 1)
    b = DistributedTokenLoader(tmp_path)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(u, v) for u, v in zip(a.next_batch(16, 4, 1), b.next_batch(16, 4, 1)))


def test_batch_must_split_evenly():
    assert local_batch_tokens(786_432, 2048, 8, 1) == 98_304
    with pytest.raises(ValueError, match="must be divisible by world_size x grad_accum_steps x TRAIN_SEQ_LEN"):
        local_batch_tokens(786_432, 2048, 5, 1)
    with pytest.raises(ValueError, match="TRAIN_BATCH_TOKENS=1000"):
        local_batch_tokens(1000, 64, 1, 1)


def test_validation_trim(tmp_path):
    tokens = np.random.randint(0, 1024, size=1000)
    write_shard(tmp_path / "v_val_000000.bin", tokens[:600])
    write_shard(tmp_path / "v_val_000001.bin", tokens[600:])
    val = load_validation_tokens(tmp_path, seq_len=64)
    assert val.numel() == (999 // 64) * 64 + 1
    assert np.array_equal(val.numpy(), tokens[:val.numel()])
    with pytest.raises(ValueError, match="shorter than one sequence"):
        load_validation_tokens(tmp_path, seq_len=4096)

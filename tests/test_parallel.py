"""Tests for ddpm_jax.parallel on 8 fake CPU devices (see conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import parallel


def _layout_step(state, batch, key):
    """Per-device step: gathers every device's rows and its axis index, updates state."""
    del key
    i = jax.lax.axis_index(parallel.AXIS)
    n = jax.lax.psum(1, parallel.AXIS)
    # Gathers with psum (the result is the same on every device): [n_dev, k, b_dev, ...].
    rows = jax.lax.psum(jnp.zeros((n, *batch["image"].shape), batch["image"].dtype)
                        .at[i].set(batch["image"]), parallel.AXIS)
    index = jax.lax.psum(jnp.zeros((n,), jnp.int32).at[i].set(i), parallel.AXIS)
    total = jax.lax.psum(jnp.sum(batch["image"].astype(jnp.float32)), parallel.AXIS)
    return {"x": state["x"] + total}, {"rows": rows, "index": index}


@pytest.mark.parametrize("mode", parallel.PARALLELISMS)
def test_device_i_gets_rows_of_its_slice(mode):
    dp = parallel.DataParallel(mode)
    assert dp.num_devices == 8
    k, batch = 3, 16
    data = np.arange(k * batch * 2, dtype=np.int32).reshape(k, batch, 2)
    fn = dp.compile_step(_layout_step)
    state = dp.to_device(dp.replicate({"x": np.zeros((), np.float32)}))
    state, out = fn(state, dp.shard_batch({"image": data}), jax.random.key(0))
    out = dp.first(out)
    # Device i holds rows [2i, 2i + 2) of every one of the k global batches.
    expected = data.reshape(k, 8, 2, 2).transpose(1, 0, 2, 3)
    np.testing.assert_array_equal(out["rows"], expected)
    np.testing.assert_array_equal(out["index"], np.arange(8))
    np.testing.assert_allclose(dp.first(state)["x"], data.sum())
    glob = dp.to_global(state)
    assert glob["x"].sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(glob["x"]), data.sum())


@pytest.mark.parametrize("mode", parallel.PARALLELISMS)
def test_state_round_trip_and_donation(mode):
    dp = parallel.DataParallel(mode)
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int32(7)}
    glob = dp.replicate(tree)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(glob))
    dev = dp.to_device(glob)
    if mode == "pmap":
        assert dev["a"].shape == (8, 2, 3)
    back = dp.first(dev)
    np.testing.assert_array_equal(back["a"], tree["a"])
    assert int(back["b"]) == 7
    again = dp.to_global(dev)
    assert again["a"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(again["a"]), tree["a"])


def test_unknown_parallelism():
    with pytest.raises(ValueError, match="shard_map"):
        parallel.DataParallel("tpu_magic")


def test_batch_must_divide_over_devices():
    dp = parallel.DataParallel()
    assert dp.local_batch_size(64) == 64
    with pytest.raises(ValueError, match="batch_size=8"):
        dp.local_batch_size(12)
    with pytest.raises(ValueError, match="multiple of the device count 8"):
        dp.local_batch_size(0)


def test_initialize_distributed_needs_all_or_nothing(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False
    with pytest.raises(ValueError, match="num_processes"):
        parallel.initialize_distributed("127.0.0.1:1234")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="process_id"):
        parallel.initialize_distributed(num_processes=2)

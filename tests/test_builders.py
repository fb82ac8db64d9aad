"""Tests for ddpm_jax.builders against closed forms computed here in numpy."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import builders, checkpoint, diffusion, parallel
from ddpm_jax.config_lib import load_config

ROOT = pathlib.Path(__file__).parent.parent


def _config(**diffusion_fields):
    config = load_config("test")
    config.diffusion.update(diffusion_fields)
    return config


def _numpy_betas(name, start, end, num):
    if name == "linear":
        return np.linspace(start, end, num, dtype=np.float64)
    if name == "quad":
        return np.linspace(start ** 0.5, end ** 0.5, num, dtype=np.float64) ** 2
    if name == "const":
        return np.full(num, end, np.float64)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["linear", "quad", "const"])
def test_schedule_is_make_schedule_of_the_named_betas(name):
    config = _config(beta_schedule=name, beta_start=2e-4, beta_end=0.05, num_timesteps=17)
    want = diffusion.make_schedule(_numpy_betas(name, 2e-4, 0.05, 17))
    meta = checkpoint.meta_from_config(config)
    # A ConfigDict, its diffusion section, a checkpoint's meta and a plain dict all work.
    for source in (config, config.diffusion, meta, dict(meta["diffusion"])):
        got = builders.schedule(source)
        assert got.num_timesteps == 17
        for field, value in want._asdict().items():
            np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(value),
                                          err_msg=field)


def test_schedule_bad_name_raises():
    with pytest.raises(ValueError, match="sigmoid"):
        builders.schedule(_config(beta_schedule="sigmoid"))


def test_uint8_round_trip_is_exact():
    u = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    x = builders.from_uint8(u)
    assert x.dtype == jnp.float32 and x.shape == u.shape
    # Within two float32 rounding steps of u / 127.5 - 1 (XLA may multiply by 1 / 127.5).
    np.testing.assert_allclose(np.asarray(x, np.float64), u / 127.5 - 1.0, rtol=0,
                               atol=2 * np.finfo(np.float32).eps)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    np.testing.assert_array_equal(np.asarray(builders.to_uint8(x)), u)
    np.testing.assert_array_equal(np.asarray(jax.jit(builders.to_uint8)(x)), u)


def test_to_uint8_rounds_and_clips():
    x = jnp.array([-2.0, -1.0, 1.0, 2.0, 0.0, 0.4 / 127.5 - 1.0, 0.6 / 127.5 - 1.0])
    # (x + 1) * 127.5 = clipped, 0, 255, clipped, 127.5 (rounds half to even: 128), 0.4, 0.6
    np.testing.assert_array_equal(np.asarray(builders.to_uint8(x)), [0, 0, 255, 255, 128, 0, 1])
    assert builders.to_uint8(x).dtype == jnp.uint8


def test_from_uint8_rejects_floats():
    with pytest.raises(ValueError, match="uint8"):
        builders.from_uint8(np.zeros((1, 2, 2, 3), np.float32))


def test_image_grid_layout():
    # 5 images of 2x3 with value i+1: 3 columns, 2 rows, the last cell empty.
    images = (np.arange(1, 6, dtype=np.uint8)[:, None, None, None]
              * np.ones((1, 2, 3, 1), np.uint8))
    grid = builders.image_grid(images)
    assert grid.shape == (4, 9, 1) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[..., 0], [
        [1, 1, 1, 2, 2, 2, 3, 3, 3],
        [1, 1, 1, 2, 2, 2, 3, 3, 3],
        [4, 4, 4, 5, 5, 5, 0, 0, 0],
        [4, 4, 4, 5, 5, 5, 0, 0, 0],
    ])
    bordered = builders.image_grid(images, border=1)
    assert bordered.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
    np.testing.assert_array_equal(bordered[..., 0], [
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 2, 2, 2, 0, 3, 3, 3, 0],
        [0, 1, 1, 1, 0, 2, 2, 2, 0, 3, 3, 3, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 4, 4, 4, 0, 5, 5, 5, 0, 0, 0, 0, 0],
        [0, 4, 4, 4, 0, 5, 5, 5, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ])


def test_image_grid_bad_input_raises():
    with pytest.raises(ValueError, match="N, H, W, C"):
        builders.image_grid(np.zeros((2, 3, 1), np.uint8))
    with pytest.raises(ValueError, match="border"):
        builders.image_grid(np.zeros((1, 2, 2, 1), np.uint8), border=-1)


@pytest.mark.parametrize("var_type,factor", [("fixedlarge", 1), ("fixedsmall", 1),
                                             ("learned", 2), ("learned_range", 2)])
def test_out_channels(var_type, factor):
    config = _config(var_type=var_type)
    channels = config.data.channels
    assert builders.out_channels(config) == factor * channels
    assert checkpoint.out_channels(config) == factor * channels
    assert builders.unet_config(config).out_ch == factor * channels
    meta = checkpoint.meta_from_config(config)
    assert builders.unet_config_from_meta(meta) == builders.unet_config(config)
    del meta["model"]["out_ch"]  # older metadata: derived from the data and the var type
    assert builders.unet_config_from_meta(meta).out_ch == factor * channels


def test_unet_from_meta_output_shape():
    config = _config(var_type="learned_range")
    size, channels = config.data.image_size, config.data.channels
    model = builders.unet_from_meta(checkpoint.meta_from_config(config))
    x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), x, t)
    out = jax.eval_shape(model.apply, params, x, t)
    assert out.shape == (2, size, size, 2 * channels)


def test_data_mesh():
    devices = jax.devices()
    mesh = builders.data_mesh(devices[:2])
    assert mesh.axis_names == (parallel.AXIS,) == ("data",)
    assert list(mesh.devices) == list(devices[:2])
    assert list(builders.data_mesh().devices) == list(devices)
    data, replicated = builders.data_shardings(devices[:4])
    assert data.mesh.axis_names == replicated.mesh.axis_names == ("data",)
    assert data.spec == jax.sharding.PartitionSpec("data")
    assert replicated.spec == jax.sharding.PartitionSpec()
    x = jax.device_put(np.arange(8.0), data)
    assert [s.data.shape for s in x.addressable_shards] == [(2,)] * 4


def test_no_module_imports_a_command_line_module():
    commands = {"ddpm_jax.generate", "ddpm_jax.metrics.cli", "ddpm_jax.digits_quality",
                "run_train"}
    for path in sorted((ROOT / "ddpm_jax").rglob("*.py")):
        if path.name == "__main__.py":
            continue
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            imported = (set(names) & commands) - {module}
            assert not imported, f"{module} imports the command-line module(s) {imported}"

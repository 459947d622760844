"""Stream tensors into a GGUF file one at a time, so peak memory is one tensor, not the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFWriter
from gguf.quants import quantize

from .errors import ConvertError

Q8_BLOCK = 32  # Q8_0 quantizes rows in blocks of 32 values


@dataclass
class TensorSpec:
    """One output tensor: GGUF name, numpy-order shape, storage type, and how to produce it."""

    name: str
    shape: tuple[int, ...]
    qtype: QType
    load: Callable[[], np.ndarray]  # float32 array of `shape`, produced only when written

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape, dtype=np.int64))
        if self.qtype == QType.Q8_0:
            return n // Q8_BLOCK * 34  # 32 int8 + one f16 scale per block
        return n * (4 if self.qtype == QType.F32 else 2)

    def encode(self) -> np.ndarray:
        data = self.load()
        if data.shape != self.shape:
            raise ValueError(f"{self.name}: produced shape {data.shape}, planned {self.shape}")
        if self.qtype == QType.F32:
            return np.ascontiguousarray(data, dtype=np.float32)
        if self.qtype == QType.F16:
            return np.ascontiguousarray(data, dtype=np.float16)
        return quantize(np.ascontiguousarray(data, dtype=np.float32), self.qtype)


def weight_type(shape: tuple[int, ...], want: QType) -> QType:
    """Storage type for a weight matrix: vectors stay F32; Q8_0 only where rows divide in blocks."""
    if len(shape) < 2:
        return QType.F32
    if want == QType.Q8_0 and shape[-1] % Q8_BLOCK != 0:
        return QType.F16
    return want


def copy_spec(ckpt, out: str, src: str, shape: tuple[int, ...], qtype: QType) -> TensorSpec:
    """A checkpoint tensor copied as-is, after checking it exists with the planned shape."""
    if src not in ckpt.tensors:
        raise ConvertError(f"{ckpt.folder}: checkpoint is missing tensor {src}")
    actual = ckpt.shape(src)
    if actual != shape:
        raise ConvertError(f"tensor {src} has shape {list(actual)}, expected {list(shape)}")
    return TensorSpec(out, shape, qtype, lambda: ckpt.load(src))


def write_gguf(
    path: Path,
    arch: str,
    add_metadata: Callable[[GGUFWriter], None],
    tensors: list[TensorSpec],
    on_bytes: Callable[[int], None] = lambda n: None,
) -> None:
    """Write header, metadata and tensor directory first, then each tensor's data as produced."""
    writer = GGUFWriter(path, arch)
    try:
        add_metadata(writer)
        for t in tensors:
            # A placeholder numpy dtype with raw_dtype set keeps `shape` as the logical shape.
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            data = t.encode()
            writer.write_tensor_data(data)
            on_bytes(data.nbytes)
            del data
    finally:
        writer.close()

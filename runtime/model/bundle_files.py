"""Primitives shared by the contract and the bundle: file names inside a bundle, tensor specs,
precisions. No I/O."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

# int8: static QDQ (weights and activations); int8w / int4w: weight-only (MatMulNBits blocks,
# int8 embedding tables), activations fp32
Precision = Literal["fp32", "fp16", "int8", "int8w", "int4w"]
DType = Literal["uint8", "int64", "float32", "float16"]


def plain_file_name(value: str) -> str:
    # Files live inside the bundle: no absolute paths, no escaping the folder.
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or value in {"", "."} or "\\" in value \
            or len(value) > 255:
        raise ValueError(f"{value!r} is not a relative path inside the bundle")
    return value


BundleFile = Annotated[str, AfterValidator(plain_file_name)]


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    dtype: DType
    shape: list[int] = Field(min_length=1, max_length=8)

    @field_validator("shape")
    @classmethod
    def _static(cls, shape: list[int]) -> list[int]:
        if any(d <= 0 for d in shape):
            raise ValueError(f"shape {' x '.join(map(str, shape))} must be static and positive")
        return shape


class ModelSpec(BaseModel):
    """One ONNX file and the tensors its engine must expose."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: BundleFile
    precision: Precision
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

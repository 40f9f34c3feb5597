"""The safetensors dtype names lorakit reads and writes, and their torch dtypes.

The order of ``LAYOUT_ORDER`` is the order in which safetensors (0.8) lays tensors out in the data section: it sorts
by dtype (this order) and then by name, which keeps every tensor aligned to its item size. Writing in the same order
makes our data sections byte-identical to ``safetensors.torch.save_file`` for the same tensors, so the kohya
``sshs_model_hash`` of our files matches the one kohya would compute.
"""

from __future__ import annotations

import torch

# Widest first, as safetensors sorts its Dtype enum in descending order.
LAYOUT_ORDER: tuple[str, ...] = (
    "U64",
    "I64",
    "F64",
    "C64",
    "F32",
    "U32",
    "I32",
    "BF16",
    "F16",
    "U16",
    "I16",
    "F8_E8M0",
    "F8_E4M3",
    "F8_E5M2",
    "I8",
    "U8",
    "BOOL",
)

# torch attribute names; a dtype this torch build lacks is simply not supported.
_TORCH_NAMES: dict[str, str] = {
    "U64": "uint64",
    "I64": "int64",
    "F64": "float64",
    "C64": "complex64",
    "F32": "float32",
    "U32": "uint32",
    "I32": "int32",
    "BF16": "bfloat16",
    "F16": "float16",
    "U16": "uint16",
    "I16": "int16",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}

TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in _TORCH_NAMES.items() if hasattr(torch, attr)
}
"""safetensors dtype name -> torch dtype, for the names this torch build supports."""

DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}
"""torch dtype -> safetensors dtype name."""

ITEM_SIZES: dict[str, int] = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in TORCH_DTYPES.items()}
"""safetensors dtype name -> bytes per element."""

_LAYOUT_RANK: dict[str, int] = {name: rank for rank, name in enumerate(LAYOUT_ORDER)}


def layout_key(dtype_name: str, tensor_name: str) -> tuple[int, str]:
    """Sort key that puts tensors in safetensors' data-section order (widest dtype first, then by name).

    Args:
        dtype_name: safetensors dtype name, e.g. ``"F16"``.
        tensor_name: the tensor's key.

    Returns:
        A tuple to sort by.
    """
    return (_LAYOUT_RANK[dtype_name], tensor_name)


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype.

    Args:
        dtype: a torch dtype.

    Returns:
        Its safetensors name, e.g. ``"BF16"``.

    Raises:
        ValueError: safetensors has no name for this dtype (or this torch build lacks it).
    """
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        known = ", ".join(str(d).removeprefix("torch.") for d in DTYPE_NAMES)
        raise ValueError(f"dtype {dtype} cannot be stored in a safetensors file; use one of {known}") from None

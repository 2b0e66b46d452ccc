"""`gather_tokens` in one Triton launch for any number of tensors.

Each tensor is described to the kernel as rows of bytes: `[B, M, N, R]` with batch, middle (the dims
between batch and tokens, flattened), token and row strides, copied in the widest word (8, 4, 2 or
1 bytes) that divides its row, strides and addresses. One program copies one kept token's rows of one
tensor; the tensors' addresses and strides travel in an int64 table, so their dtypes and shapes may
all differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .reference import token_rows

BLOCK = 1024
FIELDS = 8
"""Per tensor: source address, destination address, middle count, row words, word bytes, and the source's
batch, middle and token strides, in words; the destination is contiguous."""


@triton.jit
def _copy(
    src_addr, dst_addr, middle, row, src_base, src_middle, dst_base, dst_middle, WORD: tl.constexpr, BLOCK: tl.constexpr
):
    src = src_addr.to(tl.pointer_type(WORD))
    dst = dst_addr.to(tl.pointer_type(WORD))
    offsets = tl.arange(0, BLOCK)
    for m in range(middle):
        for start in range(0, row, BLOCK):
            columns = start + offsets
            inside = columns < row
            words = tl.load(src + src_base + m * src_middle + columns, mask=inside)
            tl.store(dst + dst_base + m * dst_middle + columns, words, mask=inside)


@triton.jit
def _gather_kernel(table, index, kept, FIELDS: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)  # b * kept + k
    entry = table + tl.program_id(1) * FIELDS
    src_addr, dst_addr = tl.load(entry), tl.load(entry + 1)
    middle, row, word = tl.load(entry + 2), tl.load(entry + 3), tl.load(entry + 4)
    batch_stride, middle_stride, token_stride = tl.load(entry + 5), tl.load(entry + 6), tl.load(entry + 7)
    b = token // kept
    source = tl.load(index + token)
    src_base = b * batch_stride + source * token_stride
    dst_middle = kept * row
    dst_base = b * middle * dst_middle + (token - b * kept) * row
    if word == 8:
        _copy(src_addr, dst_addr, middle, row, src_base, middle_stride, dst_base, dst_middle, tl.int64, BLOCK)
    elif word == 4:
        _copy(src_addr, dst_addr, middle, row, src_base, middle_stride, dst_base, dst_middle, tl.int32, BLOCK)
    elif word == 2:
        _copy(src_addr, dst_addr, middle, row, src_base, middle_stride, dst_base, dst_middle, tl.int16, BLOCK)
    else:
        _copy(src_addr, dst_addr, middle, row, src_base, middle_stride, dst_base, dst_middle, tl.int8, BLOCK)


def gather_tokens(
    tensors: Sequence[torch.Tensor], index: torch.Tensor, token_dims: Sequence[int]
) -> list[torch.Tensor]:
    """As `reference.gather_tokens`, in one kernel launch."""
    batch, kept = index.shape
    outs, entries, keep_alive = [], [], []
    for tensor, dim in zip(tensors, token_dims, strict=True):
        view = _rows_view(tensor, dim)
        if view is None:  # middle or row dims that no single stride walks: copy to a layout that has one
            view = _rows_view(tensor.contiguous(), dim)
        keep_alive.append(view)  # a contiguous copy must outlive the launch
        item = tensor.element_size()
        out = torch.empty(*tensor.shape[:dim], kept, *tensor.shape[dim + 1 :], dtype=tensor.dtype, device=tensor.device)
        outs.append(out)
        middle, row = view.shape[1], view.shape[3] * item
        strides = [stride * item for stride in view.stride()[:3]]
        word = next(
            w for w in (8, 4, 2, 1) if all(v % w == 0 for v in (row, *strides, view.data_ptr(), out.data_ptr()))
        )
        batch_stride, middle_stride, token_stride = (stride // word for stride in strides)
        entries.append(
            [view.data_ptr(), out.data_ptr(), middle, row // word, word, batch_stride, middle_stride, token_stride]
        )
    if not outs or batch * kept == 0:
        return outs
    table = torch.tensor(entries, dtype=torch.int64, device=index.device)
    _gather_kernel[(batch * kept, len(outs))](table, index.contiguous(), kept, FIELDS=FIELDS, BLOCK=BLOCK)
    return outs


def _rows_view(tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
    """`tensor` as `[B, M, N, R]` sharing its storage, or None where its middle dims or its row dims do not
    flatten to one stride or the row's elements are not adjacent."""
    try:
        view = tensor.view(token_rows(tensor.shape, dim))
    except RuntimeError:
        return None
    return view if view.shape[3] == 1 or view.stride(3) == 1 else None

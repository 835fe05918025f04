"""The Triton kernels that dequantize 4-bit weights: kernels/dequant.py's (one weight) and
kernels/experts.py's (a stack of experts' weights), over one shared decode-and-store part.

A module of its own, imported on first use (as kernels/lora_dropout_triton.py): Triton must not be
imported before a test sets TRITON_INTERPRET=1, and kernels that call other @triton.jit functions
need them as module globals.
"""

import triton
import triton.language as tl


@triton.jit
def decode_and_store(data_ptr, code_ptr, out_ptr, row, source, scale, n_bytes, n_out,
                     ROWS: tl.constexpr, COLS: tl.constexpr, NATIVE_ROUNDING: tl.constexpr):
    """Rows of COLS packed bytes (`row`: their first byte's index among the n_bytes, `source`:
    its address in data_ptr, one `scale` each): each byte's two 4-bit codes looked up in the
    16-value table, times the row's scale, stored as 2·COLS values (high nibble first) from
    2·row in out_ptr's dtype, up to n_out values."""
    byte = row[:, None] + tl.arange(0, COLS)[None, :]
    packed = tl.load(data_ptr + source[:, None] + tl.arange(0, COLS)[None, :],
                     mask=byte < n_bytes, other=0)
    # the 16 code values are read once (tl.gather keeps them in shared memory); it wants the
    # index and the table of one rank, hence the flat view of the tile
    code = tl.load(code_ptr + tl.arange(0, 16))
    flat = tl.reshape(packed, [ROWS * COLS]).to(tl.int32)
    high = tl.reshape(tl.gather(code, flat >> 4, 0), [ROWS, COLS])
    low = tl.reshape(tl.gather(code, flat & 15, 0), [ROWS, COLS])
    values = tl.interleave(high * scale[:, None], low * scale[:, None])  # high nibble first
    if out_ptr.dtype.element_ty == tl.bfloat16 and not NATIVE_ROUNDING:
        # round to nearest even on the bits: the same as the GPU's conversion, which Triton's
        # interpreter (the tests' reference run) would do by truncating instead
        bits = values.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        result = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        result = values.to(out_ptr.dtype.element_ty)
    index = 2 * row[:, None] + tl.arange(0, 2 * COLS)[None, :]
    tl.store(out_ptr + index, result, mask=index < n_out)


@triton.jit
def dequantize_kernel(data_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                      offset, out_ptr, n_bytes, n_out, BLOCK_BYTES: tl.constexpr,
                      NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                      ROWS: tl.constexpr, COLS: tl.constexpr, NATIVE_ROUNDING: tl.constexpr):
    """A tile of ROWS x COLS packed bytes. A row is the COLS bytes whose 2·COLS values fill one
    16-byte store: one thread loads the row as one word and stores it as one vector, with no
    exchange of values between threads (Triton then needs no shared memory to change layouts).
    COLS divides a block's bytes: a row lies in one quantization block and takes one scale."""
    row = tl.program_id(0).to(tl.int64) * (ROWS * COLS) + tl.arange(0, ROWS) * COLS
    row_inside = row < n_bytes
    block = row // BLOCK_BYTES
    if NESTED:  # the absmax is a uint8 code of the nested table, times its group's scale
        absmax_code = tl.load(absmax_ptr + block, mask=row_inside, other=0)
        group_scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=row_inside,
                              other=0.0)
        # mul and add rounded apart (the launch turns off FMA fusion), as torch and bnb do
        scale = tl.load(nested_code_ptr + absmax_code) * group_scale + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=row_inside, other=0.0)
    decode_and_store(data_ptr, code_ptr, out_ptr, row, row, scale, n_bytes, n_out, ROWS, COLS,
                     NATIVE_ROUNDING)


@triton.jit
def dequantize_stack_kernel(data_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                            nested_code_ptr, offset_ptr, out_ptr, n_bytes,
                            MEMBER_BYTES: tl.constexpr, DATA_STRIDE: tl.constexpr,
                            ABSMAX_STRIDE: tl.constexpr, NESTED_STRIDE: tl.constexpr,
                            OFFSET_STRIDE: tl.constexpr, BLOCK_BYTES: tl.constexpr,
                            NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                            ROWS: tl.constexpr, COLS: tl.constexpr,
                            NATIVE_ROUNDING: tl.constexpr):
    """kernels/dequant.py's dequantize kernel over a stack of members of MEMBER_BYTES each,
    member m's bytes from m · DATA_STRIDE and its scales from m · ABSMAX_STRIDE (and
    m · NESTED_STRIDE, its offset at m · OFFSET_STRIDE): the whole members, or the same rows of
    every member or of every other one (kernels/experts.stack_rows), end to end in the output.
    A row of COLS bytes lies in one block of one member (a member holds whole blocks), whose
    scale is that member's block `local`, nested group `local // NESTED_BLOCKSIZE` and offset."""
    row = tl.program_id(0).to(tl.int64) * (ROWS * COLS) + tl.arange(0, ROWS) * COLS
    row_inside = row < n_bytes
    member = row // MEMBER_BYTES
    within = row - member * MEMBER_BYTES
    local = within // BLOCK_BYTES
    if NESTED:
        absmax_code = tl.load(absmax_ptr + member * ABSMAX_STRIDE + local, mask=row_inside,
                              other=0)
        group_scale = tl.load(nested_absmax_ptr + member * NESTED_STRIDE
                              + local // NESTED_BLOCKSIZE, mask=row_inside, other=0.0)
        offset = tl.load(offset_ptr + member * OFFSET_STRIDE, mask=row_inside, other=0.0)
        scale = tl.load(nested_code_ptr + absmax_code) * group_scale + offset
    else:
        scale = tl.load(absmax_ptr + member * ABSMAX_STRIDE + local, mask=row_inside,
                        other=0.0)
    decode_and_store(data_ptr, code_ptr, out_ptr, row, member * DATA_STRIDE + within, scale,
                     n_bytes, 2 * n_bytes, ROWS, COLS, NATIVE_ROUNDING)

"""Every Triton kernel of qlora.kernels builds for an H100 (sm90) with the argument types its
launchers give it, checked on the CPU.

The other kernel tests run the kernels through Triton's interpreter, which accepts code that the
compiler refuses (values of two integer widths where one type is needed, for instance). Here the
launchers run under the interpreter on tiny inputs, and a hook records each launch's kernel and
arguments, typed as Triton's JIT types them for a launch (tensors → "*dtype", ints → i32 or i64
by range, the int 1 → a constant, floats → fp32, 16-divisible ints and pointers marked so):
Triton's own binder does it, with the NVIDIA backend's rules. A second process, without the
interpreter, builds each distinct (kernel, types) to TTIR, the compiler's first stage, where its
type checks run. No GPU is needed: the NVIDIA backend's front end runs on the CPU.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS_DIR = Path(__file__).parents[1] / "src" / "qlora" / "kernels"

# Run with TRITON_INTERPRET=1: record each launch as (module, qualname, types), one JSON line.
RECORD = r"""
import json, torch
import triton.runtime.interpreter as interpreter
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import JITFunction, create_function_from_signature

launches = []

def typed(kernel, args, kwargs):
    # Triton's binder for this kernel (JITFunction.create_binder's, with the NVIDIA backend's
    # rules): per argument (type, attribute), the int 1 and constexpr parameters as "constexpr"
    jit = JITFunction(kernel.fn, **{k: kernel.kwargs.get(k) for k in
                                    ("do_not_specialize", "do_not_specialize_on_alignment")})
    binder = create_function_from_signature(jit.signature, jit.params, CUDABackend)
    bound, specialization, options = binder(*args, **kwargs)
    values = list(bound.values())
    signature, constexprs, attrs = {}, {}, {}
    for (name, value), (ty, attr) in zip(bound.items(), specialization):
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = value
        elif isinstance(attr, str):
            attrs[name] = attr
    return dict(module=kernel.fn.__module__, qualname=kernel.fn.__qualname__,
                signature=signature, constexprs=constexprs, attrs=attrs,
                options={k: v for k, v in options.items() if isinstance(v, (bool, int, float))})

def record(self, *args, grid, warmup, **kwargs):
    # the launch's types are all that is wanted: not running the kernel keeps this fast (what
    # it would have written is left as torch.empty made it)
    launches.append(typed(self, args, kwargs))

interpreter.InterpretedFunction.run = record

from qlora.kernels import cross_entropy, dequant, dropout, embedding, experts, fused, routing
from qlora.quant import QuantConfig, QuantizedStack
from qlora.kernels import lora_dropout as L

g = torch.Generator().manual_seed(0)
def rand(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

seed = torch.tensor(2**40 + 12345, dtype=torch.int64)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    # fused.py: forward and backward; weight gradient wanted or not; one row (an int 1)
    for rows in (3, 1):
        x, w = rand(rows, 40, dtype=dtype, grad=True), rand(40, dtype=dtype, grad=True)
        fused.rms_norm(x, w, 1e-6).float().sum().backward()
        fused.rms_norm(x, w.detach(), 1e-6).float().sum().backward()
        res = rand(rows, 40, dtype=dtype, grad=True)
        total, normed = fused.add_rms_norm(x, res, w.detach(), 1e-6)
        (total.float().sum() + normed.float().sum()).backward()
    fused.swiglu(rand(2, 24, dtype=dtype, grad=True), rand(2, 24, dtype=dtype, grad=True)
                 ).float().sum().backward()
    fused.swiglu_packed(rand(2, 48, dtype=dtype, grad=True)).float().sum().backward()
    # rope: x the transposed view of [B, T, H, D]; a generation step (B = T = 1) and one head
    for B, T, H, D, cos_batch in [(2, 5, 3, 8, 2), (2, 5, 3, 8, 1), (1, 1, 1, 16, 1)]:
        x = rand(B, T, H, D, dtype=dtype, grad=True)
        cos, sin = rand(cos_batch, T, D, dtype=dtype), rand(cos_batch, T, D, dtype=dtype)
        fused.rope(x.transpose(1, 2), cos, sin).float().sum().backward()
    # dropout.py: salts 0 (int32), 1 (a constant) and from 2^31 (int64); forward, backward, add_
    for salt in (0, 1, 2**31 + 3):
        x = rand(3, 300, dtype=dtype, grad=True)
        dropout.seeded_dropout(x, seed, salt, 0.25).float().sum().backward()
        dropout.seeded_dropout_add_(rand(3, 300, dtype=dtype), x.detach(), seed, salt, 0.25)
    # embedding.py
    embedding.gather_rows_triton(rand(10, 40, dtype=dtype), torch.tensor([[3, 1, 9]]))
    embedding.gather_rows_triton(rand(10, 40, dtype=dtype), torch.tensor([2]))
    # dequant.py: plain and nested scales
    n = 64 * 5
    data = torch.randint(0, 256, (n // 2,), generator=g, dtype=torch.uint8)
    code = torch.randn(16, generator=g)
    plain = dequant.Packed4bit(data=data, absmax=torch.rand(5, generator=g), code=code,
                               blocksize=64, shape=(5, 64), dtype=dtype)
    nested = dequant.Packed4bit(data=data, code=code, blocksize=64, shape=(5, 64), dtype=dtype,
                                absmax=torch.randint(0, 256, (5,), generator=g, dtype=torch.uint8),
                                nested_absmax=torch.rand(1, generator=g),
                                nested_code=torch.randn(256, generator=g), offset=0.3)
    for p in (plain, nested):
        dequant.dequantize_4bit_triton(p, dtype)
    # experts.py: a stack of experts' 4-bit weights, plain and nested scales
    for nested_scales in (False, True):
        stack = QuantizedStack(2, (16, 64), QuantConfig(method="nf4", double_quant=nested_scales,
                                                        compute_dtype=torch.float32), "cpu")
        for i in range(2):
            stack.set_member(i, torch.randn(16, 64, generator=g))
        experts.dequantize_stack_triton(stack, dtype)
    # experts.py: the grouped GEMM forward and backward (input and weight gradients), b as a
    # transposed view (the grouped step's weights) and as it is held (its LoRA B); a rank-16 width
    offsets = torch.tensor([3, 3, 7], dtype=torch.int32)
    for b in (rand(3, 24, 40, dtype=dtype, grad=True).transpose(1, 2),
              rand(3, 40, 16, dtype=dtype, grad=True)):
        a = rand(7, 40, dtype=dtype, grad=True)
        experts.TritonGroupedMM.apply(a, b, offsets).float().sum().backward()
    # routing.py: a sparse block's weighted sum back to tokens (router weights fp32 as Mixtral's,
    # or in the hidden dtype as Qwen3-MoE's), forward and backward, and the rows' plain sum
    order = torch.randperm(12, generator=g)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(12))
    for weights_dtype in (torch.float32, dtype):
        for weights_grad in (True, False):  # the router weights' gradient made or not
            y = rand(12, 40, dtype=dtype, grad=True)
            w = rand(4, 3, dtype=weights_dtype, grad=weights_grad)
            routing.combine(y, w, order, inverse, fused=True).float().sum().backward()
    routing.SortedRows.apply(rand(4, 40, dtype=dtype, grad=True), order, inverse, 3, True
                             ).float().sum().backward()
    # cross_entropy.py: loss alone and with the gradient written in place
    for write_grad in (False, True):
        cross_entropy.cross_entropy_rows(rand(4, 50, dtype=dtype), torch.tensor([1, 0, -100, 49]),
                                         write_grad)
# lora_dropout.py: one to three adapters with the salts adapters.py gives (0, 1, 2: int32 and the
# constant 1); salts from 2^31 (int64) beside small ones, and all of them int64
LORA_CASES = [(dtype, (0, 1, 2)) for dtype in (torch.float32, torch.float16)] + [
    (torch.bfloat16, salts) for salts in [(0,), (0, 1), (0, 1, 2), (2**31 + 5, 7, 9),
                                          (3, 2**31 + 5), (2**31 + 5, 1, 2**32 + 1)]]
for dtype, salts in LORA_CASES:
    x, grad_h = rand(20, 300, dtype=dtype), rand(20, len(salts) * 8, dtype=dtype)
    adapters = [rand(8, 300) * 0.1 for _ in salts]
    scales = tuple(0.5 + i for i in range(len(salts)))
    L.down_triton(x, adapters, seed, salts, scales, 0.25)
    L.backward_triton(x, grad_h, adapters, seed, salts, scales, 0.25, want_dx=True)
print(json.dumps(launches))
"""

# Run without the interpreter: build each recorded (kernel, types) to TTIR for sm90.
BUILD = r"""
import importlib, json, sys
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton._C.libtriton import ir

def kernel(module, qualname):
    # a module-level kernel, or one that a module-level function makes and returns (alone, or
    # in a tuple or dict), cached
    outer, *inner = qualname.split(".<locals>.")
    found = getattr(importlib.import_module(module), outer)
    if not inner:
        return found
    made = found()
    made = made.values() if isinstance(made, dict) else made if isinstance(made, tuple) else [made]
    return next(k for k in made if k.fn.__qualname__ == qualname)

target = GPUTarget("cuda", 90, 32)
backend = CUDABackend(target)
failures = []
for launch in json.load(sys.stdin):
    fn = kernel(launch["module"], launch["qualname"])
    attrs = {(fn.arg_names.index(k),): backend.parse_attr(v) for k, v in launch["attrs"].items()}
    source = ASTSource(fn, launch["signature"], launch["constexprs"], attrs)
    options = backend.parse_options(launch["options"])
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    try:
        module = source.make_ir(target, options, backend.get_codegen_implementation(options),
                                backend.get_module_map(), context)
        backend.make_ttir(module, {}, options, 90)
        assert module.verify()
    except Exception as error:
        failures.append(dict(launch, error=f"{type(error).__name__}: {str(error)[-1500:]}\n"
                                           f"caused by: {error.__cause__!r}"))
print(json.dumps(failures))
"""


# The constants a launcher turns on for a CUDA tensor alone (the record's CPU tensors have them
# off: the interpreter's rounding, its dot's fp32 operands): each launch is built with them on
# too, as the GPU builds it.
GPU_FLAGS = ("NATIVE_ROUNDING", "COMPILED")


def launched_types() -> list[dict]:
    """The distinct (kernel, types, options) of the launchers' kernel launches, and each as a
    CUDA tensor's launch (GPU_FLAGS on)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", RECORD], env=env, capture_output=True, text=True,
                          timeout=3600)  # stops a hung run only, never a slow one
    assert done.returncode == 0, done.stderr[-3000:]
    launches = json.loads(done.stdout.strip().splitlines()[-1])
    launches += [dict(x, constexprs=dict(x["constexprs"], **{f: True for f in flags}))
                 for x in launches
                 if (flags := [f for f in GPU_FLAGS if f in x["constexprs"]])]
    return [json.loads(key) for key in sorted({json.dumps(x, sort_keys=True) for x in launches})]


def failed_builds(launches: list[dict]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", BUILD], input=json.dumps(launches), env=env,
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def launched_kernels() -> set[str]:
    """The names of the @triton.jit functions of kernels/ that no other one calls: the kernels."""
    jitted, called = set(), set()
    for path in KERNELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                    ast.unparse(d).endswith("jit") for d in node.decorator_list):
                jitted.add(node.name)
                called |= {ast.unparse(c.func) for c in ast.walk(node) if isinstance(c, ast.Call)}
    return jitted - called


def test_every_kernel_builds_for_sm90_with_its_launch_types():
    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as error:
        pytest.skip(f"this triton has no NVIDIA backend to build with: {error}")
    launches = launched_types()
    # every kernel was launched (a new kernel needs a launch in RECORD)
    assert {x["qualname"].split(".")[-1] for x in launches} == launched_kernels()
    # the launch that failed to compile: an int64 salt beside int32 ones
    salts = [tuple(x["signature"][f"salt{i}"] for i in range(3)) for x in launches
             if x["qualname"] == "lora_dropout_down"]
    assert ("i64", "i32", "i32") in salts
    failures = failed_builds(launches)
    assert not failures, "\n\n".join(
        f"{x['qualname']} {x['signature']} {x['constexprs']}:\n{x['error']}" for x in failures)

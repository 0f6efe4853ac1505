"""Launch a Triton or Gluon kernel's compiled binary without the JIT's per-call work.

An eager prefill launches the merged product's two kernels for every linear of every layer, and Triton's
``kernel[grid](...)`` spends tens of microseconds of Python on each: binding every argument, building the cache key
from its specialization and options, reading its knobs, checking the globals the kernel used. Where the GPU's work per
launch is short, that leaves it waiting (benchmarks/NOTES-kernels.md: the merged prefill's slow processes).

:class:`DirectLauncher` keys each call by what the JIT specializes on, computed in plain Python (tensors: dtype and
16-byte alignment; ints: 1, a multiple of 16, i32/i64/u64; descriptors: dtype, block and layout; the constexprs), goes
through the JIT the first time a key is seen (compiling as usual) and keeps the compiled kernel, whose launcher later
calls run directly. Under Triton's interpreter, or with a launch hook set (a profiler), every call takes the JIT.
"""

from __future__ import annotations

from typing import Any

import torch
from triton import knobs
from triton.runtime import driver


def _spec(arg: Any) -> Any:
    """What Triton's ``specialize_impl`` tells apart in ``arg`` (tests/test_direct_launch.py checks it)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or arg is None or isinstance(arg, float):
        return type(arg), arg if arg is None else None
    if isinstance(arg, int):
        width = 32 if -(2**31) <= arg < 2**31 else 64 if arg < 2**63 else 65
        return arg == 1, arg % 16 == 0, width
    block = getattr(arg, "block_shape", None)
    if block is not None:  # a host TMA descriptor: its type is dtype, block and layout
        return arg.base.dtype, tuple(block), getattr(arg, "layout", None), len(arg.shape)
    raise TypeError(f"no direct launch for an argument of type {type(arg).__name__}")


def hooked() -> bool:
    """Whether a launch hook is set (a profiler's): Triton 3.6 keeps an empty ``HookChain`` there, not None."""
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


class DirectLauncher:
    """``launcher(grid, args, constexprs, **options)`` launches ``fn[(grid,)](*args, **constexprs, **options)``.

    ``args`` are the kernel's runtime parameters in order, ``constexprs`` the rest of its parameters by name in the
    signature's order, ``options`` the compiler's (``num_warps``, ``maxnreg``, ...)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.kernels: dict[tuple, Any] = {}

    def __call__(self, grid: int, args: tuple, constexprs: dict[str, Any], **options: Any) -> None:
        key = (tuple(constexprs.values()), tuple(options.items()), tuple(_spec(a) for a in args))
        kernel = self.kernels.get(key)
        if kernel is None or hooked():
            compiled = self.fn[(grid,)](*args, **constexprs, **options)
            if kernel is None:
                if list(constexprs) != self.fn.arg_names[len(args) :]:
                    raise ValueError(f"constexprs must be {self.fn.arg_names[len(args) :]} in order")
                self.kernels[key] = compiled if hasattr(compiled, "function") else False  # False: the interpreter
            return
        if kernel is False:
            self.fn[(grid,)](*args, **constexprs, **options)
            return
        stream = driver.active.get_current_stream(driver.active.get_current_device())  # as the JIT launches
        kernel.run(grid, 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None, *args,
                   *constexprs.values())  # fmt: skip

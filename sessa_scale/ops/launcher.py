"""Lean Triton launches: ``launch(kernel, grid, *args, **kwargs)`` runs ``kernel[grid](*args, **kwargs)``
with less host work, calling the compiled kernel's launcher directly once triton has chosen the
kernel for a key.

``JITFunction.run`` (triton 3.6 runtime/jit.py) binds the arguments, specializes each one, builds a
string cache key, checks the kernel's globals, builds launch metadata for the (empty) launch hooks
and then calls ``CompiledKernel.run``. Here the first call per key goes through ``kernel[grid]`` (which
compiles or finds the kernel and returns the CompiledKernel); later calls with the same key pass the
same arguments to the same launcher: ``run(gridX, gridY, gridZ, stream, function, packed_metadata,
None, None, None, *args, *constexprs)``, with the device's current stream as triton takes it
(``driver.active.get_current_stream``).

The key holds what triton's cache key depends on, so that a kept kernel is reused only where triton
would pick the same one (it may be finer: a miss then costs one plain call, never a wrong kernel):
  - the kernel (its id), the current device (triton keeps one cache per device: ``JITFunction.device_caches``);
  - per positional argument, its specialization, mirroring triton 3.6 ``native_specialize_impl`` (the
    C++ ``specialize_impl`` that runtime/jit.py ``create_function_from_signature`` calls for each
    non-constexpr parameter; a constexpr passed positionally: its type and value): see
    ``specialization_key``;
  - every keyword argument by name, type and value: constexprs (``("constexpr", value)`` in triton's
    specialization; the type keeps ``True`` and ``1`` apart as triton's ``str(specialization)`` does)
    and launch options (num_warps, num_stages, maxnreg, ...: ``str(options)`` in ``compute_cache_key``);
  - ``knobs.runtime.debug`` and ``knobs.compilation.instrumentation_mode``, which ``JITFunction.run``
    adds to the options.
A parameter's type annotation (our kernels have none) is ignored: the key is then finer than triton's.

Calling convention: args are the kernel's leading parameters (every non-constexpr one), kwargs the
rest (constexprs, or their defaults) and launch options; grid a tuple of 1-3 ints.

Always the plain ``kernel[grid](...)`` (``lean_enabled() is False``) under ``TRITON_INTERPRET=1``,
with ``SESSA_TRITON_LAUNCH=plain``, with a triton other than 3.6.x (the launcher API above is read
from 3.6), and per call while a launch hook is set (profilers such as proton add them: the lean call
passes no launch metadata and no hooks), for a kernel with pre-run hooks and for anything but a plain
JITFunction (an autotuner, heuristics). Not repeated on lean calls: triton's check that the kernel's
global values have not changed since compilation.

GPU check (host time to issue one Mamba-2 layer's forward + backward, then the training step):
  python3 -m sessa_scale.bench.host_overhead --archs mamba2
  SESSA_TRITON_LAUNCH=plain python3 -m sessa_scale.bench.host_overhead --archs mamba2
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from triton import knobs
from triton.compiler import CompiledKernel
from triton.knobs import HookChain
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from sessa_scale.errors import UserError
from sessa_scale.ops.work_buffers import INTERPRET

LAUNCH_MODES = ("lean", "plain")  # SESSA_TRITON_LAUNCH values
VERIFIED_TRITON = ("3", "6")  # major.minor whose JITFunction.run / CompiledKernel.run this mirrors


def lean_enabled(environ=os.environ, version: str = triton.__version__, interpret: bool = INTERPRET) -> bool:
    """Whether launch() may call kept launchers (module docstring); UserError on an unknown
    SESSA_TRITON_LAUNCH value."""
    mode = environ.get("SESSA_TRITON_LAUNCH", "lean")
    if mode not in LAUNCH_MODES:
        raise UserError(f"SESSA_TRITON_LAUNCH={mode!r} is not one of {', '.join(LAUNCH_MODES)}: 'lean' "
                         "(default) calls the compiled Triton kernels' launchers directly, 'plain' launches "
                         "through kernel[grid](...); set one of these or unset it")
    return mode == "lean" and not interpret and tuple(version.split(".")[:2]) == VERIFIED_TRITON


@functools.cache
def lean_launches() -> bool:
    """lean_enabled() for this process, read at the first launch (tests clear the cache)."""
    return lean_enabled()


_I32, _I64 = 2**31, 2**63


def specialization_key(args: tuple, rules) -> tuple:
    """What triton 3.6 specializes each non-constexpr argument on, as ``native_specialize_impl(backend,
    arg, is_const, specialize, align)`` (the C++ specialize_impl that runtime/jit.py
    create_function_from_signature calls) does; rules: kernel_rules(kernel)[0]; is_const is per
    parameter, so in the kernel. Per argument:
      a constexpr parameter's argument (passed positionally) -> ("constexpr", arg): its type and value;
      int == 1 with specialize -> ("constexpr", 1): compiled as a constant;
      int -> i32 in [-2^31, 2^31), i64 below 2^63, u64 above; with specialize also whether align and
             arg % 16 == 0 ("D" vs "" in BaseBackend.get_int_specialization);
      an object with data_ptr (a tensor) -> its dtype and, with specialize, whether align and
             data_ptr() % 16 == 0 (BaseBackend.get_tensor_specialization);
      bool -> "u1", float -> "fp32" (neither specialized on its value), None -> ("constexpr", None).
    Other types (tuples, tensor descriptors, ...) raise TypeError: launch() then takes the plain path."""
    key = []
    for arg, (constexpr, specialize, align) in zip(args, rules):
        kind = type(arg)
        if constexpr:
            key.append((kind, arg))
        elif kind is int:
            if specialize and arg == 1:
                key.append(1)
                continue
            width = "i32" if -_I32 <= arg < _I32 else "i64" if arg < _I64 else "u64"
            key.append((width, align and arg % 16 == 0) if specialize else width)
        elif kind is torch.Tensor or hasattr(arg, "data_ptr"):
            key.append((arg.dtype, align and arg.data_ptr() % 16 == 0) if specialize else arg.dtype)
        elif kind is bool or kind is float or arg is None:
            key.append(kind)
        else:
            raise TypeError(f"no lean launch key for a {kind.__name__} argument")
    return tuple(key)


def launch_key(kernel_id: int, device: int, rules, args: tuple, kwargs: dict) -> tuple:
    """The key of a launch (module docstring); rules: kernel_rules(kernel)[0]."""
    return (kernel_id, device, specialization_key(args, rules), tuple(kwargs.items()),
            tuple(map(type, kwargs.values())), knobs.runtime.debug, knobs.compilation.instrumentation_mode)


def _idle(hook) -> bool:
    """Whether a launch hook does nothing: None, or an empty HookChain (triton 3.6's default, which
    JITFunction.run passes and the launcher calls; the lean call passes None, which it skips)."""
    return hook is None or (type(hook) is HookChain and not hook.calls)


def kernel_rules(kernel) -> tuple:
    """((constexpr, specialize, align) per parameter: constexpr-annotated, not in do_not_specialize, not in
    do_not_specialize_on_alignment (triton 3.6 runtime/jit.py KernelParam, as create_function_from_signature
    reads them), the parameters, the kernel itself (kept alive: its id is in the launch keys)."""
    params = tuple(kernel.params)
    return (tuple((p.is_constexpr, not p.do_not_specialize, not p.do_not_specialize_on_alignment) for p in params),
            params, kernel)


_rules: dict = {}  # id(kernel) -> kernel_rules(kernel)
_kept: dict = {}  # launch key -> (launcher, function, packed metadata, constexpr values after args) or None


def _lookup(kernel, args: tuple, kwargs: dict) -> tuple:
    """(the launch key, its kept launch or None); (None, None) where this call takes the plain path
    (module docstring)."""
    if not lean_launches() or type(kernel) is not JITFunction or kernel.pre_run_hooks or not (
            _idle(knobs.runtime.launch_enter_hook) and _idle(knobs.runtime.launch_exit_hook)):
        return None, None
    rules = _rules.get(id(kernel))
    if rules is None:
        rules = _rules[id(kernel)] = kernel_rules(kernel)
    try:
        key = launch_key(id(kernel), driver.active.get_current_device(), rules[0], args, kwargs)
        return key, _kept.get(key)
    except TypeError:  # an argument type specialization_key does not cover, an unhashable constexpr
        return None, None


def constexpr_values(params: tuple, n_args: int, kwargs: dict) -> tuple | None:
    """The values of the parameters after the n_args positional ones as JITFunction.run binds them (from
    kwargs, else the defaults: triton 3.6 create_function_from_signature), which the launcher takes after
    the positional ones; None if one of them is not a constexpr (its value would not be fixed by the key)."""
    tail = params[n_args:]
    if not all(p.is_constexpr for p in tail):
        return None
    return tuple(kwargs[p.name] if p.name in kwargs else p.default for p in tail)


def _keep(kernel, compiled, args: tuple, kwargs: dict):
    """What later calls of this key launch with, after the plain call that returned compiled; None
    where it cannot be kept (an async-compile future; a non-constexpr parameter passed by keyword)."""
    values = constexpr_values(_rules[id(kernel)][1], len(args), kwargs)
    if not isinstance(compiled, CompiledKernel) or values is None:
        return None
    return compiled.run, compiled.function, compiled.packed_metadata, values


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), through the kept launcher of this call's key where there is one."""
    key, kept = _lookup(kernel, args, kwargs)
    if kept is None:
        compiled = kernel[grid](*args, **kwargs)
        if key is not None and key not in _kept:
            _kept[key] = _keep(kernel, compiled, args, kwargs)
        return
    run, function, packed, constexprs = kept
    n = len(grid)
    run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, driver.active.get_current_stream(key[1]),
        function, packed, None, None, None, *args, *constexprs)

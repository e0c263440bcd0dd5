"""Helpers shared by the step benchmarks (`step_overhead.py`, `gpu_suite.py`): timing, peak memory on CPU and
CUDA, resident-state bytes, the plain student step and the RED / GKD trainer steps.

Not a benchmark itself. The scripts import it as `_common` (they put their own folder on `sys.path`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import resource
import sys
import time

import torch

GIB = 2**30


# ------------------------------------------------------------------------------------------------ timing
def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device | str = "cpu", collect: bool = True) -> tuple[float, float]:
    """Run fn once: (wall seconds, process CPU seconds over all threads); CUDA work is waited for. `collect`:
    `gc.collect()` first (outside the timing), so no collection of earlier garbage falls into it."""
    if collect:
        gc.collect()
    synchronize(device)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall0, time.process_time() - cpu0


# ------------------------------------------------------------------------------------------------ memory
def peak_rss_gib() -> float:
    """Process peak RSS so far (ru_maxrss, KiB on Linux), GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def status_kib(field: str) -> int | None:
    """A field of /proc/self/status (VmRSS, VmHWM) in KiB; None where there is no such file."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _libc():
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4


def set_allocator_returns_memory(returns: bool) -> bool:
    """glibc: `returns=True` serves every block of 1 MiB or more with its own mmap and unmaps it on free, and
    trims the heap, so a phase's peak RSS above its start is the memory it needs; `returns=False` restores what
    `RedConfig.keep_freed_cpu_memory` sets (no mmap, freed memory kept). False off glibc (nothing changed)."""
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if returns:
        ok = libc.mallopt(M_MMAP_THRESHOLD, 2**20) and libc.mallopt(M_MMAP_MAX, 65536)
        ok = ok and libc.mallopt(M_TRIM_THRESHOLD, 2**20)
    else:
        ok = libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(ok)


def trim_heap() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_memory(fn, device: torch.device | str = "cpu") -> tuple[int | None, int | None]:
    """Run fn once: (bytes in use when it started, bytes of its peak above that); None where unmeasurable.

    CUDA: `torch.cuda.memory_allocated()` at the start, and `torch.cuda.max_memory_allocated()` after
    `reset_peak_memory_stats()` minus it (tensors only; the caching allocator's reserve is not counted). CPU: the
    resident set at the start (after `gc.collect()` and `malloc_trim`), and the peak resident set (VmHWM, reset
    through /proc/self/clear_refs) minus it. On CPU, call `set_allocator_returns_memory(True)` first, or memory
    the allocator kept from an earlier phase is reused without showing.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return start, torch.cuda.max_memory_allocated() - start
    trim_heap()
    start = status_kib("VmRSS") if reset_hwm() else None
    fn()
    peak = status_kib("VmHWM") if start is not None else None
    return (None, None) if peak is None else (start * 1024, max(peak - start, 0) * 1024)


def tensor_bytes(*sources) -> int:
    """Bytes of the distinct tensors (by storage) in modules' parameters and buffers, optimizers' states and
    plain tensors: what a training run keeps resident between steps."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.device, t.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for source in sources:
        if isinstance(source, torch.nn.Module):
            for t in (*source.parameters(), *source.buffers()):
                add(t)
        elif isinstance(source, torch.optim.Optimizer):
            for state in source.state.values():
                for t in state.values():
                    add(t)
        else:
            add(source)
    return total


# ------------------------------------------------------------------------------------------------ steps
def make_plain_step(student, args, batch, accumulation: int = 1):
    """A plain training step of a HF causal LM: `accumulation` micro-batches of forward with `labels` (HF's CE) and
    backward, then the optimizer `Trainer` would build from `args` over all parameters, `zero_grad(set_to_none=True)`.
    Returns (step, optimizer)."""
    from transformers import Trainer

    student.train()
    optim_cls, optim_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, student)
    optimizer = optim_cls(student.parameters(), **optim_kwargs)

    def step():
        for _ in range(accumulation):
            out = student(**batch, use_cache=False)
            out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out

    return step, optimizer


def make_trainer_step(trainer, batch, accumulation: int = 1):
    """One optimizer step of a TRL / RED trainer without its loop: `accumulation` micro-batches of
    `trainer.training_step(trainer.model, inputs, num_items_in_batch)`, with `sync_gradients` set as Trainer's loop
    sets it (True on the last one only), then `optimizer.step()` and `zero_grad()` (the optimizer from
    `create_optimizer()`). No clipping, scheduler, data loading or logging. Returns (step, num_items_in_batch)."""
    if trainer.optimizer is None:
        trainer.create_optimizer()
    inputs = {k: v.clone() for k, v in batch.items()}
    num_items = trainer._get_num_items_in_batch([inputs] * accumulation, trainer.args.device)
    trainer.model.train()
    gradient_state = trainer.accelerator.gradient_state

    def step():
        for i in range(accumulation):
            gradient_state._set_sync_gradients(i == accumulation - 1)
            loss = trainer.training_step(trainer.model, dict(inputs), num_items)
        gradient_state._set_sync_gradients(True)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        del loss

    return step, num_items


def environment_line() -> str:
    import transformers
    import trl

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    line = (f"python {sys.version.split()[0]} | torch {torch.__version__} | transformers {transformers.__version__} "
            f"| trl {trl.__version__} | torch threads {torch.get_num_threads()} | cpus usable {affinity}")
    if torch.cuda.is_available():
        line += f" | cuda {torch.version.cuda} {torch.cuda.get_device_name()}"
    return line

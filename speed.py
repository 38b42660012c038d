"""What makes this machine fast: the mixed-precision choice and the number of CPU threads.

Precision (`--amp auto`, the default of production_trainer.py):
    CPU with AMX (Intel Sapphire Rapids and later)  bf16 autocast + channels_last (measured 2.5x fp32)
    CPU without AMX (AMD EPYC, older Intel)         fp32 (bf16 measured no faster, even with avx512_bf16)
    CUDA                                            bf16 where supported, else fp16 + GradScaler
    MPS                                             fp32 (no autocast)
`--amp on` forces autocast (bf16 on CPU), `--amp off` / `--no-amp` forces fp32.

Threads (`--threads auto`, the default of the trainer, inference.py and evaluate.py): one per core this
process may run on, or OMP_NUM_THREADS where it is set (torchrun sets 1 per process). The scripts also
set OMP_WAIT_POLICY=PASSIVE before torch loads, so an OpenMP thread that waits for its partners sleeps
instead of spinning: on a shared 2-core machine a spinning thread holds the core its straggling partner
needs, and the trainer fell to a fifth of its speed beside one other PyTorch process (bench_threads.py).
"""
import argparse
import os
from typing import NamedTuple

import torch

CPUINFO = '/proc/cpuinfo'
AMX_FLAGS = ('amx_bf16', 'amx_tile')


# ---------------------------------------------------------------- precision

def cpu_has_amx(cpuinfo=CPUINFO):
    """True where the CPU has AMX tiles for bf16. torch's own query first (it also asks the kernel for
    permission to use the tiles); /proc/cpuinfo's flags where this torch has no such query."""
    query = getattr(torch.cpu, '_is_amx_tile_supported', None)
    if query is not None and cpuinfo == CPUINFO:
        try:
            return bool(query())
        except RuntimeError:
            pass
    try:
        with open(cpuinfo) as handle:
            flags = {word for line in handle if line.startswith('flags') for word in line.split()}
    except OSError:   # not Linux
        return False
    return all(flag in flags for flag in AMX_FLAGS)


def amp_mode(amp):
    """--amp as typed (auto / on / off, or None / True / False from Python callers) -> 'auto' | 'on' | 'off'."""
    return {None: 'auto', True: 'on', False: 'off'}.get(amp, amp)


class AmpSettings(NamedTuple):
    """Mixed precision as chosen for a device (amp_choice)."""
    enabled: bool
    dtype: torch.dtype          # autocast's
    grad_scaler: bool           # fp16 needs loss scaling; bf16 has fp32's range and does not
    reason: str                 # a sentence for the log

    def autocast(self, device):
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.enabled)


def amp_choice(device, amp='auto', amp_dtype='auto'):
    """AmpSettings for a device: what --amp and --amp_dtype ask, where the device supports it."""
    return AmpSettings(*amp_tuple(device, amp_mode(amp), amp_dtype))


def amp_tuple(device, mode, amp_dtype):
    """(enabled, autocast dtype, use GradScaler, reason), amp_choice's answer."""
    if device.type == 'mps':
        return False, torch.float32, False, 'MPS: fp32 (no autocast on MPS)'
    if mode == 'off':
        return False, torch.float32, False, '--amp off: fp32'
    if device.type == 'cpu':
        if mode == 'on':
            return True, torch.bfloat16, False, '--amp on: bf16 autocast on the CPU'
        if cpu_has_amx():
            return True, torch.bfloat16, False, 'CPU has AMX: bf16 autocast + channels_last (2.5x fp32 measured)'
        return False, torch.float32, False, ('CPU without AMX: fp32 (bf16 autocast measured no faster there; '
                                             '--amp on forces it)')
    if amp_dtype == 'bf16' or (amp_dtype == 'auto' and torch.cuda.is_bf16_supported()):
        why = '--amp_dtype bf16' if amp_dtype == 'bf16' else 'the GPU supports bf16'
        return True, torch.bfloat16, False, f'CUDA: bf16 autocast ({why})'
    why = '--amp_dtype fp16' if amp_dtype == 'fp16' else 'the GPU has no bf16'
    return True, torch.float16, True, f'CUDA: fp16 autocast + GradScaler ({why})'


# ---------------------------------------------------------------- threads

def usable_cores():
    """Cores this process may run on (its affinity mask where the OS has one, e.g. under taskset)."""
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def auto_threads(cores=None):
    """(threads, reason): one per usable core. Fewer threads beside a busy process measured slower, not
    faster (bench_threads.py): the kernel shares the cores per thread, so one thread gets a smaller share,
    and the sleeping wait policy already stops the spinning that made two threads collapse."""
    cores = usable_cores() if cores is None else cores
    return cores, f'{cores} usable core(s), one thread each'


def set_threads(setting='auto'):
    """--threads auto | N -> (threads now in use, reason); torch.set_num_threads is set accordingly.
    auto leaves a set OMP_NUM_THREADS alone: the user's, or torchrun's 1 per process."""
    if setting in (None, 'auto') and os.environ.get('OMP_NUM_THREADS', '').isdigit():
        threads, reason = int(os.environ['OMP_NUM_THREADS']), f'OMP_NUM_THREADS={os.environ["OMP_NUM_THREADS"]}'
    elif setting in (None, 'auto'):
        threads, reason = auto_threads()
    else:
        threads, reason = int(setting), f'--threads {setting}'
    if threads < 1:
        raise ValueError(f'--threads {setting}: must be auto or a positive number')
    torch.set_num_threads(threads)
    return threads, reason


def threads_arg(text):
    """argparse type of --threads: 'auto' or a positive integer."""
    if text == 'auto':
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'{text!r}: give auto or a positive number of threads')
    return int(text)


# ---------------------------------------------------------------- memory

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc mallopt parameters (malloc.h)
HEAP_BLOCK_BYTES = 256 << 20                   # arrays up to this come from the heap, not a fresh mmap each
KEEP_FREED_BYTES = 1 << 30                     # freed heap the process keeps for the next page's arrays


def keep_freed_memory():
    """Have glibc reuse freed memory for the next large array instead of unmapping it and faulting fresh
    pages in: each page of a folder allocates and frees the same few tens of MB (decoded PNG, spectra,
    maps), and the kernel's page faults cost 15-35 ms of a page's 250 ms of CPU (system time of inference.py
    on 64 ecg-image-kit pages, with and without). True where applied (glibc)."""
    try:
        import ctypes
        libc = ctypes.CDLL('libc.so.6')
        return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES) and libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    except (OSError, AttributeError):   # not glibc (macOS, musl): its allocator as it is
        return False


# ---------------------------------------------------------------- inference

def fold_batch_norm(model):
    """An eval-mode model -> the same model with each BatchNorm that follows a conv folded into that conv's
    weights and bias (timm's ConvNormAct, smp's Conv2dReLU): a tenth of the CPU forward was batch norm
    alone. Only for inference: the folded model must not train."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    for module in list(model.modules()):
        if isinstance(getattr(module, 'conv', None), torch.nn.Conv2d) and \
                isinstance(getattr(module, 'bn', None), torch.nn.BatchNorm2d):
            after = torch.nn.Sequential(module.bn.drop, module.bn.act) if hasattr(module.bn, 'act') else \
                torch.nn.Identity()   # timm's BatchNormAct2d: norm, then dropout and activation
            module.conv, module.bn = fuse_conv_bn_eval(module.conv, module.bn), after
        elif isinstance(module, torch.nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], torch.nn.Conv2d) and type(module[i + 1]) is torch.nn.BatchNorm2d:
                    module[i], module[i + 1] = fuse_conv_bn_eval(module[i], module[i + 1]), torch.nn.Identity()
    return model

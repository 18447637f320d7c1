"""The CUDA driver stand-in (tests/fake_libcuda.c) loaded into this process, with every kernel launch
executed by the kernel's own Triton source under the interpreter.

The launchers (plugins/tensorrt/*_launch.cpp, driven through libshrinkrt_launchers.so's C API) reach the
driver only through dlopen("libcuda.so.1"): once the stand-in, whose soname is libcuda.so.1, is loaded
here first, that dlopen returns it. Each launch then comes back to `StandIn._on_launch`, which
- identifies the image against kernels.json (the cubin's or the PTX's sha256: the image the launcher
  chose, not the entry name, decides which specialization runs),
- checks the launch: block = 32 x num_warps, the shared bytes, the parameter count, Triton's two scratch
  pointers null (the kernels request no scratch), every pointer inside a stand-in allocation and aligned
  to its element,
- runs the kernel over tensors that view the stand-in's memory at those pointers, with the
  specialization's constexprs, on the launch's grid.
A failed check fails the launch (the launcher then reports CUDA_ERROR_LAUNCH_FAILED) and is raised by
`StandIn.raise_failure()`. Runs only under TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU).
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import json
import shutil
import struct
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "fake_libcuda.c"

# kernels.json "kernel" -> the module of plugins/kernels holding its Triton source
KERNEL_MODULES = {"qgemv": "qgemv", "dequant": "dequant", "bibranch_split": "bibranch_attn",
                  "bibranch_reduce": "bibranch_attn", "bibranch_append": "bibranch_attn",
                  "feature_quant": "bibranch_attn"}
POINTER_DTYPES = {"*fp16": torch.float16, "*fp32": torch.float32, "*i8": torch.int8, "*i32": torch.int32,
                  "*i64": torch.int64}
SCALAR_TYPES = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "fp32": ctypes.c_float}
SCRATCH_PARAMS = 2  # Triton appends global and profile scratch pointers to every entry

LAUNCH_HOOK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint),
                               ctypes.POINTER(ctypes.c_uint), ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p))


def build(out_dir: Path) -> Path:
    """tests/fake_libcuda.c -> out_dir/libcuda.so.1 (soname libcuda.so.1)."""
    if not shutil.which("cc"):
        raise FileNotFoundError("a C compiler (cc) is needed to build the CUDA driver stand-in")
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / "libcuda.so.1"
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", str(SOURCE), "-Wl,-soname,libcuda.so.1",
                    "-o", str(lib)], check=True, capture_output=True, timeout=120)
    return lib


class StandIn:
    """The stand-in driver in this process, executing launches of the images listed in `manifest`."""

    def __init__(self, lib: Path, manifest: Path):
        self.lib = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        self.lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
        self.lib.cuMemFree_v2.argtypes = [ctypes.c_uint64]
        self.lib.fake_cuda_extent.argtypes = [ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64),
                                              ctypes.POINTER(ctypes.c_uint64)]
        self.kernels = json.loads(Path(manifest).read_text())["kernels"]
        self.launches: list[dict] = []  # each executed launch: name, grid, block, shared, scalar args
        self.failure: BaseException | None = None
        self._images: dict[int, dict] = {}  # image address -> kernels.json row
        self._live: list[int] = []
        self._hook = LAUNCH_HOOK(self._on_launch)  # kept alive as long as the stand-in
        self.lib.fake_cuda_set_launch_hook(self._hook)

    # memory -------------------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        assert self.lib.cuMemAlloc_v2(ctypes.byref(ptr), nbytes) == 0
        self._live.append(ptr.value)
        return ptr.value

    def upload(self, t: torch.Tensor) -> int:
        """A new allocation holding t's bytes (contiguous)."""
        t = t.contiguous()
        ptr = self.alloc(t.numel() * t.element_size())
        ctypes.memmove(ptr, t.data_ptr(), t.numel() * t.element_size())
        return ptr

    def download(self, ptr: int, shape, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        ctypes.memmove(out.data_ptr(), ptr, out.numel() * out.element_size())
        return out

    def extent(self, ptr: int) -> tuple[int, int] | None:
        base, size = ctypes.c_uint64(), ctypes.c_uint64()
        return (base.value, size.value) if self.lib.fake_cuda_extent(ptr, ctypes.byref(base), ctypes.byref(size)) \
            else None

    def guards_broken(self) -> int:
        return self.lib.fake_cuda_guards_broken()

    def free_all(self):
        for p in self._live:
            self.lib.cuMemFree_v2(p)
        self._live.clear()

    def raise_failure(self):
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    # launches -----------------------------------------------------------------------------------------
    def identify(self, image: int) -> dict:
        """The kernels.json row whose cubin or PTX is the bytes at `image`."""
        if image not in self._images:
            elf = ctypes.string_at(image, 4) == b"\x7fELF"
            if elf:  # a cubin ends with its header tables (ELF64: e_phoff, e_shoff, then their entry sizes/counts)
                phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize, shnum, _ = struct.unpack_from(
                    "<QQIHHHHHH", ctypes.string_at(image + 0x20, 0x20))
                data = ctypes.string_at(image, max(phoff + phentsize * phnum, shoff + shentsize * shnum))
            else:  # PTX: NUL-terminated text
                data = ctypes.string_at(image)
            size, digest = ("cubin_bytes", "cubin_sha256") if elf else ("ptx_bytes", "ptx_sha256")
            sha = hashlib.sha256(data).hexdigest()
            rows = [k for k in self.kernels if k[size] == len(data) and k[digest] == sha]
            if len(rows) != 1:
                raise AssertionError(f"the loaded {'cubin' if elf else 'PTX'} image matches {len(rows)} kernels of "
                                     "kernels.json")
            self._images[image] = rows[0]
        return self._images[image]

    def _on_launch(self, image, entry, grid, block, shared, params) -> int:
        try:
            self._execute(image, entry.decode(), tuple(grid[i] for i in range(3)), tuple(block[i] for i in range(3)),
                          shared, params)
            return 0
        except BaseException as e:  # noqa: BLE001 - reported by raise_failure(), not lost in the C callback
            self.failure = self.failure or e
            return 1

    def _execute(self, image, entry, grid, block, shared, params):
        k = self.identify(image)
        name = k["name"]
        if entry != k["entry"]:
            raise AssertionError(f"{name}: launched entry {entry}, the image's is {k['entry']}")
        if block != (32 * k["num_warps"], 1, 1):
            raise AssertionError(f"{name}: block {block}, kernels.json says {32 * k['num_warps']} threads")
        if shared != k["shared"]:
            raise AssertionError(f"{name}: {shared} shared bytes, kernels.json says {k['shared']}")
        sig = k["params"]
        if len(sig) + SCRATCH_PARAMS != k["num_params"]:
            raise AssertionError(f"{name}: kernels.json lists {len(sig)} parameters for a {k['num_params']}-parameter "
                                 "entry")
        scratch = [ctypes.cast(params[len(sig) + i], ctypes.POINTER(ctypes.c_uint64))[0] for i in range(SCRATCH_PARAMS)]
        if any(scratch) or k["global_scratch_size"]:
            raise AssertionError(f"{name}: scratch pointers {scratch} for a kernel with "
                                 f"{k['global_scratch_size']} scratch bytes")
        args, scalars = [], {}
        for i, (pname, ptype) in enumerate(sig):
            if ptype in POINTER_DTYPES:
                ptr = ctypes.cast(params[i], ctypes.POINTER(ctypes.c_uint64))[0]
                args.append(self._view(name, pname, ptr, POINTER_DTYPES[ptype]))
            else:
                value = ctypes.cast(params[i], ctypes.POINTER(SCALAR_TYPES[ptype]))[0]
                scalars[pname] = value
                args.append(value)
        fn = getattr(importlib.import_module(f"shrinkrt.plugins.kernels.{KERNEL_MODULES[k['kernel']]}"),
                     f"{k['kernel']}_kernel")
        if type(fn).__name__ != "InterpretedFunction":
            raise RuntimeError("the stand-in runs kernels under Triton's interpreter: set TRITON_INTERPRET=1 before "
                               "triton is imported")
        fn[grid](*args, **k["const"])
        self.launches.append({"name": name, "grid": list(grid), "block": list(block), "shared": shared,
                              "scalars": scalars})

    def _view(self, name, pname, ptr, dtype) -> torch.Tensor:
        """A tensor over the stand-in's memory from ptr to the end of its allocation."""
        ext = self.extent(ptr)
        if ext is None:
            raise AssertionError(f"{name}: {pname} = {ptr:#x} is in no allocation")
        base, size = ext
        item = torch.empty(0, dtype=dtype).element_size()
        if (ptr - base) % item or base + size - ptr < item:
            raise AssertionError(f"{name}: {pname} = base + {ptr - base} is not a whole {dtype} inside its "
                                 f"{size}-byte allocation")
        count = (base + size - ptr) // item
        return torch.frombuffer((ctypes.c_char * (count * item)).from_address(ptr), dtype=dtype, count=count)

// A CUDA driver stand-in for the plugins' launch path (tests only; built as libcuda.so.1, soname
// libcuda.so.1, by tests/stand_in.py). It exports the driver entry points the launchers
// (plugins/tensorrt/kernel_images.cpp) and tests/plugin_probe.cpp reach through dlopen("libcuda.so.1") +
// dlsym, over host memory: "device" allocations are malloc'd with guard bytes either side, pre-filled with
// 0x5a bytes, and kept in a table (fake_cuda_extent) so a launch's pointers can be checked against them;
// copies are memcpy. Each module load, function lookup and launch is appended as one JSON line to
// $SHRINKRT_FAKE_CUDA_LOG (which images load, how often, every launch's grid, block and shared bytes), and
// a launch hook (fake_cuda_set_launch_hook) lets a test execute the launch: tests/stand_in.py runs the
// kernel's Triton source under the interpreter on tensors viewing this memory. $SHRINKRT_FAKE_CUDA_FAIL =
// context | load | launch makes that call fail (fault injection).
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
enum
{
    kSuccess = 0,
    kInvalidImage = 200,
    kInvalidContext = 201,
    kLaunchFailed = 719
};

static void say(char const* fmt, ...)
{
    char const* path = getenv("SHRINKRT_FAKE_CUDA_LOG");
    if (!path)
        return;
    FILE* f = fopen(path, "a");
    if (!f)
        return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fputc('\n', f);
    fclose(f);
}

static int injected(char const* what)
{
    char const* f = getenv("SHRINKRT_FAKE_CUDA_FAIL");
    return f && strcmp(f, what) == 0;
}

static int gContext;

CUresult cuInit(unsigned flags)
{
    (void) flags;
    return kSuccess;
}

CUresult cuDeviceGet(int* dev, int ordinal)
{
    *dev = ordinal;
    return kSuccess;
}

CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev)
{
    (void) dev;
    *ctx = &gContext;
    return kSuccess;
}

CUresult cuCtxSetCurrent(void* ctx)
{
    (void) ctx;
    return kSuccess;
}

CUresult cuCtxSynchronize(void)
{
    return kSuccess;
}

CUresult cuCtxGetCurrent(void** ctx)
{
    if (injected("context"))
        return kInvalidContext;
    *ctx = &gContext;
    return kSuccess;
}

CUresult cuCtxGetDevice(int* dev)
{
    *dev = 0;
    return kSuccess;
}

// compute capability 7.5 (the cubin path) unless SHRINKRT_FAKE_CUDA_CC says e.g. "8.6" (the PTX path)
CUresult cuDeviceGetAttribute(int* value, int attribute, int dev)
{
    (void) dev;
    int major = 7, minor = 5;
    char const* cc = getenv("SHRINKRT_FAKE_CUDA_CC");
    if (cc)
        sscanf(cc, "%d.%d", &major, &minor);
    *value = attribute == 75 ? major : attribute == 76 ? minor : 0;
    return kSuccess;
}

// Allocations: guard bytes either side (a kernel writing past its buffer shows in fake_cuda_guards_broken)
enum
{
    kGuard = 256,
    kMaxAllocs = 4096
};
static unsigned char const kGuardByte = 0xa5;
struct Alloc
{
    unsigned char* raw; // kGuard | bytes | kGuard
    size_t bytes;
};
static struct Alloc gAllocs[kMaxAllocs];
static int gNumAllocs;

CUresult cuMemAlloc_v2(uint64_t* ptr, size_t bytes)
{
    unsigned char* raw = gNumAllocs < kMaxAllocs ? malloc(bytes + 2 * kGuard) : NULL;
    if (!raw)
        return 2; // CUDA_ERROR_OUT_OF_MEMORY
    memset(raw, kGuardByte, kGuard);
    memset(raw + kGuard, 0x5a, bytes);
    memset(raw + kGuard + bytes, kGuardByte, kGuard);
    gAllocs[gNumAllocs++] = (struct Alloc){raw, bytes};
    *ptr = (uint64_t) (uintptr_t) (raw + kGuard);
    return kSuccess;
}

CUresult cuMemFree_v2(uint64_t ptr)
{
    for (int i = 0; i < gNumAllocs; ++i)
        if ((uint64_t) (uintptr_t) (gAllocs[i].raw + kGuard) == ptr)
        {
            free(gAllocs[i].raw);
            gAllocs[i] = gAllocs[--gNumAllocs];
            return kSuccess;
        }
    return 1; // CUDA_ERROR_INVALID_VALUE
}

// The allocation holding [ptr, ptr + 1): 1 and its start and size, or 0 when ptr is in none.
int fake_cuda_extent(uint64_t ptr, uint64_t* base, uint64_t* bytes)
{
    for (int i = 0; i < gNumAllocs; ++i)
    {
        uint64_t const b = (uint64_t) (uintptr_t) (gAllocs[i].raw + kGuard);
        if (ptr >= b && ptr < b + gAllocs[i].bytes)
        {
            *base = b;
            *bytes = gAllocs[i].bytes;
            return 1;
        }
    }
    return 0;
}

// Live allocations whose guard bytes were overwritten.
int fake_cuda_guards_broken(void)
{
    int broken = 0;
    for (int i = 0; i < gNumAllocs; ++i)
    {
        unsigned char const* lo = gAllocs[i].raw;
        unsigned char const* hi = gAllocs[i].raw + kGuard + gAllocs[i].bytes;
        for (int j = 0; j < kGuard; ++j)
            if (lo[j] != kGuardByte || hi[j] != kGuardByte)
            {
                ++broken;
                break;
            }
    }
    return broken;
}

CUresult cuMemcpyHtoD_v2(uint64_t dst, void const* src, size_t bytes)
{
    memcpy((void*) (uintptr_t) dst, src, bytes);
    return kSuccess;
}

CUresult cuMemcpyDtoH_v2(void* dst, uint64_t src, size_t bytes)
{
    memcpy(dst, (void const*) (uintptr_t) src, bytes);
    return kSuccess;
}

CUresult cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t bytes, void* stream)
{
    (void) stream;
    memmove((void*) (uintptr_t) dst, (void const*) (uintptr_t) src, bytes);
    say("{\"event\": \"copy\", \"bytes\": %zu}", bytes);
    return kSuccess;
}

struct Module
{
    int id;
    int ptx;           // the image starts as PTX text, not an ELF cubin
    void const* image; // as loaded (the plugins' embedded arrays outlive their modules)
};

struct Function
{
    int module;
    void const* image;
    char entry[256];
};

// A test's launch executor: (image, entry, grid[3], block[3], shared bytes, params) -> 0, or non-zero to
// fail the launch.
typedef int (*LaunchHook)(void const*, char const*, unsigned const*, unsigned const*, unsigned, void**);
static LaunchHook gLaunchHook;

void fake_cuda_set_launch_hook(LaunchHook hook)
{
    gLaunchHook = hook;
}

static int gLoads;

CUresult cuModuleLoadData(void** module, void const* image)
{
    if (injected("load"))
        return kInvalidImage;
    struct Module* m = malloc(sizeof *m);
    m->id = ++gLoads;
    m->ptx = memcmp(image, "\x7f" "ELF", 4) != 0;
    m->image = image;
    say("{\"event\": \"load\", \"module\": %d, \"kind\": \"%s\"}", m->id, m->ptx ? "ptx" : "cubin");
    *module = m;
    return kSuccess;
}

CUresult cuModuleUnload(void* module)
{
    say("{\"event\": \"unload\", \"module\": %d}", ((struct Module*) module)->id);
    free(module);
    return kSuccess;
}

CUresult cuModuleGetFunction(void** function, void* module, char const* entry)
{
    struct Function* f = malloc(sizeof *f); // one per lookup; a test process is short
    f->module = ((struct Module*) module)->id;
    f->image = ((struct Module*) module)->image;
    snprintf(f->entry, sizeof f->entry, "%s", entry);
    *function = f;
    return kSuccess;
}

CUresult cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
    unsigned shared, void* stream, void** params, void** extra)
{
    (void) stream, (void) extra;
    struct Function const* f = function;
    if (injected("launch"))
        return kLaunchFailed;
    unsigned const grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    if (gLaunchHook && gLaunchHook(f->image, f->entry, grid, block, shared, params) != 0)
        return kLaunchFailed;
    say("{\"event\": \"launch\", \"module\": %d, \"entry\": \"%s\", \"grid\": [%u, %u, %u], \"block\": [%u, %u, %u], "
        "\"shared\": %u}",
        f->module, f->entry, gx, gy, gz, bx, by, bz, shared);
    return kSuccess;
}

CUresult cuGetErrorString(CUresult res, char const** text)
{
    *text = res == kInvalidImage ? "CUDA_ERROR_INVALID_IMAGE (stand-in: injected)"
        : res == kInvalidContext ? "CUDA_ERROR_INVALID_CONTEXT (stand-in: injected)"
        : res == kLaunchFailed   ? "CUDA_ERROR_LAUNCH_FAILED (stand-in: injected or the launch check failed)"
                                 : "stand-in driver error";
    return kSuccess;
}

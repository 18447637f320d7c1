// A CUDA driver stand-in for the plugins' launch path (tests only; built as libcuda.so.1 by
// tests/test_trt_plugins.py and found first through LD_LIBRARY_PATH). It exports the driver entry points
// the plugins (plugins/tensorrt/kernel_images.cpp) and tests/plugin_probe.cpp reach through
// dlopen("libcuda.so.1") + dlsym, over host memory: "device" allocations are malloc'd and pre-filled with
// 0x5a bytes, copies are memcpy. Nothing executes a kernel: each module load, function lookup and launch
// is appended as one JSON line to $SHRINKRT_FAKE_CUDA_LOG, so a test can check which images a plugin
// loads, how often, and every launch's grid, block and shared bytes. $SHRINKRT_FAKE_CUDA_FAIL = load |
// launch makes that call fail (fault injection).
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

CUresult cuMemAlloc_v2(uint64_t* ptr, size_t bytes)
{
    void* m = malloc(bytes ? bytes : 1);
    if (!m)
        return 2; // CUDA_ERROR_OUT_OF_MEMORY
    memset(m, 0x5a, bytes);
    *ptr = (uint64_t) (uintptr_t) m;
    return kSuccess;
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
    int ptx; // the image starts as PTX text, not an ELF cubin
};

struct Function
{
    int module;
    char entry[256];
};

static int gLoads;

CUresult cuModuleLoadData(void** module, void const* image)
{
    if (injected("load"))
        return kInvalidImage;
    struct Module* m = malloc(sizeof *m);
    m->id = ++gLoads;
    m->ptx = memcmp(image, "\x7f" "ELF", 4) != 0;
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
    (void) params; // the plugins check their parameter count against kernels.json themselves
    say("{\"event\": \"launch\", \"module\": %d, \"entry\": \"%s\", \"grid\": [%u, %u, %u], \"block\": [%u, %u, %u], "
        "\"shared\": %u}",
        f->module, f->entry, gx, gy, gz, bx, by, bz, shared);
    return kSuccess;
}

CUresult cuGetErrorString(CUresult res, char const** text)
{
    *text = res == kInvalidImage ? "CUDA_ERROR_INVALID_IMAGE (stand-in: injected)"
        : res == kLaunchFailed   ? "CUDA_ERROR_LAUNCH_FAILED (stand-in: injected)"
                                 : "stand-in driver error";
    return kSuccess;
}

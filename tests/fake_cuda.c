/* A stand-in for libcuda.so, for exercising stager's CUDA plumbing on machines without a GPU.
 *
 * It implements only the driver calls stager makes, synchronously: "device memory" is host
 * memory, a device-to-host copy is a memcpy, every event has completed when recorded. It checks
 * what a real driver would refuse: calls that need a context without one being current, double
 * registration, unregistering unknown memory, unbalanced context pushes. It proves nothing about
 * ordering or speed (tests/test_gpu.py on a real GPU does); it proves the calls, contexts,
 * chunking, completion reporting and error paths are wired right.
 *
 * Build: cc -shared -fPIC -O1 -o libcuda.so fake_cuda.c -lpthread
 * Knobs: FAKE_CUDA_DEVICES (default 1), FAKE_CUDA_FAIL_COPY_AFTER=n (the n+1-th copy fails).
 * fake_cuda_counters() reports what happened (see the struct below).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUstream;
typedef void *CUevent;
typedef unsigned long long CUdeviceptr;

enum {
    OK = 0,
    INVALID_VALUE = 1,
    NOT_INITIALIZED = 3,
    INVALID_DEVICE = 101,
    INVALID_CONTEXT = 201,
    INVALID_HANDLE = 400,
    ALREADY_REGISTERED = 712,
    NOT_REGISTERED = 713,
};

struct counters {
    long registered, unregistered, copies, copied_bytes, events_alive, streams_alive, waits, errors;
};
static struct counters counters;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int initialized, devices = 1, fail_after = -1;
static int retained[16];
static char contexts[16]; /* a context handle is &contexts[device] */

#define MAX_REG 1024
static void *registered[MAX_REG];

static __thread CUcontext stack[32];
static __thread int depth;

static CUresult fail(CUresult r) {
    __atomic_add_fetch(&counters.errors, 1, __ATOMIC_SEQ_CST);
    return r;
}

static int need_ctx(void) { return initialized && depth > 0 && stack[depth - 1] != NULL; }

static int ctx_device(CUcontext ctx) {
    long d = (char *)ctx - contexts;
    return (d >= 0 && d < devices && retained[d]) ? (int)d : -1;
}

const struct counters *fake_cuda_counters(void) { return &counters; }

CUresult cuInit(unsigned flags) {
    (void)flags;
    const char *n = getenv("FAKE_CUDA_DEVICES");
    const char *f = getenv("FAKE_CUDA_FAIL_COPY_AFTER");
    devices = n ? atoi(n) : 1;
    if (devices > 16) devices = 16;
    fail_after = f ? atoi(f) : -1;
    initialized = 1;
    return OK;
}

CUresult cuGetErrorName(CUresult error, const char **name) {
    switch (error) {
    case INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; break;
    case INVALID_CONTEXT: *name = "CUDA_ERROR_INVALID_CONTEXT"; break;
    case ALREADY_REGISTERED: *name = "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED"; break;
    case NOT_REGISTERED: *name = "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED"; break;
    default: *name = "CUDA_ERROR_FAKE"; break;
    }
    return OK;
}

CUresult cuDeviceGetCount(int *count) {
    if (!initialized) return fail(NOT_INITIALIZED);
    *count = devices;
    return OK;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    if (!initialized) return fail(NOT_INITIALIZED);
    if (ordinal < 0 || ordinal >= devices) return fail(INVALID_DEVICE);
    *device = ordinal;
    return OK;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice dev) {
    if (!initialized) return fail(NOT_INITIALIZED);
    if (dev < 0 || dev >= devices) return fail(INVALID_DEVICE);
    pthread_mutex_lock(&lock);
    retained[dev]++;
    pthread_mutex_unlock(&lock);
    *ctx = &contexts[dev];
    return OK;
}

CUresult cuDevicePrimaryCtxGetState(CUdevice dev, unsigned *flags, int *active) {
    if (!initialized) return fail(NOT_INITIALIZED);
    if (dev < 0 || dev >= devices) return fail(INVALID_DEVICE);
    *flags = 0;
    *active = retained[dev] > 0;
    return OK;
}

CUresult cuCtxPushCurrent_v2(CUcontext ctx) {
    if (ctx_device(ctx) < 0 || depth >= 32) return fail(INVALID_CONTEXT);
    stack[depth++] = ctx;
    return OK;
}

CUresult cuCtxPopCurrent_v2(CUcontext *ctx) {
    if (depth == 0) return fail(INVALID_CONTEXT);
    CUcontext top = stack[--depth];
    if (ctx) *ctx = top;
    return OK;
}

CUresult cuCtxGetCurrent(CUcontext *ctx) {
    if (!initialized) return fail(NOT_INITIALIZED);
    *ctx = depth > 0 ? stack[depth - 1] : NULL;
    return OK;
}

CUresult cuCtxGetDevice(CUdevice *device) {
    if (!need_ctx()) return fail(INVALID_CONTEXT);
    *device = ctx_device(stack[depth - 1]);
    return OK;
}

CUresult cuMemHostRegister_v2(void *p, size_t bytes, unsigned flags) {
    if (!need_ctx()) return fail(INVALID_CONTEXT);
    if (!p || !bytes || (flags & ~1u)) return fail(INVALID_VALUE); /* PORTABLE only: no DEVICEMAP/IOMEMORY */
    pthread_mutex_lock(&lock);
    int free_slot = -1;
    for (int i = 0; i < MAX_REG; i++) {
        if (registered[i] == p) {
            pthread_mutex_unlock(&lock);
            return fail(ALREADY_REGISTERED);
        }
        if (!registered[i] && free_slot < 0) free_slot = i;
    }
    registered[free_slot] = p;
    counters.registered++;
    pthread_mutex_unlock(&lock);
    return OK;
}

CUresult cuMemHostUnregister(void *p) {
    if (!need_ctx()) return fail(INVALID_CONTEXT);
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_REG; i++) {
        if (registered[i] == p) {
            registered[i] = NULL;
            counters.unregistered++;
            pthread_mutex_unlock(&lock);
            return OK;
        }
    }
    pthread_mutex_unlock(&lock);
    return fail(NOT_REGISTERED);
}

CUresult cuStreamCreate(CUstream *stream, unsigned flags) {
    (void)flags;
    if (!need_ctx()) return fail(INVALID_CONTEXT);
    *stream = malloc(16);
    __atomic_add_fetch(&counters.streams_alive, 1, __ATOMIC_SEQ_CST);
    return OK;
}

CUresult cuStreamDestroy_v2(CUstream stream) {
    if (!need_ctx()) return fail(INVALID_CONTEXT);
    if (!stream) return fail(INVALID_HANDLE);
    free(stream);
    __atomic_sub_fetch(&counters.streams_alive, 1, __ATOMIC_SEQ_CST);
    return OK;
}

CUresult cuStreamSynchronize(CUstream stream) {
    (void)stream;
    return need_ctx() ? OK : fail(INVALID_CONTEXT);
}

CUresult cuStreamWaitEvent(CUstream stream, CUevent event, unsigned flags) {
    (void)flags;
    if (!need_ctx()) return fail(INVALID_CONTEXT);
    if (!stream || !event) return fail(INVALID_HANDLE);
    __atomic_add_fetch(&counters.waits, 1, __ATOMIC_SEQ_CST);
    return OK;
}

CUresult cuEventCreate(CUevent *event, unsigned flags) {
    (void)flags;
    if (!need_ctx()) return fail(INVALID_CONTEXT);
    *event = malloc(16);
    __atomic_add_fetch(&counters.events_alive, 1, __ATOMIC_SEQ_CST);
    return OK;
}

CUresult cuEventRecord(CUevent event, CUstream stream) {
    (void)stream; /* NULL: the legacy default stream */
    if (!need_ctx()) return fail(INVALID_CONTEXT);
    return event ? OK : fail(INVALID_HANDLE);
}

CUresult cuEventQuery(CUevent event) { return event ? OK : fail(INVALID_HANDLE); }

CUresult cuEventSynchronize(CUevent event) { return event ? OK : fail(INVALID_HANDLE); }

CUresult cuEventDestroy_v2(CUevent event) {
    if (!event) return fail(INVALID_HANDLE);
    free(event);
    __atomic_sub_fetch(&counters.events_alive, 1, __ATOMIC_SEQ_CST);
    return OK;
}

CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t bytes, CUstream stream) {
    if (!need_ctx()) return fail(INVALID_CONTEXT);
    if (!dst || !src || !stream) return fail(INVALID_VALUE);
    long n = __atomic_fetch_add(&counters.copies, 1, __ATOMIC_SEQ_CST);
    if (fail_after >= 0 && n >= fail_after) return fail(INVALID_VALUE);
    memcpy(dst, (const void *)(uintptr_t)src, bytes);
    __atomic_add_fetch(&counters.copied_bytes, (long)bytes, __ATOMIC_SEQ_CST);
    return OK;
}

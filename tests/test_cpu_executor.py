"""The CPU executor itself (tests/cpu_cuda), on small kernels written here.

Each test checks one thing a GPU would do and the executor must reproduce
(barrier semantics, shared memory, warp intrinsics, atomics, half precision,
launch geometry) or one error a GPU or compute-sanitizer would report
(argument mismatches, bad launch configurations, barrier divergence,
crashes, out-of-bounds accesses).
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import cpu_cuda
from cpu_cuda import KernelLaunchError
from cupyconv import _kernels

pytestmark = [
    pytest.mark.cpu_kernels,  # re-run under the sanitizers too
    pytest.mark.skipif(cpu_cuda.compiler_unavailable_reason() is not None,
                       reason=str(cpu_cuda.compiler_unavailable_reason())),
]

SANITIZED = os.environ.get(cpu_cuda.SANITIZE_ENV) == "1"
# Tests that crash a kernel on purpose: under ASan the sanitizer (rightly)
# ends the process instead, so they only run in the plain build.
plain_build_only = pytest.mark.skipif(SANITIZED, reason="crashes on purpose; ASan would abort")

KERNELS = r"""
// Tree reduction in static shared memory: one partial sum per block.
template <typename T>
__global__ void block_sum(const T* in, T* out, long long n) {
    __shared__ T partial[256];
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    partial[threadIdx.x] = i < n ? in[i] : T(0);
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// The same with the barrier inside the loop forgotten (a classic bug).
__global__ void block_sum_missing_barrier(const long long* in, long long* out) {
    __shared__ long long partial[256];
    partial[threadIdx.x] = in[(long long)blockIdx.x * blockDim.x + threadIdx.x];
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1)
        if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// Reverses each block's chunk through dynamic shared memory.
__global__ void reverse_chunks(const float* in, float* out) {
    extern __shared__ float chunk[];
    const long long base = (long long)blockIdx.x * blockDim.x;
    chunk[blockDim.x - 1 - threadIdx.x] = in[base + threadIdx.x];
    __syncthreads();
    out[base + threadIdx.x] = chunk[threadIdx.x];
}

// Dynamic shared memory declared as aligned bytes and used as doubles.
__global__ void shared_bytes_as_doubles(const double* in, double* out) {
    extern __shared__ __align__(16) unsigned char raw[];
    double* values = reinterpret_cast<double*>(raw);
    values[threadIdx.x] = 2.0 * in[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = values[(threadIdx.x + 1) % blockDim.x];
}

// Reads static shared memory nobody wrote: must see the poison byte.
__global__ void read_unwritten_shared(unsigned int* out) {
    __shared__ unsigned int never_written[64];
    __shared__ unsigned int written_by_block_0[64];
    if (blockIdx.x == 0) written_by_block_0[threadIdx.x] = 7u;
    __syncthreads();
    out[blockIdx.x * 2 * blockDim.x + threadIdx.x] = never_written[threadIdx.x];
    out[(blockIdx.x * 2 + 1) * blockDim.x + threadIdx.x] = written_by_block_0[threadIdx.x];
}

// Every built-in index, for a 3-D grid of 3-D blocks.
__global__ void write_indices(int* out) {
    const int block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const int thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    int* o = out + 10 * (block * blockDim.x * blockDim.y * blockDim.z + thread);
    o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = threadIdx.z;
    o[3] = blockIdx.x; o[4] = blockIdx.y; o[5] = blockIdx.z;
    o[6] = blockDim.x * 100 + blockDim.y * 10 + blockDim.z;
    o[7] = gridDim.x * 100 + gridDim.y * 10 + gridDim.z;
    o[8] = warpSize;
    o[9] = __activemask() == (thread / 32 * 32 + 32 <= (int)(blockDim.x * blockDim.y * blockDim.z)
                              ? 0xffffffffu : (1u << ((blockDim.x * blockDim.y * blockDim.z) % 32)) - 1u);
}

// A grid-stride loop with far fewer threads than items.
__global__ void grid_stride_square(const long long* in, long long* out, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = in[i] * in[i];
}

// Histogram with every atomicAdd overload the executor supports.
__global__ void atomic_histogram(const int* bins, long long n, int* counts_i,
                                 unsigned int* counts_u, unsigned long long* counts_ull,
                                 float* counts_f, double* counts_d, int* old_values) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const int b = bins[i];
        old_values[i] = atomicAdd(&counts_i[b], 1);
        atomicAdd(&counts_u[b], 2u);
        atomicAdd(&counts_ull[b], 3ull);
        atomicAdd(&counts_f[b], 0.5f);
        atomicAdd(&counts_d[b], 0.25);
    }
}

// Warp intrinsics; one output row of 8 values per thread.
__global__ void warp_ops(const int* in, int* out) {
    const int t = threadIdx.x;
    const int lane = t % 32;
    const int v = in[t];
    int sum = v;  // butterfly reduction over the warp
    for (int m = 16; m > 0; m >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, m);
    int down = v;  // tree reduction: lane 0 ends with the total
    for (int d = 16; d > 0; d >>= 1) down += __shfl_down_sync(0xffffffffu, down, d);
    int scan = v;  // inclusive prefix sum in segments of 8 lanes
    for (int d = 1; d < 8; d <<= 1) {
        const int up = __shfl_up_sync(0xffffffffu, scan, d, 8);
        if (lane % 8 >= d) scan += up;
    }
    int* o = out + 8 * t;
    o[0] = sum;
    o[1] = down;
    o[2] = scan;
    o[3] = __shfl_sync(0xffffffffu, v, 5);           // broadcast lane 5
    o[4] = __shfl_sync(0xffffffffu, v, lane + 1, 4); // rotate within 4-lane groups
    o[5] = (int)__ballot_sync(0xffffffffu, v % 3 == 0);
    o[6] = __any_sync(0xffffffffu, v == 40) * 10 + __all_sync(0xffffffffu, v >= 0);
    // Half warps shuffle independently under their own masks.
    const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    o[7] = __shfl_sync(half, v, lane < 16 ? 0 : 16);
}

// Lanes in different branches are not active together.
__global__ void divergent_activemask(unsigned int* out) {
    if (threadIdx.x % 32 < 10) out[threadIdx.x] = __activemask();
    else out[threadIdx.x] = __activemask();
}

__global__ void double_shuffle(const double* in, double* out) {
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, in[threadIdx.x], 1);
}

__global__ void barrier_predicates(const int* in, int* out) {
    const int v = in[threadIdx.x];
    out[3 * threadIdx.x] = __syncthreads_count(v > 0);
    out[3 * threadIdx.x + 1] = __syncthreads_and(v > 0);
    out[3 * threadIdx.x + 2] = __syncthreads_or(v > 5);
}

// float <-> half conversions and half arithmetic.
__global__ void half_roundtrip(const float* in, __half* halves, float* back, __half* sums) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const __half h = __float2half_rn(in[i]);
    halves[i] = h;
    back[i] = __half2float(h);
    sums[i] = __half2float(h) > 0.0f ? h + __float2half(1.0f) : __float2half(__half2float(h) * 2.0f);
}

__global__ void math_functions(const float* in, float* out) {
    const float x = in[threadIdx.x];
    float* o = out + 8 * threadIdx.x;
    o[0] = fmaxf(x, 0.5f);
    o[1] = fminf(x, -0.5f);
    o[2] = sqrtf(fabsf(x));
    o[3] = expf(x);
    o[4] = isnan(x) ? 1.0f : (isinf(x) ? 2.0f : 0.0f);
    o[5] = max(x, 1.0f);
    o[6] = (float)min(threadIdx.x, 3u);
    o[7] = __ldg(&in[threadIdx.x]) + INFINITY * 0.0f * 0.0f;
}

__global__ void vector_types(const float4* in, float4* out, int2* ints) {
    const float4 v = in[threadIdx.x];
    out[threadIdx.x] = make_float4(v.w, v.z, v.y, v.x);
    ints[threadIdx.x] = make_int2((int)threadIdx.x, (int)sizeof(float4) * 100 + (int)alignof(float4));
}

__global__ void takes_scalars(float* out, float f, double d, int i, long long ll,
                              unsigned char u8, bool b) {
    out[0] = f; out[1] = (float)d; out[2] = (float)i; out[3] = (float)ll;
    out[4] = (float)u8; out[5] = b ? 1.0f : 0.0f;
}

// ---- kernels that must fail ----
__global__ void early_return_before_barrier(int* out) {
    if (threadIdx.x == 3) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

__global__ void barrier_in_both_branches(int* out) {
    if (threadIdx.x % 2 == 0) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

__global__ void shuffle_missing_lane(int* out) {
    if (threadIdx.x == 7) {
        __syncthreads();
        return;
    }
    out[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0);
}

__global__ void shuffle_mask_without_self(int* out) {
    out[threadIdx.x] = __shfl_sync(0x1u, (int)threadIdx.x, 0);
}

__global__ void divide(const int* a, const int* b, int* out) {
    out[threadIdx.x] = a[threadIdx.x] / b[threadIdx.x];
}

__global__ void write_through(int* p, long long offset) { p[offset] = 1; }

__global__ void failing_assert(const int* in) { assert(in[threadIdx.x] >= 0); }

__global__ void traps(int* out) {
    if (threadIdx.x == 1) __trap();
    out[threadIdx.x] = 1;
}

// Each level keeps a 1 KiB frame alive for the next: 1000 levels overflow
// the 64 KiB fiber stack.
__device__ __noinline__ int deep(int depth, volatile char* previous) {
    volatile char frame[1024];
    frame[depth % 1024] = previous[depth % 1024];
    return depth == 0 ? frame[0] : frame[1] + deep(depth - 1, frame);
}

__global__ void recurse(int* out, int depth) {
    volatile char first[1024] = {};
    out[threadIdx.x] = deep(depth, first);
}

// Thread 0 waits for a flag thread 1 sets.  Volta's independent thread
// scheduling lets thread 1 run meanwhile; the executor runs thread 0 until
// it blocks, which it never does: the watchdog must end the launch.
__global__ void spin_on_flag(volatile int* flag) {
    if (threadIdx.x == 0) while (flag[0] == 0) {}
    else flag[0] = 1;
}

__global__ void dynamic_shared_overflow(int* out, int index) {
    extern __shared__ int window[];
    window[index] = 1;
    __syncthreads();
    out[threadIdx.x] = window[0];
}
"""

EXPRESSIONS = (
    "block_sum<long long>", "block_sum<double>", "block_sum_missing_barrier",
    "reverse_chunks", "shared_bytes_as_doubles", "read_unwritten_shared", "write_indices",
    "grid_stride_square", "atomic_histogram", "warp_ops", "divergent_activemask",
    "double_shuffle",
    "barrier_predicates", "half_roundtrip", "math_functions", "vector_types",
    "takes_scalars", "early_return_before_barrier", "barrier_in_both_branches",
    "shuffle_missing_lane", "shuffle_mask_without_self", "divide", "write_through",
    "failing_assert", "traps", "recurse", "spin_on_flag", "dynamic_shared_overflow",
)


@pytest.fixture(scope="module")
def source():
    return cpu_cuda.source_file("executor_kernels.cu", KERNELS)


@pytest.fixture
def kernel(source):
    """kernel(name, **provider_options): a kernel of KERNELS, built once."""
    def get(name, compile_options=(), **options):
        provider = cpu_cuda.CpuKernelProvider(**options)
        return provider.get_function(source, EXPRESSIONS, name,
                                     ("-std=c++17",) + compile_options)
    return get


# ------------------------------------------------------------------ barriers

@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_shared_memory_reduction_with_barriers(kernel, reverse):
    rng = np.random.default_rng(0)
    n = 1000  # four blocks, the last one partial
    x = rng.integers(-10**12, 10**12, n)
    out = np.zeros(4, np.int64)
    kernel("block_sum<long long>", reverse=reverse)((4,), (256,), (x, out, np.int64(n)))
    np.testing.assert_array_equal(out, [x[i:i + 256].sum() for i in range(0, n, 256)])


def test_block_sum_in_double(kernel):
    x = np.arange(512, dtype=np.float64) / 8
    out = np.zeros(2)
    kernel("block_sum<double>")((2,), (256,), (x, out, np.int64(512)))
    np.testing.assert_array_equal(out, [x[:256].sum(), x[256:].sum()])


def test_missing_barrier_gives_wrong_sums(kernel):
    # Threads switch only at barriers: without the one in the loop, thread 0
    # finishes its loop before thread 64 added its pair, so the sum is wrong
    # in either schedule (this is what racecheck would flag on a GPU).
    x = np.ones(256, np.int64)
    for reverse in (False, True):
        out = np.zeros(1, np.int64)
        kernel("block_sum_missing_barrier", reverse=reverse)((1,), (256,), (x, out))
        assert out[0] != 256


def test_barrier_predicates(kernel):
    x = np.array([3, -1, 7, 2, 0, 9, 1, 4], np.int32)
    out = np.zeros(3 * 8, np.int32)
    kernel("barrier_predicates")((1,), (8,), (x, out))
    np.testing.assert_array_equal(out.reshape(8, 3), [[6, 0, 1]] * 8)
    positive = np.arange(1, 9, dtype=np.int32)
    kernel("barrier_predicates")((1,), (8,), (positive, out))
    np.testing.assert_array_equal(out.reshape(8, 3), [[8, 1, 1]] * 8)


# ------------------------------------------------------------ shared memory

def test_dynamic_shared_memory(kernel):
    x = np.arange(3 * 96, dtype=np.float32)
    out = np.full_like(x, np.nan)
    kernel("reverse_chunks")((3,), (96,), (x, out), shared_mem=96 * 4)
    np.testing.assert_array_equal(out, x.reshape(3, 96)[:, ::-1].ravel())


def test_dynamic_shared_memory_declared_as_bytes(kernel):
    x = np.arange(32, dtype=np.float64)
    out = np.zeros_like(x)
    kernel("shared_bytes_as_doubles")((1,), (32,), (x, out), shared_mem=32 * 8)
    np.testing.assert_array_equal(out, 2 * np.roll(x, -1))


@pytest.mark.parametrize("poison", [0x7F, 0xFF])
def test_shared_memory_is_poisoned_before_every_block(kernel, poison):
    out = np.zeros((3, 2, 64), np.uint32)
    kernel("read_unwritten_shared", shared_poison=poison)((3,), (64,), (out,))
    pattern = np.frombuffer(bytes([poison]) * 4, np.uint32)[0]
    np.testing.assert_array_equal(out[:, 0], pattern)  # never written
    np.testing.assert_array_equal(out[0, 1], 7)  # written in this block
    np.testing.assert_array_equal(out[1:, 1], pattern)  # block 0's writes are gone


def test_shared_mem_limits(kernel):
    k = kernel("reverse_chunks")
    x = np.zeros(32, np.float32)
    with pytest.raises(ValueError, match="max_dynamic_shared_size_bytes"):
        k((1,), (32,), (x, x), shared_mem=48 * 1024 + 4)
    k.max_dynamic_shared_size_bytes = 100 * 1024  # as cupy.RawKernel's attribute
    k((1,), (32,), (x, x.copy()), shared_mem=100 * 1024)
    with pytest.raises(ValueError, match="outside"):
        k.max_dynamic_shared_size_bytes = 228 * 1024
    with pytest.raises(ValueError, match="negative"):
        k((1,), (32,), (x, x), shared_mem=-1)


# -------------------------------------------------------- launch geometry

def test_builtin_indices_in_3d(kernel):
    grid, block = (2, 3, 2), (4, 3, 3)  # 36 threads: one full warp + 4 lanes
    threads = np.prod(block)
    out = np.zeros((np.prod(grid), threads, 10), np.int32)
    kernel("write_indices")(grid, block, (out,))
    tz, ty, tx = np.unravel_index(np.arange(threads), block[::-1])
    bz, by, bx = np.unravel_index(np.arange(np.prod(grid)), grid[::-1])
    np.testing.assert_array_equal(out[:, :, 0], np.broadcast_to(tx, out.shape[:2]))
    np.testing.assert_array_equal(out[:, :, 1], np.broadcast_to(ty, out.shape[:2]))
    np.testing.assert_array_equal(out[:, :, 2], np.broadcast_to(tz, out.shape[:2]))
    np.testing.assert_array_equal(out[:, :, 3], np.broadcast_to(bx[:, None], out.shape[:2]))
    np.testing.assert_array_equal(out[:, :, 4], np.broadcast_to(by[:, None], out.shape[:2]))
    np.testing.assert_array_equal(out[:, :, 5], np.broadcast_to(bz[:, None], out.shape[:2]))
    assert (out[:, :, 6] == 433).all() and (out[:, :, 7] == 232).all()
    assert (out[:, :, 8] == 32).all()
    assert (out[:, :, 9] == 1).all()  # __activemask: the partial warp has 4 lanes


def test_grid_stride_loop(kernel):
    n = 5000
    x = np.arange(n, dtype=np.int64) - 2500
    out = np.zeros(n, np.int64)
    kernel("grid_stride_square")((3,), (64,), (x, out, np.int64(n)))
    np.testing.assert_array_equal(out, x * x)


@pytest.mark.parametrize("grid, block, error, match", [
    ((1,), (1025,), ValueError, r"block\[0\] = 1025 is outside"),
    ((1,), (32, 32, 2), ValueError, "2048 threads, more than 1024"),
    ((1,), (1, 1, 65), ValueError, r"block\[2\] = 65"),
    ((0,), (32,), ValueError, r"grid\[0\] = 0"),
    ((1, 65536), (32,), ValueError, r"grid\[1\] = 65536"),
    ((1, 1, 1, 1), (32,), TypeError, "tuple of 1 to 3 ints"),
    (1, (32,), TypeError, "tuple of 1 to 3 ints"),
    ((1.0,), (32,), TypeError, r"grid\[0\] must be an int"),
])
def test_launch_configuration_is_validated(kernel, grid, block, error, match):
    x = np.zeros(64, np.int64)
    with pytest.raises(error, match=match):
        kernel("grid_stride_square")(grid, block, (x, x, np.int64(0)))


# ------------------------------------------------------------- arguments

def test_scalar_arguments_of_every_kind(kernel):
    out = np.zeros(6, np.float32)
    kernel("takes_scalars")((1,), (1,), (out, np.float32(1.5), np.float64(2.5), np.int32(-3),
                                         np.int64(4), np.uint8(5), np.bool_(True)))
    np.testing.assert_array_equal(out, [1.5, 2.5, -3, 4, 5, 1])


@pytest.mark.parametrize("args, error, match", [
    (lambda o: (o, np.float32(1), np.float64(2), np.int32(3), np.int64(4), np.uint8(5)),
     TypeError, "takes_scalars takes 7 arguments, got 6"),
    (lambda o: (o, 1.0, np.float64(2), np.int32(3), np.int64(4), np.uint8(5), np.bool_(1)),
     TypeError, r"argument 1 is a Python float; .*numpy.float32"),
    (lambda o: (o, np.float32(1), np.float64(2), 3, np.int64(4), np.uint8(5), np.bool_(1)),
     TypeError, r"argument 3 is a Python int; .*numpy.int32"),
    (lambda o: (o, np.float32(1), np.float64(2), np.int64(3), np.int64(4), np.uint8(5),
                np.bool_(1)),
     TypeError, r"argument 3 is int64 \(8 bytes\) but the kernel's parameter has 4 bytes"),
    (lambda o: (o, np.int32(1), np.float64(2), np.int32(3), np.int64(4), np.uint8(5),
                np.bool_(1)),
     TypeError, r"argument 1 is int32 but the kernel's parameter is floating"),
    (lambda o: (np.float32(0), np.float32(1), np.float64(2), np.int32(3), np.int64(4),
                np.uint8(5), np.bool_(1)),
     TypeError, "argument 0 is a NumPy float32 scalar but the kernel takes a pointer"),
    (lambda o: (o, o, np.float64(2), np.int32(3), np.int64(4), np.uint8(5), np.bool_(1)),
     TypeError, "argument 1 is an array but the kernel takes a 4-byte value"),
    (lambda o: (o.astype(np.float64), np.float32(1), np.float64(2), np.int32(3), np.int64(4),
                np.uint8(5), np.bool_(1)),
     TypeError, r"reads 4-byte elements through this pointer but the array has dtype float64"),
    (lambda o: (o.view(np.uint8)[1:5], np.float32(1), np.float64(2), np.int32(3),
                np.int64(4), np.uint8(5), np.bool_(1)),
     TypeError, "reads 4-byte elements"),
    (lambda o: (np.zeros(4, object), np.float32(1), np.float64(2), np.int32(3),
                np.int64(4), np.uint8(5), np.bool_(1)),
     TypeError, "dtype object"),
])
def test_argument_mismatch_names_kernel_and_index(kernel, args, error, match):
    out = np.zeros(6, np.float32)
    with pytest.raises(error, match=match):
        kernel("takes_scalars")((1,), (1,), args(out))


def test_misaligned_array_is_rejected(kernel):
    buffer = np.zeros(16, np.float32)
    misaligned = np.frombuffer(buffer.data, np.uint8)[2:18].view(np.float32)
    assert misaligned.ctypes.data % 4 == 2
    with pytest.raises(ValueError, match="argument 0: address .* not aligned to the 4 bytes"):
        kernel("takes_scalars")((1,), (1,), (misaligned, np.float32(1), np.float64(2),
                                             np.int32(3), np.int64(4), np.uint8(5),
                                             np.bool_(1)))


def test_arrays_are_passed_at_their_first_element(kernel):
    # A reversed view: element 0 is the last in memory, the stride negative.
    # The kernel indexes forward from element 0, so it must get a base view.
    x = np.arange(10, dtype=np.int64)
    out = np.zeros(20, np.int64)
    kernel("grid_stride_square")((1,), (32,), (x[3:8], out[5:], np.int64(5)))
    np.testing.assert_array_equal(out[5:10], x[3:8] ** 2)
    assert not out[:5].any() and not out[10:].any()


# ------------------------------------------------------- atomics and warps

def test_atomic_add_every_type(kernel):
    rng = np.random.default_rng(1)
    n = 3000
    bins = rng.integers(0, 7, n).astype(np.int32)
    counts = [np.zeros(7, t) for t in (np.int32, np.uint32, np.uint64, np.float32, np.float64)]
    old = np.full(n, -1, np.int32)
    kernel("atomic_histogram")((4,), (128,), (bins, np.int64(n), *counts, old))
    expected = np.bincount(bins, minlength=7)
    for c, scale in zip(counts, (1, 2, 3, 0.5, 0.25)):
        np.testing.assert_array_equal(c, expected * scale)
    # atomicAdd returns the previous value: per bin, each of 0..count-1 once.
    for b in range(7):
        np.testing.assert_array_equal(np.sort(old[bins == b]), np.arange(expected[b]))


def test_warp_intrinsics(kernel):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 50, 64).astype(np.int32)
    x[40] = 40
    out = np.zeros((64, 8), np.int32)
    kernel("warp_ops")((1,), (64,), (x, out.ravel()))
    lanes = np.arange(64) % 32
    warps = x.reshape(2, 32)
    np.testing.assert_array_equal(out[:, 0], np.repeat(warps.sum(1), 32))
    assert out[0, 1] == warps[0].sum() and out[32, 1] == warps[1].sum()
    segments = x.reshape(8, 8)
    np.testing.assert_array_equal(out[:, 2], np.cumsum(segments, axis=1).ravel())
    np.testing.assert_array_equal(out[:, 3], np.repeat(warps[:, 5], 32))
    rotated = x.reshape(16, 4)[:, [1, 2, 3, 0]].ravel()
    np.testing.assert_array_equal(out[:, 4], rotated)
    ballots = [sum(1 << i for i in range(32) if w[i] % 3 == 0) for w in warps]
    np.testing.assert_array_equal(out[:, 5].view(np.uint32), np.repeat(ballots, 32))
    any_all = [10 * bool((w == 40).any()) + 1 for w in warps]
    np.testing.assert_array_equal(out[:, 6], np.repeat(any_all, 32))
    np.testing.assert_array_equal(out[:, 7], x[(np.arange(64) // 16) * 16])
    assert lanes.size == 64


def test_activemask_follows_branches(kernel):
    out = np.zeros(40, np.uint32)
    kernel("divergent_activemask")((1,), (40,), (out,))
    expected = [0x3FF] * 10 + [0xFFFFFC00] * 22 + [0xFF] * 8  # last warp: 8 lanes
    np.testing.assert_array_equal(out, expected)


def test_shuffle_of_doubles_and_partial_warp(kernel):
    x = np.arange(40, dtype=np.float64) * 1.5
    out = np.zeros_like(x)
    kernel("double_shuffle", shared_poison=0xFF)((1,), (40,), (x, out))
    # Lane 31 has no lane 32: shfl_down keeps its own value.
    np.testing.assert_array_equal(out[:32], np.append(x[1:32], x[31]))
    np.testing.assert_array_equal(out[32:39], x[33:40])
    # The last warp has 8 lanes: lane 7 reads the missing lane 8, which CUDA
    # leaves undefined and the executor answers with the poison byte.
    assert np.isnan(out[39])


# ------------------------------------------------------- numbers and types

def test_half_conversions_match_numpy(kernel):
    special = [0.0, -0.0, 1.0, 65504.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8, 2.98e-8, 1e-10,
               np.inf, -np.inf, 1 + 2**-11, 1 + 3 * 2**-11, 2049.0, 2051.0, 0.1, -0.3]
    rng = np.random.default_rng(4)
    x = np.concatenate([special, rng.normal(0, 100, 256 - len(special) - 1), [np.nan]])
    x = x.astype(np.float32)
    halves = np.zeros(256, np.float16)
    back = np.zeros(256, np.float32)
    sums = np.zeros(256, np.float16)
    kernel("half_roundtrip")((2,), (128,), (x, halves, back, sums))
    with np.errstate(invalid="ignore", over="ignore"):
        h = x.astype(np.float16)  # 65520 and 1e6 overflow to inf, as in CUDA
        expected = np.where(h > 0, h + np.float16(1), (h.astype(np.float32) * 2).astype(np.float16))
    np.testing.assert_array_equal(halves.view(np.uint16)[:-1], h[:-1].view(np.uint16))
    assert np.isnan(halves[-1]) and np.isnan(back[-1])
    np.testing.assert_array_equal(back, h.astype(np.float32))
    np.testing.assert_array_equal(sums, expected)


def test_math_functions(kernel):
    x = np.array([-2.0, -0.25, 0.0, 0.75, 3.0, np.nan, np.inf, -np.inf], np.float32)
    out = np.zeros((8, 8), np.float32)
    kernel("math_functions")((1,), (8,), (x, out.ravel()))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(out[:, 0], np.fmax(x, 0.5))
        np.testing.assert_array_equal(out[:, 1], np.fmin(x, -0.5))
        np.testing.assert_allclose(out[:, 2], np.sqrt(np.abs(x)), rtol=1e-6)
        np.testing.assert_allclose(out[:, 3], np.exp(x), rtol=1e-6)
    np.testing.assert_array_equal(out[:, 4], [0, 0, 0, 0, 0, 1, 2, 2])
    np.testing.assert_array_equal(out[:, 5], np.fmax(x, 1))  # CUDA max: NaN loses
    np.testing.assert_array_equal(out[:, 6], np.minimum(np.arange(8), 3))
    assert np.isnan(out[:, 7]).all()  # INFINITY * 0 is NaN


def test_vector_types_have_cuda_layout(kernel):
    x = np.arange(16, dtype=np.float32)
    out = np.zeros_like(x)
    ints = np.zeros(8, np.int32)
    kernel("vector_types")((1,), (4,), (x, out, ints))
    np.testing.assert_array_equal(out, x.reshape(4, 4)[:, ::-1].ravel())
    np.testing.assert_array_equal(ints.reshape(4, 2), [[i, 1616] for i in range(4)])


def test_ucontext_fiber_switch(kernel):
    # The portable fiber switch (used off x86-64) runs barriers, warp
    # intrinsics and deadlock detection like the assembly one.
    ucontext = ("-DCUPYCONV_CPU_UCONTEXT",)
    x = np.arange(300, dtype=np.int64)
    out = np.zeros(2, np.int64)
    kernel("block_sum<long long>", ucontext)((2,), (256,), (x, out, np.int64(300)))
    np.testing.assert_array_equal(out, [x[:256].sum(), x[256:].sum()])
    values = np.arange(64, dtype=np.int32)
    lanes = np.zeros((64, 8), np.int32)
    kernel("warp_ops", ucontext)((1,), (64,), (values, lanes.ravel()))
    np.testing.assert_array_equal(lanes[:, 0], np.repeat(values.reshape(2, 32).sum(1), 32))
    with pytest.raises(KernelLaunchError, match="barrier divergence"):
        kernel("early_return_before_barrier", ucontext)((1,), (8,), (np.zeros(8, np.int32),))


# ------------------------------------------------------- detected errors

def test_early_return_before_barrier_is_divergence(kernel):
    out = np.zeros(8, np.int32)
    with pytest.raises(KernelLaunchError, match=(
            r"early_return_before_barrier: barrier divergence in block \(0,0,0\).*"
            r"7 thread\(s\) wait at __syncthreads\(\) .*executor_kernels.cu:\d+.*"
            r"1 thread\(s\) already returned \(first: thread \(3,0,0\)\)")):
        kernel("early_return_before_barrier")((1,), (8,), (out,))


def test_barriers_at_different_call_sites_are_divergence(kernel):
    out = np.zeros(4, np.int32)
    with pytest.raises(KernelLaunchError, match=(
            r"barrier divergence in block \(0,0,0\): thread \(\d,0,0\) waits at "
            r"__syncthreads\(\) .*:(\d+) while thread \(\d,0,0\) waits at "
            r"__syncthreads\(\) .*:(?!\1)\d+")):
        kernel("barrier_in_both_branches")((1,), (4,), (out,))


def test_warp_lane_missing_from_shuffle_is_deadlock(kernel):
    out = np.zeros(32, np.int32)
    with pytest.raises(KernelLaunchError, match=(
            r"31 thread\(s\) wait at __shfl_sync\(mask=0xffffffff\).*"
            r"1 thread\(s\) wait at __syncthreads\(\)")):
        kernel("shuffle_missing_lane")((1,), (32,), (out,))


def test_shuffle_mask_must_include_the_caller(kernel):
    out = np.zeros(2, np.int32)
    with pytest.raises(KernelLaunchError, match="lane 1 .* mask 0x00000001, which does not"):
        kernel("shuffle_mask_without_self")((1,), (2,), (out,))


def test_executor_recovers_after_a_failed_launch(kernel):
    out = np.zeros(8, np.int32)
    with pytest.raises(KernelLaunchError):
        kernel("early_return_before_barrier")((1,), (8,), (out,))
    test_shared_memory_reduction_with_barriers(kernel, reverse=False)


@plain_build_only
@pytest.mark.parametrize("name, threads, args, match", [
    ("divide", 4, lambda: (np.ones(4, np.int32), np.array([1, 1, 0, 1], np.int32),
                           np.zeros(4, np.int32)),
     r"kernel crashed in thread \(2,0,0\) of block \(0,0,0\): SIGFPE"),
    ("write_through", 1, lambda: (np.zeros(1, np.int32), np.int64(-(1 << 60))),
     r"kernel crashed in thread \(0,0,0\) of block \(0,0,0\): SIGSEGV .* at address"),
    ("failing_assert", 3, lambda: (np.array([0, 1, -1], np.int32),),
     r"assertion `in\[threadIdx.x\] >= 0' failed in thread \(2,0,0\).*executor_kernels.cu"),
    ("traps", 2, lambda: (np.zeros(2, np.int32),), r"__trap\(\) in thread \(1,0,0\)"),
    ("recurse", 1, lambda: (np.zeros(1, np.int32), np.int32(1000)), r"stack overflow"),
])
def test_crashes_fail_the_launch(kernel, name, threads, args, match):
    with pytest.raises(KernelLaunchError, match=match):
        kernel(name)((1,), (threads,), args())
    test_grid_stride_loop(kernel)  # the next launch works


@plain_build_only
def test_hung_kernel_times_out(kernel):
    flag = np.zeros(1, np.int32)
    with pytest.raises(KernelLaunchError, match=r"timeout: the launch ran longer than 0.5 s, "
                       r"now in thread \(0,0,0\) of block \(0,0,0\)"):
        kernel("spin_on_flag", timeout=0.5)((1,), (2,), (flag,))
    test_grid_stride_loop(kernel)


@plain_build_only
def test_dynamic_shared_overflow_faults(kernel):
    out = np.zeros(4, np.int32)
    k = kernel("dynamic_shared_overflow")
    k((1,), (4,), (out, np.int32(63)), shared_mem=256)  # last element: fine
    with pytest.raises(KernelLaunchError, match="past the end of dynamic shared memory"):
        k((1,), (4,), (out, np.int32(64 + 16)), shared_mem=256)


# ------------------------------------------------------ build and harness

def test_compile_errors_carry_the_compiler_log():
    path = cpu_cuda.source_file("broken.cu", "__global__ void broken(int* p) { p[0] = q; }\n")
    provider = cpu_cuda.CpuKernelProvider()
    with pytest.raises(_kernels.KernelCompileError, match=r"broken.cu:1:.*'q' was not declared"):
        provider.get_function(path, ("broken",), "broken", ())


def test_libraries_are_built_once(kernel, source):
    first = kernel("block_sum<long long>")
    second = kernel("reverse_chunks", reverse=True)
    assert first.library is second.library
    assert first.library.path.exists()


def test_unsupported_compile_option_is_rejected(source):
    with pytest.raises(ValueError, match="'-fopenmp' is not supported"):
        cpu_cuda.CpuKernelProvider().get_function(source, EXPRESSIONS, "traps", ("-fopenmp",))


def test_cpu_kernels_switches_provider_and_poisons_empty():
    assert not _kernels.provider_runs_on_numpy()
    with cpu_cuda.cpu_kernels() as provider:
        assert _kernels.provider_runs_on_numpy()
        assert isinstance(provider, cpu_cuda.CpuKernelProvider)
        assert np.isnan(np.empty(5)).all()
        assert (np.empty_like(np.zeros(3, np.int16)) == np.int16(-23131)).all()  # 0xA5A5
        assert np.isnan(np.empty((2, 2), np.complex64)).all()
        with cpu_cuda.numpy_path():
            assert not _kernels.provider_runs_on_numpy()
    assert not _kernels.provider_runs_on_numpy()
    assert not np.isnan(np.empty(1000)).all() or np.empty.__module__ == "numpy"


def test_launches_are_logged(kernel):
    before = cpu_cuda.LAUNCHED[("executor_kernels.cu", "grid_stride_square")]
    test_grid_stride_loop(kernel)
    assert cpu_cuda.LAUNCHED[("executor_kernels.cu", "grid_stride_square")] == before + 1


# -------------------------------------------------------------- sanitizers

SANITIZER_KERNELS = r"""
__global__ void write_one_past(float* out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.0f;  // should be i < n
}

__global__ void read_past_dynamic_shared(const float* in, float* out) {
    extern __shared__ float window[];
    window[threadIdx.x] = in[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = window[threadIdx.x + 1];  // the last thread reads past it
}

__global__ void overflow_int(const int* in, int* out) {
    out[threadIdx.x] = in[threadIdx.x] * 65536;  // signed overflow for in >= 32768
}
"""

SANITIZER_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np
import cpu_cuda
provider = cpu_cuda.CpuKernelProvider()
assert provider.sanitize
kernel = provider.get_function({path!r}, {names!r}, {name!r}, ("-std=c++17",))
{launch}
print("kernel finished")
"""


@pytest.mark.skipif(SANITIZED, reason="starts its own sanitized process")
@pytest.mark.parametrize("name, launch, report", [
    # 31 floats: the overflow lands inside ASan's last 8-byte granule.
    ("write_one_past",
     "kernel((1,), (32,), (np.zeros(31, np.float32), np.int64(31)))",
     ["ERROR: AddressSanitizer: heap-buffer-overflow", "WRITE of size 4",
      "0 bytes to the right of 124-byte region", "sanitizer_kernels.cu:4"]),
    ("read_past_dynamic_shared",
     "x = np.ones(16, np.float32)\n"
     "kernel((1,), (16,), (x, np.zeros(16, np.float32)), shared_mem=64)",
     ["ERROR: AddressSanitizer: heap-buffer-overflow", "READ of size 4",
      "0 bytes to the right of 64-byte region", "sanitizer_kernels.cu:11"]),
    ("overflow_int",
     "kernel((1,), (2,), (np.array([3, 40000], np.int32), np.zeros(2, np.int32)))",
     ["sanitizer_kernels.cu:15", "runtime error: signed integer overflow: "
      "40000 * 65536 cannot be represented in type 'int'"]),
])
def test_sanitizers_report_kernel_bugs(name, launch, report):
    path = cpu_cuda.source_file("sanitizer_kernels.cu", SANITIZER_KERNELS)
    script = SANITIZER_SCRIPT.format(
        tests=str(pathlib.Path(__file__).resolve().parent), path=str(path), name=name,
        names=("write_one_past", "read_past_dynamic_shared", "overflow_int"), launch=launch)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=cpu_cuda.sanitizer_environment(), timeout=300)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "kernel finished" not in result.stdout
    for line in report:
        assert line in result.stderr, result.stderr

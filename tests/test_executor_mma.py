"""The CPU executor's tensor-core instructions (cuda/cupyconv_mma.cuh on the
executor's emulation): mma.sync fragments lane by lane, ldmatrix, cp.async
groups, 16-byte loads and the TF32 / bfloat16 conversions, on small kernels
written here.

Each mma kernel loads its fragments from global memory with the PTX ISA's
per-lane formulas written out in the kernel; a variant with one index
deliberately wrong must give a wrong product.
"""

import numpy as np
import pytest

import cpu_cuda
from cpu_cuda import KernelLaunchError
from cupyconv import _kernels
from formats import tf32_reference

ml_dtypes = pytest.importorskip("ml_dtypes")

pytestmark = [
    pytest.mark.cpu_kernels,
    pytest.mark.skipif(cpu_cuda.compiler_unavailable_reason() is not None,
                       reason=str(cpu_cuda.compiler_unavailable_reason())),
]

KERNELS = r"""
#include "cupyconv_mma.cuh"
using namespace cupyconv::mma;

// D = A B + C on one warp, m16n8k8 TF32.  A [16][8], B [8][8] (k, n),
// C, D [16][8], row-major.  Mutation 1 swaps the rows of a1 and a2's
// fragment positions, 2 reads b[1] from row t instead of t + 4.
template <int Mutation>
__global__ void mma_tf32_product(const float* A, const float* B, const float* C, float* D) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    unsigned a[4], b[2];
    float c[4], d[4];
    for (int e = 0; e < 4; ++e) {
        int row = g + 8 * (e & 1), col = t + 4 * (e >> 1);
        if (Mutation == 1 && e == 1) row = g, col = t + 4;
        if (Mutation == 1 && e == 2) row = g + 8, col = t;
        a[e] = to_tf32(A[row * 8 + col]);
    }
    for (int e = 0; e < 2; ++e) {
        const int k = Mutation == 2 ? t : t + 4 * e;
        b[e] = to_tf32(B[k * 8 + g]);
    }
    for (int e = 0; e < 4; ++e) c[e] = C[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)];
    mma_tf32(d, a, b, c);
    for (int e = 0; e < 4; ++e) D[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)] = d[e];
}

// The same for m16n8k16 with 16-bit operands given as raw bits: A [16][16],
// B [16][8].  Bf16 picks mma_bf16 over mma_f16.  Mutation 1 swaps the
// halves of a register of A, 2 gives b[e] the column t instead of g.
template <bool Bf16, int Mutation>
__global__ void mma_half_product(const unsigned short* A, const unsigned short* B,
                                 const float* C, float* D) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    float c[4], d[4];
    for (int e = 0; e < 8; ++e) {
        const int row = g + 8 * ((e >> 1) & 1);
        int col = 2 * t + (e & 1) + 8 * (e >> 2);
        if (Mutation == 1 && e < 2) col = 2 * t + 1 - e;
        a[e >> 1] |= (unsigned)A[row * 16 + col] << (16 * (e & 1));
    }
    for (int e = 0; e < 4; ++e) {
        const int k = 2 * t + (e & 1) + 8 * (e >> 1);
        const int n = Mutation == 2 ? t : g;
        b[e >> 1] |= (unsigned)B[k * 8 + n] << (16 * (e & 1));
    }
    for (int e = 0; e < 4; ++e) c[e] = C[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)];
    if (Bf16) mma_bf16(d, a, b, c);
    else mma_f16(d, a, b, c);
    for (int e = 0; e < 4; ++e) D[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)] = d[e];
}

// Every lane's ldmatrix registers: out[lane][i] (Count 8x8 matrices of
// 16-bit values, matrix i at rows 8i.. of `in`, row pitch 8 elements,
// copied to shared memory first).
template <int Count, bool Trans>
__global__ void ldmatrix_registers(const unsigned short* in, unsigned* out) {
    __shared__ __align__(16) unsigned short tile[4 * 64];
    for (int i = threadIdx.x; i < Count * 64; i += 32) tile[i] = in[i];
    __syncthreads();
    const int lane = threadIdx.x;
    unsigned r[Count];
    ldmatrix<Count, Trans>(r, tile + 8 * (lane % (8 * Count)));
    for (int i = 0; i < Count; ++i) out[lane * Count + i] = r[i];
}

// ldmatrix from global memory (a GPU would fault).
__global__ void ldmatrix_from_global(const unsigned short* in, unsigned* out) {
    unsigned r[1];
    ldmatrix<1, false>(r, in + 8 * (threadIdx.x % 8));
    out[threadIdx.x] = r[0];
}

// mma with one lane gone.
__global__ void mma_with_lane_returned(float* D) {
    if (threadIdx.x == 5) return;
    unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    float c[4] = {0, 0, 0, 0}, d[4];
    mma_tf32(d, a, b, c);
    D[threadIdx.x] = d[0];
}

// cp.async: 4 floats per thread through shared memory.  mode 0: wait,
// barrier, read the next thread's slot; 1: read own slot before the wait;
// 2: two groups, wait_group 1 then read both (the second is still in
// flight), then wait_group 0 and read again into out[.., 8..].
// src_bytes of each 16-byte copy come from src, the rest is zero.
__global__ void async_stage(const float* src, float* out, int mode, int src_bytes) {
    __shared__ __align__(16) float first[4 * 64];
    __shared__ __align__(16) float second[4 * 64];
    const int t = threadIdx.x, n = blockDim.x;
    cp_async<16>(first + 4 * t, src + 4 * t, src_bytes);
    cp_async_commit();
    if (mode == 1) {
        for (int i = 0; i < 4; ++i) out[4 * t + i] = first[4 * t + i];
        cp_async_wait<0>();
        return;
    }
    if (mode == 2) {
        cp_async<8>(second + 4 * t, src + 4 * (n + t), 8);
        cp_async<4>(second + 4 * t + 2, src + 4 * (n + t) + 2, 4);
        cp_async<4>(second + 4 * t + 3, src + 4 * (n + t) + 3, 4);
        cp_async_commit();
        cp_async_wait<1>();
        for (int i = 0; i < 4; ++i) out[12 * t + i] = first[4 * t + i];
        for (int i = 0; i < 4; ++i) out[12 * t + 4 + i] = second[4 * t + i];
        cp_async_wait<0>();
        for (int i = 0; i < 4; ++i) out[12 * t + 8 + i] = second[4 * t + i];
        return;
    }
    cp_async_wait<0>();
    __syncthreads();
    const int u = (t + 1) % n;
    for (int i = 0; i < 4; ++i) out[4 * t + i] = first[4 * u + i];
}

// 16-byte loads through registers: out[4 t ..] = the 4 words at in + 4 t + shift.
__global__ void load_chunks(const unsigned* in, unsigned* out, int shift) {
    const uint4 words = load_16_bytes(in + 4 * threadIdx.x + shift);
    unsigned* mine = out + 4 * threadIdx.x;
    mine[0] = words.x, mine[1] = words.y, mine[2] = words.z, mine[3] = words.w;
}

__global__ void tf32_bits(const float* in, unsigned* out, long long n) {
    for (long long i = threadIdx.x; i < n; i += blockDim.x) out[i] = to_tf32(in[i]);
}

__global__ void split_tf32_parts(const float* in, float* big, float* small, long long n) {
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        unsigned b, s;
        split_tf32(in[i], b, s);
        big[i] = __uint_as_float(b);
        small[i] = __uint_as_float(s);
    }
}

__global__ void bfloat16_round_trip(const float* in, unsigned short* bits, float* back,
                                    long long n) {
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        const __nv_bfloat16 h = __float2bfloat16_rn(in[i]);
        bits[i] = __bfloat16_as_ushort(h);
        back[i] = __bfloat162float(h);
    }
}
"""

EXPRESSIONS = (
    "mma_tf32_product<0>", "mma_tf32_product<1>", "mma_tf32_product<2>",
    "mma_half_product<false, 0>", "mma_half_product<true, 0>",
    "mma_half_product<false, 1>", "mma_half_product<true, 2>",
    "ldmatrix_registers<1, false>", "ldmatrix_registers<2, false>",
    "ldmatrix_registers<4, false>", "ldmatrix_registers<1, true>",
    "ldmatrix_registers<2, true>", "ldmatrix_registers<4, true>",
    "ldmatrix_from_global", "mma_with_lane_returned", "async_stage", "load_chunks",
    "tf32_bits", "split_tf32_parts", "bfloat16_round_trip",
)


@pytest.fixture(scope="module")
def kernel():
    source = cpu_cuda.source_file("executor_mma_kernels.cu", KERNELS)
    provider = cpu_cuda.CpuKernelProvider()
    options = ("-std=c++17", f"-I{_kernels.cuda_source_dir()}")

    def get(name):
        return provider.get_function(source, EXPRESSIONS, name, options)
    return get


def test_static_shared_memory_is_poisoned_at_a_librarys_first_launch():
    """The first launch of a freshly loaded library poisons static shared
    memory too (its thread-local block did not exist yet)."""
    source = cpu_cuda.source_file("first_launch_poison.cu", r"""
__global__ void first_launch(unsigned* out) {
    __shared__ unsigned never_written[32];
    out[threadIdx.x] = never_written[threadIdx.x];
}
""")
    out = np.zeros(32, np.uint32)
    cpu_cuda.CpuKernelProvider(shared_poison=0x5A).get_function(
        source, ("first_launch",), "first_launch", ("-std=c++17",))((1,), (32,), (out,))
    assert (out == 0x5A5A5A5A).all()


def tf32_values(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("mutation", [0, 1, 2])
def test_mma_tf32_fragments(kernel, mutation):
    rng = np.random.default_rng(1)
    a, b, c = tf32_values(rng, (16, 8)), tf32_values(rng, (8, 8)), tf32_values(rng, (16, 8))
    d = np.full((16, 8), np.nan, np.float32)
    kernel(f"mma_tf32_product<{mutation}>")((1,), (32,), (a, b, c, d))
    expected = (tf32_reference(a).astype(np.float64) @ tf32_reference(b).astype(np.float64)
                + c).astype(np.float32)
    if mutation == 0:
        np.testing.assert_allclose(d, expected, rtol=1e-6, atol=1e-6)
    else:  # a wrong fragment index must show
        assert not np.allclose(d, expected, rtol=1e-3, atol=1e-3)


def test_mma_tf32_operands_are_truncated_not_rounded(kernel):
    """The tensor cores read a .tf32 register's upper 19 bits: an operand
    not rounded by cvt.rna is truncated.  to_tf32 rounds, so a value just
    below a rounding boundary rounds up in the kernel's product."""
    a = np.zeros((16, 8), np.float32)
    b = np.zeros((8, 8), np.float32)
    a[0, 0] = np.uint32(0x3F801000).view(np.float32)  # 1 + 2**-11: a tie, rounds away
    b[0, 0] = 1.0
    d = np.empty((16, 8), np.float32)
    kernel("mma_tf32_product<0>")((1,), (32,), (a, b, np.zeros_like(d), d))
    assert d[0, 0] == np.float32(1 + 2**-10)
    assert np.count_nonzero(d) == 1


@pytest.mark.parametrize("bf16, mutation", [(False, 0), (True, 0), (False, 1), (True, 2)])
def test_mma_half_fragments(kernel, bf16, mutation):
    rng = np.random.default_rng(2)
    dtype = ml_dtypes.bfloat16 if bf16 else np.float16
    a = rng.standard_normal((16, 16)).astype(dtype)
    b = rng.standard_normal((16, 8)).astype(dtype)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    d = np.full((16, 8), np.nan, np.float32)
    name = f"mma_half_product<{'true' if bf16 else 'false'}, {mutation}>"
    kernel(name)((1,), (32,), (a.view(np.uint16), b.view(np.uint16), c, d))
    expected = (a.astype(np.float64) @ b.astype(np.float64) + c).astype(np.float32)
    if mutation == 0:
        np.testing.assert_allclose(d, expected, rtol=1e-6, atol=1e-6)
    else:
        assert not np.allclose(d, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("count", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_registers_of_every_lane(kernel, count, trans):
    values = np.arange(count * 64, dtype=np.uint16) + 1000
    out = np.zeros((32, count), np.uint32)
    kernel(f"ldmatrix_registers<{count}, {'true' if trans else 'false'}>")(
        (1,), (32,), (values, out))
    m = values.reshape(count, 8, 8)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(count):
            mat = m[i].T if trans else m[i]
            lo, hi = int(mat[g, 2 * t]), int(mat[g, 2 * t + 1])
            assert out[lane, i] == lo | hi << 16, (lane, i)


def test_ldmatrix_needs_shared_memory(kernel):
    with pytest.raises(KernelLaunchError, match="not in the block's shared memory"):
        kernel("ldmatrix_from_global")((1,), (32,), (np.zeros(64, np.uint16),
                                                     np.zeros(32, np.uint32)))


def test_mma_needs_every_lane(kernel):
    with pytest.raises(KernelLaunchError, match="lane 5 returned before it"):
        kernel("mma_with_lane_returned")((1,), (32,), (np.zeros(32, np.float32),))


def poisoned(kernel, values):
    """Whether every float32 of ``values`` holds the executor's shared-memory poison."""
    word = kernel("async_stage").provider.shared_poison * 0x01010101
    return (np.asarray(values, np.float32).view(np.uint32) == word).all()


def test_cp_async_lands_at_the_wait(kernel):
    src = np.arange(4 * 64, dtype=np.float32)
    out = np.full(4 * 64, np.nan, np.float32)
    kernel("async_stage")((1,), (64,), (src, out, np.int32(0), np.int32(16)))
    np.testing.assert_array_equal(out, np.roll(src.reshape(64, 4), -1, axis=0).ravel())


def test_cp_async_read_before_wait_is_poison(kernel):
    src = np.arange(4 * 64, dtype=np.float32)
    out = np.zeros(4 * 64, np.float32)
    kernel("async_stage")((1,), (64,), (src, out, np.int32(1), np.int32(16)))
    assert poisoned(kernel, out)


def test_cp_async_wait_group_leaves_newest_groups_in_flight(kernel):
    src = np.arange(4 * 128, dtype=np.float32)
    out = np.zeros((64, 12), np.float32)
    kernel("async_stage")((1,), (64,), (src, out, np.int32(2), np.int32(16)))
    np.testing.assert_array_equal(out[:, :4], src[:256].reshape(64, 4))
    assert poisoned(kernel, out[:, 4:8])
    np.testing.assert_array_equal(out[:, 8:], src[256:].reshape(64, 4))


@pytest.mark.parametrize("src_bytes", [0, 4, 12])
def test_cp_async_zero_fills_past_src_bytes(kernel, src_bytes):
    src = np.arange(1, 4 * 32 + 1, dtype=np.float32)
    out = np.full(4 * 32, np.nan, np.float32)
    kernel("async_stage")((1,), (32,), (src, out, np.int32(0), np.int32(src_bytes)))
    expected = np.roll(src.reshape(32, 4), -1, axis=0)
    expected[:, src_bytes // 4:] = 0
    np.testing.assert_array_equal(out, expected.ravel())


def test_cp_async_rejects_bad_sizes(kernel):
    with pytest.raises(KernelLaunchError, match="not 20 of 16"):
        kernel("async_stage")((1,), (32,), (np.zeros(128, np.float32), np.zeros(128, np.float32),
                                            np.int32(0), np.int32(20)))


def test_16_byte_loads_read_aligned_chunks(kernel):
    src = np.arange(4 * 33, dtype=np.uint32)
    out = np.zeros(4 * 32, np.uint32)
    kernel("load_chunks")((1,), (32,), (src, out, np.int32(0)))
    np.testing.assert_array_equal(out, src[:4 * 32])


def test_16_byte_loads_reject_misaligned_addresses(kernel):
    """As on the GPU, where a misaligned vector load faults."""
    src, out = np.arange(4 * 33, dtype=np.uint32), np.zeros(4 * 32, np.uint32)
    with pytest.raises(KernelLaunchError, match="not aligned to 16 bytes"):
        kernel("load_chunks")((1,), (32,), (src, out, np.int32(1)))


def special_floats():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 2**19, 200, dtype=np.uint64).astype(np.uint32) << 13) | 0x1000
    bf16_ties = (rng.integers(0, 2**16, 200, dtype=np.uint64).astype(np.uint32) << 16) | 0x8000
    edges = np.array([0, 0x80000000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000,
                      0x7FC00000, 0x7F800001, 0x00000001, 0x00001000, 0x007FFFFF,
                      0x3F800FFF, 0x3F801000, 0x3F801001, 0xBF801000, 0x3F808000,
                      0x3F818000, 0x3F7FFFFF], np.uint32)
    return np.concatenate([bits, ties, bf16_ties, edges]).view(np.float32)


def test_tf32_rounding_is_bit_exact(kernel):
    x = special_floats()
    out = np.zeros(x.size, np.uint32)
    kernel("tf32_bits")((1,), (128,), (x, out, np.int64(x.size)))
    np.testing.assert_array_equal(out, tf32_reference(x).view(np.uint32))


def test_split_tf32_is_exact_to_22_bits(kernel):
    x = np.random.default_rng(4).standard_normal(4096).astype(np.float32)
    big, small = np.zeros_like(x), np.zeros_like(x)
    kernel("split_tf32_parts")((1,), (128,), (x, big, small, np.int64(x.size)))
    np.testing.assert_array_equal(big, tf32_reference(x))
    np.testing.assert_array_equal(small, tf32_reference(x - big))
    error = np.abs(x.astype(np.float64) - big - small.astype(np.float64))
    assert (error <= np.abs(x) * 2.0**-21).all()


def test_bfloat16_conversions_are_bit_exact(kernel):
    x = special_floats()
    bits = np.zeros(x.size, np.uint16)
    back = np.zeros(x.size, np.float32)
    kernel("bfloat16_round_trip")((1,), (128,), (x, bits, back, np.int64(x.size)))
    with np.errstate(invalid="ignore", over="ignore"):
        expected = x.astype(ml_dtypes.bfloat16).view(np.uint16).copy()
    expected[np.isnan(x)] = 0x7FFF  # the GPU's canonical NaN
    np.testing.assert_array_equal(bits, expected)
    np.testing.assert_array_equal(back.view(np.uint32), bits.astype(np.uint32) << 16)

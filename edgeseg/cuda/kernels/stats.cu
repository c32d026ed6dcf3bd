// Whole-volume statistics on the device, written into "stats slots" that the elementwise ops
// of preprocess.cu read, so no value has to come back to the host (and the chain can be
// captured in a CUDA graph).
//  * Percentiles: exact order statistics by 4-pass radix select (8 bits a pass) on the float
//    bits mapped to ordered unsigned keys, then numpy's linear interpolation in double.
//  * Z-score: two-pass mean / variance in double (numpy: float64 mean, then std around it).
// Reference: edgeseg/cuda/reference.py (radix_select, percentile_stats, zscore_stats).

#define RADIX_ROW 258  // per rank: prefix, remaining k, 256 bins
#define STAT_WIDTH 4

__device__ __forceinline__ unsigned int float_key(float f) {
    const unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_float(unsigned int k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

extern "C" __global__ void radix_init(unsigned int* state, int R, unsigned int k0, unsigned int k1,
                                      unsigned int k2, unsigned int k3) {
    const unsigned int ks[4] = {k0, k1, k2, k3};
    for (int i = threadIdx.x; i < R * RADIX_ROW; i += blockDim.x) {
        const int r = i / RADIX_ROW, c = i % RADIX_ROW;
        state[i] = c == 1 ? ks[r] : 0u;
    }
}

// Histogram of the digit at `shift` among the values whose higher digits match each rank's prefix.
extern "C" __global__ void radix_hist(const float* x, u64 n, unsigned int* state, int R, int shift) {
    __shared__ unsigned int hist[4 * 256];
    for (int i = threadIdx.x; i < 4 * 256; i += blockDim.x) hist[i] = 0u;
    __syncthreads();
    const unsigned int mask = shift >= 24 ? 0u : (0xffffffffu << (shift + 8));
    unsigned int prefix[4];
    for (int r = 0; r < 4; ++r) prefix[r] = r < R ? (state[r * RADIX_ROW] & mask) : 0u;
    for (i64 i = global_index(); i < (i64)n; i += global_stride()) {
        const unsigned int key = float_key(x[i]);
        const unsigned int digit = (key >> shift) & 255u;
        for (int r = 0; r < R; ++r)
            if ((key & mask) == prefix[r]) atomicAdd(&hist[r * 256 + digit], 1u);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < R * 256; i += blockDim.x)
        if (hist[i]) atomicAdd(&state[(i / 256) * RADIX_ROW + 2 + (i % 256)], hist[i]);
}

// One thread per rank: pick the digit whose bin holds the k-th value, clear the bins.
extern "C" __global__ void radix_select(unsigned int* state, int R, int shift) {
    const int r = threadIdx.x;
    if (r >= R) return;
    unsigned int* s = state + r * RADIX_ROW;
    const unsigned int k = s[1];
    unsigned int cum = 0u;
    int d = 0;
    for (; d < 255; ++d) {
        const unsigned int c = s[2 + d];
        if (cum + c > k) break;
        cum += c;
    }
    s[0] |= (unsigned int)d << shift;
    s[1] = k - cum;
    for (int i = 0; i < 256; ++i) s[2 + i] = 0u;
}

// lo/hi by numpy's linear interpolation (double), then what the percentile op reads.
extern "C" __global__ void percentile_finalize(const unsigned int* state, float* stats, int slot,
                                               double frac_lo, double frac_hi) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const double a0 = key_float(state[0]), a1 = key_float(state[RADIX_ROW]);
    const double b0 = key_float(state[2 * RADIX_ROW]), b1 = key_float(state[3 * RADIX_ROW]);
    const double lo = a0 + frac_lo * (a1 - a0);
    const double hi = b0 + frac_hi * (b1 - b0);
    float* out = stats + STAT_WIDTH * slot;
    out[0] = (float)lo;
    out[1] = (float)hi;
    out[2] = hi > lo ? (float)(1.0 / (hi - lo)) : 0.0f;
    out[3] = hi > lo ? 1.0f : 0.0f;
}

__device__ void block_add(double* acc, double a, double b) {
    __shared__ double sa[256], sb[256];
    sa[threadIdx.x] = a;
    sb[threadIdx.x] = b;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            sa[threadIdx.x] += sa[threadIdx.x + s];
            sb[threadIdx.x] += sb[threadIdx.x + s];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        atomicAdd(acc, sa[0]);
        atomicAdd(acc + 1, sb[0]);
    }
}

// acc: count, sum, m2 (double). Launch with 256 threads a block; zero acc first.
extern "C" __global__ void zscore_sum(const float* x, u64 n, int nonzero, double* acc) {
    double c = 0.0, s = 0.0;
    for (i64 i = global_index(); i < (i64)n; i += global_stride()) {
        const float v = x[i];
        if (!nonzero || v != 0.0f) { c += 1.0; s += (double)v; }
    }
    block_add(acc, c, s);
}

extern "C" __global__ void zscore_m2(const float* x, u64 n, int nonzero, double* acc) {
    const double mean = acc[0] > 0.0 ? acc[1] / acc[0] : 0.0;
    double m2 = 0.0;
    for (i64 i = global_index(); i < (i64)n; i += global_stride()) {
        const float v = x[i];
        if (!nonzero || v != 0.0f) { const double d = (double)v - mean; m2 += d * d; }
    }
    block_add(acc + 2, m2, 0.0);  // acc[2] += m2 (acc[3] is padding)
}

extern "C" __global__ void zscore_finalize(const double* acc, float* stats, int slot, int has_mean,
                                           double mean_given, int has_std, double std_given) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const double count = acc[0];
    const double mean = has_mean ? mean_given : (count > 0.0 ? acc[1] / count : 0.0);
    const double std = has_std ? std_given : (count > 0.0 ? sqrt(acc[2] / count) : 0.0);
    float* out = stats + STAT_WIDTH * slot;
    out[0] = (float)mean;
    out[1] = (float)(1.0 / (std > 1e-8 ? std : 1e-8));
    out[2] = 0.0f;
    out[3] = 0.0f;
}

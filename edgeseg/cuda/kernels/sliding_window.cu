// 3D sliding window on the device: cut patches out of the preprocessed volume into the model
// input batch, add each patch's output times the Gaussian importance map into an accumulator
// (one launch per patch, in order, so the sums are deterministic and equal the reference), and
// divide by the summed weights.
// Reference: edgeseg/cuda/reference.py (sliding_window).

// vol (C, S0, S1, S2) float32 -> dst[j] (C, P0, P1, P2), fp32 or fp16.
extern "C" __global__ void sw_extract(const float* vol, void* dst, int dst_half, int j, int C,
                                      int S0, int S1, int S2, int P0, int P1, int P2, int a, int b, int c) {
    const i64 p = (i64)P0 * P1 * P2;
    const i64 total = (i64)C * p;
    for (i64 i = global_index(); i < total; i += global_stride()) {
        const int ch = (int)(i / p);
        const i64 r = i - ch * p;
        const int z = (int)(r / ((i64)P1 * P2)), y = (int)((r / P2) % P1), x = (int)(r % P2);
        const float v = vol[(((i64)ch * S0 + a + z) * S1 + b + y) * S2 + c + x];
        const i64 o = (i64)j * total + i;
        if (dst_half) ((u16*)dst)[o] = float_to_half(v);
        else ((float*)dst)[o] = v;
    }
}

template <typename T>
__device__ __forceinline__ float load_out(const T* p, i64 i);
template <>
__device__ __forceinline__ float load_out<float>(const float* p, i64 i) { return p[i]; }
template <>
__device__ __forceinline__ float load_out<u16>(const u16* p, i64 i) { return half_to_float(p[i]); }

// acc (K, S0, S1, S2) += out[j] (K, P0, P1, P2) * weight; wsum (S0, S1, S2) += weight.
template <typename T>
__device__ void accumulate_body(const T* out, int j, int K, int P0, int P1, int P2, const float* weight,
                                float* acc, float* wsum, int S0, int S1, int S2, int a, int b, int c) {
    const i64 p = (i64)P0 * P1 * P2;
    const i64 s = (i64)S0 * S1 * S2;
    for (i64 i = global_index(); i < p; i += global_stride()) {
        const int z = (int)(i / ((i64)P1 * P2)), y = (int)((i / P2) % P1), x = (int)(i % P2);
        const i64 o = ((i64)(a + z) * S1 + b + y) * S2 + c + x;
        const float w = weight[i];
        for (int k = 0; k < K; ++k) acc[k * s + o] = acc[k * s + o] + load_out<T>(out, ((i64)j * K + k) * p + i) * w;
        wsum[o] = wsum[o] + w;
    }
}

extern "C" __global__ void sw_accumulate_f32(const float* out, int j, int K, int P0, int P1, int P2,
                                             const float* weight, float* acc, float* wsum, int S0, int S1,
                                             int S2, int a, int b, int c) {
    accumulate_body<float>(out, j, K, P0, P1, P2, weight, acc, wsum, S0, S1, S2, a, b, c);
}

extern "C" __global__ void sw_accumulate_f16(const u16* out, int j, int K, int P0, int P1, int P2,
                                             const float* weight, float* acc, float* wsum, int S0, int S1,
                                             int S2, int a, int b, int c) {
    accumulate_body<u16>(out, j, K, P0, P1, P2, weight, acc, wsum, S0, S1, S2, a, b, c);
}

// acc /= wsum, in place (K, S).
extern "C" __global__ void sw_finalize(float* acc, const float* wsum, int K, u64 s) {
    const i64 total = (i64)K * (i64)s;
    for (i64 i = global_index(); i < total; i += global_stride()) acc[i] = acc[i] / wsum[i % (i64)s];
}

// Zero a float buffer (accumulators) inside a captured graph without a memset node.
extern "C" __global__ void fill_f32(float* x, u64 n, float value) {
    for (i64 i = global_index(); i < (i64)n; i += global_stride()) x[i] = value;
}

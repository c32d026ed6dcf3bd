// Fused preprocessing: raw stored pixels -> modality values (per-slice slope/intercept) ->
// reorientation + resampling (index tables built on the host, see edgeseg/cuda/plan.py) ->
// elementwise intensity ops -> padding -> fp32 or fp16 written into the model input.
// Reference: edgeseg/cuda/reference.py (preprocess_channel, apply_ops).

#define OP_WINDOW 0
#define OP_CLIP 1
#define OP_PERCENTILE 2
#define OP_ZSCORE 3
#define OP_SCALE 4
#define OP_WIDTH 8
#define STAT_WIDTH 4

// Mirrors edgeseg.cuda.kernels.PreParams (ctypes): 8-byte fields first, then 4-byte ones.
struct PreParams {
    const void* src;          // stored pixels (resample) or float32 grid scratch (apply)
    const i64* off0;          // [D+H+W] element offset of tap 0 per model-axis sample
    const i64* off1;          // tap 1 (linear)
    const float* weight;      // weight of tap 1
    const int* zi0;           // stored slice index of tap 0 / tap 1 (z axis only)
    const int* zi1;
    const float* slope;       // [nz] per-slice rescale (float32, as numpy applies it)
    const float* intercept;
    const float* ops;         // [n_ops * OP_WIDTH]
    const float* stats;       // [slots * STAT_WIDTH], filled on the device by stats.cu
    void* dst;
    i64 dst_stride[4];        // c, d, h, w in elements
    int grid[3];
    int padded[3];
    int base[3];
    int order[3];
    int zaxis;
    int linear;
    int rescale_mode;         // 1: uniform (after resampling), 2: per slice (before)
    int n_ops;
    int channel;
    int dst_half;
    float pad_value;
    float slope0;
    float intercept0;
    int unused;
};

// Layout guard: must equal ctypes.sizeof(edgeseg.cuda.module.PreParams).
static_assert(sizeof(PreParams) == 208, "PreParams layout changed: update edgeseg/cuda/module.py");

__device__ float apply_ops(float x, const float* ops, int n_ops, const float* stats) {
    for (int i = 0; i < n_ops; ++i) {
        const float* op = ops + OP_WIDTH * i;
        const int code = (int)op[0];
        const int slot = (int)op[1];
        const float* p = slot >= 0 ? stats + STAT_WIDTH * slot : op + 2;
        switch (code) {
        case OP_WINDOW:  // clip((x - lo) / w, 0, 1) * (max - min) + min
            x = (x - p[0]) * p[1];
            x = fminf(fmaxf(x, 0.0f), 1.0f);
            if (op[6] != 0.0f) x = x * p[2] + p[3];
            break;
        case OP_CLIP:
            x = fminf(fmaxf(x, p[0]), p[1]);
            break;
        case OP_PERCENTILE:  // stats: lo, hi, 1/(hi-lo), hi > lo
            x = fminf(fmaxf(x, p[0]), p[1]);
            if (op[6] != 0.0f) x = p[3] != 0.0f ? (x - p[0]) * p[2] : 0.0f;
            break;
        case OP_ZSCORE:  // mean, 1/max(std, 1e-8)
            x = (x - p[0]) * p[1];
            break;
        case OP_SCALE:
            if (p[0] != 1.0f) x = x * p[0];
            if (p[1] != 0.0f) x = x + p[1];
            break;
        }
    }
    return x;
}

__device__ __forceinline__ void store(const PreParams& p, int d, int h, int w, float x) {
    const i64 o = p.channel * p.dst_stride[0] + d * p.dst_stride[1] + h * p.dst_stride[2] + w * p.dst_stride[3];
    if (p.dst_half) ((u16*)p.dst)[o] = float_to_half(x);
    else ((float*)p.dst)[o] = x;
}

template <typename T>
__device__ __forceinline__ float tap(const PreParams& p, const T* src, i64 off, int z) {
    float v = (float)src[off];
    if (p.rescale_mode == 2) v = v * p.slope[z] + p.intercept[z];
    return v;
}

template <typename T>
__device__ float sample(const PreParams& p, const int idx[3]) {
    const T* src = (const T*)p.src;
    i64 o0[3], o1[3];
    float w[3];
    for (int m = 0; m < 3; ++m) {
        const int e = p.base[m] + idx[m];
        o0[m] = p.off0[e];
        o1[m] = p.off1[e];
        w[m] = p.weight[e];
    }
    const int ez = p.base[p.zaxis] + idx[p.zaxis];
    const int z0 = p.zi0[ez], z1 = p.zi1[ez];
    float v;
    if (!p.linear) {
        v = tap<T>(p, src, o0[0] + o0[1] + o0[2], z0);
    } else {
        // 8 taps; bit m of the index picks tap 1 on model axis m.
        float t[8];
        for (int b = 0; b < 8; ++b) {
            const i64 off = ((b & 1) ? o1[0] : o0[0]) + ((b & 2) ? o1[1] : o0[1]) + ((b & 4) ? o1[2] : o0[2]);
            t[b] = tap<T>(p, src, off, ((b >> p.zaxis) & 1) ? z1 : z0);
        }
        // One axis at a time in the CPU path's order, a0 + w * (a1 - a0): the same roundings as
        // its separable passes.
        for (int k = 0; k < 3; ++k) {
            const int a = p.order[k], bit = 1 << a;
            for (int b = 0; b < 8; ++b)
                if (!(b & bit)) t[b] = t[b] + (t[b | bit] - t[b]) * w[a];
        }
        v = t[0];
    }
    if (p.rescale_mode == 1) {
        if (p.slope0 != 1.0f) v = v * p.slope0;
        if (p.intercept0 != 0.0f) v = v + p.intercept0;
    }
    return v;
}

template <typename T>
__device__ void preprocess_body(const PreParams& p) {
    const i64 total = (i64)p.padded[0] * p.padded[1] * p.padded[2];
    for (i64 i = global_index(); i < total; i += global_stride()) {
        const int w = (int)(i % p.padded[2]);
        const i64 t = i / p.padded[2];
        const int h = (int)(t % p.padded[1]);
        const int d = (int)(t / p.padded[1]);
        float x = p.pad_value;
        if (d < p.grid[0] && h < p.grid[1] && w < p.grid[2]) {
            const int idx[3] = {d, h, w};
            x = apply_ops(sample<T>(p, idx), p.ops, p.n_ops, p.stats);
        }
        store(p, d, h, w, x);
    }
}

extern "C" __global__ void preprocess_i16(const PreParams p) { preprocess_body<short>(p); }
extern "C" __global__ void preprocess_u16(const PreParams p) { preprocess_body<u16>(p); }
extern "C" __global__ void preprocess_f32(const PreParams p) { preprocess_body<float>(p); }
extern "C" __global__ void preprocess_u8(const PreParams p) { preprocess_body<u8>(p); }

// The steps after a whole-volume pass: float32 grid scratch (contiguous D,H,W) -> ops -> dst
// (the scratch itself, in place, or the padded model input).
extern "C" __global__ void intensity_apply(const PreParams p) {
    const float* src = (const float*)p.src;
    const i64 total = (i64)p.padded[0] * p.padded[1] * p.padded[2];
    for (i64 i = global_index(); i < total; i += global_stride()) {
        const int w = (int)(i % p.padded[2]);
        const i64 t = i / p.padded[2];
        const int h = (int)(t % p.padded[1]);
        const int d = (int)(t / p.padded[1]);
        float x = p.pad_value;
        if (d < p.grid[0] && h < p.grid[1] && w < p.grid[2])
            x = apply_ops(src[((i64)d * p.grid[1] + h) * p.grid[2] + w], p.ops, p.n_ops, p.stats);
        store(p, d, h, w, x);
    }
}

// One axis of the separable Gaussian (Denoise) with numpy's "symmetric" borders; taps are
// added in kernel order, like the reference.
extern "C" __global__ void gauss_axis(const float* src, float* dst, int D, int H, int W, int axis,
                                      const float* kernel, int radius) {
    const i64 total = (i64)D * H * W;
    const int n = axis == 0 ? D : (axis == 1 ? H : W);
    const i64 step = axis == 0 ? (i64)H * W : (axis == 1 ? W : 1);
    for (i64 i = global_index(); i < total; i += global_stride()) {
        const int pos = axis == 0 ? (int)(i / ((i64)H * W)) : (axis == 1 ? (int)((i / W) % H) : (int)(i % W));
        const i64 row = i - (i64)pos * step;
        float acc = 0.0f;
        for (int k = 0; k <= 2 * radius; ++k) {
            int j = pos + k - radius;
            int m = j % (2 * n);
            if (m < 0) m += 2 * n;
            j = m < n ? m : 2 * n - 1 - m;
            acc = acc + kernel[k] * src[row + (i64)j * step];
        }
        dst[i] = acc;
    }
}

// Network output (N, K, S0, S1, S2) -> uint8 labels (and optional uint8 confidence) on the
// unpadded grid, written at batch offset `n_offset` of a (N_total, G0, G1, G2) label volume.
// Reference: edgeseg/cuda/reference.py (postprocess), which equals edgeseg.preprocess.to_labels.

// Mirrors edgeseg.cuda.kernels.PostParams (ctypes).
struct PostParams {
    const void* logits;
    u8* labels;
    u8* confidence;          // null: not wanted
    const u8* label_values;  // threshold mode: label value of channel c
    i64 n_offset;
    int N, K;
    int S[3];                // spatial extent of the logits (padded)
    int G[3];                // extent kept (the model grid)
    int mode;                // 0: argmax, 1: threshold
    int activation;          // 0: logits, 1: softmax, 2: sigmoid
    int n_labels;
    float threshold;
};

// Layout guard: must equal ctypes.sizeof(edgeseg.cuda.module.PostParams).
static_assert(sizeof(PostParams) == 88, "PostParams layout changed: update edgeseg/cuda/module.py");

template <typename T>
__device__ __forceinline__ float load(const T* p, i64 i);
template <>
__device__ __forceinline__ float load<float>(const float* p, i64 i) { return p[i]; }
template <>
__device__ __forceinline__ float load<u16>(const u16* p, i64 i) { return half_to_float(p[i]); }

__device__ __forceinline__ u8 to_u8(float p) { return (u8)rintf(p * 255.0f); }

template <typename T>
__device__ void postprocess_body(const PostParams& p) {
    const T* x = (const T*)p.logits;
    const i64 g = (i64)p.G[0] * p.G[1] * p.G[2];
    const i64 s = (i64)p.S[0] * p.S[1] * p.S[2];
    const i64 total = (i64)p.N * g;
    for (i64 i = global_index(); i < total; i += global_stride()) {
        const int n = (int)(i / g);
        const i64 r = i - n * g;
        const int c2 = (int)(r % p.G[2]);
        const int c1 = (int)((r / p.G[2]) % p.G[1]);
        const int c0 = (int)(r / ((i64)p.G[2] * p.G[1]));
        const i64 base = (i64)n * p.K * s + ((i64)c0 * p.S[1] + c1) * p.S[2] + c2;
        u8 label = 0;
        float conf = 0.0f;
        if (p.mode == 0) {
            // Running max, ties to the lower channel (np.argmax).
            float best = load<T>(x, base);
            int arg = 0;
            for (int k = 1; k < p.K; ++k) {
                const float v = load<T>(x, base + k * s);
                if (v > best) { best = v; arg = k; }
            }
            label = (u8)arg;
            if (p.confidence) {
                if (p.activation == 1) {
                    conf = best;
                } else {  // max softmax probability = 1 / sum(exp(x - max))
                    float sum = 0.0f;
                    for (int k = 0; k < p.K; ++k) sum = sum + expf(load<T>(x, base + k * s) - best);
                    conf = 1.0f / sum;
                }
            }
        } else {
            // Later channels win; probability is sigmoid(x) for logits.
            float pmax = 0.0f;
            for (int k = 0; k < p.K; ++k) {
                float v = load<T>(x, base + k * s);
                if (p.activation == 0) v = 1.0f / (1.0f + expf(-v));
                if (k < p.n_labels && v > p.threshold) label = p.label_values[k];
                pmax = k == 0 ? v : fmaxf(pmax, v);
            }
            conf = pmax;
        }
        const i64 o = (p.n_offset + n) * g + r;
        p.labels[o] = label;
        if (p.confidence) p.confidence[o] = to_u8(conf);
    }
}

extern "C" __global__ void postprocess_f32(const PostParams p) { postprocess_body<float>(p); }
extern "C" __global__ void postprocess_f16(const PostParams p) { postprocess_body<u16>(p); }

// Grid labels -> source (z, y, x) grid: dst[z, y, x] = src[t[z] + t[nz + y] + t[nz + ny + x]], the
// nearest resampling and the inverse reorientation folded into per-axis element offsets.
// Reference: edgeseg/cuda/reference.py (gather_labels), tables: edgeseg/cuda/plan.py (source_tables).
extern "C" __global__ void gather_u8(const u8* src, u8* dst, const i64* table, int nz, int ny, int nx) {
    const i64 total = (i64)nz * ny * nx;
    for (i64 i = global_index(); i < total; i += global_stride()) {
        const int x = (int)(i % nx);
        const i64 t = i / nx;
        const int y = (int)(t % ny);
        const int z = (int)(t / ny);
        dst[i] = src[table[z] + table[nz + y] + table[nz + ny + x]];
    }
}

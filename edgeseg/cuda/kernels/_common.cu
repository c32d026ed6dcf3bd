// Shared by every edgeseg kernel: the loader prepends this file to each kernel source, so the
// kernels compile with NVRTC alone (no CUDA headers, no include paths on the device).
// Every kernel is compiled with --fmad=false: the numpy references round after each multiply
// and add, and so do the kernels.

typedef unsigned char u8;
typedef unsigned short u16;
typedef long long i64;
typedef unsigned long long u64;

// fp16 <-> fp32 with the PTX conversions (cuda_fp16.h is not needed).
__device__ __forceinline__ float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 float_to_half(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ i64 global_index() {
    return (i64)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ i64 global_stride() {
    return (i64)gridDim.x * blockDim.x;
}

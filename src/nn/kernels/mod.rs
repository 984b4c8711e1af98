//! The crate's own CPU kernels for `f32`: the fast paths behind the layers of [`crate::nn`].
//!
//! Nothing here is public API. The layers and the functional face ([`crate::nn::ops`],
//! [`crate::nn::linear`], [`crate::nn::attention`], [`crate::nn::efficientnet`]) decide
//! which path a call takes; the kernels only compute.
//!
//! # When a fast path applies
//!
//! Every kernel takes `f32` tensors on the CPU, checked with [`cpu_f32`]. Two kinds exist:
//!
//! * **Inference kernels** record no backward pass (`apply_op*_no_bwd`, or in place in a
//!   fresh output buffer). The face takes them only when no input tracks gradients
//!   ([`cpu_f32_no_grad`]); the in-place ones also need a contiguous buffer that nothing
//!   else refers to (a matmul or convolution output).
//! * **Training kernels** are candle custom ops with a backward pass of their own, itself
//!   one or a few kernels (`dx`, `dweight`, `dbias` …), so gradients are exact and never
//!   stop at a fused op. The face takes them on the CPU in `f32` where the inference kernel
//!   does not apply (an input tracks gradients); a few run whenever the tensors are `f32` on
//!   the CPU (the tanh GELU, BatchNorm with batch statistics, EfficientNet's convolutions in
//!   train mode).
//!
//! Other devices and dtypes take candle's ops and differentiable compositions, in the face.
//!
//! # Dispatch
//!
//! Loops are written so that the compiler vectorises them, and the hot ones are compiled
//! twice: portable, and with `#[target_feature(enable = "avx2,fma")]`, the copy chosen at run
//! time by [`avx2_fma`]. The depthwise convolution has hand-written AVX2 kernels. Work is
//! split across the rayon pool (planes, rows, output blocks, attention heads).
//!
//! # Files
//!
//! * [`math`]: the vectorisable scalar functions (one `exp`, `erf`, the activations and
//!   their derivatives);
//! * [`act`]: activations (with a bias over the last dimension) in place, and the training
//!   activation ops;
//! * [`softmax`]: the scaled, masked softmax in place, and the training softmax;
//! * [`norm`]: the training layer norm and batch norm;
//! * [`gemm`]: matrix products (linear layers, 1×1 convolutions) split across the pool;
//! * [`attention`]: fused multi-head attention reading the heads in place;
//! * [`epilogue`]: EfficientNet's per-channel shift + SiLU (+ residual) after a convolution;
//! * [`depthwise`]: EfficientNet's depthwise convolutions, both directions;
//! * [`im2col`]: the 3×3 convolutions of CLIP's modified ResNet as im2col (col2im backward).

pub(crate) mod act;
pub(crate) mod attention;
pub(crate) mod depthwise;
pub(crate) mod epilogue;
pub(crate) mod gemm;
pub(crate) mod im2col;
pub(crate) mod math;
pub(crate) mod norm;
pub(crate) mod softmax;

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

/// Whether every tensor of `ts` is `f32` on the CPU: the tensors the kernels take.
pub(crate) fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// [`cpu_f32`], and none of `ts` takes part in a gradient computation: the inputs of the
/// inference kernels, which record no backward pass.
pub(crate) fn cpu_f32_no_grad(ts: &[&Tensor]) -> bool {
    cpu_f32(ts) && !ts.iter().any(|t| t.track_op())
}

/// Whether the CPU has AVX2 and FMA (detected once): the kernels then run copies compiled
/// for them (8-wide vectors, fused multiply-adds).
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The `f32` data of a contiguous CPU storage, or an error naming `what`.
pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{what}: expected f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// [`contiguous_f32`] for in-place ops.
pub(crate) fn contiguous_f32_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{what}: expected f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// The `f32` data of a contiguous tensor on the CPU, read in place by `f`.
pub(crate) fn with_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*s else {
        candle_core::bail!("{what}: expected a CPU tensor")
    };
    Ok(f(contiguous_f32(s, l, what)?))
}

/// [`contiguous_f32`] for each of an op's inputs, errors naming `what`.
pub(crate) fn contiguous_f32s<'a, const N: usize>(
    what: &str,
    args: [(&'a CpuStorage, &Layout); N],
) -> Result<[&'a [f32]; N]> {
    let mut out = [&[][..]; N];
    for (o, (s, l)) in out.iter_mut().zip(args) {
        *o = contiguous_f32(s, l, what)?;
    }
    Ok(out)
}

//! Element-wise and normalisation ops that are correct for both inference and training.
//!
//! candle's fused `softmax_last_dim`, `layer_norm` and `rms_norm` record no backward pass:
//! gradients silently stop at them. Each op here takes the fused kernel when no input
//! tracks gradients (inference, frozen towers) and an equivalent composition of
//! differentiable primitives otherwise, so training always gets true gradients and
//! inference keeps the fast path.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// Whether any of `ts` takes part in a gradient computation.
pub fn tracks_grad(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// Softmax over the last dimension, with a real backward when the input tracks gradients.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        if xs.dtype() == DType::F32 && xs.device().is_cpu() && xs.rank() > 0 {
            // One parallel pass forward and one backward (the composition takes five
            // single-threaded passes and as many buffers each way).
            return xs.contiguous()?.apply_op1(SoftmaxTrain);
        }
        softmax_composed(xs)
    } else {
        candle_nn::ops::softmax_last_dim(xs)
    }
}

/// Max-stabilised softmax built from differentiable primitives.
pub fn softmax_composed(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

/// Log-softmax over the last dimension (always differentiable).
pub fn log_softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let diff = xs.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    diff.broadcast_sub(&lse)
}

/// Numerically stable `log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|))`.
pub fn log_sigmoid(xs: &Tensor) -> Result<Tensor> {
    let zeros = xs.zeros_like()?;
    let neg_abs = xs.abs()?.neg()?;
    let log1p = (neg_abs.exp()? + 1.0)?.log()?;
    xs.minimum(&zeros)?.sub(&log1p)
}

/// Sigmoid with a real backward.
pub fn sigmoid(xs: &Tensor) -> Result<Tensor> {
    candle_nn::ops::sigmoid(xs)
}

/// L2-normalises along the last dimension (differentiable).
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    // torch.nn.functional.normalize(eps=1e-12) divides by max(‖x‖, 1e-12). Clamping the
    // squared norm at 1e-24 instead gives the same values and the same backward for an
    // all-zero row (1/eps, finite), where sqrt'(0) = ∞ would make it NaN.
    let norm = xs
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .clamp(1e-24, f64::INFINITY)?
        .sqrt()?;
    xs.broadcast_div(&norm)
}

/// Layer normalisation over the last dimension with learned scale and shift.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Builds from explicit tensors.
    pub fn from_tensors(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    /// Loads `weight` and `bias` of size `dim`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    /// Loads the old BERT TF-style names `gamma`/`beta` when `weight`/`bias` are absent.
    pub fn new_bert(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if !vb.contains_tensor("weight") && vb.contains_tensor("gamma") {
            return Ok(Self {
                weight: vb.get(dim, "gamma")?,
                bias: vb.get(dim, "beta")?,
                eps,
            });
        }
        Self::new(dim, eps, vb)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if tracks_grad(&[xs, &self.weight, &self.bias])
            && xs.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && self.bias.dtype() == DType::F32
            && xs.device().is_cpu()
            && xs.rank() > 0
        {
            // Training on the CPU: fused forward and backward kernels.
            xs.contiguous()?.apply_op3(
                &self.weight.contiguous()?,
                &self.bias.contiguous()?,
                LayerNormTrain {
                    eps: self.eps as f32,
                },
            )
        } else if tracks_grad(&[xs, &self.weight, &self.bias])
            || !xs.is_contiguous()
            || xs.dtype() == DType::F64
        {
            layer_norm_composed(xs, &self.weight, &self.bias, self.eps)
        } else {
            candle_nn::ops::layer_norm(xs, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// Layer norm built from differentiable primitives; statistics in f32 for half inputs.
pub fn layer_norm_composed(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = xs.dtype();
    let internal = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let x = xs.to_dtype(internal)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

// ---------------------------------------------------------------------------------------
// Training kernels (CPU, f32): softmax and layer norm with real backward kernels, used when
// a tensor tracks gradients. Tests check them against the compositions above.
// ---------------------------------------------------------------------------------------

/// Softmax over the last dimension with a backward kernel `dx = y · (g − Σ g·y)`.
struct SoftmaxTrain;

impl candle_core::CustomOp1 for SoftmaxTrain {
    fn name(&self) -> &'static str {
        "softmax-train"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let mut out = contiguous_f32(storage, layout, "softmax-train")?.to_vec();
        softmax_rows(&mut out, layout.dims(), None, 1.0)?;
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let y = res.detach();
        let g = grad_res.contiguous()?;
        Ok(Some(y.apply_op2_no_bwd(&g, &SoftmaxBackward)?))
    }
}

/// `(y, g) ↦ y · (g − Σ_last g·y)`.
struct SoftmaxBackward;

impl candle_core::CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(
        &self,
        ys: &candle_core::CpuStorage,
        yl: &candle_core::Layout,
        gs: &candle_core::CpuStorage,
        gl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let y = contiguous_f32(ys, yl, "softmax-backward")?;
        let g = contiguous_f32(gs, gl, "softmax-backward")?;
        let k = *yl.dims().last().unwrap_or(&1);
        if y.len() != g.len() || k == 0 {
            candle_core::bail!("softmax-backward: shapes differ")
        }
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(k)
            .zip(y.par_chunks(k).zip(g.par_chunks(k)))
            .for_each(|(o, (y, g))| {
                let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                for ((o, y), g) in o.iter_mut().zip(y).zip(g) {
                    *o = y * (g - dot);
                }
            });
        Ok((candle_core::CpuStorage::F32(out), yl.shape().clone()))
    }
}

/// Layer norm over the last dimension, `(x, weight, bias)`, with a backward kernel.
struct LayerNormTrain {
    eps: f32,
}

/// Mean and `1/sqrt(var + eps)` of a row (two passes, as the composition).
#[inline]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl candle_core::CustomOp3 for LayerNormTrain {
    fn name(&self) -> &'static str {
        "layer-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
        bs: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = contiguous_f32(xs, xl, "layer-norm-train")?;
        let w = contiguous_f32(ws, wl, "layer-norm-train")?;
        let b = contiguous_f32(bs, bl, "layer-norm-train")?;
        let d = *xl.dims().last().unwrap_or(&1);
        if d == 0 || w.len() != d || b.len() != d {
            candle_core::bail!("layer-norm-train: weight and bias must match the last dim {d}")
        }
        let eps = self.eps;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, x)| {
                let (mean, rstd) = row_stats(x, eps);
                for (((o, x), w), b) in o.iter_mut().zip(x).zip(w).zip(b) {
                    *o = (x - mean) * rstd * w + b;
                }
            });
        Ok((candle_core::CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / d;
        let packed = x.detach().apply_op3_no_bwd(
            &w.detach(),
            &grad_res.contiguous()?,
            &LayerNormBackward { eps: self.eps },
        )?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows, 1)?.reshape(d)?;
        let db = packed.narrow(0, rows + 1, 1)?.reshape(d)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `(x, weight, g)` to `[rows + 2, d]`: `dx` rows, then `dweight`, then `dbias`.
struct LayerNormBackward {
    eps: f32,
}

impl candle_core::CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
        gs: &candle_core::CpuStorage,
        gl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = contiguous_f32(xs, xl, "layer-norm-backward")?;
        let w = contiguous_f32(ws, wl, "layer-norm-backward")?;
        let g = contiguous_f32(gs, gl, "layer-norm-backward")?;
        let d = *xl.dims().last().unwrap_or(&1);
        if d == 0 || w.len() != d || g.len() != x.len() {
            candle_core::bail!("layer-norm-backward: shapes differ")
        }
        let rows = x.len() / d;
        let eps = self.eps;
        let mut out = vec![0f32; (rows + 2) * d];
        let (dx, dwb) = out.split_at_mut(rows * d);
        // Rows in blocks; each block also sums its share of dweight and dbias.
        let block = (16384 / d).max(1) * d;
        let (dw, db) = dx
            .par_chunks_mut(block)
            .zip(x.par_chunks(block).zip(g.par_chunks(block)))
            .map(|(dx, (x, g))| {
                let mut dw = vec![0f32; d];
                let mut db = vec![0f32; d];
                let mut xhat = vec![0f32; d];
                for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                    let (mean, rstd) = row_stats(x, eps);
                    let (mut m1, mut m2) = (0f32, 0f32);
                    for j in 0..d {
                        let xh = (x[j] - mean) * rstd;
                        xhat[j] = xh;
                        let dxh = g[j] * w[j];
                        m1 += dxh;
                        m2 += dxh * xh;
                        dw[j] += g[j] * xh;
                        db[j] += g[j];
                    }
                    let (m1, m2) = (m1 / d as f32, m2 / d as f32);
                    for j in 0..d {
                        dx[j] = rstd * (g[j] * w[j] - m1 - xhat[j] * m2);
                    }
                }
                (dw, db)
            })
            .reduce(
                || (vec![0f32; d], vec![0f32; d]),
                |(mut a, mut b), (c, e)| {
                    a.iter_mut().zip(&c).for_each(|(a, c)| *a += c);
                    b.iter_mut().zip(&e).for_each(|(b, e)| *b += e);
                    (a, b)
                },
            );
        dwb[..d].copy_from_slice(&dw);
        dwb[d..].copy_from_slice(&db);
        Ok((candle_core::CpuStorage::F32(out), (rows + 2, d).into()))
    }
}

/// GELU (erf) or quick GELU with a backward kernel (tanh GELU: [`GeluTanh`]).
struct ActTrain(Activation);

/// `f'(x)` of the activations [`ActTrain`] runs.
#[inline(always)]
fn act_derivative(act: Activation, x: f32) -> f32 {
    match act {
        // d/dx ½x(1+t) = ½(1+t) + ½x(1−t²)·√(2/π)(1+3c·x²), t = tanh(√(2/π)(x+c·x³)).
        Activation::GeluPytorchTanh => {
            let z = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
            let t = 1.0 - 2.0 / (exp_fast(2.0 * z) + 1.0);
            0.5 * (1.0 + t)
                + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x)
        }
        Activation::QuickGelu => {
            let s = 1.0 / (1.0 + exp_fast(-1.702 * x));
            s + 1.702 * x * s * (1.0 - s)
        }
        // d/dx ½x(1 + erf(x/√2)) = ½(1 + erf(x/√2)) + x·φ(x).
        _ => {
            const INV_SQRT_2PI: f32 = 0.398_942_3;
            0.5 * (1.0 + erf_fast(x * std::f32::consts::FRAC_1_SQRT_2))
                + x * INV_SQRT_2PI * exp_fast(-0.5 * x * x)
        }
    }
}

impl candle_core::CustomOp1 for ActTrain {
    fn name(&self) -> &'static str {
        "act-train"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let src = contiguous_f32(storage, layout, "act-train")?;
        let mut out = src.to_vec();
        out.par_chunks_mut(16 * 1024)
            .for_each(|o| bias_act_chunk(Some(self.0), o, &[]));
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(
            arg.detach().apply_op2_no_bwd(&g, &ActBackward(self.0))?,
        ))
    }
}

/// `(x, g) ↦ g · f'(x)`.
struct ActBackward(Activation);

impl candle_core::CustomOp2 for ActBackward {
    fn name(&self) -> &'static str {
        "act-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        gs: &candle_core::CpuStorage,
        gl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = contiguous_f32(xs, xl, "act-backward")?;
        let g = contiguous_f32(gs, gl, "act-backward")?;
        if x.len() != g.len() {
            candle_core::bail!("act-backward: shapes differ")
        }
        let out = act_backward(self.0, x, g);
        Ok((candle_core::CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// `g · f'(x)` elementwise, in parallel, for the activations [`ActTrain`] runs; `x` and `g`
/// have the same length.
pub(crate) fn act_backward(act: Activation, x: &[f32], g: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(16 * 1024)
        .zip(x.par_chunks(16 * 1024).zip(g.par_chunks(16 * 1024)))
        .for_each(|(o, (x, g))| act_backward_chunk(act, o, x, g));
    out
}

/// `o = g · f'(x)` with the activation chosen once, outside the loop, so that each loop is
/// a straight-line body the compiler vectorises (with AVX2 and FMA where the CPU has them).
fn act_backward_chunk(act: Activation, o: &mut [f32], x: &[f32], g: &[f32]) {
    #[inline(always)]
    fn run(o: &mut [f32], x: &[f32], g: &[f32], f: impl Fn(f32) -> f32) {
        for ((o, x), g) in o.iter_mut().zip(x).zip(g) {
            *o = g * f(*x);
        }
    }
    #[inline(always)]
    fn dispatch(act: Activation, o: &mut [f32], x: &[f32], g: &[f32]) {
        match act {
            Activation::GeluPytorchTanh => {
                run(o, x, g, |x| act_derivative(Activation::GeluPytorchTanh, x))
            }
            Activation::QuickGelu => run(o, x, g, |x| act_derivative(Activation::QuickGelu, x)),
            Activation::Gelu => run(o, x, g, |x| act_derivative(Activation::Gelu, x)),
            other => run(o, x, g, |x| act_derivative(other, x)),
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dispatch_avx(act: Activation, o: &mut [f32], x: &[f32], g: &[f32]) {
        dispatch(act, o, x, g)
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { dispatch_avx(act, o, x, g) };
    }
    dispatch(act, o, x, g)
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// Tanh-approximated GELU. For contiguous f32 tensors on the CPU this runs a parallel
/// kernel (candle's is scalar and single-threaded, about a fifth of a ViT's forward time);
/// its backward is the exact derivative. Other inputs use candle's op.
pub fn gelu_tanh(xs: &Tensor) -> Result<Tensor> {
    if xs.dtype() == DType::F32 && xs.device().is_cpu() {
        xs.apply_op1(GeluTanh)
    } else {
        xs.gelu()
    }
}

struct GeluTanh;

impl candle_core::CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh-par"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("gelu-tanh-par: expected f32")
        };
        let src = match layout.contiguous_offsets() {
            Some((a, b)) => &data[a..b],
            None => candle_core::bail!("gelu-tanh-par: expected a contiguous input"),
        };
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(16 * 1024)
            .zip(src.par_chunks(16 * 1024))
            .for_each(|(o, i)| {
                o.copy_from_slice(i);
                bias_act_chunk(Some(Activation::GeluPytorchTanh), o, &[]);
            });
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(arg.detach().apply_op2_no_bwd(
            &g,
            &ActBackward(Activation::GeluPytorchTanh),
        )?))
    }
}

// ---------------------------------------------------------------------------------------
// Inference kernels (CPU, f32): vectorisable exp and activations, applied in place.
//
// These run only on tensors that track no gradient (they record no backward); every caller
// checks [`tracks_grad`] first and otherwise takes the differentiable composition.
// ---------------------------------------------------------------------------------------

/// `exp(x)` for f32 (Cephes' `expf` reduction and polynomial, within 2 ulp), written
/// without branches so that loops over it vectorise.
#[inline(always)]
fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.3);
    let fx = (x * LOG2E + 0.5).floor();
    let r = x - fx * C1 - fx * C2;
    let mut y = 1.987_569_1e-4;
    y = y * r + 1.398_199_9e-3;
    y = y * r + 8.333_452e-3;
    y = y * r + 4.166_579_6e-2;
    y = y * r + 0.166_666_65;
    y = y * r + 0.5;
    let y = y * r * r + r + 1.0;
    // 2^fx for the integral fx in [-126, 127]: the low mantissa bits of 2²³ + fx + 127 are
    // fx + 127, shifted into the exponent field. (An `as i32` cast would not vectorise: it
    // saturates and maps NaN to 0 lane by lane.)
    y * f32::from_bits((fx + (127.0 + 8_388_608.0)).to_bits() << 23)
}

// tanh(z) = 1 − 2 / (exp(2z) + 1), exact at both saturations.
#[inline(always)]
fn gelu_tanh_fast(x: f32) -> f32 {
    let z = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
    let t = 1.0 - 2.0 / (exp_fast(2.0 * z) + 1.0);
    0.5 * x * (1.0 + t)
}

/// erf(x) (Abramowitz and Stegun 7.1.26, absolute error below 1.5e-7 plus rounding).
#[inline(always)]
fn erf_fast(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_7) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let e = 1.0 - p * exp_fast(-a * a);
    e.copysign(x)
}

#[inline(always)]
fn gelu_erf_fast(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_fast(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn quick_gelu_fast(x: f32) -> f32 {
    x / (1.0 + exp_fast(-1.702 * x))
}

/// Applies `f(x + bias[j % bias.len()])` in place over a row-major buffer (`bias` may be
/// empty: no bias). Compiled twice: with AVX2/FMA (chosen at run time) and without.
macro_rules! bias_act_kernel {
    ($name:ident, $name_avx:ident, $f:expr) => {
        #[inline(always)]
        fn $name(data: &mut [f32], bias: &[f32]) {
            let f = $f;
            if bias.is_empty() {
                for x in data.iter_mut() {
                    *x = f(*x);
                }
            } else {
                for row in data.chunks_mut(bias.len()) {
                    for (x, b) in row.iter_mut().zip(bias) {
                        *x = f(*x + b);
                    }
                }
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $name_avx(data: &mut [f32], bias: &[f32]) {
            $name(data, bias)
        }
    };
}

bias_act_kernel!(k_identity, k_identity_avx, |x: f32| x);
bias_act_kernel!(k_gelu_tanh, k_gelu_tanh_avx, gelu_tanh_fast);
bias_act_kernel!(k_gelu_erf, k_gelu_erf_avx, gelu_erf_fast);
bias_act_kernel!(k_quick_gelu, k_quick_gelu_avx, quick_gelu_fast);
bias_act_kernel!(k_relu, k_relu_avx, |x: f32| x.max(0.0));

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// `data ← act(data + bias)` row by row on the calling thread (`bias` empty: no bias).
pub(crate) fn bias_act_chunk(act: Option<Activation>, data: &mut [f32], bias: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        unsafe {
            match act {
                None => k_identity_avx(data, bias),
                Some(Activation::GeluPytorchTanh) => k_gelu_tanh_avx(data, bias),
                Some(Activation::Gelu) => k_gelu_erf_avx(data, bias),
                Some(Activation::QuickGelu) => k_quick_gelu_avx(data, bias),
                Some(Activation::Relu) => k_relu_avx(data, bias),
                Some(Activation::Silu) => unreachable!("silu has no fused kernel"),
            }
        }
        return;
    }
    match act {
        None => k_identity(data, bias),
        Some(Activation::GeluPytorchTanh) => k_gelu_tanh(data, bias),
        Some(Activation::Gelu) => k_gelu_erf(data, bias),
        Some(Activation::QuickGelu) => k_quick_gelu(data, bias),
        Some(Activation::Relu) => k_relu(data, bias),
        Some(Activation::Silu) => unreachable!("silu has no fused kernel"),
    }
}

/// In place: `x ← act(x + bias)` over the last dimension.
struct BiasAct(Option<Activation>);

fn bias_act_cpu(act: Option<Activation>, data: &mut [f32], bias: &[f32]) {
    use rayon::prelude::*;
    let row = bias.len().max(1);
    // Whole rows per task, about 64 Ki elements each.
    let rows_per = (65536 / row).max(1);
    data.par_chunks_mut(rows_per * row)
        .for_each(|c| bias_act_chunk(act, c, bias));
}

impl candle_core::InplaceOp1 for BiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(&self, s: &mut candle_core::CpuStorage, l: &candle_core::Layout) -> Result<()> {
        bias_act_cpu(self.0, contiguous_f32_mut(s, l, "bias-act")?, &[]);
        Ok(())
    }
}

impl candle_core::InplaceOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(
        &self,
        s: &mut candle_core::CpuStorage,
        l: &candle_core::Layout,
        bs: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
    ) -> Result<()> {
        let data = contiguous_f32_mut(s, l, "bias-act")?;
        let bias = contiguous_f32(bs, bl, "bias-act")?;
        if bias.is_empty() || data.len() % bias.len() != 0 {
            candle_core::bail!("bias-act: bias does not divide the rows")
        }
        bias_act_cpu(self.0, data, bias);
        Ok(())
    }
}

/// Whether the in-place inference kernels apply to `xs`: a contiguous f32 CPU tensor that
/// tracks no gradient.
/// The `f32` data of a contiguous CPU storage, or an error naming `what`.
pub(crate) fn contiguous_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(data) = s else {
        candle_core::bail!("{what}: expected f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// [`contiguous_f32`] for in-place ops.
pub(crate) fn contiguous_f32_mut<'a>(
    s: &'a mut candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> Result<&'a mut [f32]> {
    let candle_core::CpuStorage::F32(data) = s else {
        candle_core::bail!("{what}: expected f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

pub fn inplace_ok(xs: &Tensor) -> bool {
    xs.dtype() == DType::F32 && xs.device().is_cpu() && xs.is_contiguous() && !xs.track_op()
}

/// `act(y + bias)` computed **in place in `y`**, for a freshly computed `y` that nothing
/// else refers to (a matmul output). Falls back to (differentiable) out-of-place ops when
/// `y` or `bias` tracks gradients, is not an f32 CPU tensor, or `act` has no kernel.
pub fn bias_act_into(y: Tensor, bias: Option<&Tensor>, act: Option<Activation>) -> Result<Tensor> {
    let fused = inplace_ok(&y)
        && bias.is_none_or(|b| {
            inplace_ok(b) && b.rank() == 1 && y.dims().last() == Some(&b.dim(0).unwrap_or(0))
        })
        && act != Some(Activation::Silu);
    if !fused {
        let y = match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        };
        return match act {
            Some(a) => a.apply(&y),
            None => Ok(y),
        };
    }
    match bias {
        Some(b) => y.inplace_op2(b, &BiasAct(act))?,
        None => {
            if act.is_some() {
                y.inplace_op1(&BiasAct(act))?
            }
        }
    }
    Ok(y)
}

/// In place: `x ← softmax(scale · x + bias)` over the last dimension of a `[b, h, q, k]`
/// score tensor; `bias` broadcastable to it.
struct ScaledSoftmax {
    scale: f32,
}

#[inline(always)]
fn softmax_row(row: &mut [f32], bias: Option<&[f32]>, scale: f32) {
    match bias {
        Some(bv) => {
            for (x, b) in row.iter_mut().zip(bv) {
                *x = *x * scale + b;
            }
        }
        None => {
            for x in row.iter_mut() {
                *x *= scale;
            }
        }
    }
    // The max and the sum run in `LANES` independent lanes, so that they vectorise (a single
    // running max or sum is one serial dependency chain).
    const LANES: usize = 16;
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &x) in lane_max.iter_mut().zip(c) {
            *m = m.max(x);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lane_max)
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut lane_sum = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (s, x) in lane_sum.iter_mut().zip(c) {
            *x = exp_fast(*x - max);
            *s += *x;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp_fast(*x - max);
        sum += *x;
    }
    let sum = sum + lane_sum.iter().sum::<f32>();
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx(row: &mut [f32], bias: Option<&[f32]>, scale: f32) {
    softmax_row(row, bias, scale)
}

/// `row ← softmax(scale · row + bias)` on the calling thread, with AVX2 where the CPU has it.
pub(crate) fn softmax_row_fast(row: &mut [f32], bias: Option<&[f32]>, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA are present (checked above).
        unsafe { softmax_row_avx(row, bias, scale) };
        return;
    }
    softmax_row(row, bias, scale)
}

fn softmax_rows(
    data: &mut [f32],
    dims: &[usize],
    bias: Option<(&[f32], &candle_core::Layout)>,
    scale: f32,
) -> Result<()> {
    use rayon::prelude::*;
    let k = *dims.last().unwrap_or(&1);
    if k == 0 {
        return Ok(());
    }
    // Bias strides for the leading dims (broadcast dims have stride 0).
    let (bias_data, bstrides, bstart) = match bias {
        Some((d, l)) => (Some(d), l.stride().to_vec(), l.start_offset()),
        None => (None, vec![], 0),
    };
    let rank = dims.len();
    data.par_chunks_mut(k).enumerate().for_each(|(r, row)| {
        let mut tmp;
        let brow = match bias_data {
            Some(bd) => {
                let mut off = bstart;
                let mut rem = r;
                for i in (0..rank - 1).rev() {
                    off += (rem % dims[i]) * bstrides[i];
                    rem /= dims[i];
                }
                let s = bstrides[rank - 1];
                if s == 1 {
                    Some(&bd[off..off + k])
                } else {
                    tmp = Vec::with_capacity(k);
                    tmp.extend((0..k).map(|j| bd[off + j * s]));
                    Some(&tmp[..])
                }
            }
            None => None,
        };
        softmax_row_fast(row, brow, scale)
    });
    Ok(())
}

impl candle_core::InplaceOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, s: &mut candle_core::CpuStorage, l: &candle_core::Layout) -> Result<()> {
        softmax_rows(
            contiguous_f32_mut(s, l, "scaled-softmax")?,
            l.dims(),
            None,
            self.scale,
        )
    }
}

impl candle_core::InplaceOp2 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(
        &self,
        s: &mut candle_core::CpuStorage,
        l: &candle_core::Layout,
        bs: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
    ) -> Result<()> {
        let (candle_core::CpuStorage::F32(data), candle_core::CpuStorage::F32(bias)) = (s, bs)
        else {
            candle_core::bail!("scaled-softmax: expected f32")
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("scaled-softmax: expected a contiguous tensor")
        };
        if bl.dims() != l.dims() {
            candle_core::bail!("scaled-softmax: bias not broadcast to the scores")
        }
        softmax_rows(&mut data[a..b], l.dims(), Some((bias, bl)), self.scale)
    }
}

/// `softmax(scale · scores + bias)` over the last dimension, **in place in `scores`** when it
/// is a fresh f32 CPU tensor and nothing tracks gradients; otherwise the differentiable
/// composition.
pub fn scaled_softmax_into(scores: Tensor, bias: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let fused = inplace_ok(&scores)
        && bias.is_none_or(|b| b.dtype() == DType::F32 && b.device().is_cpu() && !b.track_op());
    if !fused {
        let s = (scores * scale)?;
        let s = match bias {
            Some(b) => s.broadcast_add(b)?,
            None => s,
        };
        return softmax_last_dim(&s);
    }
    let op = ScaledSoftmax {
        scale: scale as f32,
    };
    match bias {
        Some(b) => scores.inplace_op2(&b.broadcast_as(scores.shape())?, &op)?,
        None => scores.inplace_op1(&op)?,
    }
    Ok(scores)
}

/// Activation functions used by the supported checkpoints, with HF config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU (`gelu` in HF configs, erf based).
    #[default]
    Gelu,
    /// Tanh-approximated GELU.
    #[serde(alias = "gelu_new", alias = "gelu_fast")]
    GeluPytorchTanh,
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    Relu,
    #[serde(alias = "swish")]
    Silu,
}

impl Activation {
    pub fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        if matches!(self, Activation::Gelu | Activation::QuickGelu)
            && xs.track_op()
            && xs.dtype() == DType::F32
            && xs.device().is_cpu()
        {
            // Training on the CPU: one parallel pass each way.
            return xs.contiguous()?.apply_op1(ActTrain(*self));
        }
        match self {
            Activation::Gelu => xs.gelu_erf(),
            Activation::GeluPytorchTanh => gelu_tanh(xs),
            Activation::QuickGelu => xs.mul(&sigmoid(&(xs * 1.702)?)?),
            Activation::Relu => xs.relu(),
            Activation::Silu => xs.silu(),
        }
    }
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(xs)
    }
}

/// Additive attention bias from a `[batch, keys]` 0/1 mask: 0 where attended, `neg`
/// where masked, shaped `[batch, 1, 1, keys]` for broadcasting over heads and queries.
pub fn key_padding_bias(mask: &Tensor, neg: f64, dtype: DType) -> Result<Tensor> {
    let (b, k) = mask.dims2()?;
    let m = mask.to_dtype(DType::F32)?;
    let bias = ((m.ones_like()? - m)? * neg)?;
    bias.to_dtype(dtype)?.reshape((b, 1, 1, k))
}

/// Cross-entropy with integer targets, averaged over the batch; `logits` is `[n, classes]`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last_dim(logits)?;
    let picked = logp.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    picked.mean_all()?.neg()
}

/// Cross-entropy against soft targets `[n, classes]` (rows sum to 1), batch mean.
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last_dim(logits)?;
    (logp * targets)?.sum(D::Minus1)?.mean_all()?.neg()
}

/// BatchNorm over `x` `[b, c, h, w]` with the batch's statistics, as in train mode:
/// `(x − mean) / sqrt(var + eps) · weight + bias` with the biased variance, gradients
/// flowing to `x` through the statistics and to `weight` and `bias`. Returns the output
/// and the batch mean and biased variance `[c]` (detached, for the running statistics).
///
/// On the CPU in f32 both passes are one kernel each (`BatchNormTrain`: per-channel
/// sums over planes, then a per-plane map); elsewhere it is a composition of
/// differentiable primitives.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, c, h, w) = x.dims4()?;
    let n = b * h * w;
    if x.device().is_cpu() && x.dtype() == DType::F32 && n > 0 {
        let x = x.contiguous()?;
        let (mean, var) = {
            let (s, l) = x.storage_and_layout();
            let candle_core::Storage::Cpu(s) = &*s else {
                candle_core::bail!("batch-norm-train: expected a CPU tensor")
            };
            channel_stats(contiguous_f32(s, l, "batch-norm-train")?, b, c, h * w)
        };
        let rstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps as f32).sqrt()).collect();
        let mean_t = Tensor::from_slice(&mean, c, x.device())?;
        let var_t = Tensor::from_slice(&var, c, x.device())?;
        let op = BatchNormTrain {
            mean: std::sync::Arc::new(mean),
            rstd: std::sync::Arc::new(rstd),
        };
        let y = x.apply_op3_arc(
            &weight.to_dtype(DType::F32)?.contiguous()?,
            &bias.to_dtype(DType::F32)?.contiguous()?,
            std::sync::Arc::new(Box::new(op)),
        )?;
        return Ok((y, mean_t, var_t));
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let sum = |t: &Tensor| -> Result<Tensor> { t.sum_keepdim(0)?.sum_keepdim(2)?.sum_keepdim(3) };
    let mean = (sum(&xf)? / n as f64)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = (sum(&centered.sqr()?)? / n as f64)?;
    let weight = weight.to_dtype(DType::F32)?.reshape((1, c, 1, 1))?;
    let bias = bias.to_dtype(DType::F32)?.reshape((1, c, 1, 1))?;
    let scale = weight.broadcast_div(&(&var + eps)?.sqrt()?)?;
    let y = centered.broadcast_mul(&scale)?.broadcast_add(&bias)?;
    Ok((
        y.to_dtype(dtype)?,
        mean.detach().flatten_all()?,
        var.detach().flatten_all()?,
    ))
}

/// Per-channel mean and biased variance of a contiguous `[b, c, hw]` buffer (two passes,
/// f64 accumulation), channels in parallel.
fn channel_stats(x: &[f32], b: usize, c: usize, hw: usize) -> (Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let n = (b * hw) as f64;
    let planes = |ch: usize| (0..b).map(move |i| (i * c + ch) * hw);
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let mean = planes(ch)
                .map(|o| x[o..o + hw].iter().map(|&v| v as f64).sum::<f64>())
                .sum::<f64>()
                / n;
            let var = planes(ch)
                .map(|o| {
                    x[o..o + hw]
                        .iter()
                        .map(|&v| (v as f64 - mean) * (v as f64 - mean))
                        .sum::<f64>()
                })
                .sum::<f64>()
                / n;
            (mean as f32, var as f32)
        })
        .unzip()
}

/// The CPU BatchNorm of [`batch_norm_train`], `(x, weight, bias)`, with the batch
/// statistics computed beforehand.
struct BatchNormTrain {
    mean: std::sync::Arc<Vec<f32>>,
    rstd: std::sync::Arc<Vec<f32>>,
}

impl candle_core::CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
        bs: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = contiguous_f32(xs, xl, "batch-norm-train")?;
        let w = contiguous_f32(ws, wl, "batch-norm-train")?;
        let bv = contiguous_f32(bs, bl, "batch-norm-train")?;
        let (_, c, h, wd) = xl.shape().dims4()?;
        let hw = h * wd;
        if w.len() != c || bv.len() != c || self.mean.len() != c || hw == 0 {
            candle_core::bail!("batch-norm-train: weight and bias must have {c} channels")
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(p, (o, x))| {
                let ch = p % c;
                let scale = self.rstd[ch] * w[ch];
                let shift = bv[ch] - self.mean[ch] * scale;
                for (o, x) in o.iter_mut().zip(x) {
                    *o = x * scale + shift;
                }
            });
        Ok((candle_core::CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = w.elem_count();
        let packed = x.detach().apply_op3_no_bwd(
            &w.detach(),
            &grad_res.contiguous()?,
            &BatchNormBackward {
                mean: self.mean.clone(),
                rstd: self.rstd.clone(),
            },
        )?;
        let len = x.elem_count();
        let dx = packed.narrow(0, 0, len)?.reshape(x.shape())?;
        let dw = packed.narrow(0, len, c)?;
        let db = packed.narrow(0, len + c, c)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `(x, weight, g)` to a flat `[len + 2c]`: `dx`, then `dweight`, then `dbias`.
struct BatchNormBackward {
    mean: std::sync::Arc<Vec<f32>>,
    rstd: std::sync::Arc<Vec<f32>>,
}

impl candle_core::CustomOp3 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "batch-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
        gs: &candle_core::CpuStorage,
        gl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = contiguous_f32(xs, xl, "batch-norm-backward")?;
        let w = contiguous_f32(ws, wl, "batch-norm-backward")?;
        let g = contiguous_f32(gs, gl, "batch-norm-backward")?;
        let (b, c, h, wd) = xl.shape().dims4()?;
        let hw = h * wd;
        if w.len() != c || g.len() != x.len() || self.mean.len() != c || hw == 0 {
            candle_core::bail!("batch-norm-backward: shapes differ")
        }
        let n = (b * hw) as f64;
        // Per channel: sum(g) and sum(g · xhat).
        let (sg, sgx): (Vec<f64>, Vec<f64>) = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (m, r) = (self.mean[ch], self.rstd[ch]);
                let (mut sg, mut sgx) = (0f64, 0f64);
                for i in 0..b {
                    let o = (i * c + ch) * hw;
                    let (mut a, mut s) = (0f32, 0f32);
                    for (&x, &g) in x[o..o + hw].iter().zip(&g[o..o + hw]) {
                        a += g;
                        s += g * (x - m) * r;
                    }
                    sg += a as f64;
                    sgx += s as f64;
                }
                (sg, sgx)
            })
            .unzip();
        let len = x.len();
        let mut out = vec![0f32; len + 2 * c];
        let (dx, dwb) = out.split_at_mut(len);
        dx.par_chunks_mut(hw)
            .zip(x.par_chunks(hw).zip(g.par_chunks(hw)))
            .enumerate()
            .for_each(|(p, (dx, (x, g)))| {
                let ch = p % c;
                let (m, r) = (self.mean[ch], self.rstd[ch]);
                let mg = (sg[ch] / n) as f32;
                let mgx = (sgx[ch] / n) as f32;
                let k = r * w[ch];
                for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                    *dx = k * (g - mg - (x - m) * r * mgx);
                }
            });
        for ch in 0..c {
            dwb[ch] = sgx[ch] as f32;
            dwb[c + ch] = sg[ch] as f32;
        }
        Ok((candle_core::CpuStorage::F32(out), (len + 2 * c).into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Checks the gradient of `f(x)·w` (w fixed random weights) against central finite
    /// differences in f64.
    fn check_grad(name: &str, x0: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(x0).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let w = Tensor::randn(0f64, 1.0, y.dims(), &dev).unwrap();
        let loss = (&y * &w).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient reached the input"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let flat = x0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eps = 1e-6;
        let eval = |v: &[f64]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), x0.dims(), &dev).unwrap();
            (f(&t).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let mut worst = 0f64;
        for i in 0..flat.len() {
            let mut p = flat.clone();
            p[i] += eps;
            let mut m = flat.clone();
            m[i] -= eps;
            let num = (eval(&p) - eval(&m)) / (2.0 * eps);
            worst = worst.max((num - g[i]).abs() / (1.0 + num.abs()));
        }
        assert!(
            worst < 1e-6,
            "{name}: analytic and numeric gradients differ by {worst}"
        );
    }

    fn input(shape: (usize, usize, usize)) -> Tensor {
        Tensor::randn(0f64, 1.0, shape, &Device::Cpu).unwrap()
    }

    /// The fused training kernels (f32 CPU, input tracking gradients) against the
    /// compositions: values and the gradients of every input.
    #[test]
    fn fused_training_softmax_and_layer_norm_match_the_compositions() {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f32, 2.0, (3, 5, 37), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 5, 37), &dev).unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // Softmax.
        let x = Var::from_tensor(&x0).unwrap();
        let fused = softmax_last_dim(x.as_tensor()).unwrap();
        let gf = (&fused * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let x2 = Var::from_tensor(&x0).unwrap();
        let comp = softmax_composed(x2.as_tensor()).unwrap();
        let gc = (&comp * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(&fused, &comp) < 1e-6);
        let (a, b) = (
            gf.get(x.as_tensor()).unwrap(),
            gc.get(x2.as_tensor()).unwrap(),
        );
        assert!(max_diff(b, &b.zeros_like().unwrap()) > 1e-3);
        assert!(max_diff(a, b) < 1e-5, "softmax grad {}", max_diff(a, b));
        // Layer norm, with respect to the input, the scale and the shift.
        let lw0 = Tensor::randn(1f32, 0.3, 37, &dev).unwrap();
        let lb0 = Tensor::randn(0f32, 0.3, 37, &dev).unwrap();
        let run = |composed: bool| {
            let (x, lw, lb) = (
                Var::from_tensor(&x0).unwrap(),
                Var::from_tensor(&lw0).unwrap(),
                Var::from_tensor(&lb0).unwrap(),
            );
            let y = if composed {
                layer_norm_composed(x.as_tensor(), lw.as_tensor(), lb.as_tensor(), 1e-5)
            } else {
                LayerNorm::from_tensors(lw.as_tensor().clone(), lb.as_tensor().clone(), 1e-5)
                    .forward(x.as_tensor())
            }
            .unwrap();
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let grads = [&x, &lw, &lb].map(|v| g.get(v.as_tensor()).unwrap().clone());
            (y, grads)
        };
        let (yf, gf) = run(false);
        let (yc, gc) = run(true);
        assert!(
            max_diff(&yf, &yc) < 1e-5,
            "layer norm {}",
            max_diff(&yf, &yc)
        );
        for (name, (a, b)) in ["dx", "dweight", "dbias"].iter().zip(gf.iter().zip(&gc)) {
            assert!(max_diff(b, &b.zeros_like().unwrap()) > 1e-3);
            let d = max_diff(a, b);
            assert!(d < 1e-4, "layer norm {name}: {d}");
        }
    }

    /// The fused training GELU (erf) and quick GELU against candle's differentiable ops.
    #[test]
    fn fused_training_activations_match_candle() {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f32, 3.0, (4, 777), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 777), &dev).unwrap();
        for act in [Activation::Gelu, Activation::QuickGelu] {
            let x = Var::from_tensor(&x0).unwrap();
            let y = act.apply(x.as_tensor()).unwrap();
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let x2 = Var::from_tensor(&x0).unwrap();
            let t = x2.as_tensor();
            let y2 = match act {
                Activation::Gelu => t.gelu_erf().unwrap(),
                _ => t.mul(&sigmoid(&(t * 1.702).unwrap()).unwrap()).unwrap(),
            };
            let g2 = (&y2 * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let d = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert!(d(&y, &y2) < 2e-6, "{act:?} value {}", d(&y, &y2));
            let (a, b) = (
                g.get(x.as_tensor()).unwrap(),
                g2.get(x2.as_tensor()).unwrap(),
            );
            assert!(d(a, b) < 1e-5, "{act:?} grad {}", d(a, b));
        }
    }

    #[test]
    fn softmax_gradient_matches_finite_differences() {
        check_grad("softmax", &input((2, 3, 5)), softmax_last_dim);
        check_grad("log_softmax", &input((2, 3, 5)), log_softmax_last_dim);
    }

    #[test]
    fn layer_norm_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let w0 = Tensor::randn(1f64, 0.2, 6, &dev).unwrap();
        let b0 = Tensor::randn(0f64, 0.2, 6, &dev).unwrap();
        let x0 = input((2, 3, 6));
        // With respect to the input...
        let ln = LayerNorm::from_tensors(w0.clone(), b0.clone(), 1e-5);
        check_grad("layer_norm dx", &x0, |x| ln.forward(x));
        // ...and to the scale and shift.
        check_grad("layer_norm dweight", &w0, |w| {
            LayerNorm::from_tensors(w.clone(), b0.clone(), 1e-5).forward(&x0)
        });
        check_grad("layer_norm dbias", &b0, |b| {
            LayerNorm::from_tensors(w0.clone(), b.clone(), 1e-5).forward(&x0)
        });
    }

    #[test]
    fn parallel_gelu_tanh_matches_candle_and_has_a_gradient() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3.0, (3, 1000), &dev).unwrap() * 1.0).unwrap();
        let x = Tensor::cat(
            &[
                &x,
                &Tensor::new(&[[-100f32, -20.0, 0.0, 20.0, 100.0]], &dev)
                    .unwrap()
                    .broadcast_as((3, 5))
                    .unwrap(),
            ],
            1,
        )
        .unwrap();
        let ours = gelu_tanh(&x).unwrap();
        let theirs = x.gelu().unwrap();
        let d = (ours - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 2e-6, "parallel gelu differs from candle's by {d}");
        // The custom op's backward against candle's differentiable gelu.
        let v = Var::from_tensor(&x).unwrap();
        let g1 = gelu_tanh(v.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = v
            .as_tensor()
            .gelu()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (
            g1.get(v.as_tensor()).unwrap(),
            g2.get(v.as_tensor()).unwrap(),
        );
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "gelu gradients differ by {d}");
    }

    #[test]
    fn fused_and_composed_paths_agree() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 7, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.2, 16, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.2, 16, &dev).unwrap();
        let fused = LayerNorm::from_tensors(w.clone(), b.clone(), 1e-6)
            .forward(&x)
            .unwrap();
        let composed = layer_norm_composed(&x, &w, &b, 1e-6).unwrap();
        let d = (fused - composed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "layer norm paths differ by {d}");
        let fused = softmax_last_dim(&x).unwrap();
        let composed = softmax_composed(&x).unwrap();
        let d = (fused - composed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "softmax paths differ by {d}");
    }

    #[test]
    fn training_path_is_taken_when_tracking() {
        // A Var input must produce a graph that reaches the weights: the fused kernels
        // would silently return no gradient.
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::ones(8, DType::F32, &dev).unwrap()).unwrap();
        let b = Var::zeros(8, DType::F32, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 8), &dev).unwrap();
        let ln = LayerNorm::from_tensors(w.as_tensor().clone(), b.as_tensor().clone(), 1e-5);
        let y = softmax_last_dim(&ln.forward(&x).unwrap()).unwrap();
        let loss = y.narrow(1, 0, 1).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for (n, v) in [("weight", &w), ("bias", &b)] {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {n}"));
            let s = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(s > 0.0, "zero gradient for {n}");
        }
    }

    #[test]
    fn activations_and_log_sigmoid_gradients() {
        for act in [
            Activation::Gelu,
            Activation::GeluPytorchTanh,
            Activation::QuickGelu,
            Activation::Silu,
        ] {
            check_grad(&format!("{act:?}"), &input((2, 2, 4)), |x| act.apply(x));
        }
        check_grad("log_sigmoid", &input((2, 2, 4)), log_sigmoid);
        check_grad("l2_normalize", &input((2, 2, 4)), l2_normalize);
        // An all-zero row normalises to zero with PyTorch's finite gradient, 1/eps.
        let v = Var::from_tensor(
            &Tensor::new(&[[0f32, 0.0, 0.0], [3.0, 4.0, 0.0]], &Device::Cpu).unwrap(),
        )
        .unwrap();
        let y = l2_normalize(v.as_tensor()).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap()[1], [0.6, 0.8, 0.0]);
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = g.get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert!(g.iter().flatten().all(|x| x.is_finite()), "{g:?}");
        assert_eq!(g[0], [1e12, 1e12, 1e12]);
        // log σ(x) stays finite far from zero.
        let x = Tensor::new(&[-200f32, -20.0, 0.0, 20.0, 200.0], &Device::Cpu).unwrap();
        let v = log_sigmoid(&x).unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
        assert!((v[0] + 200.0).abs() < 1e-3 && v[4].abs() < 1e-6);
    }

    #[test]
    fn attention_gradient_matches_finite_differences() {
        use crate::nn::attention::scaled_dot_product_attention;
        let dev = Device::Cpu;
        let k = Tensor::randn(0f64, 1.0, (1, 2, 5, 4), &dev).unwrap();
        let v = Tensor::randn(0f64, 1.0, (1, 2, 5, 4), &dev).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 0, 0]], &dev).unwrap();
        let bias = key_padding_bias(&mask, -1e4, DType::F64).unwrap();
        let q0 = Tensor::randn(0f64, 1.0, (1, 2, 3, 4), &dev).unwrap();
        let q3 = q0.reshape((2, 3, 4)).unwrap();
        check_grad("attention dq", &q3, |q| {
            scaled_dot_product_attention(&q.reshape((1, 2, 3, 4))?, &k, &v, Some(&bias), 0.5)
        });
    }

    #[test]
    fn batch_norm_kernel_matches_the_composition() {
        // The f32 CPU kernel against the f64 composition: output, statistics and the
        // gradients of input, weight and bias under a random linear loss.
        let dev = Device::Cpu;
        let x64 = Tensor::randn(0.5f64, 2.0, (3, 5, 4, 6), &dev).unwrap();
        let w64 = Tensor::randn(1f64, 0.3, 5, &dev).unwrap();
        let b64 = Tensor::randn(0f64, 0.3, 5, &dev).unwrap();
        let probe = Tensor::randn(0f64, 1.0, (3, 5, 4, 6), &dev).unwrap();
        let run = |dtype: DType| {
            let x = Var::from_tensor(&x64.to_dtype(dtype).unwrap()).unwrap();
            let w = Var::from_tensor(&w64.to_dtype(dtype).unwrap()).unwrap();
            let b = Var::from_tensor(&b64.to_dtype(dtype).unwrap()).unwrap();
            let (y, mean, var) =
                batch_norm_train(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-3).unwrap();
            let loss = (&y * probe.to_dtype(dtype).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let g = loss.backward().unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            vec![
                f(&y),
                f(&mean),
                f(&var),
                f(g.get(x.as_tensor()).unwrap()),
                f(g.get(w.as_tensor()).unwrap()),
                f(g.get(b.as_tensor()).unwrap()),
            ]
        };
        let (kernel, composed) = (run(DType::F32), run(DType::F64));
        for (name, (a, b)) in ["y", "mean", "var", "dx", "dw", "db"]
            .iter()
            .zip(kernel.iter().zip(&composed))
        {
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 2e-5, "batch norm {name} differs by {d}");
        }
    }
}

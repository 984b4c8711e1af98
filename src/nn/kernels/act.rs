//! Activations on the CPU in `f32`: `act(x + bias)` in place over the last dimension (the
//! inference epilogue of products), and the activations with a backward kernel of their own
//! for training.

use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout, Result, Shape, Tensor};

use super::math::{
    gelu_erf, gelu_erf_grad, gelu_tanh, gelu_tanh_grad, quick_gelu, quick_gelu_grad,
};
use super::{avx2_fma, contiguous_f32, contiguous_f32_mut};

/// The activations with a fused kernel ([`crate::nn::Activation::fused`] maps to them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FusedAct {
    /// Exact (erf) GELU.
    Gelu,
    /// Tanh-approximated GELU.
    GeluTanh,
    /// `x · sigmoid(1.702 x)`.
    QuickGelu,
    Relu,
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
bias_act_kernel!(k_gelu_tanh, k_gelu_tanh_avx, gelu_tanh);
bias_act_kernel!(k_gelu_erf, k_gelu_erf_avx, gelu_erf);
bias_act_kernel!(k_quick_gelu, k_quick_gelu_avx, quick_gelu);
bias_act_kernel!(k_relu, k_relu_avx, |x: f32| x.max(0.0));

/// `data ← act(data + bias)` row by row on the calling thread (`bias` empty: no bias).
pub(crate) fn bias_act_chunk(act: Option<FusedAct>, data: &mut [f32], bias: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        unsafe {
            match act {
                None => k_identity_avx(data, bias),
                Some(FusedAct::GeluTanh) => k_gelu_tanh_avx(data, bias),
                Some(FusedAct::Gelu) => k_gelu_erf_avx(data, bias),
                Some(FusedAct::QuickGelu) => k_quick_gelu_avx(data, bias),
                Some(FusedAct::Relu) => k_relu_avx(data, bias),
            }
        }
        return;
    }
    match act {
        None => k_identity(data, bias),
        Some(FusedAct::GeluTanh) => k_gelu_tanh(data, bias),
        Some(FusedAct::Gelu) => k_gelu_erf(data, bias),
        Some(FusedAct::QuickGelu) => k_quick_gelu(data, bias),
        Some(FusedAct::Relu) => k_relu(data, bias),
    }
}

/// `y ← act(y + bias)` **in place in `y`** over its last dimension (`bias` `[last]`): for a
/// contiguous `f32` CPU tensor that tracks no gradient and that nothing else refers to (a
/// matmul output). Nothing is recorded for a backward pass.
pub(crate) fn bias_act_inplace(
    y: &Tensor,
    bias: Option<&Tensor>,
    act: Option<FusedAct>,
) -> Result<()> {
    match bias {
        Some(b) => y.inplace_op2(b, &BiasAct(act)),
        None if act.is_some() => y.inplace_op1(&BiasAct(act)),
        None => Ok(()),
    }
}

/// In place: `x ← act(x + bias)` over the last dimension.
struct BiasAct(Option<FusedAct>);

fn bias_act_cpu(act: Option<FusedAct>, data: &mut [f32], bias: &[f32]) {
    use rayon::prelude::*;
    let row = bias.len().max(1);
    // Whole rows per task, about 64 Ki elements each.
    let rows_per = (65536 / row).max(1);
    data.par_chunks_mut(rows_per * row)
        .for_each(|c| bias_act_chunk(act, c, bias));
}

impl InplaceOp1 for BiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        bias_act_cpu(self.0, contiguous_f32_mut(s, l, "bias-act")?, &[]);
        Ok(())
    }
}

impl InplaceOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<()> {
        let data = contiguous_f32_mut(s, l, "bias-act")?;
        let bias = contiguous_f32(bs, bl, "bias-act")?;
        if bias.is_empty() || data.len() % bias.len() != 0 {
            candle_core::bail!("bias-act: bias does not divide the rows")
        }
        bias_act_cpu(self.0, data, bias);
        Ok(())
    }
}

/// `act(xs)` as one parallel pass with a backward kernel, `g · act'(x)`, for `f32` CPU
/// tensors.
pub(crate) fn act_train(xs: &Tensor, act: FusedAct) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(ActTrain(act))
}

/// An activation with a backward kernel.
struct ActTrain(FusedAct);

impl candle_core::CustomOp1 for ActTrain {
    fn name(&self) -> &'static str {
        "act-train"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let src = contiguous_f32(storage, layout, "act-train")?;
        let mut out = src.to_vec();
        out.par_chunks_mut(16 * 1024)
            .for_each(|o| bias_act_chunk(Some(self.0), o, &[]));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(
            arg.detach().apply_op2_no_bwd(&g, &ActBackward(self.0))?,
        ))
    }
}

/// `(x, g) ↦ g · f'(x)`.
struct ActBackward(FusedAct);

impl candle_core::CustomOp2 for ActBackward {
    fn name(&self) -> &'static str {
        "act-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "act-backward")?;
        let g = contiguous_f32(gs, gl, "act-backward")?;
        if x.len() != g.len() {
            candle_core::bail!("act-backward: shapes differ")
        }
        let out = act_backward(self.0, x, g);
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// `g · f'(x)` elementwise, in parallel; `x` and `g` have the same length.
pub(crate) fn act_backward(act: FusedAct, x: &[f32], g: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(16 * 1024)
        .zip(x.par_chunks(16 * 1024).zip(g.par_chunks(16 * 1024)))
        .for_each(|(o, (x, g))| act_backward_chunk(act, o, x, g));
    out
}

/// `o = g · f'(x)` with the activation chosen once, outside the loop, so that each loop is
/// a straight-line body the compiler vectorises (with AVX2 and FMA where the CPU has them).
fn act_backward_chunk(act: FusedAct, o: &mut [f32], x: &[f32], g: &[f32]) {
    #[inline(always)]
    fn run(o: &mut [f32], x: &[f32], g: &[f32], f: impl Fn(f32) -> f32) {
        for ((o, x), g) in o.iter_mut().zip(x).zip(g) {
            *o = g * f(*x);
        }
    }
    #[inline(always)]
    fn dispatch(act: FusedAct, o: &mut [f32], x: &[f32], g: &[f32]) {
        match act {
            FusedAct::GeluTanh => run(o, x, g, gelu_tanh_grad),
            FusedAct::QuickGelu => run(o, x, g, quick_gelu_grad),
            FusedAct::Gelu => run(o, x, g, gelu_erf_grad),
            // PyTorch's convention: no gradient at 0.
            FusedAct::Relu => run(o, x, g, |x| if x > 0.0 { 1.0 } else { 0.0 }),
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dispatch_avx(act: FusedAct, o: &mut [f32], x: &[f32], g: &[f32]) {
        dispatch(act, o, x, g)
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { dispatch_avx(act, o, x, g) };
    }
    dispatch(act, o, x, g)
}

#[cfg(test)]
mod tests {
    use crate::nn::ops::{gelu_tanh, sigmoid};
    use crate::nn::test_util::max_diff;
    use crate::nn::Activation;
    use candle_core::{Device, Tensor, Var};

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
            let d = |a: &Tensor, b: &Tensor| max_diff(a, b);
            assert!(d(&y, &y2) < 2e-6, "{act:?} value {}", d(&y, &y2));
            let (a, b) = (
                g.get(x.as_tensor()).unwrap(),
                g2.get(x2.as_tensor()).unwrap(),
            );
            assert!(d(a, b) < 1e-5, "{act:?} grad {}", d(a, b));
        }
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
        let d = max_diff(&ours, &theirs);
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
        let d = max_diff(a, b);
        assert!(d < 1e-5, "gelu gradients differ by {d}");
    }

    /// ReLU's derivative (no op takes it today): PyTorch's, zero at zero.
    #[test]
    fn relu_backward_is_the_step() {
        let x = [-2f32, -0.0, 0.0, 0.5, 3.0];
        let g = [1f32, 1.0, 1.0, 2.0, -3.0];
        assert_eq!(
            super::act_backward(super::FusedAct::Relu, &x, &g),
            [0.0, 0.0, 0.0, 2.0, -3.0]
        );
    }
}

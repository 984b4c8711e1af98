//! Softmax over the last dimension on the CPU in `f32`: scaled and masked, in place in a
//! score buffer (inference), and with a backward kernel (training).

use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout, Result, Shape, Tensor};

use super::math::exp;
use super::{avx2_fma, contiguous_f32, contiguous_f32_mut};

/// Softmax over the last dimension of an `f32` CPU tensor of rank ≥ 1 with a backward
/// kernel: one parallel pass forward and one backward (the composition takes five
/// single-threaded passes and as many buffers each way).
pub(crate) fn softmax_train(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(SoftmaxTrain)
}

/// `softmax(scale · scores + bias)` over the last dimension, **in place in `scores`**: a
/// contiguous `f32` CPU tensor that tracks no gradient and that nothing else refers to;
/// `bias` an `f32` CPU tensor broadcastable to it. Nothing is recorded for a backward pass.
pub(crate) fn scaled_softmax_inplace(
    scores: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<()> {
    let op = ScaledSoftmax {
        scale: scale as f32,
    };
    match bias {
        Some(b) => scores.inplace_op2(&b.broadcast_as(scores.shape())?, &op),
        None => scores.inplace_op1(&op),
    }
}

/// Softmax over the last dimension with a backward kernel `dx = y · (g − Σ g·y)`.
struct SoftmaxTrain;

impl candle_core::CustomOp1 for SoftmaxTrain {
    fn name(&self) -> &'static str {
        "softmax-train"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = contiguous_f32(storage, layout, "softmax-train")?.to_vec();
        softmax_rows(&mut out, layout.dims(), None, 1.0)?;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
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
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
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
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }
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
            *x = exp(*x - max);
            *s += *x;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
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
    if avx2_fma() {
        // SAFETY: AVX2 and FMA are present (checked above).
        unsafe { softmax_row_avx(row, bias, scale) };
        return;
    }
    softmax_row(row, bias, scale)
}

fn softmax_rows(
    data: &mut [f32],
    dims: &[usize],
    bias: Option<(&[f32], &Layout)>,
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

impl InplaceOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        softmax_rows(
            contiguous_f32_mut(s, l, "scaled-softmax")?,
            l.dims(),
            None,
            self.scale,
        )
    }
}

impl InplaceOp2 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<()> {
        let (CpuStorage::F32(data), CpuStorage::F32(bias)) = (s, bs) else {
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

#[cfg(test)]
mod tests {
    use crate::nn::ops::{softmax_composed, softmax_last_dim};
    use crate::nn::test_util::max_diff;
    use candle_core::{Device, Tensor, Var};

    /// The fused training softmax (f32 CPU, input tracking gradients) against the
    /// composition: values and the gradients of the input.
    #[test]
    fn fused_training_softmax_matches_the_composition() {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f32, 2.0, (3, 5, 37), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 5, 37), &dev).unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| max_diff(a, b);
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
    }
}

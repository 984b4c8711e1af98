//! Normalisation with backward kernels on the CPU in `f32`: layer norm over the last
//! dimension, and BatchNorm with the batch's statistics (PyTorch's train mode).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::{contiguous_f32s, with_f32};

/// Layer norm of an `f32` CPU tensor of rank ≥ 1 over its last dimension, with `weight` and
/// `bias` `[last]` in `f32`: one parallel pass forward, one backward for all three
/// gradients.
pub(crate) fn layer_norm_train(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    xs.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormTrain { eps: eps as f32 },
    )
}

/// `crate::nn::ops::batch_norm_train` for an `f32` CPU `x` `[b, c, h, w]` with
/// `b·h·w > 0`: the per-channel statistics in one pass, then the output with its backward
/// kernel. Returns the output and the batch mean and biased variance `[c]`.
pub(crate) fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, c, h, w) = x.dims4()?;
    let x = x.contiguous()?;
    let (mean, var) = with_f32(&x, "batch-norm-train", |d| channel_stats(d, b, c, h * w))?;
    let rstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps as f32).sqrt()).collect();
    let mean_t = Tensor::from_slice(&mean, c, x.device())?;
    let var_t = Tensor::from_slice(&var, c, x.device())?;
    let op = BatchNormTrain(BnStats {
        mean: Arc::new(mean),
        rstd: Arc::new(rstd),
    });
    let y = x.apply_op3_arc(
        &weight.to_dtype(DType::F32)?.contiguous()?,
        &bias.to_dtype(DType::F32)?.contiguous()?,
        Arc::new(Box::new(op)),
    )?;
    Ok((y, mean_t, var_t))
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

impl CustomOp3 for LayerNormTrain {
    fn name(&self) -> &'static str {
        "layer-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let [x, w, b] = contiguous_f32s("layer-norm-train", [(xs, xl), (ws, wl), (bs, bl)])?;
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
        Ok((CpuStorage::F32(out), xl.shape().clone()))
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

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let [x, w, g] = contiguous_f32s("layer-norm-backward", [(xs, xl), (ws, wl), (gs, gl)])?;
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
        Ok((CpuStorage::F32(out), (rows + 2, d).into()))
    }
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
struct BatchNormTrain(BnStats);

/// The batch statistics of a [`BatchNormTrain`], shared with its backward op.
#[derive(Clone)]
struct BnStats {
    mean: Arc<Vec<f32>>,
    rstd: Arc<Vec<f32>>,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let [x, w, bv] = contiguous_f32s("batch-norm-train", [(xs, xl), (ws, wl), (bs, bl)])?;
        let (_, c, h, wd) = xl.shape().dims4()?;
        let hw = h * wd;
        if w.len() != c || bv.len() != c || self.0.mean.len() != c || hw == 0 {
            candle_core::bail!("batch-norm-train: weight and bias must have {c} channels")
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(p, (o, x))| {
                let ch = p % c;
                let scale = self.0.rstd[ch] * w[ch];
                let shift = bv[ch] - self.0.mean[ch] * scale;
                for (o, x) in o.iter_mut().zip(x) {
                    *o = x * scale + shift;
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
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
            &BatchNormBackward(self.0.clone()),
        )?;
        let len = x.elem_count();
        let dx = packed.narrow(0, 0, len)?.reshape(x.shape())?;
        let dw = packed.narrow(0, len, c)?;
        let db = packed.narrow(0, len + c, c)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `(x, weight, g)` to a flat `[len + 2c]`: `dx`, then `dweight`, then `dbias`.
struct BatchNormBackward(BnStats);

impl CustomOp3 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "batch-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let [x, w, g] = contiguous_f32s("batch-norm-backward", [(xs, xl), (ws, wl), (gs, gl)])?;
        let (b, c, h, wd) = xl.shape().dims4()?;
        let hw = h * wd;
        if w.len() != c || g.len() != x.len() || self.0.mean.len() != c || hw == 0 {
            candle_core::bail!("batch-norm-backward: shapes differ")
        }
        let n = (b * hw) as f64;
        // Per channel: sum(g) and sum(g · xhat).
        let (sg, sgx): (Vec<f64>, Vec<f64>) = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (m, r) = (self.0.mean[ch], self.0.rstd[ch]);
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
                let (m, r) = (self.0.mean[ch], self.0.rstd[ch]);
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
        Ok((CpuStorage::F32(out), (len + 2 * c).into()))
    }
}

#[cfg(test)]
mod tests {
    use crate::nn::ops::{batch_norm_train, layer_norm_composed, LayerNorm};
    use crate::nn::test_util::max_diff;
    use candle_core::{DType, Device, Module, Tensor, Var};

    /// The fused training layer norm (f32 CPU, input tracking gradients) against the
    /// composition: values and the gradients of every input.
    #[test]
    fn fused_training_layer_norm_matches_the_composition() {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f32, 2.0, (3, 5, 37), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 5, 37), &dev).unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| max_diff(a, b);
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

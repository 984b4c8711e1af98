//! EfficientNet's epilogue after a convolution on the CPU in `f32`: `act(y + shift[c] +
//! residual)` over the channel dimension of `[b, c, ...]` (the folded BatchNorm's shift,
//! the block's residual, SiLU), in place at inference, and as an op with its own backward
//! pass in training.

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, InplaceOp2, InplaceOp3, Layout, Result, Shape, Tensor,
};

use super::math::{silu, silu_grad};
use super::{avx2_fma, contiguous_f32, contiguous_f32_mut, cpu_f32, cpu_f32_no_grad};

/// `act(y + shift[c] (+ residual))` over channel dim 1 of `y` `[b, c, ...]` (`act` SiLU or
/// none), on the CPU in `f32`: in place in `y` when nothing tracks gradients and `y` is
/// contiguous (a fresh convolution output), otherwise as one op with its own backward pass.
/// `None` when neither applies (another device or dtype), for the caller to compose it.
pub(crate) fn shift_act(
    y: &Tensor,
    shift: &Tensor,
    residual: Option<&Tensor>,
    act: bool,
) -> Result<Option<Tensor>> {
    let in_place = ChannelBiasAct { act };
    match residual {
        None if cpu_f32_no_grad(&[y, shift]) && y.is_contiguous() => {
            y.inplace_op2(shift, &in_place)?;
            return Ok(Some(y.clone()));
        }
        Some(r) if cpu_f32_no_grad(&[y, shift, r]) && y.is_contiguous() => {
            y.inplace_op3(shift, &r.contiguous()?, &in_place)?;
            return Ok(Some(y.clone()));
        }
        _ => {}
    }
    if cpu_f32(&[y, shift]) && residual.is_none_or(|r| cpu_f32(&[r])) && shift.rank() == 1 {
        let op = EpilogueTrain { act };
        return match residual {
            None => y.apply_op2(shift, op),
            Some(r) => y.apply_op3(shift, r, op),
        }
        .map(Some);
    }
    Ok(None)
}

/// `plane += residual; plane = act(plane + shift)`, compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bias_act_avx2(p: &mut [f32], res: Option<&[f32]>, sh: f32, act: bool) {
    bias_act(p, res, sh, act)
}

#[inline(always)]
fn bias_act(p: &mut [f32], res: Option<&[f32]>, sh: f32, act: bool) {
    if let Some(r) = res {
        p.iter_mut().zip(r.iter()).for_each(|(v, r)| *v += r);
    }
    bias_act_plane(p, sh, act)
}

fn bias_act_dispatch(p: &mut [f32], res: Option<&[f32]>, sh: f32, act: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { bias_act_avx2(p, res, sh, act) };
    }
    bias_act(p, res, sh, act)
}

#[inline(always)]
pub(super) fn bias_act_plane(p: &mut [f32], sh: f32, act: bool) {
    if act {
        p.iter_mut().for_each(|v| *v = silu(*v + sh));
    } else if sh != 0.0 {
        p.iter_mut().for_each(|v| *v += sh);
    }
}

/// In place `y = act(y + shift[c] + residual)` over `[b, c, ...]`, parallel over planes.
struct ChannelBiasAct {
    act: bool,
}

impl ChannelBiasAct {
    fn run(
        &self,
        y: &mut CpuStorage,
        l: &Layout,
        shift: &[f32],
        res: Option<&[f32]>,
    ) -> Result<()> {
        use rayon::prelude::*;
        let dims = l.dims();
        let c = dims.get(1).copied().unwrap_or(1);
        let plane: usize = dims.iter().skip(2).product();
        let y = contiguous_f32_mut(y, l, "bias-act")?;
        if shift.len() != c || plane == 0 || res.is_some_and(|r| r.len() != y.len()) {
            candle_core::bail!("bias-act: shapes do not fit {:?}", dims)
        }
        let act = self.act;
        y.par_chunks_mut(plane).enumerate().for_each(|(i, p)| {
            let r = res.map(|r| &r[i * plane..(i + 1) * plane]);
            bias_act_dispatch(p, r, shift[i % c], act)
        });
        Ok(())
    }
}

impl InplaceOp2 for ChannelBiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let shift = contiguous_f32(s2, l2, "bias-act")?;
        self.run(s1, l1, shift, None)
    }
}

impl InplaceOp3 for ChannelBiasAct {
    fn name(&self) -> &'static str {
        "bias-residual-act"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let shift = contiguous_f32(s2, l2, "bias-act")?;
        let res = contiguous_f32(s3, l3, "bias-act")?;
        self.run(s1, l1, shift, Some(res))
    }
}

/// The training epilogue `act(y + shift[c] + residual)` over `[b, c, ...]` on the CPU in `f32`,
/// with its own backward pass: one pass gives `dz = dout · silu'(z)` (recomputing `z`) and
/// the per-channel sums `dshift`. Composed, the shift's broadcast alone costs a strided
/// reduction over the batch and positions, and SiLU's derivative six graph ops.
struct EpilogueTrain {
    act: bool,
}

/// One plane of [`EpilogueTrain`]'s backward: `dz` into `out`, returning `Σ dz`.
#[inline(always)]
fn epilogue_grad_plane(out: &mut [f32], g: &[f32], y: &[f32], r: Option<&[f32]>, sh: f32) -> f32 {
    match r {
        Some(r) => {
            for (((o, g), y), r) in out.iter_mut().zip(g).zip(y).zip(r) {
                *o = g * silu_grad(y + r + sh);
            }
        }
        None => {
            for ((o, g), y) in out.iter_mut().zip(g).zip(y) {
                *o = g * silu_grad(y + sh);
            }
        }
    }
    out.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn epilogue_grad_plane_avx2(
    out: &mut [f32],
    g: &[f32],
    y: &[f32],
    r: Option<&[f32]>,
    sh: f32,
) -> f32 {
    epilogue_grad_plane(out, g, y, r, sh)
}

impl EpilogueTrain {
    fn fwd(
        &self,
        (ys, yl): (&CpuStorage, &Layout),
        (ss, sl): (&CpuStorage, &Layout),
        res: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let mut st = CpuStorage::F32(contiguous_f32(ys, yl, "epilogue")?.to_vec());
        let shift = contiguous_f32(ss, sl, "epilogue shift")?;
        let res = match res {
            Some((rs, rl)) => Some(contiguous_f32(rs, rl, "epilogue residual")?),
            None => None,
        };
        let layout = Layout::contiguous(yl.shape());
        ChannelBiasAct { act: self.act }.run(&mut st, &layout, shift, res)?;
        Ok((st, yl.shape().clone()))
    }

    /// `(dz, dshift)` for the output gradient `grad`.
    fn grads(
        &self,
        y: &Tensor,
        shift: &Tensor,
        res: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        use rayon::prelude::*;
        let dims = y.dims().to_vec();
        let c = dims.get(1).copied().unwrap_or(1);
        let plane: usize = dims.iter().skip(2).product();
        let grad = grad.contiguous()?;
        if !self.act && !shift.track_op() {
            return Ok((grad, None));
        }
        let (y, shift) = (y.contiguous()?, shift.contiguous()?);
        let res = res.map(|r| r.contiguous()).transpose()?;
        let data = |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1::<f32>() };
        // Small per-channel and per-plane vectors; the planes themselves are read in place.
        let sh = data(&shift)?;
        let (gs, gl) = grad.storage_and_layout();
        let (ys, yl) = y.storage_and_layout();
        let res_guard = res.as_ref().map(|r| r.storage_and_layout());
        let (candle_core::Storage::Cpu(gc), candle_core::Storage::Cpu(yc)) = (&*gs, &*ys) else {
            candle_core::bail!("epilogue: expected CPU tensors in the backward pass")
        };
        let g = contiguous_f32(gc, gl, "epilogue gradient")?;
        let yd = contiguous_f32(yc, yl, "epilogue input")?;
        let rd = match &res_guard {
            Some((rs, rl)) => match &**rs {
                candle_core::Storage::Cpu(rc) => Some(contiguous_f32(rc, rl, "epilogue residual")?),
                _ => candle_core::bail!("epilogue: expected a CPU residual"),
            },
            None => None,
        };
        if plane == 0
            || sh.len() != c
            || g.len() != yd.len()
            || rd.is_some_and(|r| r.len() != yd.len())
        {
            candle_core::bail!("epilogue: shapes do not fit {dims:?}")
        }
        // Without the activation `dz` is the gradient itself: only its plane sums are needed.
        let mut dz = if self.act {
            vec![0f32; yd.len()]
        } else {
            Vec::new()
        };
        let mut sums = vec![0f32; yd.len() / plane];
        if self.act {
            dz.par_chunks_mut(plane)
                .zip(sums.par_iter_mut())
                .enumerate()
                .for_each(|(i, (o, sum))| {
                    let span = i * plane..(i + 1) * plane;
                    let (gp, yp) = (&g[span.clone()], &yd[span.clone()]);
                    let rp = rd.map(|r| &r[span]);
                    #[cfg(target_arch = "x86_64")]
                    if avx2_fma() {
                        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                        *sum = unsafe { epilogue_grad_plane_avx2(o, gp, yp, rp, sh[i % c]) };
                        return;
                    }
                    *sum = epilogue_grad_plane(o, gp, yp, rp, sh[i % c]);
                });
        } else {
            sums.par_iter_mut()
                .zip(g.par_chunks(plane))
                .for_each(|(sum, gp)| *sum = gp.iter().sum());
        }
        drop((gs, ys, res_guard));
        let dshift = if shift.track_op() {
            let mut d = vec![0f32; c];
            for (i, s) in sums.iter().enumerate() {
                d[i % c] += s;
            }
            Some(Tensor::from_vec(d, c, shift.device())?)
        } else {
            None
        };
        let dz = if self.act {
            Tensor::from_vec(dz, dims, y.device())?
        } else {
            grad
        };
        Ok((dz, dshift))
    }
}

impl CustomOp2 for EpilogueTrain {
    fn name(&self) -> &'static str {
        "bias-act-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        y: &Tensor,
        shift: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dz, dshift) = self.grads(y, shift, None, grad)?;
        Ok((y.track_op().then_some(dz), dshift))
    }
}

impl CustomOp3 for EpilogueTrain {
    fn name(&self) -> &'static str {
        "bias-residual-act-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        y: &Tensor,
        shift: &Tensor,
        res: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dz, dshift) = self.grads(y, shift, Some(res), grad)?;
        let dres = res.track_op().then(|| dz.clone());
        Ok((y.track_op().then_some(dz), dshift, dres))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The training epilogue op against the composed form, with and without SiLU and a
    /// residual, gradients for every input (or only some of them).
    #[test]
    fn epilogue_train_matches_composed() {
        use crate::nn::test_util::{max_diff, randn};
        use candle_core::Var;
        for (act, with_res, shift_tracks) in [
            (true, false, true),
            (false, true, true),
            (true, true, true),
            (false, false, true),
            (true, false, false),
        ] {
            let y = Var::from_tensor(&(randn(&[2, 3, 4, 5], 1) * 3.0).unwrap()).unwrap();
            let shift = randn(&[3], 2);
            let shift = if shift_tracks {
                Var::from_tensor(&shift).unwrap().as_tensor().clone()
            } else {
                shift
            };
            let res = Var::from_tensor(&randn(&[2, 3, 4, 5], 3)).unwrap();
            let r = with_res.then(|| res.as_tensor().clone());
            let op = EpilogueTrain { act };
            let ours = match &r {
                None => y.as_tensor().apply_op2(&shift, op),
                Some(r) => y.as_tensor().apply_op3(&shift, r, op),
            }
            .unwrap();
            let mut reference = y
                .as_tensor()
                .broadcast_add(&shift.reshape((1, 3, 1, 1)).unwrap())
                .unwrap();
            if let Some(r) = &r {
                reference = (reference + r).unwrap();
            }
            if act {
                reference = reference.silu().unwrap();
            }
            assert!(
                max_diff(&ours, &reference) < 1e-5,
                "forward act {act} res {with_res}"
            );
            let (g1, g2) = crate::nn::test_util::probe_grads(&ours, &reference, 4);
            let mut inputs = vec![("y", y.as_tensor().clone())];
            if shift_tracks {
                inputs.push(("shift", shift.clone()));
            }
            if with_res {
                inputs.push(("residual", res.as_tensor().clone()));
            }
            for (name, t) in inputs {
                let (a, b) = (g1.get(&t).unwrap(), g2.get(&t).unwrap());
                let d = max_diff(a, b);
                assert!(d < 1e-5, "grad {name} act {act} res {with_res}: {d}");
            }
            if !shift_tracks {
                assert!(g1.get(&shift).is_none());
            }
        }
    }
}

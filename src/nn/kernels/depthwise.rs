//! Depthwise convolutions on the CPU in `f32` (EfficientNet's): a direct kernel per plane,
//! register-blocked with AVX2 and FMA where the CPU has them, with the BatchNorm shift and
//! SiLU applied as the rows are finished; and for training an op whose backward pass runs
//! the same kernel for the input gradient and an 8-column kernel for the weight gradient.
//!
//! Padding is explicit, `[top, bottom, left, right]` zeros: the layers compute TF "same"
//! padding themselves.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::epilogue::bias_act_plane;
use super::{avx2_fma, contiguous_f32s};

/// `act(depthwise(x, weight) + shift[c])` at inference (nothing recorded for a backward
/// pass): `x` `[b, c, h, w]`, `weight` `[c, k·k]` and `shift` `[c]` contiguous `f32` CPU
/// tensors, zero padding `pad` `[top, bottom, left, right]`, `act` SiLU or none.
pub(crate) fn conv2d_shift_act(
    x: &Tensor,
    weight: &Tensor,
    shift: &Tensor,
    (kernel, stride): (usize, usize),
    pad: [usize; 4],
    act: bool,
) -> Result<Tensor> {
    let op = DepthwiseCpu {
        kernel,
        stride,
        pad,
        act,
    };
    x.contiguous()?.apply_op3_no_bwd(weight, shift, &op)
}

/// The depthwise convolution of `x` `[b, c, h, w]` with `weight` `[c, k·k]` (both `f32` on
/// the CPU, the weight checked by the caller) and zero padding `pad` `[top, bottom, left,
/// right]`, with its own backward pass (direct kernels in both directions).
pub(crate) fn conv2d_train(
    x: &Tensor,
    weight: &Tensor,
    (kernel, stride): (usize, usize),
    pad: [usize; 4],
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let g = DwGeom::new((h, w), (kernel, stride), pad)?;
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, DepthwiseTrain { g })
}

/// The direct CPU kernel: a depthwise convolution with zero padding `[top, bottom, left,
/// right]`, then `act(y + shift[c])`; parallel over the `b·c` planes. Strided rows are split
/// into phases first so that every tap is a contiguous multiply-add.
struct DepthwiseCpu {
    kernel: usize,
    stride: usize,
    pad: [usize; 4],
    act: bool,
}

/// The geometry of one depthwise plane.
#[derive(Clone, Copy)]
struct DwGeom {
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    k: usize,
    s: usize,
    pt: usize,
    pl: usize,
}

impl DwGeom {
    /// The geometry of an `h × w` plane under a `k×k` kernel at stride `s` with zero padding
    /// `[top, bottom, left, right]`.
    fn new(
        (h, w): (usize, usize),
        (k, s): (usize, usize),
        [pt, pb, pl, pr]: [usize; 4],
    ) -> Result<Self> {
        if h + pt + pb < k || w + pl + pr < k || s == 0 {
            candle_core::bail!("depthwise-conv2d: input {h}x{w} smaller than kernel {k}")
        }
        Ok(Self {
            h,
            w,
            ho: (h + pt + pb - k) / s + 1,
            wo: (w + pl + pr - k) / s + 1,
            k,
            s,
            pt,
            pl,
        })
    }
}

/// The depthwise convolution of every plane of `x` `[b, c, h, w]` with its channel's taps
/// (`weight` `[c, k·k]`), then `act(· + shift[c])`; parallel over the planes.
fn dw_forward(
    g: DwGeom,
    x: &[f32],
    wt: &[f32],
    (b, c): (usize, usize),
    shift: Option<&[f32]>,
    act: bool,
) -> Vec<f32> {
    use rayon::prelude::*;
    let (hw, kk) = (g.h * g.w, g.k * g.k);
    let mut out = vec![0f32; b * c * g.ho * g.wo];
    out.par_chunks_mut(g.ho * g.wo)
        .enumerate()
        .for_each(|(plane, o)| {
            let ch = plane % c;
            let src = &x[plane * hw..(plane + 1) * hw];
            let taps = &wt[ch * kk..(ch + 1) * kk];
            let sh = shift.map_or(0.0, |s| s[ch]);
            #[cfg(target_arch = "x86_64")]
            if avx2_fma() {
                // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                unsafe { dw_plane_avx2(g, src, taps, o, sh, act) };
                return;
            }
            dw_plane(g, src, taps, o, sh, act);
        });
    out
}

/// The zero-padded copy of one plane that the AVX2 depthwise kernels read: padded row `r`
/// holds input row `(r − pt)/dil` (when that divides), and phase `p` of it the padded columns
/// `p, p + s, …` (`lp` of them), input column `(c − pl)/dil` at padded column `c`. With
/// `lp` at least the output width rounded up to 8, plus `⌈k/s⌉`, every 8-wide load of every
/// tap stays inside the copy, and no bounds are checked in the inner loops.
#[derive(Clone, Copy)]
struct Padded {
    hp: usize,
    lp: usize,
    s: usize,
}

impl Padded {
    /// The layout for `ho × wo` outputs of a `k×k` kernel at stride `s`.
    fn new(ho: usize, wo: usize, k: usize, s: usize) -> Self {
        Self {
            hp: (ho - 1) * s + k,
            lp: wo.div_ceil(8) * 8 + k.div_ceil(s),
            s,
        }
    }

    fn len(self) -> usize {
        self.s * self.hp * self.lp
    }

    /// Writes the plane `src` (`h × w`) into `buf` (zeroed first); `dil > 1` only with
    /// stride 1.
    fn fill(
        self,
        buf: &mut [f32],
        src: &[f32],
        (h, w): (usize, usize),
        (pt, pl): (usize, usize),
        dil: usize,
    ) {
        let Self { hp, lp, s } = self;
        buf.fill(0.0);
        for iy in 0..h {
            let r = pt + iy * dil;
            if r >= hp {
                break;
            }
            let row = &src[iy * w..(iy + 1) * w];
            if s == 1 {
                let dst = &mut buf[r * lp..(r + 1) * lp];
                if dil == 1 {
                    let n = w.min(lp.saturating_sub(pl));
                    dst[pl..pl + n].copy_from_slice(&row[..n]);
                } else {
                    for (ix, v) in row.iter().enumerate() {
                        match dst.get_mut(pl + ix * dil) {
                            Some(d) => *d = *v,
                            None => break,
                        }
                    }
                }
                continue;
            }
            for p in 0..s {
                // Input columns `ix` with `(ix + pl) % s == p`, at `j = (ix + pl) / s`.
                let ix0 = (p + s - pl % s) % s;
                let j0 = (ix0 + pl) / s;
                let dst = &mut buf[(p * hp + r) * lp..(p * hp + r + 1) * lp];
                let n = w.saturating_sub(ix0).div_ceil(s).min(lp.saturating_sub(j0));
                if s == 2 {
                    for (d, pair) in dst[j0..j0 + n].iter_mut().zip(row[ix0..].chunks(2)) {
                        *d = pair[0];
                    }
                } else {
                    for (i, d) in dst[j0..j0 + n].iter_mut().enumerate() {
                        *d = row[ix0 + i * s];
                    }
                }
            }
        }
    }
}

thread_local! {
    /// Per-thread scratch of the AVX2 depthwise kernels: a padded plane, and a padded
    /// gradient plane for the weight gradient.
    static DW_SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Grows `v` to at least `len` elements and returns its first `len`.
fn scratch(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// Writes the [`Padded`] copy of the plane `src` for `g` (the input dilated by `dil`) into
/// the scratch `buf`; `None` when `g` has no outputs.
fn pad_plane<'a>(
    g: DwGeom,
    dil: usize,
    src: &[f32],
    buf: &'a mut Vec<f32>,
) -> Option<(Padded, &'a [f32])> {
    if g.ho == 0 || g.wo == 0 {
        return None;
    }
    let pad = Padded::new(g.ho, g.wo, g.k, g.s);
    let buf = scratch(buf, pad.len());
    pad.fill(buf, src, (g.h, g.w), (g.pt, g.pl), dil);
    Some((pad, buf))
}

/// One plane of the depthwise convolution with AVX2 and FMA, `act(conv + sh)` into `o`:
/// register-blocked, each block [`DW_ROWS`] output rows × 8 columns kept in registers over
/// all `k²` taps, on a [`Padded`] copy of the plane. The taps accumulate in the same order
/// as [`dw_plane`] (the portable kernel), each as a fused multiply-add.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dw_plane_avx2(g: DwGeom, src: &[f32], taps: &[f32], o: &mut [f32], sh: f32, act: bool) {
    // SAFETY: AVX2 and FMA are enabled on this function.
    unsafe { dw_plane_dilated_avx2(g, 1, src, taps, o, sh, act) }
}

/// [`dw_plane_avx2`] on the `h × w` input dilated by `dil` (`dil − 1` zeros between its rows
/// and columns), at stride 1 when `dil > 1`: with flipped taps and padding `k − 1 − p`, the
/// input gradient.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_plane_dilated_avx2(
    g: DwGeom,
    dil: usize,
    src: &[f32],
    taps: &[f32],
    o: &mut [f32],
    sh: f32,
    act: bool,
) {
    let DwGeom { ho, wo, k, .. } = g;
    DW_SCRATCH.with_borrow_mut(|(buf, _)| {
        let Some((pad, buf)) = pad_plane(g, dil, src, buf) else {
            return;
        };
        let mut oy = 0;
        while oy < ho {
            let rows = (ho - oy).min(DW_ROWS);
            for ox in (0..wo).step_by(8) {
                // SAFETY: AVX2 and FMA are enabled on this function; every load lies in
                // `buf` (rows below `hp`, columns below `ox + 8 + (k − 1)/s ≤ lp`).
                unsafe {
                    match rows {
                        DW_ROWS => dw_block::<DW_ROWS>(buf, pad, k, taps, oy, ox, o, wo),
                        3 => dw_block::<3>(buf, pad, k, taps, oy, ox, o, wo),
                        2 => dw_block::<2>(buf, pad, k, taps, oy, ox, o, wo),
                        _ => dw_block::<1>(buf, pad, k, taps, oy, ox, o, wo),
                    }
                }
            }
            bias_act_plane(&mut o[oy * wo..(oy + rows) * wo], sh, act);
            oy += rows;
        }
    })
}

/// The input gradient of one plane with AVX2 and FMA, into `gx` (`h × w`): the stride-1
/// convolution of the gradient `gy` (`ho × wo`), dilated by the stride, with the flipped
/// taps and padding `k − 1 − p` on each side.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dw_grad_input_avx2(g: DwGeom, gy: &[f32], taps: &[f32], gx: &mut [f32]) {
    let k = g.k;
    let mut flipped = [0f32; 64];
    for (i, t) in taps.iter().enumerate().take(64) {
        flipped[k * k - 1 - i] = *t;
    }
    // The source is the `ho × wo` gradient, spread `s` apart by the dilation.
    let t = DwGeom {
        h: g.ho,
        w: g.wo,
        ho: g.h,
        wo: g.w,
        k,
        s: 1,
        pt: k - 1 - g.pt,
        pl: k - 1 - g.pl,
    };
    // SAFETY: AVX2 and FMA are enabled on this function.
    unsafe { dw_plane_dilated_avx2(t, g.s, gy, &flipped[..k * k], gx, 0.0, false) }
}

/// Adds one plane's weight gradient `Σ gy[oy, ox] · x_pad[oy·s + dy, ox·s + dx]` to
/// `gw` (`k²` taps) with AVX2 and FMA: 8 output columns at a time, one accumulator per
/// `dx` while `dy` is fixed, on [`Padded`] copies of `x` and of `gy` (rows zero-padded to a
/// multiple of 8).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dw_grad_weight_avx2(g: DwGeom, x: &[f32], gy: &[f32], gw: &mut [f32]) {
    use std::arch::x86_64::*;
    let DwGeom { ho, wo, k, s, .. } = g;
    let wo8 = wo.div_ceil(8) * 8;
    DW_SCRATCH.with_borrow_mut(|(buf, gbuf)| {
        let Some((pad, buf)) = pad_plane(g, 1, x, buf) else {
            return;
        };
        let gp = scratch(gbuf, ho * wo8);
        gp.fill(0.0);
        for (dst, src) in gp.chunks_exact_mut(wo8).zip(gy.chunks_exact(wo)) {
            dst[..wo].copy_from_slice(src);
        }
        let (xb, gb) = (buf.as_ptr(), gp.as_ptr());
        let Padded { hp, lp, .. } = pad;
        for dy in 0..k {
            let mut acc = [_mm256_setzero_ps(); 8];
            for dx0 in (0..k).step_by(8) {
                let n = (k - dx0).min(8);
                for oy in 0..ho {
                    let row = oy * s + dy;
                    for ox in (0..wo8).step_by(8) {
                        // SAFETY: `gp` holds `ho` rows of `wo8`; the padded loads stay
                        // below column `ox + 8 + (k − 1)/s ≤ lp` of rows below `hp`.
                        unsafe {
                            let gv = _mm256_loadu_ps(gb.add(oy * wo8 + ox));
                            for (j, a) in acc.iter_mut().enumerate().take(n) {
                                let dx = dx0 + j;
                                let at = (dx % s) * hp * lp + row * lp + ox + dx / s;
                                *a = _mm256_fmadd_ps(gv, _mm256_loadu_ps(xb.add(at)), *a);
                            }
                        }
                    }
                }
                for (j, a) in acc.iter_mut().enumerate().take(n) {
                    let mut lanes = [0f32; 8];
                    // SAFETY: `lanes` holds 8 elements.
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *a) };
                    gw[dy * k + dx0 + j] += lanes.iter().sum::<f32>();
                    *a = _mm256_setzero_ps();
                }
            }
        }
    })
}

/// Output rows per register block of [`dw_plane_avx2`].
#[cfg(target_arch = "x86_64")]
const DW_ROWS: usize = 4;

/// `R` output rows from `oy`, columns `ox..ox + 8` (those below `wo`), of [`dw_plane_avx2`].
///
/// # Safety
/// AVX2 and FMA must be available, and `buf` must hold the padded phases as laid out there.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_block<const R: usize>(
    buf: &[f32],
    Padded { hp, lp, s }: Padded,
    k: usize,
    taps: &[f32],
    oy: usize,
    ox: usize,
    o: &mut [f32],
    wo: usize,
) {
    use std::arch::x86_64::*;
    let base = buf.as_ptr();
    let mut acc = [_mm256_setzero_ps(); R];
    for dy in 0..k {
        for dx in 0..k {
            let t = _mm256_set1_ps(taps[dy * k + dx]);
            let col = (dx % s) * hp * lp + ox + dx / s;
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: as promised by the caller.
                let v = unsafe { _mm256_loadu_ps(base.add(col + ((oy + r) * s + dy) * lp)) };
                *a = _mm256_fmadd_ps(t, v, *a);
            }
        }
    }
    let n = (wo - ox).min(8);
    for (r, a) in acc.iter().enumerate() {
        let dst = &mut o[(oy + r) * wo + ox..(oy + r) * wo + ox + n];
        if n == 8 {
            // SAFETY: `dst` holds 8 elements.
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), *a) };
        } else {
            let mut tmp = [0f32; 8];
            // SAFETY: `tmp` holds 8 elements.
            unsafe { _mm256_storeu_ps(tmp.as_mut_ptr(), *a) };
            dst.copy_from_slice(&tmp[..n]);
        }
    }
}

#[inline(always)]
fn dw_plane(g: DwGeom, src: &[f32], taps: &[f32], o: &mut [f32], sh: f32, act: bool) {
    let DwGeom {
        h,
        w,
        ho,
        wo,
        k,
        s,
        pt,
        pl,
    } = g;
    // Phase p of a row holds its columns p, p + s, p + 2s, ...
    let phase_len = |p: usize| (w + s - 1 - p.min(w)) / s;
    let phased: Vec<Vec<f32>> = if s == 1 {
        Vec::new()
    } else {
        (0..s)
            .map(|p| {
                let mut v = Vec::with_capacity(h * phase_len(p));
                for row in src.chunks_exact(w) {
                    v.extend(row.iter().skip(p).step_by(s));
                }
                v
            })
            .collect()
    };
    for oy in 0..ho {
        let orow = &mut o[oy * wo..(oy + 1) * wo];
        for dy in 0..k {
            let iy = (oy * s + dy) as isize - pt as isize;
            if iy < 0 || iy >= h as isize {
                continue;
            }
            let iy = iy as usize;
            for dx in 0..k {
                let t = taps[dy * k + dx];
                let off = dx as isize - pl as isize;
                let p = off.rem_euclid(s as isize);
                let q = (off - p) / s as isize;
                let (row, len): (&[f32], usize) = if s == 1 {
                    (&src[iy * w..(iy + 1) * w], w)
                } else {
                    let len = phase_len(p as usize);
                    (&phased[p as usize][iy * len..(iy + 1) * len], len)
                };
                let lo = (-q).max(0) as usize;
                let hi = (len as isize - q).clamp(0, wo as isize) as usize;
                if lo >= hi {
                    continue;
                }
                let start = (lo as isize + q) as usize;
                let dst = &mut orow[lo..hi];
                let src = &row[start..start + (hi - lo)];
                dst.iter_mut()
                    .zip(src.iter())
                    .for_each(|(d, v)| *d += t * v);
            }
        }
        bias_act_plane(orow, sh, act);
    }
}

impl CustomOp3 for DepthwiseCpu {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
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
        let [x, wt, shift] = contiguous_f32s(self.name(), [(s1, l1), (s2, l2), (s3, l3)])?;
        let (b, c, h, w) = l1.shape().dims4()?;
        let k = self.kernel;
        let g = DwGeom::new((h, w), (k, self.stride), self.pad)?;
        if wt.len() != c * k * k || shift.len() != c {
            candle_core::bail!("depthwise-conv2d: weights do not fit {c} channels")
        }
        let out = dw_forward(g, x, wt, (b, c), Some(shift), self.act);
        Ok((CpuStorage::F32(out), Shape::from((b, c, g.ho, g.wo))))
    }
}

/// [`conv2d_train`]'s op.
struct DepthwiseTrain {
    g: DwGeom,
}

impl CustomOp2 for DepthwiseTrain {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [x, wt] = contiguous_f32s(self.name(), [(s1, l1), (s2, l2)])?;
        let (b, c, h, w) = l1.shape().dims4()?;
        let g = self.g;
        if (h, w) != (g.h, g.w) || wt.len() != c * g.k * g.k {
            candle_core::bail!(
                "depthwise-conv2d-train: {:?} does not fit the op",
                l1.dims()
            )
        }
        let out = dw_forward(g, x, wt, (b, c), None, false);
        Ok((CpuStorage::F32(out), Shape::from((b, c, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gx = grad.apply_op2_no_bwd(weight, &DepthwiseGradInput { g: self.g })?;
        let gw = x.apply_op2_no_bwd(&grad, &DepthwiseGradWeight { g: self.g })?;
        Ok((Some(gx), Some(gw)))
    }
}

/// For output position range `0..n` along one axis with stride `s` and tap offset `d − p`:
/// the outputs whose input index `o·s + d − p` lies in `0..len`.
fn valid_outputs(n: usize, s: usize, off: isize, len: usize) -> (usize, usize) {
    let lo = if off >= 0 {
        0
    } else {
        ((-off) as usize).div_ceil(s)
    };
    let hi = if (len as isize) <= off {
        0
    } else {
        (((len as isize - off) as usize).div_ceil(s)).min(n)
    };
    (lo.min(hi), hi)
}

/// Visits every tap of `g` with the output rows and columns that read inside the plane
/// through it: `f(tap, rows, columns, (dy − pt, dx − pl))`, output `(oy, ox)` reading input
/// `(oy·s + dy − pt, ox·s + dx − pl)`.
fn for_each_tap(g: DwGeom, mut f: impl FnMut(usize, Range<usize>, Range<usize>, (isize, isize))) {
    for dy in 0..g.k {
        let offy = dy as isize - g.pt as isize;
        let (oy0, oy1) = valid_outputs(g.ho, g.s, offy, g.h);
        for dx in 0..g.k {
            let offx = dx as isize - g.pl as isize;
            let (ox0, ox1) = valid_outputs(g.wo, g.s, offx, g.w);
            f(dy * g.k + dx, oy0..oy1, ox0..ox1, (offy, offx));
        }
    }
}

/// The portable input gradient of one plane: `gx[oy·s + dy − pt, ox·s + dx − pl] +=
/// taps[dy, dx] · gy[oy, ox]`.
fn dw_grad_input_plane(g: DwGeom, gy: &[f32], taps: &[f32], gx: &mut [f32]) {
    let DwGeom { w, wo, s, .. } = g;
    for_each_tap(g, |tap, rows, cols, (offy, offx)| {
        let t = taps[tap];
        for oy in rows {
            let iy = ((oy * s) as isize + offy) as usize;
            let grow = &gy[oy * wo..(oy + 1) * wo];
            let xrow = &mut gx[iy * w..(iy + 1) * w];
            for (ox, gv) in grow.iter().enumerate().take(cols.end).skip(cols.start) {
                let ix = (ox * s) as isize + offx;
                xrow[ix as usize] += t * gv;
            }
        }
    });
}

/// The portable weight gradient of one plane, added to `gw` (`k²` taps): `Σ gy[oy, ox] ·
/// x[oy·s + dy − pt, ox·s + dx − pl]` for each tap.
fn dw_grad_weight_plane(g: DwGeom, x: &[f32], gy: &[f32], gw: &mut [f32]) {
    let DwGeom { w, wo, s, .. } = g;
    for_each_tap(g, |tap, rows, cols, (offy, offx)| {
        let mut acc = 0f32;
        for oy in rows {
            let iy = ((oy * s) as isize + offy) as usize;
            let grow = &gy[oy * wo..(oy + 1) * wo];
            let xrow = &x[iy * w..(iy + 1) * w];
            for ox in cols.clone() {
                acc += grow[ox] * xrow[((ox * s) as isize + offx) as usize];
            }
        }
        gw[tap] += acc;
    });
}

/// The input gradient of [`DepthwiseTrain`]: `(grad [b, c, ho, wo], weight)` to `[b, c, h, w]`.
struct DepthwiseGradInput {
    g: DwGeom,
}

impl CustomOp2 for DepthwiseGradInput {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let [gy, wt] = contiguous_f32s(self.name(), [(s1, l1), (s2, l2)])?;
        let (b, c, _, _) = l1.shape().dims4()?;
        let g = self.g;
        let (hw, howo, kk) = (g.h * g.w, g.ho * g.wo, g.k * g.k);
        let mut out = vec![0f32; b * c * hw];
        #[cfg(target_arch = "x86_64")]
        let fast = avx2_fma() && g.k <= 8 && g.pt < g.k && g.pl < g.k;
        out.par_chunks_mut(hw).enumerate().for_each(|(plane, gx)| {
            let ch = plane % c;
            let gy = &gy[plane * howo..(plane + 1) * howo];
            let taps = &wt[ch * kk..(ch + 1) * kk];
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                unsafe { dw_grad_input_avx2(g, gy, taps, gx) };
                return;
            }
            dw_grad_input_plane(g, gy, taps, gx);
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c, g.h, g.w))))
    }
}

/// The weight gradient of [`DepthwiseTrain`]: `(x [b, c, h, w], grad [b, c, ho, wo])` to
/// `[c, k·k]`.
struct DepthwiseGradWeight {
    g: DwGeom,
}

impl CustomOp2 for DepthwiseGradWeight {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let [x, gy] = contiguous_f32s(self.name(), [(s1, l1), (s2, l2)])?;
        let (b, c, _, _) = l1.shape().dims4()?;
        let g = self.g;
        let (hw, howo, kk) = (g.h * g.w, g.ho * g.wo, g.k * g.k);
        let mut out = vec![0f32; c * kk];
        #[cfg(target_arch = "x86_64")]
        let fast = avx2_fma();
        out.par_chunks_mut(kk).enumerate().for_each(|(ch, gw)| {
            for bi in 0..b {
                let plane = bi * c + ch;
                let xs = &x[plane * hw..(plane + 1) * hw];
                let gy = &gy[plane * howo..(plane + 1) * howo];
                #[cfg(target_arch = "x86_64")]
                if fast {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    unsafe { dw_grad_weight_avx2(g, xs, gy, gw) };
                    continue;
                }
                dw_grad_weight_plane(g, xs, gy, gw);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((c, kk))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::efficientnet::{
        depthwise_conv2d, depthwise_conv2d_composed, depthwise_conv2d_same, pad_same, same_padding,
    };
    use candle_core::Device;

    /// `(kernel, stride, h, w)` for the depthwise tests: narrow and wide planes (one or
    /// several 8-column register blocks), row counts that are and are not multiples of the
    /// row block, odd and even padding, planes smaller than the kernel.
    const DW_SHAPES: &[(usize, usize, usize, usize)] = &[
        (3, 1, 7, 9),
        (3, 2, 8, 11),
        (5, 2, 9, 6),
        (5, 1, 5, 5),
        (3, 2, 1, 4),
        (5, 2, 11, 8),
        (3, 2, 6, 7),
        (5, 2, 2, 3),
        (3, 1, 13, 19),
        (5, 2, 14, 33),
        (3, 2, 12, 18),
        (5, 1, 9, 17),
        (3, 1, 1, 1),
    ];

    /// The CPU depthwise op with backward against the composed (autograd) form.
    #[test]
    fn depthwise_op_gradients_match_composed() {
        let dev = Device::Cpu;
        for &(k, s, h, w) in DW_SHAPES {
            let x = candle_core::Var::randn(0f32, 1.0, (2, 3, h, w), &dev).unwrap();
            let wt = candle_core::Var::randn(0f32, 1.0, (3, k * k), &dev).unwrap();
            let ours = depthwise_conv2d_same(x.as_tensor(), wt.as_tensor(), k, s).unwrap();
            let reference = depthwise_conv2d_composed(
                &pad_same(x.as_tensor(), k, s).unwrap(),
                wt.as_tensor(),
                k,
                s,
            )
            .unwrap();
            assert_eq!(ours.dims(), reference.dims(), "k{k} s{s} {h}x{w}");
            let diff = crate::nn::test_util::max_diff;
            assert!(diff(&ours, &reference) < 1e-5, "forward k{k} s{s} {h}x{w}");
            let (g1, g2) = crate::nn::test_util::probe_grads(&ours, &reference, 5);
            for (name, v) in [("x", &x), ("weight", &wt)] {
                let a = g1.get(v.as_tensor()).unwrap();
                let b = g2.get(v.as_tensor()).unwrap();
                assert!(
                    diff(a, b) < 1e-4,
                    "grad {name} k{k} s{s} {h}x{w}: {}",
                    diff(a, b)
                );
            }
        }
    }

    /// The training epilogue op against the composed form, with and without SiLU and a
    /// residual, gradients for every input (or only some of them).
    #[test]
    fn fused_depthwise_matches_composed() -> Result<()> {
        let dev = Device::Cpu;
        for &(k, s, h, w) in DW_SHAPES {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (3, k * k), &dev)?;
            let shift = Tensor::randn(0f32, 1.0, 3, &dev)?;
            let (t, b) = same_padding(h, k, s);
            let (l, r) = same_padding(w, k, s);
            for act in [false, true] {
                let op = DepthwiseCpu {
                    kernel: k,
                    stride: s,
                    pad: [t, b, l, r],
                    act,
                };
                let fast = x.apply_op3_no_bwd(&wt, &shift, &op)?;
                let mut slow = depthwise_conv2d_composed(&pad_same(&x, k, s)?, &wt, k, s)?
                    .broadcast_add(&shift.reshape((1, 3, 1, 1))?)?;
                if act {
                    slow = slow.silu()?;
                }
                assert_eq!(fast.dims(), slow.dims());
                let d = (fast - slow)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                assert!(d < 1e-5, "k{k} s{s} {h}x{w} act {act}: {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn depthwise_paths_agree_with_grouped_conv() -> Result<()> {
        let dev = Device::Cpu;
        for (k, s, h, w) in [(3, 1, 7, 9), (5, 2, 11, 8), (3, 2, 6, 6), (5, 1, 5, 5)] {
            let x = Tensor::randn(0f32, 1.0, (2, 4, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (4, 1, k, k), &dev)?;
            let reference = x.conv2d(&wt, 0, s, 1, 4)?;
            let w2 = wt.reshape((4, k * k))?;
            let fast = depthwise_conv2d(&x, &w2, k, s)?;
            let composed = depthwise_conv2d_composed(&x, &w2, k, s)?;
            for y in [fast, composed] {
                let d = (y - &reference)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                assert!(d < 1e-5, "k{k} s{s} {h}x{w}: {d}");
            }
        }
        Ok(())
    }

    /// The portable plane kernels (taken where the CPU lacks AVX2) against the AVX2 ones,
    /// forward and both gradients, so that both are checked on an AVX2 machine.
    #[test]
    fn portable_plane_kernels_match_avx2() {
        use crate::nn::test_util::randn;
        if !avx2_fma() {
            return;
        }
        let vec = |n: usize, seed: u64| -> Vec<f32> {
            randn(&[n.max(1)], seed).to_vec1::<f32>().unwrap()[..n].to_vec()
        };
        for &(k, s, h, w) in DW_SHAPES {
            let (t, b) = same_padding(h, k, s);
            let (l, r) = same_padding(w, k, s);
            let g = DwGeom::new((h, w), (k, s), [t, b, l, r]).unwrap();
            let (x, taps, gy) = (vec(h * w, 1), vec(k * k, 2), vec(g.ho * g.wo, 3));
            let close = |a: &[f32], b: &[f32], what: &str| {
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-5, "{what} k{k} s{s} {h}x{w}: {d}");
            };
            for act in [false, true] {
                let (mut o1, mut o2) = (vec![0f32; g.ho * g.wo], vec![0f32; g.ho * g.wo]);
                dw_plane(g, &x, &taps, &mut o1, 0.3, act);
                // SAFETY: the CPU supports AVX2 and FMA (checked above).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    dw_plane_avx2(g, &x, &taps, &mut o2, 0.3, act)
                };
                close(&o1, &o2, "forward");
            }
            let (mut gx1, mut gx2) = (vec![0f32; h * w], vec![0f32; h * w]);
            dw_grad_input_plane(g, &gy, &taps, &mut gx1);
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                dw_grad_input_avx2(g, &gy, &taps, &mut gx2)
            };
            close(&gx1, &gx2, "input gradient");
            let (mut gw1, mut gw2) = (vec![0f32; k * k], vec![0f32; k * k]);
            dw_grad_weight_plane(g, &x, &gy, &mut gw1);
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                dw_grad_weight_avx2(g, &x, &gy, &mut gw2)
            };
            close(&gw1, &gw2, "weight gradient");
        }
    }
}

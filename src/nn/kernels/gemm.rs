//! Matrix products on the CPU in `f32`: the linear layers of [`crate::nn::Linear`] and
//! EfficientNet's 1×1 convolutions, at inference and as ops with their own backward passes.
//!
//! At inference a linear layer is `act(x Wᵀ + b)` as one matrix product split into output
//! blocks across the rayon pool, each block a single-threaded `gemm` call followed, while
//! the block is still in cache, by the bias and activation.
//!
//! Against candle's matmul (one `gemm` call that splits its own work across threads, into a
//! zero-filled output, then separate passes for the bias and activation) this skips the
//! output's zero fill and the extra passes, and the split by whole output blocks keeps both
//! threads busy on the shapes of transformer layers: `gemm`'s own split leaves them idle
//! part of the time when the product has few rows or a long inner dimension.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

use super::act::{act_backward, bias_act_chunk, FusedAct};
use super::{contiguous_f32, cpu_f32};

/// Products below this many multiply-adds run on one thread.
const SPLIT_MIN_MACS: usize = 1 << 18;
/// Products are split by columns (output features: each task packs only its part of the
/// weights, and in the encoders' shapes this measured faster than a split by rows), into
/// blocks that are multiples of this width; narrower outputs are split by rows.
const COL_ALIGN: usize = 16;

/// A strided `f32` matrix view: element `(i, j)` at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    pub(super) data: &'a [f32],
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl View<'_> {
    /// The transposed view (no copy).
    fn t(self) -> Self {
        View {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// The data and layout of a 2-D `f32` CPU storage, or `None` for other storages.
fn view_cpu<'a>(s: &'a CpuStorage, l: &Layout) -> Option<View<'a>> {
    let CpuStorage::F32(data) = s else {
        return None;
    };
    let [rs, cs] = *l.stride() else {
        return None;
    };
    Some(View {
        data: &data[l.start_offset()..],
        rs,
        cs,
    })
}

/// [`view_cpu`] for a storage of any device.
fn view<'a>(s: &'a Storage, l: &Layout) -> Option<View<'a>> {
    match s {
        Storage::Cpu(c) => view_cpu(c, l),
        _ => None,
    }
}

/// A raw output pointer shared by the tasks, each of which writes a disjoint block.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: the tasks write disjoint blocks of the output, which outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// An uninitialised `f32` buffer of `len` elements, for outputs that are written whole.
pub(super) fn uninit_buffer(len: usize) -> Vec<MaybeUninit<f32>> {
    let mut out = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` needs no initialisation.
    unsafe { out.set_len(len) };
    out
}

/// The buffer of [`uninit_buffer`] as `f32`.
///
/// # Safety
/// Every element must have been written.
pub(super) unsafe fn assume_init(out: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut out = std::mem::ManuallyDrop::new(out);
    let (ptr, len, cap) = (out.as_mut_ptr().cast::<f32>(), out.len(), out.capacity());
    // SAFETY: `MaybeUninit<f32>` and `f32` have the same size and alignment, the allocation
    // is handed over whole, and the caller guarantees that every element is initialised.
    unsafe { Vec::from_raw_parts(ptr, len, cap) }
}

/// One single-threaded `gemm` call: `dst = lhs · rhs` (`acc` false) or `dst += lhs · rhs`
/// (`acc` true) for `dst` `[m, n]`, `lhs` `[m, k]` and `rhs` `[k, n]`, each with explicit
/// row and column strides (`(rs, cs)` pairs).
///
/// # Safety
/// Every pointer must address its matrix within its allocation for the given strides, and
/// `dst` must be valid for reads and writes and not accessed concurrently.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (drs, dcs): (usize, usize),
    lhs: *const f32,
    (lrs, lcs): (usize, usize),
    rhs: *const f32,
    (rrs, rcs): (usize, usize),
    acc: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: `dst` addresses an `m × n` matrix (the caller's guarantee).
                    unsafe { *dst.add(i * drs + j * dcs) = 0.0 };
                }
            }
        }
        return;
    }
    // SAFETY: forwarded from the caller. `gemm` computes `dst = α·dst + β·lhs·rhs`, reading
    // `dst` only when asked to.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dcs as isize,
            drs as isize,
            acc,
            lhs,
            lcs as isize,
            lrs as isize,
            rhs,
            rcs as isize,
            rrs as isize,
            if acc { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// [`gemm_strided`] on views, into a row-major `dst` with row stride `drs`.
///
/// # Safety
/// `dst` must be valid for reads and writes of `m` rows of `n` elements at row stride `drs`,
/// and the views must hold every element of their `[m, k]` and `[k, n]` extents.
unsafe fn gemm_into(
    dst: *mut f32,
    drs: usize,
    dims: (usize, usize, usize),
    lhs: View,
    rhs: View,
    acc: bool,
) {
    // SAFETY: as promised by the caller.
    unsafe {
        gemm_strided(
            dims,
            dst,
            (drs, 1),
            lhs.data.as_ptr(),
            (lhs.rs, lhs.cs),
            rhs.data.as_ptr(),
            (rhs.rs, rhs.cs),
            acc,
        )
    }
}

/// `lhs [m, k] · rhs [k, n]` into a new row-major `[m, n]` buffer, split into output blocks
/// across the rayon pool (one single-threaded `gemm` call each); `finish(row, c0, out_row)`
/// then runs on each row's part `c0..` of the block while it is in cache.
fn matmul_blocks(
    m: usize,
    n: usize,
    k: usize,
    lhs: View,
    rhs: View,
    finish: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    if m * n == 0 {
        return Vec::new();
    }
    let mut out = uninit_buffer(m * n);
    let dst = OutPtr(out.as_mut_ptr().cast::<f32>());
    let block = |r0: usize, r1: usize, c0: usize, c1: usize| {
        // SAFETY: rows `r0..r1` × columns `c0..c1` of the `m × n` row-major output are this
        // task's alone; `lhs` and `rhs` are read within their views' extents.
        unsafe {
            let d = dst.get().add(r0 * n + c0);
            let lhs = View {
                data: &lhs.data[r0 * lhs.rs..],
                ..lhs
            };
            let rhs = View {
                data: &rhs.data[c0 * rhs.cs..],
                ..rhs
            };
            gemm_into(d, n, (r1 - r0, c1 - c0, k), lhs, rhs, false);
            for r in 0..r1 - r0 {
                finish(
                    r0 + r,
                    c0,
                    std::slice::from_raw_parts_mut(d.add(r * n), c1 - c0),
                );
            }
        }
    };
    let threads = rayon::current_num_threads();
    if threads <= 1 || m * n * k < SPLIT_MIN_MACS {
        block(0, m, 0, n);
    } else if n < COL_ALIGN * threads {
        let per = m.div_ceil(threads);
        rayon::scope(|s| {
            for r0 in (0..m).step_by(per) {
                let block = &block;
                s.spawn(move |_| block(r0, (r0 + per).min(m), 0, n));
            }
        });
    } else {
        let per = n.div_ceil(threads).div_ceil(COL_ALIGN) * COL_ALIGN;
        rayon::scope(|s| {
            for c0 in (0..n).step_by(per) {
                let block = &block;
                s.spawn(move |_| block(0, m, c0, (c0 + per).min(n)));
            }
        });
    }
    // SAFETY: the blocks tile the output and each is written whole (by `gemm`, which with
    // `read_dst = false` writes without reading, or by the zero fill when `k == 0`).
    unsafe { assume_init(out) }
}

/// `act(x Wᵀ + b) + residual` rows: the `finish` step of [`matmul_blocks`] for a linear layer.
fn linear_blocks(
    x: View,
    w: View,
    (m, n, k): (usize, usize, usize),
    bias: &[f32],
    act: Option<FusedAct>,
    residual: Option<View>,
) -> Vec<f32> {
    matmul_blocks(m, n, k, x, w.t(), |r, c0, row| {
        let b = if bias.is_empty() {
            &[][..]
        } else {
            &bias[c0..c0 + row.len()]
        };
        if act.is_some() || !b.is_empty() {
            bias_act_chunk(act, row, b);
        }
        if let Some(rv) = residual {
            let (start, len) = (r * rv.rs + c0, row.len());
            for (y, x) in row.iter_mut().zip(&rv.data[start..start + len]) {
                *y += x;
            }
        }
    })
}

/// `act(x Wᵀ + b) + residual` for a 2-D `x` `[m, k]`, `w` `[n, k]` and `residual` `[m, n]`
/// on the CPU in `f32`; `None` when this path does not apply (another device or dtype), for
/// the caller to take the general one. Nothing here records gradients.
pub(crate) fn linear_cpu_f32(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    act: Option<FusedAct>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    let (n, k2) = w.dims2()?;
    if k != k2 {
        candle_core::bail!(
            "linear: input width {k} does not match weight {:?}",
            w.dims()
        )
    }
    if let Some(r) = residual {
        if r.dims() != [m, n] {
            candle_core::bail!("linear: residual {:?} for a [{m}, {n}] output", r.dims())
        }
    }
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (Some(xv), Some(wv)) = (view(&xs, xl), view(&ws, wl)) else {
        return Ok(None);
    };
    let res_guard = residual.map(|r| r.storage_and_layout());
    let rv = match &res_guard {
        Some((rs, rl)) => match view(rs, rl) {
            Some(v) if v.cs == 1 => Some(v),
            _ => return Ok(None),
        },
        None => None,
    };
    let bias_guard = bias.map(|b| b.storage_and_layout());
    let bias_data: &[f32] = match (&bias_guard, bias) {
        (Some((bs, bl)), Some(b)) => {
            let Storage::Cpu(cpu) = &**bs else {
                return Ok(None);
            };
            if b.dims() != [n] {
                candle_core::bail!("linear: bias {:?} for {n} outputs", b.dims())
            }
            match (cpu, bl.contiguous_offsets()) {
                (CpuStorage::F32(_), Some(_)) => contiguous_f32(cpu, bl, "linear bias")?,
                _ => return Ok(None),
            }
        }
        _ => &[],
    };
    let out = linear_blocks(xv, wv, (m, n, k), bias_data, act, rv);
    drop((xs, ws, bias_guard, res_guard));
    Tensor::from_vec(out, (m, n), x.device()).map(Some)
}

/// `act(x Wᵀ + b)` on the CPU in `f32` as one op with its own backward pass (`dz = dy·f'(z)`
/// for the pre-activation `z`, then `dx = dz W`, `dW = dzᵀ x`, `db = Σ_rows dz`, each one
/// split product): the training path of [`crate::nn::Linear`]. Applied as a `CustomOp3` with a
/// bias and a `CustomOp2` without.
///
/// The activation is applied to each output block while it is in cache, and `z` is kept for
/// the backward pass; against a separate activation op this saves one graph node per MLP,
/// with its pass over the activations each way and its gradient buffer.
pub(crate) struct LinearTrain {
    act: Option<FusedAct>,
    /// With `act`: `z = x Wᵀ + b` from the forward pass.
    pre: std::sync::OnceLock<Vec<f32>>,
}

impl LinearTrain {
    /// The op for `act`, which must be `None` or [`LinearTrain::fuses`] it.
    pub(crate) fn new(act: Option<FusedAct>) -> Self {
        Self {
            act,
            pre: std::sync::OnceLock::new(),
        }
    }

    /// Whether the op applies `act` itself (the activations with a backward kernel).
    pub(crate) fn fuses(act: FusedAct) -> bool {
        matches!(
            act,
            FusedAct::Gelu | FusedAct::GeluTanh | FusedAct::QuickGelu
        )
    }

    fn fwd(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ws, wl): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        let (Some(xv), Some(wv)) = (view_cpu(xs, xl), view_cpu(ws, wl)) else {
            candle_core::bail!("linear-train: expected 2-D f32 input and weight")
        };
        let (&[m, k], &[n, k2]) = (xl.dims(), wl.dims()) else {
            candle_core::bail!("linear-train: expected 2-D input and weight")
        };
        if k != k2 {
            candle_core::bail!("linear-train: input width {k} does not match weight [{n}, {k2}]")
        }
        let bias = match bias {
            Some((bs, bl)) => {
                if bl.dims() != [n] {
                    candle_core::bail!("linear-train: bias {:?} for {n} outputs", bl.dims())
                }
                contiguous_f32(bs, bl, "linear-train bias")?
            }
            None => &[],
        };
        let out = match self.act {
            None => linear_blocks(xv, wv, (m, n, k), bias, None, None),
            Some(act) => {
                if !Self::fuses(act) {
                    candle_core::bail!("linear-train: no backward kernel for {act:?}")
                }
                let mut pre = uninit_buffer(m * n);
                let dst = OutPtr(pre.as_mut_ptr().cast::<f32>());
                let out = matmul_blocks(m, n, k, xv, wv.t(), |r, c0, row| {
                    if !bias.is_empty() {
                        bias_act_chunk(None, row, &bias[c0..c0 + row.len()]);
                    }
                    // SAFETY: row `r`, columns `c0..` of the `m × n` buffer belong to this
                    // block alone, as in the output.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            row.as_ptr(),
                            dst.get().add(r * n + c0),
                            row.len(),
                        )
                    };
                    bias_act_chunk(Some(act), row, &[]);
                });
                // SAFETY: the blocks tile the output, and each copied all its rows.
                let pre = unsafe { assume_init(pre) };
                if self.pre.set(pre).is_err() {
                    candle_core::bail!("linear-train: the op ran twice")
                }
                out
            }
        };
        Ok((CpuStorage::F32(out), (m, n).into()))
    }

    /// `(dx, dW, db)` for the output gradient `grad` `[m, n]`, each only for an input that
    /// takes part in the gradient computation.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = match self.act {
            None => grad.contiguous()?,
            Some(act) => {
                let pre = self.pre.get().ok_or_else(|| {
                    candle_core::Error::Msg("linear-train: backward before forward".into())
                })?;
                let g = grad.contiguous()?;
                let dz = {
                    let (gs, gl) = g.storage_and_layout();
                    let Storage::Cpu(c) = &*gs else {
                        candle_core::bail!("linear-train: expected a CPU output gradient")
                    };
                    let gd = contiguous_f32(c, gl, "linear-train gradient")?;
                    if gd.len() != pre.len() {
                        candle_core::bail!("linear-train: output gradient {:?}", g.dims())
                    }
                    act_backward(act, pre, gd)
                };
                Tensor::from_vec(dz, g.dims(), g.device())?
            }
        };
        let (m, n) = grad.dims2()?;
        let k = x.dim(1)?;
        let (gs, gl) = grad.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (Some(gv), Some(xv), Some(wv)) = (view(&gs, gl), view(&xs, xl), view(&ws, wl)) else {
            candle_core::bail!("linear-train: expected f32 CPU tensors in the backward pass")
        };
        let dx = if x.track_op() {
            let d = matmul_blocks(m, k, n, gv, wv, |_, _, _| {});
            Some(Tensor::from_vec(d, (m, k), x.device())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let d = matmul_blocks(n, k, m, gv.t(), xv, |_, _, _| {});
            Some(Tensor::from_vec(d, (n, k), w.device())?)
        } else {
            None
        };
        let db = if bias.is_some_and(|b| b.track_op()) {
            Some(Tensor::from_vec(column_sums(gv, m, n), n, w.device())?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// The column sums of a row-major `[m, n]` view, split by columns across the pool.
fn column_sums(g: View, m: usize, n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; n];
    let per = n.div_ceil(rayon::current_num_threads()).max(64);
    out.par_chunks_mut(per).enumerate().for_each(|(i, o)| {
        let c0 = i * per;
        for r in 0..m {
            let row = &g.data[r * g.rs + c0..r * g.rs + c0 + o.len()];
            for (s, x) in o.iter_mut().zip(row) {
                *s += x;
            }
        }
    });
    out
}

impl candle_core::CustomOp3 for LinearTrain {
    fn name(&self) -> &'static str {
        "linear-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        self.fwd((xs, xl), (ws, wl), Some((bs, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.grads(x, w, grad, Some(b))
    }
}

impl candle_core::CustomOp2 for LinearTrain {
    fn name(&self) -> &'static str {
        "linear-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        self.fwd((xs, xl), (ws, wl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, grad, None)?;
        Ok((dx, dw))
    }
}

/// `out[i] = lhs · rhs[i]` for the row-major `[k, n]` matrices `rhs[i]` stacked in `rhs`
/// (`b` of them), into a new `[b, m, n]` buffer; tasks over images and column blocks.
fn left_matmul_batched(
    lhs: View,
    rhs: &[f32],
    (b, m, n, k): (usize, usize, usize, usize),
) -> Vec<f32> {
    if b * m * n == 0 {
        return Vec::new();
    }
    if k == 0 {
        return vec![0.0; b * m * n];
    }
    let mut out = uninit_buffer(b * m * n);
    let dst = OutPtr(out.as_mut_ptr().cast::<f32>());
    let task = |i: usize, c0: usize, c1: usize| {
        let rv = View {
            data: &rhs[i * k * n + c0..],
            rs: n,
            cs: 1,
        };
        // SAFETY: columns `c0..c1` of image `i` are this task's alone; `rv` holds rows `0..k`
        // of width `c1 − c0` and `lhs` its `[m, k]` extent.
        unsafe {
            gemm_into(
                dst.get().add(i * m * n + c0),
                n,
                (m, c1 - c0, k),
                lhs,
                rv,
                false,
            )
        };
    };
    let threads = rayon::current_num_threads();
    if threads <= 1 || b * m * n * k < SPLIT_MIN_MACS {
        (0..b).for_each(|i| task(i, 0, n));
    } else {
        // Enough column blocks per image that every thread gets work.
        let per = n.div_ceil(threads.div_ceil(b)).max(COL_ALIGN);
        rayon::scope(|s| {
            for i in 0..b {
                for c0 in (0..n).step_by(per) {
                    let task = &task;
                    s.spawn(move |_| task(i, c0, (c0 + per).min(n)));
                }
            }
        });
    }
    // SAFETY: the tasks tile every image's output, each written whole by `gemm_into`.
    unsafe { assume_init(out) }
}

/// `Σ_i a[i] · b[i]ᵀ` for the row-major `a[i]` `[m, p]` and `b[i]` `[n, p]` stacked in `a`
/// and `bm` (`b` of each): `[m, n]`. Tasks over row blocks, each summing over the images.
fn sum_outer_batched(
    a: &[f32],
    bm: &[f32],
    (b, m, n, p): (usize, usize, usize, usize),
) -> Vec<f32> {
    if b == 0 || p == 0 {
        return vec![0.0; m * n];
    }
    if m * n == 0 {
        return Vec::new();
    }
    let mut out = uninit_buffer(m * n);
    let dst = OutPtr(out.as_mut_ptr().cast::<f32>());
    let task = |r0: usize, r1: usize| {
        for i in 0..b {
            let av = View {
                data: &a[i * m * p + r0 * p..],
                rs: p,
                cs: 1,
            };
            // `b[i]ᵀ`: element (q, j) at `j·p + q`.
            let bv = View {
                data: &bm[i * n * p..],
                rs: 1,
                cs: p,
            };
            // SAFETY: rows `r0..r1` are this task's alone, written by the first image and
            // then accumulated; the views hold their extents.
            unsafe { gemm_into(dst.get().add(r0 * n), n, (r1 - r0, n, p), av, bv, i > 0) };
        }
    };
    let threads = rayon::current_num_threads();
    if threads <= 1 || b * m * n * p < SPLIT_MIN_MACS {
        task(0, m);
    } else {
        let per = m.div_ceil(threads);
        rayon::scope(|s| {
            for r0 in (0..m).step_by(per) {
                let task = &task;
                s.spawn(move |_| task(r0, (r0 + per).min(m)));
            }
        });
    }
    // SAFETY: the row blocks tile the output; the first image writes each whole.
    unsafe { assume_init(out) }
}

/// A 1×1 convolution over channels-first activations, `y[i] = W · x[i]` for `w` `[o, c]` and
/// `x` `[b, c, p]` (`p` positions), with its own backward pass: `dx[i] = Wᵀ · dy[i]` and
/// `dW = Σ_i dy[i] · x[i]ᵀ`, each as `gemm` calls on the stacked images. candle's
/// `broadcast_matmul` would give `dW` per image and reduce them with a strided sum.
/// Other devices and dtypes take `broadcast_matmul`.
pub(crate) fn conv1x1(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[w, x]) && w.rank() == 2 && x.rank() == 3 {
        w.apply_op2(&x.contiguous()?, Conv1x1)
    } else {
        w.broadcast_matmul(x)
    }
}

struct Conv1x1;

impl Conv1x1 {
    /// `(b, o, c, p)`, checked.
    fn dims(w: &[usize], x: &[usize]) -> Result<(usize, usize, usize, usize)> {
        match (w, x) {
            (&[o, c], &[b, c2, p]) if c == c2 => Ok((b, o, c, p)),
            _ => candle_core::bail!("conv1x1: weight {w:?} does not fit input {x:?}"),
        }
    }
}

impl candle_core::CustomOp2 for Conv1x1 {
    fn name(&self) -> &'static str {
        "conv1x1"
    }

    fn cpu_fwd(
        &self,
        ws: &CpuStorage,
        wl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        let (b, o, c, p) = Self::dims(wl.dims(), xl.dims())?;
        let Some(wv) = view_cpu(ws, wl) else {
            candle_core::bail!("conv1x1: expected an f32 weight")
        };
        let x = contiguous_f32(xs, xl, "conv1x1 input")?;
        let out = left_matmul_batched(wv, x, (b, o, p, c));
        Ok((CpuStorage::F32(out), (b, o, p).into()))
    }

    fn bwd(
        &self,
        w: &Tensor,
        x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, o, c, p) = Self::dims(w.dims(), x.dims())?;
        let grad = grad.contiguous()?;
        let x = x.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (Storage::Cpu(gc), Storage::Cpu(xc), Some(wv)) = (&*gs, &*xs, view(&ws, wl)) else {
            candle_core::bail!("conv1x1: expected f32 CPU tensors in the backward pass")
        };
        let g = contiguous_f32(gc, gl, "conv1x1 gradient")?;
        let xd = contiguous_f32(xc, xl, "conv1x1 input")?;
        if g.len() != b * o * p {
            candle_core::bail!("conv1x1: output gradient {:?}", grad.dims())
        }
        let dx = if x.track_op() {
            let d = left_matmul_batched(wv.t(), g, (b, c, p, o));
            Some(Tensor::from_vec(d, (b, c, p), x.device())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let d = sum_outer_batched(g, xd, (b, o, c, p));
            Some(Tensor::from_vec(d, (o, c), w.device())?)
        } else {
            None
        };
        Ok((dw, dx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::kernels::act::FusedAct;
    use crate::nn::test_util::{grads_of, max_diff, randn};
    use crate::nn::Activation;
    use candle_core::Var;

    /// The 1×1 convolution op against `broadcast_matmul` with candle's autograd, on shapes
    /// below and above the threshold for splitting across threads, with the input tracking
    /// and not.
    #[test]
    fn conv1x1_matches_broadcast_matmul() {
        // `max_diff`, with empty tensors (no channels) compared by shape alone.
        let diff = |a: &Tensor, b: &Tensor| match a.elem_count() {
            0 => {
                assert_eq!(a.dims(), b.dims());
                0.0
            }
            _ => max_diff(a, b),
        };
        for ((b, o, c, p), x_tracks) in [
            ((2, 5, 3, 7), true),
            ((3, 96, 40, 196), true),
            ((1, 64, 48, 100), false),
            ((2, 4, 0, 3), true),
        ] {
            let w = Var::from_tensor(&randn(&[o, c], 1)).unwrap();
            let x = randn(&[b, c, p], 2);
            let x = if x_tracks {
                Var::from_tensor(&x).unwrap().as_tensor().clone()
            } else {
                x
            };
            let ours = conv1x1(w.as_tensor(), &x).unwrap();
            let reference = w.as_tensor().broadcast_matmul(&x).unwrap();
            assert!(diff(&ours, &reference) < 1e-4, "forward {b} {o} {c} {p}");
            let (g1, g2) = crate::nn::test_util::probe_grads(&ours, &reference, 3);
            let d = diff(
                g1.get(w.as_tensor()).unwrap(),
                g2.get(w.as_tensor()).unwrap(),
            );
            assert!(d < 1e-3, "grad w {b} {o} {c} {p}: {d}");
            if x_tracks {
                let d = diff(g1.get(&x).unwrap(), g2.get(&x).unwrap());
                assert!(d < 1e-3, "grad x {b} {o} {c} {p}: {d}");
            } else {
                assert!(
                    g1.get(&x).is_none(),
                    "no gradient for an input that does not track"
                );
            }
        }
        let bad = conv1x1(&randn(&[4, 3], 1), &randn(&[2, 5, 6], 2));
        assert!(bad.unwrap_err().to_string().contains("does not fit"));
    }

    #[test]
    fn linear_matches_matmul_on_split_and_strided_shapes() {
        // (m, k, n): one block, a column split and a row split (2 threads or more).
        for (i, &(m, k, n)) in [(3, 5, 7), (40, 96, 200), (1100, 64, 24)]
            .iter()
            .enumerate()
        {
            let x = randn(&[m, k + 3], 10 + i as u64).narrow(1, 2, k).unwrap();
            let w = randn(&[n, k], 20 + i as u64);
            let b = randn(&[n], 30 + i as u64);
            let r = randn(&[m, n], 40 + i as u64);
            let want = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
                .relu()
                .unwrap();
            let want_res = (&want + &r).unwrap();
            let got = linear_cpu_f32(&x, &w, Some(&b), Some(FusedAct::Relu), Some(&r))
                .unwrap()
                .unwrap();
            assert!(max_diff(&got, &want_res) < 1e-4, "{m}x{k}x{n}");
            let plain = linear_cpu_f32(&x, &w, None, None, None).unwrap().unwrap();
            let want_plain = x.matmul(&w.t().unwrap()).unwrap();
            assert!(max_diff(&plain, &want_plain) < 1e-4, "{m}x{k}x{n} plain");
        }
        // Mismatched widths are an error, not a panic.
        let e = linear_cpu_f32(&randn(&[2, 3], 1), &randn(&[4, 5], 2), None, None, None);
        assert!(e.is_err());
    }

    #[test]
    fn linear_train_gradients_match_composed_ops() {
        let (m, k, n) = (37, 24, 50);
        let x = Var::from_tensor(&randn(&[m, k], 1)).unwrap();
        let w = Var::from_tensor(&randn(&[n, k], 2)).unwrap();
        let b = Var::from_tensor(&randn(&[n], 3)).unwrap();
        let g = randn(&[m, n], 4);
        let fused = x.apply_op3(&w, &b, LinearTrain::new(None)).unwrap();
        let composed = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_diff(&fused, &composed) < 1e-5);
        let gf = grads_of(&fused, &g);
        let gc = grads_of(&composed, &g);
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            let (a, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(max_diff(a, c) < 1e-4, "d{name}");
        }
        // Without a bias, and with an input that takes no gradient.
        let x0 = randn(&[m, k], 5);
        let y = x0.apply_op2(&w, LinearTrain::new(None)).unwrap();
        let grads = grads_of(&y, &g);
        let want = g.t().unwrap().matmul(&x0).unwrap();
        assert!(max_diff(grads.get(&w).unwrap(), &want) < 1e-4);
        assert!(grads.get(&x0).is_none());
    }

    #[test]
    fn linear_train_with_activation_matches_candle_autograd() {
        let (m, k, n) = (29, 24, 40);
        let x = Var::from_tensor(&randn(&[m, k], 11)).unwrap();
        let w = Var::from_tensor(&randn(&[n, k], 12)).unwrap();
        let b = Var::from_tensor(&randn(&[n], 13)).unwrap();
        let g = randn(&[m, n], 14);
        // Candle's own ops and their backward passes as the reference.
        let reference = |act: FusedAct, z: &Tensor| match act {
            FusedAct::Gelu => z.gelu_erf().unwrap(),
            FusedAct::GeluTanh => z.gelu().unwrap(),
            _ => (z * candle_nn::ops::sigmoid(&(z * 1.702).unwrap()).unwrap()).unwrap(),
        };
        for act in [FusedAct::Gelu, FusedAct::GeluTanh, FusedAct::QuickGelu] {
            assert!(LinearTrain::fuses(act));
            let fused = x.apply_op3(&w, &b, LinearTrain::new(Some(act))).unwrap();
            let z = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let composed = reference(act, &z);
            assert!(max_diff(&fused, &composed) < 1e-5, "{act:?}");
            let (gf, gc) = (grads_of(&fused, &g), grads_of(&composed, &g));
            for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                let (a, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                assert!(max_diff(a, c) < 1e-4, "{act:?} d{name}: {}", max_diff(a, c));
            }
        }
        // Without a bias.
        let fused = x
            .apply_op2(&w, LinearTrain::new(Some(FusedAct::Gelu)))
            .unwrap();
        let composed = reference(FusedAct::Gelu, &x.matmul(&w.t().unwrap()).unwrap());
        let (gf, gc) = (grads_of(&fused, &g), grads_of(&composed, &g));
        assert!(max_diff(gf.get(&w).unwrap(), gc.get(&w).unwrap()) < 1e-4);
        // An activation without a backward kernel is refused, not run without one (SiLU
        // has no fused kernel at all).
        assert!(Activation::Silu.fused().is_none());
        assert!(!LinearTrain::fuses(FusedAct::Relu));
        let e = x.apply_op3(&w, &b, LinearTrain::new(Some(FusedAct::Relu)));
        assert!(e.is_err());
    }
}

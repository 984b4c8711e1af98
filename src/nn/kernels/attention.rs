//! Fused multi-head attention on the CPU in `f32`: `softmax(q kᵀ · scale + bias) v` reading
//! the heads in place from the projection outputs `[b, len, h·hd]` and writing the output
//! in place, one task per (batch row, head) with two single-threaded `gemm` calls and the
//! scaled, masked softmax between them; and the same as an op with its own backward pass
//! (probabilities recomputed) for training.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

use super::gemm::{assume_init, gemm_strided, uninit_buffer, OutPtr};
use super::softmax::softmax_row_fast;

/// A `[batch, len, dim]` `f32` view with unit stride along `dim` (heads side by side).
#[derive(Clone, Copy)]
struct Seq<'a> {
    data: &'a [f32],
    /// Batch stride.
    bs: usize,
    /// Row (position) stride.
    rs: usize,
}

impl Seq<'_> {
    /// The first element of head `h` (width `hd`) of batch row `b`.
    fn head(&self, b: usize, h: usize, hd: usize) -> *const f32 {
        self.data[b * self.bs + h * hd..].as_ptr()
    }
}

/// The `[batch, len, dim]` view of a CPU storage, or `None` for other storages and layouts.
fn seq_cpu<'a>(s: &'a CpuStorage, l: &Layout) -> Option<Seq<'a>> {
    let CpuStorage::F32(data) = s else {
        return None;
    };
    match *l.stride() {
        [bs, rs, 1] => Some(Seq {
            data: &data[l.start_offset()..],
            bs,
            rs,
        }),
        _ => None,
    }
}

/// [`seq_cpu`] for a storage of any device.
fn seq<'a>(s: &'a Storage, l: &Layout) -> Option<Seq<'a>> {
    match s {
        Storage::Cpu(c) => seq_cpu(c, l),
        _ => None,
    }
}

/// An additive attention bias broadcast to `[b, h, lq, lk]`: its data, start and strides.
struct BiasRows<'a> {
    data: &'a [f32],
    start: usize,
    strides: [usize; 4],
}

impl BiasRows<'_> {
    /// Row `(b, h, i)` of length `lk`, gathered into `tmp` when its stride is not 1.
    fn row<'t>(
        &'t self,
        (b, h, i): (usize, usize, usize),
        lk: usize,
        tmp: &'t mut Vec<f32>,
    ) -> &'t [f32] {
        let st = self.strides;
        let off = self.start + b * st[0] + h * st[1] + i * st[2];
        if st[3] == 1 {
            &self.data[off..off + lk]
        } else {
            tmp.clear();
            tmp.extend((0..lk).map(|j| self.data[off + j * st[3]]));
            tmp
        }
    }
}

/// Shapes of one attention call: batch, heads, query and key lengths, head width.
#[derive(Clone, Copy)]
struct AttnDims {
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    hd: usize,
}

/// `P = softmax(scale · Q_h K_hᵀ + bias)` for batch row `bi`, head `hi`, into `p` `[lq, lk]`.
fn attention_probs(
    (q, k): (Seq, Seq),
    (bi, hi): (usize, usize),
    d: AttnDims,
    bias: Option<&BiasRows>,
    scale: f32,
    p: &mut [f32],
) {
    // SAFETY: the heads are read within the views; `p` holds `lq × lk`.
    unsafe {
        gemm_strided(
            (d.lq, d.lk, d.hd),
            p.as_mut_ptr(),
            (d.lk, 1),
            q.head(bi, hi, d.hd),
            (q.rs, 1),
            k.head(bi, hi, d.hd),
            (1, k.rs),
            false,
        );
    }
    let mut tmp = Vec::new();
    for (i, row) in p.chunks_mut(d.lk.max(1)).enumerate().take(d.lq) {
        let brow = bias.map(|b| b.row((bi, hi, i), d.lk, &mut tmp));
        softmax_row_fast(row, brow, scale);
    }
}

/// `softmax(q kᵀ · scale + bias) v` as `[b, lq, h·hd]`: one task per (batch row, head), two
/// single-threaded `gemm` calls that read the heads in place and write the output block in
/// place, with the softmax between them in a task-local buffer.
fn attention_forward(
    (q, k, v): (Seq, Seq, Seq),
    d: AttnDims,
    bias: Option<&BiasRows>,
    scale: f32,
) -> Vec<f32> {
    use rayon::prelude::*;
    let width = d.h * d.hd;
    let mut out = uninit_buffer(d.b * d.lq * width);
    let dst = OutPtr(out.as_mut_ptr().cast::<f32>());
    (0..d.b * d.h).into_par_iter().for_each(|t| {
        let (bi, hi) = (t / d.h, t % d.h);
        let mut p = vec![0f32; d.lq * d.lk];
        attention_probs((q, k), (bi, hi), d, bias, scale, &mut p);
        // SAFETY: this task's `[lq, hd]` block of the output is its alone.
        unsafe {
            gemm_strided(
                (d.lq, d.hd, d.lk),
                dst.get().add(bi * d.lq * width + hi * d.hd),
                (width, 1),
                p.as_ptr(),
                (d.lk, 1),
                v.head(bi, hi, d.hd),
                (v.rs, 1),
                false,
            );
        }
    });
    // SAFETY: each task writes its `[lq, hd]` block whole, and the blocks tile the output.
    unsafe { assume_init(out) }
}

/// Checks `q` `[b, lq, d]`, `k` and `v` `[b, lk, d]` against `heads`.
fn attn_dims(q: &[usize], k: &[usize], v: &[usize], heads: usize) -> Result<AttnDims> {
    match (q, k) {
        (&[_, lq, _], &[_, lk, _]) if lq == 0 || lk == 0 => {
            candle_core::bail!("attention over an empty sequence: q {q:?}, k {k:?}")
        }
        (&[b, lq, d], &[bk, lk, dk])
            if v == k && bk == b && dk == d && heads > 0 && d.is_multiple_of(heads) =>
        {
            Ok(AttnDims {
                b,
                h: heads,
                lq,
                lk,
                hd: d / heads,
            })
        }
        _ => candle_core::bail!("attention: q {q:?}, k {k:?}, v {v:?} with {heads} heads"),
    }
}

/// The `f32` CPU bias rows of `bias` broadcast to `d`, or `None` when it is elsewhere.
fn bias_rows<'a>(bias: Option<(&'a Storage, &'a Layout)>) -> Option<Option<BiasRows<'a>>> {
    match bias {
        None => Some(None),
        Some((s, l)) => match (s, l.stride()) {
            (Storage::Cpu(CpuStorage::F32(data)), &[s0, s1, s2, s3]) => Some(Some(BiasRows {
                data,
                start: l.start_offset(),
                strides: [s0, s1, s2, s3],
            })),
            _ => None,
        },
    }
}

/// Multi-head attention at inference on the CPU in `f32`: `q` `[b, lq, h·hd]`, `k` and `v`
/// `[b, lk, h·hd]` (projection outputs, heads side by side) to `softmax(q kᵀ · scale + bias) v`
/// `[b, lq, h·hd]`; `bias` broadcastable to `[b, h, lq, lk]`. No head is copied out and no
/// score tensor is built. `None` when this path does not apply.
pub(crate) fn attention_cpu_f32(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    let d = attn_dims(q.dims(), k.dims(), v.dims(), heads)?;
    let bias = match bias {
        Some(t) => Some(t.broadcast_as((d.b, d.h, d.lq, d.lk))?),
        None => None,
    };
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Some(qv), Some(kv), Some(vv)) = (seq(&qs, ql), seq(&ks, kl), seq(&vs, vl)) else {
        return Ok(None);
    };
    let bias_guard = bias.as_ref().map(|t| t.storage_and_layout());
    let Some(bv) = bias_rows(bias_guard.as_ref().map(|(s, l)| (&**s, *l))) else {
        return Ok(None);
    };
    let out = attention_forward((qv, kv, vv), d, bv.as_ref(), scale as f32);
    drop((qs, ks, vs));
    Tensor::from_vec(out, (d.b, d.lq, d.h * d.hd), q.device()).map(Some)
}

/// Multi-head attention on `q`, `k`, `v` (as [`attention_cpu_f32`]) as one op with its own
/// backward pass, for training on the CPU in `f32`. The backward pass recomputes each
/// head's probabilities `P` and takes `dV = Pᵀ dO`, `dS = scale · P ⊙ (dO Vᵀ − rowsum)`,
/// `dQ = dS K`, `dK = dSᵀ Q`, one task per (batch row, head). The bias (a mask) gets no
/// gradient.
pub(crate) struct AttentionTrain {
    pub heads: usize,
    pub scale: f32,
    /// Broadcast to `[b, heads, lq, lk]`.
    pub bias: Option<Tensor>,
}

impl candle_core::CustomOp3 for AttentionTrain {
    fn name(&self) -> &'static str {
        "attention-train"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        let d = attn_dims(ql.dims(), kl.dims(), vl.dims(), self.heads)?;
        let (Some(qv), Some(kv), Some(vv)) = (seq_cpu(qs, ql), seq_cpu(ks, kl), seq_cpu(vs, vl))
        else {
            candle_core::bail!("attention-train: expected f32 inputs with unit inner stride")
        };
        let guard = self.bias.as_ref().map(|t| t.storage_and_layout());
        let Some(bv) = bias_rows(guard.as_ref().map(|(s, l)| (&**s, *l))) else {
            candle_core::bail!("attention-train: expected an f32 CPU bias")
        };
        let out = attention_forward((qv, kv, vv), d, bv.as_ref(), self.scale);
        Ok((CpuStorage::F32(out), (d.b, d.lq, d.h * d.hd).into()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let d = attn_dims(q.dims(), k.dims(), v.dims(), self.heads)?;
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (Some(gv), Some(qv), Some(kv), Some(vv)) =
            (seq(&gs, gl), seq(&qs, ql), seq(&ks, kl), seq(&vs, vl))
        else {
            candle_core::bail!("attention-train: expected f32 CPU tensors in the backward pass")
        };
        let guard = self.bias.as_ref().map(|t| t.storage_and_layout());
        let Some(bv) = bias_rows(guard.as_ref().map(|(s, l)| (&**s, *l))) else {
            candle_core::bail!("attention-train: expected an f32 CPU bias")
        };
        let width = d.h * d.hd;
        let mut dq = uninit_buffer(d.b * d.lq * width);
        let mut dk = uninit_buffer(d.b * d.lk * width);
        let mut dv = uninit_buffer(d.b * d.lk * width);
        let (dqp, dkp, dvp) = (
            OutPtr(dq.as_mut_ptr().cast::<f32>()),
            OutPtr(dk.as_mut_ptr().cast::<f32>()),
            OutPtr(dv.as_mut_ptr().cast::<f32>()),
        );
        let scale = self.scale;
        (0..d.b * d.h).into_par_iter().for_each(|t| {
            let (bi, hi) = (t / d.h, t % d.h);
            let mut p = vec![0f32; d.lq * d.lk];
            let mut dp = vec![0f32; d.lq * d.lk];
            attention_probs((qv, kv), (bi, hi), d, bv.as_ref(), scale, &mut p);
            let (q_off, k_off) = (bi * d.lq * width + hi * d.hd, bi * d.lk * width + hi * d.hd);
            // SAFETY: the inputs are read within their views; each output block (head `hi` of
            // row `bi` in dQ, dK, dV) is this task's alone.
            unsafe {
                // dV = Pᵀ dO
                gemm_strided(
                    (d.lk, d.hd, d.lq),
                    dvp.get().add(k_off),
                    (width, 1),
                    p.as_ptr(),
                    (1, d.lk),
                    gv.head(bi, hi, d.hd),
                    (gv.rs, 1),
                    false,
                );
                // dP = dO Vᵀ
                gemm_strided(
                    (d.lq, d.lk, d.hd),
                    dp.as_mut_ptr(),
                    (d.lk, 1),
                    gv.head(bi, hi, d.hd),
                    (gv.rs, 1),
                    vv.head(bi, hi, d.hd),
                    (1, vv.rs),
                    false,
                );
            }
            // dS = scale · P ⊙ (dP − Σ_j dP_j P_j), in place in dP.
            for (dpr, pr) in dp.chunks_mut(d.lk.max(1)).zip(p.chunks(d.lk.max(1))) {
                let dot: f32 = dpr.iter().zip(pr).map(|(a, b)| a * b).sum();
                for (g, &pv) in dpr.iter_mut().zip(pr) {
                    *g = scale * pv * (*g - dot);
                }
            }
            // SAFETY: as above.
            unsafe {
                // dQ = dS K
                gemm_strided(
                    (d.lq, d.hd, d.lk),
                    dqp.get().add(q_off),
                    (width, 1),
                    dp.as_ptr(),
                    (d.lk, 1),
                    kv.head(bi, hi, d.hd),
                    (kv.rs, 1),
                    false,
                );
                // dK = dSᵀ Q
                gemm_strided(
                    (d.lk, d.hd, d.lq),
                    dkp.get().add(k_off),
                    (width, 1),
                    dp.as_ptr(),
                    (1, d.lk),
                    qv.head(bi, hi, d.hd),
                    (qv.rs, 1),
                    false,
                );
            }
        });
        drop((gs, qs, ks, vs, guard));
        // SAFETY: each task writes its head blocks whole, and they tile the three outputs.
        let (dq, dk, dv) = unsafe { (assume_init(dq), assume_init(dk), assume_init(dv)) };
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (d.b, d.lq, width), dev)?),
            Some(Tensor::from_vec(dk, (d.b, d.lk, width), dev)?),
            Some(Tensor::from_vec(dv, (d.b, d.lk, width), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{grads_of, max_diff, randn};
    use candle_core::{DType, Device, Var, D};

    /// Candle's composed `softmax(q kᵀ · scale + bias) v` on `[b, lq, h·hd]` inputs.
    fn reference_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        h: usize,
        bias: Option<&Tensor>,
        scale: f64,
    ) -> Tensor {
        let split = |t: &Tensor| {
            let (b, l, d) = t.dims3().unwrap();
            t.reshape((b, l, h, d / h))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q4, k4, v4) = (split(q), split(k), split(v));
        let s = (q4.matmul(&k4.t().unwrap()).unwrap() * scale).unwrap();
        let s = match bias {
            Some(b) => s.broadcast_add(b).unwrap(),
            None => s,
        };
        let m = s.max_keepdim(D::Minus1).unwrap();
        let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let (b, lq, d) = q.dims3().unwrap();
        p.matmul(&v4)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, lq, d))
            .unwrap()
    }

    #[test]
    fn attention_matches_composed_ops_with_and_without_bias() {
        let (b, lq, lk, h, hd) = (3, 5, 9, 2, 8);
        let q = randn(&[b, lq, h * hd], 1);
        let k = randn(&[b, lk, h * hd], 2);
        let v = randn(&[b, lk, h * hd], 3);
        // A key-padding bias [b, 1, 1, lk]: the last keys of row 1 masked.
        let mut mask = vec![0f32; b * lk];
        for j in 6..lk {
            mask[lk + j] = -1e4;
        }
        let bias = Tensor::from_vec(mask, (b, 1, 1, lk), &Device::Cpu).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        for bias in [None, Some(&bias)] {
            let want = reference_attention(&q, &k, &v, h, bias, scale);
            let got = attention_cpu_f32(&q, &k, &v, h, bias, scale)
                .unwrap()
                .unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "bias {}", bias.is_some());
        }
        let e = attention_cpu_f32(&q, &k, &v, 3, None, scale);
        assert!(e.is_err(), "16 channels do not split into 3 heads");
        // No keys, or no queries: an error, not a panic.
        let none = Tensor::zeros((b, 0, h * hd), DType::F32, &Device::Cpu).unwrap();
        let e = attention_cpu_f32(&q, &none, &none, h, None, scale).unwrap_err();
        assert!(e.to_string().contains("empty sequence"), "{e}");
        assert!(attention_cpu_f32(&none, &k, &v, h, None, scale).is_err());
    }

    #[test]
    fn attention_train_gradients_match_composed_ops() {
        let (b, lq, lk, h, hd) = (2, 6, 7, 3, 4);
        let q = Var::from_tensor(&randn(&[b, lq, h * hd], 1)).unwrap();
        let k = Var::from_tensor(&randn(&[b, lk, h * hd], 2)).unwrap();
        let v = Var::from_tensor(&randn(&[b, lk, h * hd], 3)).unwrap();
        let bias = (randn(&[b, 1, lq, lk], 4) * 2.0).unwrap();
        let g = randn(&[b, lq, h * hd], 5);
        let scale = 0.37;
        let op = AttentionTrain {
            heads: h,
            scale: scale as f32,
            bias: Some(bias.broadcast_as((b, h, lq, lk)).unwrap()),
        };
        let fused = q.apply_op3(&k, &v, op).unwrap();
        let composed = reference_attention(&q, &k, &v, h, Some(&bias), scale);
        assert!(max_diff(&fused, &composed) < 1e-5);
        let gf = grads_of(&fused, &g);
        let gc = grads_of(&composed, &g);
        for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, c) = (gf.get(t).unwrap(), gc.get(t).unwrap());
            assert!(max_diff(a, c) < 1e-5, "d{name}: {}", max_diff(a, c));
        }
    }
}

//! Multi-head attention (self and cross) with additive masks.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::kernels::attention::{attention_cpu_f32, AttentionTrain};
use super::kernels::cpu_f32;
use super::linear::{batch_broadcast, linear, Linear, WEIGHT_HINT};

use super::ops::{scaled_softmax_into, softmax_last_dim, tracks_grad};

/// `softmax(q kᵀ · scale + bias) v` for `[batch, heads, len, head_dim]` inputs.
///
/// `bias` is additive and broadcast to `[batch, heads, q_len, k_len]`.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let q = (q * scale)?;
    let scores = q.matmul(&k.t()?)?;
    let scores = match bias {
        Some(b) => scores.broadcast_add(b)?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?;
    probs.matmul(v)
}

/// The parameter names of an attention block, which differ between checkpoint families.
#[derive(Debug, Clone, Copy)]
pub struct AttentionNames {
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    pub out: &'static str,
}

impl AttentionNames {
    /// HF CLIP / SigLIP names.
    pub const CLIP: Self = Self {
        q: "q_proj",
        k: "k_proj",
        v: "v_proj",
        out: "out_proj",
    };
    /// HF BERT names (relative to `attention`).
    pub const BERT: Self = Self {
        q: "self.query",
        k: "self.key",
        v: "self.value",
        out: "output.dense",
    };
}

/// Multi-head attention with separate query, key, value and output projections.
///
/// Used as self-attention (`context = None`) or cross-attention (keys and values from
/// `context`, whose width may differ from the query width).
///
/// The projections are kept as loaded (no concatenated copy built at load time): models
/// built on tensors that share storage with variables (an EMA teacher, say) must see every
/// in-place update of those tensors.
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl MultiHeadAttention {
    /// Builds from projections; `dim` is the query/output width.
    pub fn from_parts(
        q: Linear,
        k: Linear,
        v: Linear,
        out: Linear,
        dim: usize,
        num_heads: usize,
    ) -> Result<Self> {
        if num_heads == 0 || !dim.is_multiple_of(num_heads) {
            candle_core::bail!("attention width {dim} is not divisible by {num_heads} heads")
        }
        let head_dim = dim / num_heads;
        Ok(Self {
            q,
            k,
            v,
            out,
            num_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// Loads separate projections named by `names`; `kv_dim` is the key/value input width.
    pub fn new(
        dim: usize,
        kv_dim: usize,
        num_heads: usize,
        names: AttentionNames,
        vb: VarBuilder,
    ) -> Result<Self> {
        let q = linear(dim, dim, vb.pp(names.q))?;
        let k = linear(kv_dim, dim, vb.pp(names.k))?;
        let v = linear(kv_dim, dim, vb.pp(names.v))?;
        let out = linear(dim, dim, vb.pp(names.out))?;
        Self::from_parts(q, k, v, out, dim, num_heads)
    }

    /// Loads PyTorch `nn.MultiheadAttention` parameters: `in_proj_weight` `[3d, d]` and
    /// `in_proj_bias` in q, k, v order, and `out_proj`.
    pub fn new_packed(dim: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get_with_hints((3 * dim, dim), "in_proj_weight", WEIGHT_HINT)?;
        let b = vb.get(3 * dim, "in_proj_bias")?;
        let part = |i: usize| -> Result<Linear> {
            Ok(Linear::new(
                w.narrow(0, i * dim, dim)?,
                Some(b.narrow(0, i * dim, dim)?),
            ))
        };
        let out = linear(dim, dim, vb.pp("out_proj"))?;
        Self::from_parts(part(0)?, part(1)?, part(2)?, out, dim, num_heads)
    }

    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        x.reshape((b, l, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `x` is `[batch, q_len, dim]`; `context` (cross-attention) is `[batch, k_len, kv_dim]`;
    /// `bias` is an additive mask broadcastable to `[batch, heads, q_len, k_len]`.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_impl(x, context, bias, None)
    }

    /// `residual + self.forward(x, context, bias)`, with the residual added in the output
    /// projection's pass on the CPU at inference (see [`Linear::forward_residual`]).
    pub fn forward_residual(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        bias: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        self.forward_impl(x, context, bias, Some(residual))
    }

    fn project_out(&self, y: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        match residual {
            Some(r) => self.out.forward_residual(y, r),
            None => self.out.forward(y),
        }
    }

    fn forward_impl(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        bias: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        let kv = context.unwrap_or(x);
        let inference = !tracks_grad(&[x, kv, self.q.weight(), self.k.weight()])
            && !bias.is_some_and(|b| b.track_op());
        if inference && bias.is_none() && batch_broadcast(kv) {
            if context.is_none() || batch_broadcast(x) {
                // Every row sees the same queries and the same keys: compute one row.
                let c0 = match context {
                    Some(c) => Some(c.narrow(0, 0, 1)?),
                    None => None,
                };
                let one = self.forward(&x.narrow(0, 0, 1)?, c0.as_ref(), None)?;
                let mut shape = one.dims().to_vec();
                shape[0] = b;
                let y = one.broadcast_as(shape)?;
                return match residual {
                    Some(r) => r + y,
                    None => Ok(y),
                };
            }
            return self.forward_shared_context(x, kv, residual);
        }
        let q = self.q.forward(x)?;
        let k = self.k.forward(kv)?;
        let v = self.v.forward(kv)?;
        if inference {
            if let Some(y) = attention_cpu_f32(&q, &k, &v, self.num_heads, bias, self.scale)? {
                return self.project_out(&y, residual);
            }
        } else if cpu_f32(&[&q, &k, &v]) && bias.is_none_or(|b| cpu_f32(&[b]) && !b.track_op()) {
            // Training on the CPU: one op with its own backward pass.
            let (lq, lk) = (q.dim(1)?, k.dim(1)?);
            let bias = match bias {
                Some(t) => Some(t.broadcast_as((b, self.num_heads, lq, lk))?),
                None => None,
            };
            let op = AttentionTrain {
                heads: self.num_heads,
                scale: self.scale as f32,
                bias,
            };
            return self.project_out(&q.apply_op3(&k, &v, op)?, residual);
        }
        self.attend(&q, &k, &v, bias, residual)
    }

    /// Attention over projected `q` `[b, lq, dim]`, `k` and `v` `[b, lk, dim]`, then the output
    /// projection.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, l, _) = q.dims3()?;
        let q = self.split_heads(q)?;
        let k = self.split_heads(k)?;
        let v = self.split_heads(v)?;
        let y = if tracks_grad(&[&q, &k, &v]) || bias.is_some_and(|b| b.track_op()) {
            scaled_dot_product_attention(&q, &k, &v, bias, self.scale)?
        } else {
            // Inference: scale, mask and softmax in place in the score buffer.
            let scores = q.matmul(&k.t()?)?;
            scaled_softmax_into(scores, bias, self.scale)?.matmul(&v)?
        };
        let y = y
            .transpose(1, 2)?
            .reshape((b, l, self.num_heads * self.head_dim))?;
        self.project_out(&y, residual)
    }

    /// Inference cross-attention of `x` `[b, l, dim]` over one context shared by every row
    /// (`context` a stride-0 broadcast, no mask): keys and values are projected once and
    /// each head runs as one `[b·l, head_dim]` product.
    fn forward_shared_context(
        &self,
        x: &Tensor,
        context: &Tensor,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (h, hd) = (self.num_heads, self.head_dim);
        let c0 = context.narrow(0, 0, 1)?;
        let k = self.split_heads(&self.k.forward(&c0)?)?.squeeze(0)?;
        let v = self.split_heads(&self.v.forward(&c0)?)?.squeeze(0)?;
        let q = self
            .q
            .forward(x)?
            .reshape((b, l, h, hd))?
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((h, b * l, hd))?;
        let scores = q.matmul(&k.t()?)?;
        let y = scaled_softmax_into(scores, None, self.scale)?.matmul(&v)?;
        let y = y
            .reshape((h, b, l, hd))?
            .permute((1, 2, 0, 3))?
            .reshape((b, l, h * hd))?;
        self.project_out(&y, residual)
    }
}

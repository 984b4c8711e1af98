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
    let norm = xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    // Same guard as torch.nn.functional.normalize(eps=1e-12).
    xs.broadcast_div(&norm.clamp(1e-12, f64::INFINITY)?)
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
        if tracks_grad(&[xs, &self.weight, &self.bias]) || !xs.is_contiguous() {
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
        match self {
            Activation::Gelu => xs.gelu_erf(),
            Activation::GeluPytorchTanh => xs.gelu(),
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

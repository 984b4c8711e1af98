//! A linear layer that runs as one 2-D matrix product.
//!
//! `candle_nn::Linear` multiplies a `[b, n, d]` input batch by batch; flattening the
//! leading dimensions into one `[b·n, d]` product is about twice as fast on CPU and
//! differentiable all the same (reshape, matmul and add all record a backward).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::ops::{bias_act_into, tracks_grad, Activation};

/// Whether `x` has rank ≥ 2 and a leading dimension > 1 with stride 0 (a broadcast copy of
/// one row, shared storage).
pub fn batch_broadcast(x: &Tensor) -> bool {
    x.rank() >= 2 && x.dims()[0] > 1 && x.stride()[0] == 0
}

/// `y = x Wᵀ + b` over the last dimension, with PyTorch's `weight` `[out, in]` layout.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl From<candle_nn::Linear> for Linear {
    fn from(l: candle_nn::Linear) -> Self {
        Self::new(l.weight().clone(), l.bias().cloned())
    }
}

/// Loads `weight` `[out, in]` and `bias` `[out]`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(
        vb.get((out_dim, in_dim), "weight")?,
        Some(vb.get(out_dim, "bias")?),
    ))
}

/// Loads `weight` `[out, in]` only.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(vb.get((out_dim, in_dim), "weight")?, None))
}

impl Linear {
    /// `act(x Wᵀ + b)`. On the CPU in f32 with nothing tracking gradients, the bias and the
    /// activation are applied in place in the matmul output (one pass, no new buffer);
    /// otherwise through differentiable ops.
    pub fn forward_act(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        let dims = x.dims();
        if batch_broadcast(x) && !tracks_grad(&[x, &self.weight]) {
            // Every row of the leading dimension is the same data (a stride-0 broadcast, as
            // in ITM re-ranking of one image against many texts): compute one, broadcast it.
            let one = self.forward_act(&x.narrow(0, 0, 1)?, act)?;
            let mut shape = one.dims().to_vec();
            shape[0] = dims[0];
            return one.broadcast_as(shape);
        }
        let in_dim = *dims
            .last()
            .ok_or_else(|| candle_core::Error::Msg("linear on a scalar".into()))?;
        let rows = x.elem_count() / in_dim.max(1);
        let mut x2 = x.reshape((rows, in_dim))?;
        if !x2.device().is_cpu() && !x2.is_contiguous() {
            // CUDA and Metal matmuls take no row stride other than the row length (e.g. the
            // `[CLS]` rows of a `[batch, len, dim]` tensor); the CPU gemm takes any stride.
            x2 = x2.contiguous()?;
        }
        let w = self.weight.to_dtype(x.dtype())?;
        let y = x2.matmul(&w.t()?)?;
        let b = match &self.bias {
            Some(b) => Some(b.to_dtype(x.dtype())?),
            None => None,
        };
        let y = bias_act_into(y, b.as_ref(), act)?;
        let mut out_shape = dims.to_vec();
        if let Some(last) = out_shape.last_mut() {
            *last = self.weight.dim(0)?;
        }
        y.reshape(out_shape)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, None)
    }
}

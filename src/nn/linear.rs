//! A linear layer that runs as one 2-D matrix product.
//!
//! `candle_nn::Linear` multiplies a `[b, n, d]` input batch by batch; here the leading
//! dimensions are flattened into one `[b·n, d]` product. On the CPU in `f32` that product is
//! the crate's own (`super::gemm`): at inference with the bias, activation and residual
//! applied in the same pass, in training as one op with its own backward pass. Elsewhere
//! (CUDA, Metal, other dtypes) it is candle's matmul and differentiable ops.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::gemm::{cpu_f32, linear_cpu_f32, LinearTrain};
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
    /// activation are applied to each output block of the product while it is in cache; in
    /// training on the CPU the product is one op with its own backward pass; elsewhere
    /// candle's matmul and differentiable ops.
    pub fn forward_act(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        self.forward_fused(x, act, None)
    }

    /// `residual + (x Wᵀ + b)`: on the CPU in f32 at inference, the residual is added in the
    /// same pass as the bias, while the output block is still in cache.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, None, Some(residual))
    }

    fn forward_fused(
        &self,
        x: &Tensor,
        act: Option<Activation>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        if let Some(r) = residual {
            let n = self.weight.dim(0)?;
            let same_shape = r.rank() == x.rank()
                && r.dims().split_last() == x.dims().split_last().map(|(_, lead)| (&n, lead));
            if !same_shape || batch_broadcast(x) || r.track_op() {
                return residual_add(r, &self.forward_fused(x, act, None)?);
            }
        }
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
        let mut out_shape = dims.to_vec();
        if let Some(last) = out_shape.last_mut() {
            *last = self.weight.dim(0)?;
        }
        let bias_tracks = self.bias.as_ref().is_some_and(|b| b.track_op());
        if !tracks_grad(&[x, &self.weight]) && !bias_tracks {
            let res2 = match residual {
                Some(r) => Some(r.reshape((rows, self.weight.dim(0)?))?),
                None => None,
            };
            if let Some(y) =
                linear_cpu_f32(&x2, &self.weight, self.bias.as_ref(), act, res2.as_ref())?
            {
                return y.reshape(out_shape);
            }
        }
        let y = if cpu_f32(&x2) && cpu_f32(&self.weight) && self.bias.as_ref().is_none_or(cpu_f32) {
            // Training on the CPU: one op with its own backward pass.
            let y = match &self.bias {
                Some(b) => x2.apply_op3(&self.weight, b, LinearTrain)?,
                None => x2.apply_op2(&self.weight, LinearTrain)?,
            };
            bias_act_into(y, None, act)?
        } else {
            let w = self.weight.to_dtype(x.dtype())?;
            let y = x2.matmul(&w.t()?)?;
            let b = match &self.bias {
                Some(b) => Some(b.to_dtype(x.dtype())?),
                None => None,
            };
            bias_act_into(y, b.as_ref(), act)?
        };
        let y = y.reshape(out_shape)?;
        match residual {
            Some(r) => residual_add(r, &y),
            None => Ok(y),
        }
    }
}

/// `residual + y`, in the order of the models' `x + f(x)`.
fn residual_add(residual: &Tensor, y: &Tensor) -> Result<Tensor> {
    residual.broadcast_add(y)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, None)
    }
}

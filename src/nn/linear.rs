//! A linear layer that runs as one 2-D matrix product.
//!
//! `candle_nn::Linear` multiplies a `[b, n, d]` input batch by batch; here the leading
//! dimensions are flattened into one `[b·n, d]` product. On the CPU in `f32` that product is
//! the crate's own (`nn::kernels::gemm`): at inference with the bias, activation and residual
//! applied in the same pass, in training as one op with its own backward pass. Elsewhere
//! (CUDA, Metal, other dtypes) it is candle's matmul and differentiable ops.

use candle_core::{Module, Result, Tensor};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::{Init, VarBuilder};

use super::kernels::cpu_f32;
use super::kernels::gemm::{linear_cpu_f32, LinearTrain};
use super::ops::{bias_act_into, fused_act, tracks_grad, Activation};

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

/// The hint that [`linear`] asks for its weight with: candle-nn's own initialisation of a
/// linear weight (Kaiming normal, fan-in), which a `VarMap` fills a new weight with.
///
/// The crate's inference backends (a [`crate::checkpoint::Loader`] without variables, and
/// [`crate::checkpoint::random_var_builder`]) also read it as "the weight of a linear layer"
/// and store such a weight in [`inference_layout`].
pub const WEIGHT_HINT: Init = candle_nn::init::DEFAULT_KAIMING_NORMAL;

/// Whether `hint` is [`WEIGHT_HINT`].
pub(crate) fn is_weight_hint(hint: &Init) -> bool {
    matches!(
        hint,
        Init::Kaiming {
            dist: NormalOrUniform::Normal,
            fan: FanInOut::FanIn,
            non_linearity: NonLinearity::ReLU,
        }
    )
}

/// A linear weight `[out, in]` with the same values, stored the way the CPU `f32` inference
/// kernels read it fastest: as the transposed view of a row-major `[in, out]` buffer. The
/// matrix product then reads the weight down its columns without `gemm`'s gather of strided
/// rows into its packed panels (measured up to 3× faster for the 64-row products of a batch-1
/// text tower with `gemm`'s AVX-512 kernels, 0–30% at batch 8).
///
/// Only for weights that nothing updates in place: a model built on tensors that share
/// storage with variables (a training model, an EMA teacher) must keep that storage, so the
/// backends apply this only when they build a model for inference. Other devices, dtypes
/// and ranks are returned unchanged.
pub fn inference_layout(w: Tensor) -> Result<Tensor> {
    if cpu_f32(&[&w]) && w.rank() == 2 && w.is_contiguous() && !w.is_variable() {
        w.t()?.contiguous()?.t()
    } else {
        Ok(w)
    }
}

/// Loads `weight` `[out, in]` and `bias` `[out]`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(
        vb.get_with_hints((out_dim, in_dim), "weight", WEIGHT_HINT)?,
        Some(vb.get(out_dim, "bias")?),
    ))
}

/// Loads `weight` `[out, in]` only.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(
        vb.get_with_hints((out_dim, in_dim), "weight", WEIGHT_HINT)?,
        None,
    ))
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
        let kernel_act = fused_act(act);
        if let Some(ka) = kernel_act.filter(|_| !tracks_grad(&[x, &self.weight]) && !bias_tracks) {
            let res2 = match residual {
                Some(r) => Some(r.reshape((rows, self.weight.dim(0)?))?),
                None => None,
            };
            if let Some(y) =
                linear_cpu_f32(&x2, &self.weight, self.bias.as_ref(), ka, res2.as_ref())?
            {
                return y.reshape(out_shape);
            }
        }
        let y = if cpu_f32(&[&x2, &self.weight]) && self.bias.as_ref().is_none_or(|b| cpu_f32(&[b]))
        {
            // Training on the CPU: one op with its own backward pass, the activation
            // included where it has a backward kernel.
            let fused = kernel_act.flatten().filter(|a| LinearTrain::fuses(*a));
            let op = LinearTrain::new(fused);
            let y = match &self.bias {
                Some(b) => x2.apply_op3(&self.weight, b, op)?,
                None => x2.apply_op2(&self.weight, op)?,
            };
            bias_act_into(y, None, act.filter(|_| fused.is_none()))?
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device};

    use super::*;
    use crate::checkpoint::{random_var_builder, Loader, TensorSource};
    use crate::nn::test_util::max_diff;

    fn source(w: &Tensor, b: &Tensor) -> TensorSource {
        TensorSource::Map(HashMap::from([
            ("fc.weight".to_string(), w.clone()),
            ("fc.bias".to_string(), b.clone()),
        ]))
    }

    #[test]
    fn only_inference_loaders_store_linear_weights_transposed() {
        // The backends recognise the hint by its shape: it must stay the one `linear` uses.
        assert!(is_weight_hint(&WEIGHT_HINT));
        assert!(!is_weight_hint(&candle_nn::init::DEFAULT_KAIMING_UNIFORM));
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap();
        let expected = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();

        // Inference: the same values, stored `[in, out]`, and the same outputs.
        let loader = Loader::new(source(&w, &b), "map");
        let l = linear(3, 5, loader.var_builder(DType::F32, &dev).pp("fc")).unwrap();
        assert_eq!(l.weight().dims(), [5, 3]);
        assert_eq!(l.weight().stride(), [1, 5]);
        assert_eq!(
            l.weight().to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
        let diff = max_diff(&l.forward(&x).unwrap(), &expected);
        assert!(diff < 1e-5, "{diff}");

        // Training: the variable itself, as stored, so that updates reach the model.
        let (loader, _vars) = Loader::new(source(&w, &b), "map").trainable().unwrap();
        let l = linear(3, 5, loader.var_builder(DType::F32, &dev).pp("fc")).unwrap();
        assert!(l.weight().is_variable());
        assert_eq!(l.weight().stride(), [3, 1]);

        // Other dtypes keep the checkpoint's layout; the bench weights get the CPU one.
        let loader = Loader::new(source(&w, &b), "map");
        let l = linear(3, 5, loader.var_builder(DType::F16, &dev).pp("fc")).unwrap();
        assert_eq!(l.weight().stride(), [3, 1]);
        let l = linear(3, 5, random_var_builder(1, DType::F32, &dev)).unwrap();
        assert_eq!(l.weight().stride(), [1, 5]);
    }
}

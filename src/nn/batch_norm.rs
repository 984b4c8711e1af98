//! BatchNorm, and the convolution + BatchNorm pair of the CNN towers (timm's EfficientNets
//! and CLIP's modified ResNet), written once.
//!
//! * [`BatchNorm`] with trainable affine parameters: inference mode uses the running
//!   statistics (constants); train mode ([`BatchNorm::forward_train`]) the batch's, and the
//!   running ones move towards them in place.
//! * [`BnMode`]: the mode of one network, shared by its layers and clones
//!   ([`BnMode::set_training`]).
//! * [`FoldedConvBn`]: a bias-free convolution weight with its BatchNorm, whose scale is
//!   folded into the weight and whose shift becomes a bias: once at construction when
//!   nothing trains, on every forward otherwise (so the convolution weight and the BN weight
//!   and bias all get their gradients), and again after train mode may have moved the
//!   running statistics. The networks decide how to convolve with the folded weight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// BatchNorm with trainable affine parameters. In inference mode the statistics are the
/// running ones (constants); in train mode ([`BatchNorm::forward_train`]) they are the
/// batch's, and the running ones move towards them.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    pub fn new(channels: usize, eps: f64, momentum: f64, vb: VarBuilder) -> Result<Self> {
        crate::nn::ops::check_eps("batch norm", eps)?;
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            running_mean: vb.get(channels, "running_mean")?,
            running_var: vb.get(channels, "running_var")?,
            eps,
            momentum,
        })
    }

    /// The BN as a per-channel affine map `x · scale + shift` (both `[c]`).
    pub fn scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let var = self.running_var.detach();
        let mean = self.running_mean.detach();
        let scale = self.weight.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let shift = (&self.bias - mean.mul(&scale)?)?;
        Ok((scale, shift))
    }

    /// The running mean and variance (`[c]`).
    pub fn running_stats(&self) -> (&Tensor, &Tensor) {
        (&self.running_mean, &self.running_var)
    }

    /// Whether the affine weight or bias tracks gradients.
    pub fn is_trainable(&self) -> bool {
        self.weight.track_op() || self.bias.track_op()
    }

    /// Train mode on `x` `[b, c, h, w]`: normalises with the batch mean and biased variance
    /// (gradients flow through both), then updates the running statistics in place with the
    /// batch mean and the unbiased variance. Fails, like PyTorch, when a channel has a
    /// single value.
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let n = b * h * w;
        if n < 2 {
            candle_core::bail!(
                "BatchNorm in train mode needs more than one value per channel, got input \
                 {:?}",
                x.dims()
            )
        }
        // `y` in x's dtype; `mean` and `var` detached, `[c]`, f32.
        let (y, mean, var) =
            crate::nn::ops::batch_norm_train(x, &self.weight, &self.bias, self.eps)?;
        let m = self.momentum;
        let unbiased = (var * (n as f64 / (n - 1) as f64))?;
        for (running, batch) in [(&self.running_mean, mean), (&self.running_var, unbiased)] {
            let rd = running.dtype();
            let new =
                ((running.to_dtype(DType::F32)? * (1.0 - m))? + (batch * m)?)?.to_dtype(rd)?;
            // Written into the buffer's own storage: the var map (and so checkpoints) and
            // every clone of the model see the new statistics.
            running.slice_set(&new, 0, 0)?;
        }
        Ok(y)
    }
}

impl Module for BatchNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (scale, shift) = self.scale_shift()?;
        let c = scale.dim(0)?;
        x.broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
            .broadcast_add(&shift.reshape((1, c, 1, 1))?)
    }
}

/// The BatchNorm mode of one network, shared by its layers.
#[derive(Debug, Default)]
pub struct BnMode {
    /// Batch statistics (PyTorch's train mode).
    training: AtomicBool,
    /// Train mode was on at some point: the running statistics may have moved, so the BN
    /// folded at construction is stale.
    stats_moved: AtomicBool,
}

impl BnMode {
    /// Switches between running statistics (`false`, the default) and batch statistics.
    pub fn set_training(&self, on: bool) {
        if on {
            self.stats_moved.store(true, Ordering::Relaxed);
        }
        self.training.store(on, Ordering::Relaxed);
    }

    /// Whether BatchNorm uses batch statistics.
    pub fn training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// Whether train mode was ever on (the running statistics may have moved).
    pub fn stats_moved(&self) -> bool {
        self.stats_moved.load(Ordering::Relaxed)
    }
}

/// A bias-free convolution weight `[out, in, kh, kw]` and its BatchNorm, with the BN folded
/// into the weight (see the module documentation).
#[derive(Debug, Clone)]
pub struct FoldedConvBn {
    weight: Tensor,
    bn: BatchNorm,
    /// The fold computed at construction, kept when nothing trains.
    folded: Option<(Tensor, Tensor)>,
    mode: Arc<BnMode>,
}

impl FoldedConvBn {
    /// Pairs `weight` with `bn` in a network whose BN mode is `mode`.
    pub fn new(weight: Tensor, bn: BatchNorm, mode: &Arc<BnMode>) -> Result<Self> {
        if weight.rank() != 4 {
            candle_core::bail!(
                "a convolution weight is [out, in, kh, kw], got {:?}",
                weight.dims()
            )
        }
        let mut this = Self {
            weight,
            bn,
            folded: None,
            mode: mode.clone(),
        };
        if !(this.weight.track_op() || this.bn.is_trainable()) {
            this.folded = Some(this.fold()?);
        }
        Ok(this)
    }

    /// The unscaled convolution weight `[out, in, kh, kw]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bn(&self) -> &BatchNorm {
        &self.bn
    }

    /// Whether the network's BatchNorm uses batch statistics.
    pub fn training(&self) -> bool {
        self.mode.training()
    }

    /// Whether the fold was computed once at construction (nothing trains).
    pub fn is_prefolded(&self) -> bool {
        self.folded.is_some()
    }

    /// The BN-scaled weight (the shape of [`FoldedConvBn::weight`]) and the shift `[out]`,
    /// computed now.
    fn fold(&self) -> Result<(Tensor, Tensor)> {
        let (scale, shift) = self.bn.scale_shift()?;
        let o = scale.dim(0)?;
        let w = self.weight.broadcast_mul(&scale.reshape((o, 1, 1, 1))?)?;
        Ok((w, shift))
    }

    /// The BN-scaled weight and the shift: the one folded at construction while it is
    /// current, else computed now (differentiably).
    pub fn folded(&self) -> Result<(Tensor, Tensor)> {
        match &self.folded {
            Some(f) if !self.mode.stats_moved() => Ok(f.clone()),
            _ => self.fold(),
        }
    }
}

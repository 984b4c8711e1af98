//! timm's TensorFlow-ported EfficientNets (`tf_efficientnet_b0` … `b8`, `l2`, and the `_ns` /
//! `_ap` weights of the same shapes), built from **one** architecture definition (b0's) scaled
//! by a channel and a depth multiplier, with timm's parameter names.
//!
//! What makes the `tf_` variants differ from timm's own EfficientNets, and what this port
//! reproduces:
//!
//! * **TF "same" padding.** A stride-2 convolution pads dynamically and asymmetrically, as
//!   timm's `Conv2dSame`: per axis `pad = max((⌈i/s⌉ − 1)·s + (k − 1) + 1 − i, 0)`, split
//!   `pad / 2` before and the rest after. A stride-1 convolution pads `(k − 1) / 2` on each
//!   side (timm makes it a plain `Conv2d` with static padding, which is the same thing for the
//!   odd kernels used here).
//! * **BatchNorm eps 1e-3**, in inference mode: `y = (x − running_mean) / √(running_var + eps) ·
//!   weight + bias`. The running statistics are constants (detached); `weight` and `bias`
//!   stay parameters, so the blocks can be fine-tuned (BriVL trains `blocks.3`–`blocks.6`).
//!   The per-channel scale is folded into the preceding convolution's weights on every
//!   forward, which is exact up to rounding and keeps gradients for both.
//! * **Batch statistics on request.** [`EfficientNet::set_batch_norm_training`] switches every
//!   BatchNorm to PyTorch's train mode: it normalises with the batch's mean and biased
//!   variance over `(batch, h, w)` (differentiably) and moves its running statistics by
//!   `momentum` (0.1, PyTorch's default, which timm keeps for the `tf_` ports) towards the
//!   batch mean and the unbiased variance. The running statistics are updated in place, so
//!   the var map and checkpoints of a training run see them.
//! * SiLU everywhere, squeeze-excitation with `round(0.25 · block input channels)` reduced
//!   channels, a residual only when the stride is 1 and the width does not change.
//!
//! Channel rounding is timm's `round_channels`: `make_divisible(c · multiplier, 8)` with the
//! 0.9 rule; depth is `⌈repeats · depth_multiplier⌉` per stage.
//!
//! Depthwise convolutions are not sent to candle's grouped `conv2d`, which runs one
//! convolution per channel: they are a sum of `k²` shifted, per-channel-scaled views of the
//! padded input (differentiable, any device and dtype). For inference in `f32` on the CPU
//! (no tensor tracking gradients) direct multi-threaded kernels take over: the depthwise
//! convolution with its padding, BN shift and SiLU fused, and the BN shift plus SiLU applied
//! in place after the 1×1 convolutions.

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, InplaceOp2, InplaceOp3, Layout, Module,
    Result, Shape, Tensor, D,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_nn::{Linear, VarBuilder};

use crate::nn::gemm::conv1x1;
use crate::nn::ops::{contiguous_f32, contiguous_f32_mut};
use serde::{Deserialize, Serialize};

/// The b0 architecture every `tf_efficientnet_bN` scales: per stage the block kind, repeats,
/// kernel, stride, expansion ratio and output channels (squeeze-excitation 0.25 throughout).
const ARCH_B0: [(BlockKind, usize, usize, usize, usize, usize); 7] = [
    (BlockKind::DepthwiseSeparable, 1, 3, 1, 1, 16),
    (BlockKind::InvertedResidual, 2, 3, 2, 6, 24),
    (BlockKind::InvertedResidual, 2, 5, 2, 6, 40),
    (BlockKind::InvertedResidual, 3, 3, 2, 6, 80),
    (BlockKind::InvertedResidual, 3, 5, 1, 6, 112),
    (BlockKind::InvertedResidual, 4, 5, 2, 6, 192),
    (BlockKind::InvertedResidual, 1, 3, 1, 6, 320),
];
const STEM_BASE: usize = 32;
const FEATURES_BASE: usize = 1280;
const SE_RATIO: f64 = 0.25;
const CHANNEL_DIVISOR: usize = 8;

/// timm's `make_divisible`: round `v` to a multiple of `divisor` (at least `divisor`), going
/// up one step when rounding would lose more than 10%.
pub fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut new_v = (((v + d / 2.0).trunc() / d).floor() * d).max(d);
    if new_v < 0.9 * v {
        new_v += d;
    }
    new_v as usize
}

/// timm's `round_channels` for a channel multiplier (a zero multiplier keeps the channels).
pub fn round_channels(channels: usize, multiplier: f64) -> usize {
    if multiplier == 0.0 {
        return channels;
    }
    make_divisible(channels as f64 * multiplier, CHANNEL_DIVISOR)
}

fn default_bn_eps() -> f64 {
    1e-3
}

fn default_bn_momentum() -> f64 {
    0.1
}

/// The two multipliers that pick an EfficientNet out of the b0 definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EfficientNetConfig {
    pub channel_multiplier: f64,
    pub depth_multiplier: f64,
    /// BatchNorm epsilon: 1e-3 for the TF ports.
    #[serde(default = "default_bn_eps")]
    pub bn_eps: f64,
    /// BatchNorm momentum of the running statistics in train mode (PyTorch's convention:
    /// `running ← (1 − momentum)·running + momentum·batch`).
    #[serde(default = "default_bn_momentum")]
    pub bn_momentum: f64,
    /// The width of the features, if the writer of the config stated it; it is derived from
    /// the channel multiplier and checked against this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_features: Option<usize>,
}

/// The kind of an EfficientNet block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `conv_dw, bn1, se, conv_pw, bn2` (timm `DepthwiseSeparableConv`, stage 0).
    DepthwiseSeparable,
    /// `conv_pw, bn1, conv_dw, bn2, se, conv_pwl, bn3` (timm `InvertedResidual`).
    InvertedResidual,
}

/// The derived shape of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpec {
    pub kind: BlockKind,
    pub in_chs: usize,
    /// Width of the depthwise convolution (`in_chs` for depthwise-separable blocks).
    pub mid_chs: usize,
    pub out_chs: usize,
    pub kernel: usize,
    pub stride: usize,
    pub se_chs: usize,
    pub has_skip: bool,
}

impl EfficientNetConfig {
    /// Multipliers of the timm `tf_efficientnet_*` models (`_ns` and `_ap` weights share the
    /// shapes of the plain ones), e.g. `tf_efficientnet_b5_ns`.
    pub fn tf_variant(name: &str) -> Option<Self> {
        let base = name.strip_prefix("tf_efficientnet_")?;
        let base = base
            .strip_suffix("_ns")
            .or_else(|| base.strip_suffix("_ap"))
            .unwrap_or(base);
        let (c, d) = match base {
            "b0" => (1.0, 1.0),
            "b1" => (1.0, 1.1),
            "b2" => (1.1, 1.2),
            "b3" => (1.2, 1.4),
            "b4" => (1.4, 1.8),
            "b5" => (1.6, 2.2),
            "b6" => (1.8, 2.6),
            "b7" => (2.0, 3.1),
            "b8" => (2.2, 3.6),
            "l2" => (4.3, 5.3),
            _ => return None,
        };
        Some(Self {
            channel_multiplier: c,
            depth_multiplier: d,
            bn_eps: 1e-3,
            bn_momentum: default_bn_momentum(),
            num_features: None,
        })
    }

    /// Output channels of the stem.
    pub fn stem_channels(&self) -> usize {
        round_channels(STEM_BASE, self.channel_multiplier)
    }

    /// Width of `forward_features`' output (`conv_head`).
    pub fn feature_channels(&self) -> usize {
        round_channels(FEATURES_BASE, self.channel_multiplier)
    }

    /// Every block's shape, stage by stage.
    pub fn stages(&self) -> Vec<Vec<BlockSpec>> {
        let mut in_chs = self.stem_channels();
        let mut stages = Vec::with_capacity(ARCH_B0.len());
        for &(kind, repeats, kernel, stride, exp, chs) in &ARCH_B0 {
            let n = (repeats as f64 * self.depth_multiplier).ceil().max(1.0) as usize;
            let out_chs = round_channels(chs, self.channel_multiplier);
            let mut blocks = Vec::with_capacity(n);
            for i in 0..n {
                let stride = if i == 0 { stride } else { 1 };
                let (mid_chs, se_chs) = match kind {
                    BlockKind::DepthwiseSeparable => (
                        in_chs,
                        (in_chs as f64 * SE_RATIO).round_ties_even() as usize,
                    ),
                    BlockKind::InvertedResidual => {
                        let mid = make_divisible(in_chs as f64 * exp as f64, CHANNEL_DIVISOR);
                        // timm: SE on mid channels with ratio 0.25 / exp_ratio.
                        (
                            mid,
                            (mid as f64 * (SE_RATIO / exp as f64)).round_ties_even() as usize,
                        )
                    }
                };
                blocks.push(BlockSpec {
                    kind,
                    in_chs,
                    mid_chs,
                    out_chs,
                    kernel,
                    stride,
                    se_chs: se_chs.max(1),
                    has_skip: stride == 1 && in_chs == out_chs,
                });
                in_chs = out_chs;
            }
            stages.push(blocks);
        }
        stages
    }

    /// Checks the multipliers and a stated `num_features`.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.channel_multiplier > 0.0 && self.channel_multiplier.is_finite()) {
            return Err(format!(
                "EfficientNet channel multiplier {} must be positive",
                self.channel_multiplier
            ));
        }
        if !(self.depth_multiplier > 0.0 && self.depth_multiplier.is_finite()) {
            return Err(format!(
                "EfficientNet depth multiplier {} must be positive",
                self.depth_multiplier
            ));
        }
        if let Some(n) = self.num_features {
            if n != self.feature_channels() {
                return Err(format!(
                    "EfficientNet num_features {n} does not match the channel multiplier {} \
                     (which gives {})",
                    self.channel_multiplier,
                    self.feature_channels()
                ));
            }
        }
        Ok(())
    }
}

/// Padding `(before, after)` of TF "same" for one axis.
pub fn same_padding(size: usize, kernel: usize, stride: usize) -> (usize, usize) {
    if stride == 1 {
        // timm's static padding for stride-1 convolutions.
        let p = (kernel - 1) / 2;
        return (p, kernel - 1 - p);
    }
    let out = size.div_ceil(stride);
    let total = ((out.saturating_sub(1)) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2)
}

/// Zero-pads a `[b, c, h, w]` tensor for a TF "same" convolution.
pub fn pad_same(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (top, bottom) = same_padding(h, kernel, stride);
    let (left, right) = same_padding(w, kernel, stride);
    x.pad_with_zeros(2, top, bottom)?
        .pad_with_zeros(3, left, right)
}

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

/// How a [`ConvBn`] convolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConvKind {
    /// 1×1, stride 1, a matrix product.
    Pointwise,
    /// One `k×k` filter per channel.
    Depthwise { kernel: usize, stride: usize },
    /// A dense `k×k` convolution (the stem).
    Dense { kernel: usize, stride: usize },
}

/// A bias-free convolution, its BatchNorm, and optionally SiLU.
///
/// The BN's scale is folded into the convolution's weights and its shift becomes a bias:
/// once at construction when nothing trains, on every forward otherwise (so that the conv
/// weight and the BN weight and bias all get their gradients).
#[derive(Debug, Clone)]
struct ConvBn {
    weight: Tensor,
    bn: BatchNorm,
    kind: ConvKind,
    act: bool,
    folded: Option<(Tensor, Tensor)>,
    mode: Arc<BnMode>,
}

/// The BatchNorm mode of one network, shared by its layers.
#[derive(Debug, Default)]
struct BnMode {
    /// Batch statistics (PyTorch's train mode).
    training: AtomicBool,
    /// Train mode was on at some point: the running statistics may have moved, so the
    /// BN folded at construction is stale.
    stats_moved: AtomicBool,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        in_chs: usize,
        out_chs: usize,
        kind: ConvKind,
        act: bool,
        (cfg, mode): (&EfficientNetConfig, &Arc<BnMode>),
        conv: &str,
        bn: &str,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let weight = match kind {
            ConvKind::Pointwise => vb.get((out_chs, in_chs, 1, 1), &format!("{conv}.weight"))?,
            ConvKind::Depthwise { kernel, .. } => {
                vb.get((out_chs, 1, kernel, kernel), &format!("{conv}.weight"))?
            }
            ConvKind::Dense { kernel, .. } => {
                vb.get((out_chs, in_chs, kernel, kernel), &format!("{conv}.weight"))?
            }
        };
        let mut this = Self {
            weight,
            bn: BatchNorm::new(out_chs, cfg.bn_eps, cfg.bn_momentum, vb.pp(bn))?,
            kind,
            act,
            folded: None,
            mode: mode.clone(),
        };
        let frozen = ![&this.weight, &this.bn.weight, &this.bn.bias]
            .iter()
            .any(|t| t.track_op());
        if frozen {
            this.folded = Some(this.fold()?);
        }
        Ok(this)
    }

    /// The BN-scaled weights (`[out, in]`, `[out, k·k]` or `[out, in, k, k]`) and the shift.
    fn fold(&self) -> Result<(Tensor, Tensor)> {
        let (scale, shift) = self.bn.scale_shift()?;
        let o = scale.dim(0)?;
        let w = match self.kind {
            ConvKind::Pointwise => self
                .weight
                .flatten_from(1)?
                .broadcast_mul(&scale.unsqueeze(1)?)?,
            ConvKind::Depthwise { kernel, .. } => self
                .weight
                .reshape((o, kernel * kernel))?
                .broadcast_mul(&scale.unsqueeze(1)?)?,
            ConvKind::Dense { .. } => self.weight.broadcast_mul(&scale.reshape((o, 1, 1, 1))?)?,
        };
        Ok((w, shift))
    }

    fn folded(&self) -> Result<(Tensor, Tensor)> {
        match &self.folded {
            Some(f) if !self.mode.stats_moved.load(Ordering::Relaxed) => Ok(f.clone()),
            _ => self.fold(),
        }
    }

    /// Train mode: the convolution with the unscaled weights, BN with batch statistics,
    /// the residual, SiLU.
    fn forward_train(
        &self,
        x: &Tensor,
        gate: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, c, h, wd) = x.dims4()?;
        let out_chs = self.weight.dim(0)?;
        let y = match self.kind {
            ConvKind::Pointwise => {
                let xr = x.reshape((b, c, h * wd))?;
                let xr = match gate {
                    Some(g) => xr.broadcast_mul(&g.unsqueeze(2)?)?,
                    None => xr,
                };
                conv1x1(&self.weight.flatten_from(1)?, &xr)?.reshape((b, out_chs, h, wd))?
            }
            ConvKind::Depthwise { kernel, stride } => depthwise_conv2d_same(
                x,
                &self.weight.reshape((out_chs, kernel * kernel))?,
                kernel,
                stride,
            )?,
            ConvKind::Dense { kernel, stride } => {
                pad_same(x, kernel, stride)?.conv2d(&self.weight, 0, stride, 1, 1)?
            }
        };
        if gate.is_some() && self.kind != ConvKind::Pointwise {
            candle_core::bail!("only 1×1 convolutions take a gate")
        }
        let y = self.bn.forward_train(&y)?;
        let y = match residual {
            Some(r) => (y + r)?,
            None => y,
        };
        if self.act {
            y.silu()
        } else {
            Ok(y)
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, None)
    }

    /// The convolution with, for 1×1 convolutions, a per-image channel gate `[b, in]`
    /// applied to the input (squeeze-excitation) and a residual added to the output.
    fn forward_with(
        &self,
        x: &Tensor,
        gate: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.mode.training.load(Ordering::Relaxed) {
            return self.forward_train(x, gate, residual);
        }
        let (w, shift) = self.folded()?;
        let out_chs = shift.dim(0)?;
        let (b, c, h, wd) = x.dims4()?;
        match self.kind {
            ConvKind::Pointwise => {
                let xr = x.reshape((b, c, h * wd))?;
                // Training takes the product with its own backward pass on gated activations.
                let tracking = [x, &w].into_iter().chain(gate).any(|t| t.track_op());
                let y = match gate {
                    None => conv1x1(&w, &xr)?,
                    Some(g) if tracking => conv1x1(&w, &xr.broadcast_mul(&g.unsqueeze(2)?)?)?,
                    // Gate the weights when they are smaller than the activations.
                    Some(g) if out_chs * c <= c * h * wd => w
                        .unsqueeze(0)?
                        .broadcast_mul(&g.unsqueeze(1)?)?
                        .matmul(&xr)?,
                    Some(g) => conv1x1(&w, &xr.broadcast_mul(&g.unsqueeze(2)?)?)?,
                };
                let residual = match residual {
                    Some(r) => Some(r.reshape((b, out_chs, h * wd))?),
                    None => None,
                };
                self.epilogue(y, &shift, residual.as_ref())?
                    .reshape((b, out_chs, h, wd))
            }
            ConvKind::Depthwise { kernel, stride } => {
                if gate.is_some() || residual.is_some() {
                    candle_core::bail!("depthwise convolutions take no gate or residual")
                }
                if fast_cpu(&[x, &w, &shift]) {
                    let (top, bottom) = same_padding(h, kernel, stride);
                    let (left, right) = same_padding(wd, kernel, stride);
                    let op = DepthwiseCpu {
                        kernel,
                        stride,
                        pad: [top, bottom, left, right],
                        act: self.act,
                    };
                    return x.contiguous()?.apply_op3_no_bwd(&w, &shift, &op);
                }
                let y = depthwise_conv2d_same(x, &w, kernel, stride)?;
                self.epilogue(y, &shift, None)
            }
            ConvKind::Dense { kernel, stride } => {
                if gate.is_some() || residual.is_some() {
                    candle_core::bail!("the stem convolution takes no gate or residual")
                }
                let y = pad_same(x, kernel, stride)?.conv2d(&w, 0, stride, 1, 1)?;
                self.epilogue(y, &shift, None)
            }
        }
    }

    /// `act(y + shift[c] (+ residual))` over channel dim 1: in place by the CPU kernels for
    /// `f32` without gradients, composed otherwise.
    fn epilogue(&self, y: Tensor, shift: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let op = BiasActCpu { act: self.act };
        match residual {
            None if fast_cpu(&[&y, shift]) && y.is_contiguous() => {
                y.inplace_op2(shift, &op)?;
                return Ok(y);
            }
            Some(r) if fast_cpu(&[&y, shift, r]) && y.is_contiguous() => {
                y.inplace_op3(shift, &r.contiguous()?, &op)?;
                return Ok(y);
            }
            _ => {}
        }
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if cpu_f32(&y) && cpu_f32(shift) && residual.is_none_or(cpu_f32) && shift.rank() == 1 {
            let op = EpilogueTrain { act: self.act };
            return match residual {
                None => y.apply_op2(shift, op),
                Some(r) => y.apply_op3(shift, r, op),
            };
        }
        let mut dims = vec![1usize; y.rank()];
        dims[1] = shift.dim(0)?;
        let mut y = y.broadcast_add(&shift.reshape(dims)?)?;
        if let Some(r) = residual {
            y = (y + r)?;
        }
        if self.act {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

/// Whether the direct CPU kernels apply: every tensor `f32` on the CPU, none tracking
/// gradients.
fn fast_cpu(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32 && !t.track_op())
}

/// `e^x` for `x` in f32 (Cephes' `expf`: about 1 ulp), written without branches or library
/// calls so that loops over it vectorise.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Round to nearest by adding and subtracting 1.5 · 2^23.
    const ROUND: f32 = 12_582_912.0;
    // Comparisons rather than `clamp` (whose NaN rules keep loops from vectorising); a NaN
    // passes through both.
    let x = if x > 88.0 { 88.0 } else { x };
    let x = if x < -87.3 { -87.3 } else { x };
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    // The rounded `n` sits in the low mantissa bits of `shifted`: read it from there rather
    // than with `as i32`, whose saturating conversion does not vectorise.
    let ni = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    p * f32::from_bits(((ni + 127) as u32) << 23)
}

#[inline(always)]
fn silu(v: f32) -> f32 {
    v / (1.0 + exp_f32(-v))
}

/// Whether the CPU has AVX2 and FMA: the kernels then run copies compiled for them
/// (8-wide vectors, fused multiply-adds).
fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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
fn bias_act_plane(p: &mut [f32], sh: f32, act: bool) {
    if act {
        p.iter_mut().for_each(|v| *v = silu(*v + sh));
    } else if sh != 0.0 {
        p.iter_mut().for_each(|v| *v += sh);
    }
}

/// In place `y = act(y + shift[c] + residual)` over `[b, c, ...]`, parallel over planes.
struct BiasActCpu {
    act: bool,
}

impl BiasActCpu {
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

impl InplaceOp2 for BiasActCpu {
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

impl InplaceOp3 for BiasActCpu {
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

/// `silu'(z) = s + z·s·(1 − s)` for `s = sigmoid(z)`.
#[inline(always)]
fn silu_grad(z: f32) -> f32 {
    let s = 1.0 / (1.0 + exp_f32(-z));
    s + z * s * (1.0 - s)
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
        BiasActCpu { act: self.act }.run(&mut st, &layout, shift, res)?;
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

/// Depthwise convolution without padding: `x` `[b, c, h, w]` (already padded), `weight`
/// `[c, k·k]`, stride `s`; output `[b, c, (h − k)/s + 1, (w − k)/s + 1]`. Differentiable (a
/// sum of `k²` shifted views scaled per channel); `f32` on the CPU without gradients runs
/// the direct kernel.
pub fn depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    kernel: usize,
    stride: usize,
) -> Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    let (wc, kk) = weight.dims2()?;
    if wc != c || kk != kernel * kernel {
        candle_core::bail!(
            "depthwise weight {:?} does not fit {c} channels and kernel {kernel}",
            weight.dims()
        )
    }
    if h < kernel || w < kernel || stride == 0 {
        candle_core::bail!("depthwise input {h}x{w} is smaller than the kernel {kernel}")
    }
    if fast_cpu(&[x, weight]) {
        let zeros = Tensor::zeros(c, DType::F32, &Device::Cpu)?;
        let op = DepthwiseCpu {
            kernel,
            stride,
            pad: [0; 4],
            act: false,
        };
        x.contiguous()?
            .apply_op3_no_bwd(&weight.contiguous()?, &zeros, &op)
    } else {
        depthwise_conv2d_composed(x, weight, kernel, stride)
    }
}

/// The differentiable depthwise convolution: `Σ_taps view(x) · weight[:, tap]`.
pub fn depthwise_conv2d_composed(
    x: &Tensor,
    weight: &Tensor,
    kernel: usize,
    stride: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let ho = (h - kernel) / stride + 1;
    let wo = (w - kernel) / stride + 1;
    // For stride s, split the input into s×s phases so every tap is a plain window.
    let phases: Vec<Tensor> = if stride == 1 {
        vec![x.clone()]
    } else {
        let hp = h.div_ceil(stride) * stride;
        let wp = w.div_ceil(stride) * stride;
        let xp = x
            .pad_with_zeros(2, 0, hp - h)?
            .pad_with_zeros(3, 0, wp - w)?
            .reshape((b, c, hp / stride, stride, wp / stride, stride))?;
        let mut v = Vec::with_capacity(stride * stride);
        for py in 0..stride {
            for px in 0..stride {
                v.push(xp.narrow(3, py, 1)?.narrow(5, px, 1)?.reshape((
                    b,
                    c,
                    hp / stride,
                    wp / stride,
                ))?);
            }
        }
        v
    };
    let mut acc: Option<Tensor> = None;
    for dy in 0..kernel {
        for dx in 0..kernel {
            let phase = &phases[(dy % stride) * stride + dx % stride];
            let view = phase
                .narrow(2, dy / stride, ho)?
                .narrow(3, dx / stride, wo)?;
            let tap = weight
                .narrow(1, dy * kernel + dx, 1)?
                .reshape((1, c, 1, 1))?;
            let term = view.broadcast_mul(&tap)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    acc.ok_or_else(|| candle_core::Error::Msg("depthwise kernel of size 0".into()))
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
        use rayon::prelude::*;
        let x = contiguous_f32(s1, l1, "depthwise-conv2d")?;
        let wt = contiguous_f32(s2, l2, "depthwise-conv2d")?;
        let shift = contiguous_f32(s3, l3, "depthwise-conv2d")?;
        let (b, c, h, w) = l1.shape().dims4()?;
        let (k, s) = (self.kernel, self.stride);
        let [pt, pb, pl, pr] = self.pad;
        if h + pt + pb < k || w + pl + pr < k || s == 0 {
            candle_core::bail!("depthwise-conv2d: input {h}x{w} smaller than kernel {k}")
        }
        if wt.len() != c * k * k || shift.len() != c {
            candle_core::bail!("depthwise-conv2d: weights do not fit {c} channels")
        }
        let g = DwGeom {
            h,
            w,
            ho: (h + pt + pb - k) / s + 1,
            wo: (w + pl + pr - k) / s + 1,
            k,
            s,
            pt,
            pl,
        };
        let act = self.act;
        let mut out = vec![0f32; b * c * g.ho * g.wo];
        out.par_chunks_mut(g.ho * g.wo)
            .enumerate()
            .for_each(|(plane, o)| {
                let ch = plane % c;
                let src = &x[plane * h * w..(plane + 1) * h * w];
                let taps = &wt[ch * k * k..(ch + 1) * k * k];
                #[cfg(target_arch = "x86_64")]
                if avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    unsafe { dw_plane_avx2(g, src, taps, o, shift[ch], act) };
                    return;
                }
                dw_plane(g, src, taps, o, shift[ch], act);
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, g.ho, g.wo))))
    }
}

/// A depthwise convolution with TF "same" padding and a backward pass: `x` `[b, c, h, w]`,
/// `weight` `[c, k·k]`. On the CPU in `f32` it runs direct kernels in both directions
/// (forward, input gradient, weight gradient); elsewhere the composed, differentiable form.
pub fn depthwise_conv2d_same(
    x: &Tensor,
    weight: &Tensor,
    kernel: usize,
    stride: usize,
) -> Result<Tensor> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(cpu_f32(x) && cpu_f32(weight)) {
        return depthwise_conv2d_composed(&pad_same(x, kernel, stride)?, weight, kernel, stride);
    }
    let (_, c, h, w) = x.dims4()?;
    let (wc, kk) = weight.dims2()?;
    if wc != c || kk != kernel * kernel || stride == 0 {
        candle_core::bail!(
            "depthwise weight {:?} does not fit {c} channels and kernel {kernel}",
            weight.dims()
        )
    }
    let (top, bottom) = same_padding(h, kernel, stride);
    let (left, right) = same_padding(w, kernel, stride);
    let g = DwGeom {
        h,
        w,
        ho: (h + top + bottom - kernel) / stride + 1,
        wo: (w + left + right - kernel) / stride + 1,
        k: kernel,
        s: stride,
        pt: top,
        pl: left,
    };
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, DepthwiseTrain { g })
}

/// [`depthwise_conv2d_same`]'s CPU op.
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
        use rayon::prelude::*;
        let x = contiguous_f32(s1, l1, self.name())?;
        let wt = contiguous_f32(s2, l2, self.name())?;
        let (b, c, h, w) = l1.shape().dims4()?;
        let g = self.g;
        let kk = g.k * g.k;
        let mut out = vec![0f32; b * c * g.ho * g.wo];
        out.par_chunks_mut(g.ho * g.wo)
            .enumerate()
            .for_each(|(plane, o)| {
                let ch = plane % c;
                let src = &x[plane * h * w..(plane + 1) * h * w];
                let taps = &wt[ch * kk..(ch + 1) * kk];
                #[cfg(target_arch = "x86_64")]
                if avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    unsafe { dw_plane_avx2(g, src, taps, o, 0.0, false) };
                    return;
                }
                dw_plane(g, src, taps, o, 0.0, false);
            });
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
        let gy = contiguous_f32(s1, l1, self.name())?;
        let wt = contiguous_f32(s2, l2, self.name())?;
        let (b, c, _, _) = l1.shape().dims4()?;
        let DwGeom {
            h,
            w,
            ho,
            wo,
            k,
            s,
            pt,
            pl,
        } = self.g;
        let mut out = vec![0f32; b * c * h * w];
        #[cfg(target_arch = "x86_64")]
        let fast = avx2_fma() && k <= 8 && pt < k && pl < k;
        out.par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(plane, gx)| {
                let ch = plane % c;
                let g = &gy[plane * ho * wo..(plane + 1) * ho * wo];
                let taps = &wt[ch * k * k..(ch + 1) * k * k];
                #[cfg(target_arch = "x86_64")]
                if fast {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    unsafe { dw_grad_input_avx2(self.g, g, taps, gx) };
                    return;
                }
                for dy in 0..k {
                    let (oy0, oy1) = valid_outputs(ho, s, dy as isize - pt as isize, h);
                    for dx in 0..k {
                        let t = taps[dy * k + dx];
                        let off = dx as isize - pl as isize;
                        let (ox0, ox1) = valid_outputs(wo, s, off, w);
                        for oy in oy0..oy1 {
                            let iy = oy * s + dy - pt;
                            let grow = &g[oy * wo..(oy + 1) * wo];
                            let xrow = &mut gx[iy * w..(iy + 1) * w];
                            for (ox, gv) in grow.iter().enumerate().take(ox1).skip(ox0) {
                                let ix = (ox * s) as isize + off;
                                xrow[ix as usize] += t * gv;
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, h, w))))
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
        let x = contiguous_f32(s1, l1, self.name())?;
        let gy = contiguous_f32(s2, l2, self.name())?;
        let (b, c, _, _) = l1.shape().dims4()?;
        let DwGeom {
            h,
            w,
            ho,
            wo,
            k,
            s,
            pt,
            pl,
        } = self.g;
        let mut out = vec![0f32; c * k * k];
        #[cfg(target_arch = "x86_64")]
        let fast = avx2_fma();
        out.par_chunks_mut(k * k).enumerate().for_each(|(ch, gw)| {
            for bi in 0..b {
                let plane = bi * c + ch;
                let xs = &x[plane * h * w..(plane + 1) * h * w];
                let g = &gy[plane * ho * wo..(plane + 1) * ho * wo];
                #[cfg(target_arch = "x86_64")]
                if fast {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    unsafe { dw_grad_weight_avx2(self.g, xs, g, gw) };
                    continue;
                }
                for dy in 0..k {
                    let (oy0, oy1) = valid_outputs(ho, s, dy as isize - pt as isize, h);
                    for dx in 0..k {
                        let off = dx as isize - pl as isize;
                        let (ox0, ox1) = valid_outputs(wo, s, off, w);
                        let mut acc = 0f32;
                        for oy in oy0..oy1 {
                            let iy = oy * s + dy - pt;
                            let grow = &g[oy * wo..(oy + 1) * wo];
                            let xrow = &xs[iy * w..(iy + 1) * w];
                            for ox in ox0..ox1 {
                                acc += grow[ox] * xrow[((ox * s) as isize + off) as usize];
                            }
                        }
                        gw[dy * k + dx] += acc;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((c, k * k))))
    }
}

/// Squeeze-excitation's gate `sigmoid(expand(silu(reduce(mean_hw(x)))))`, `[b, c]`; the
/// block multiplies it into the next 1×1 convolution.
#[derive(Debug, Clone)]
struct SqueezeExcite {
    reduce: Linear,
    expand: Linear,
}

impl SqueezeExcite {
    fn new(chs: usize, rd: usize, vb: VarBuilder) -> Result<Self> {
        let reduce = Linear::new(
            vb.get((rd, chs, 1, 1), "conv_reduce.weight")?
                .reshape((rd, chs))?,
            Some(vb.get(rd, "conv_reduce.bias")?),
        );
        let expand = Linear::new(
            vb.get((chs, rd, 1, 1), "conv_expand.weight")?
                .reshape((chs, rd))?,
            Some(vb.get(chs, "conv_expand.bias")?),
        );
        Ok(Self { reduce, expand })
    }

    fn gate(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.flatten_from(2)?.mean(D::Minus1)?;
        let s = self.reduce.forward(&s)?.silu()?;
        crate::nn::ops::sigmoid(&self.expand.forward(&s)?)
    }
}

/// One block (depthwise-separable or inverted residual).
#[derive(Debug, Clone)]
pub struct Block {
    spec: BlockSpec,
    conv_pw: Option<ConvBn>,
    conv_dw: ConvBn,
    se: SqueezeExcite,
    conv_out: ConvBn,
}

impl Block {
    fn new(
        spec: &BlockSpec,
        bn: (&EfficientNetConfig, &Arc<BnMode>),
        vb: VarBuilder,
    ) -> Result<Self> {
        let dw = ConvKind::Depthwise {
            kernel: spec.kernel,
            stride: spec.stride,
        };
        let pw = ConvKind::Pointwise;
        let (conv_pw, conv_dw, conv_out) = match spec.kind {
            BlockKind::DepthwiseSeparable => (
                None,
                ConvBn::new(
                    spec.in_chs,
                    spec.in_chs,
                    dw,
                    true,
                    bn,
                    "conv_dw",
                    "bn1",
                    &vb,
                )?,
                ConvBn::new(
                    spec.in_chs,
                    spec.out_chs,
                    pw,
                    false,
                    bn,
                    "conv_pw",
                    "bn2",
                    &vb,
                )?,
            ),
            BlockKind::InvertedResidual => (
                Some(ConvBn::new(
                    spec.in_chs,
                    spec.mid_chs,
                    pw,
                    true,
                    bn,
                    "conv_pw",
                    "bn1",
                    &vb,
                )?),
                ConvBn::new(
                    spec.mid_chs,
                    spec.mid_chs,
                    dw,
                    true,
                    bn,
                    "conv_dw",
                    "bn2",
                    &vb,
                )?,
                ConvBn::new(
                    spec.mid_chs,
                    spec.out_chs,
                    pw,
                    false,
                    bn,
                    "conv_pwl",
                    "bn3",
                    &vb,
                )?,
            ),
        };
        Ok(Self {
            spec: *spec,
            conv_pw,
            conv_dw,
            se: SqueezeExcite::new(spec.mid_chs, spec.se_chs, vb.pp("se"))?,
            conv_out,
        })
    }

    pub fn spec(&self) -> &BlockSpec {
        &self.spec
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.conv_pw {
            Some(pw) => pw.forward(x)?,
            None => x.clone(),
        };
        let y = self.conv_dw.forward(&y)?;
        let gate = self.se.gate(&y)?;
        let residual = self.spec.has_skip.then_some(x);
        self.conv_out.forward_with(&y, Some(&gate), residual)
    }
}

/// An EfficientNet backbone up to `forward_features` (`conv_stem`, `bn1`, `blocks.S.B`,
/// `conv_head`, `bn2`); the classifier is not built.
#[derive(Debug, Clone)]
pub struct EfficientNet {
    stem: ConvBn,
    stages: Vec<Vec<Block>>,
    head: ConvBn,
    cfg: EfficientNetConfig,
    mode: Arc<BnMode>,
}

impl EfficientNet {
    pub fn new(cfg: &EfficientNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let mode = Arc::new(BnMode::default());
        let bn = (cfg, &mode);
        let stem = ConvBn::new(
            3,
            cfg.stem_channels(),
            ConvKind::Dense {
                kernel: 3,
                stride: 2,
            },
            true,
            bn,
            "conv_stem",
            "bn1",
            &vb,
        )?;
        let vbb = vb.pp("blocks");
        let mut last = cfg.stem_channels();
        let stages = cfg
            .stages()
            .iter()
            .enumerate()
            .map(|(si, specs)| {
                specs
                    .iter()
                    .enumerate()
                    .map(|(bi, spec)| {
                        last = spec.out_chs;
                        Block::new(spec, bn, vbb.pp(si).pp(bi))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let head = ConvBn::new(
            last,
            cfg.feature_channels(),
            ConvKind::Pointwise,
            true,
            bn,
            "conv_head",
            "bn2",
            &vb,
        )?;
        Ok(Self {
            stem,
            stages,
            head,
            cfg: cfg.clone(),
            mode,
        })
    }

    /// Switches every BatchNorm between inference mode (running statistics, the default)
    /// and PyTorch's train mode (batch statistics; each forward moves the running
    /// statistics). Clones of this network share the setting.
    pub fn set_batch_norm_training(&self, on: bool) {
        if on {
            self.mode.stats_moved.store(true, Ordering::Relaxed);
        }
        self.mode.training.store(on, Ordering::Relaxed);
    }

    /// Whether BatchNorm uses batch statistics.
    pub fn batch_norm_training(&self) -> bool {
        self.mode.training.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> &EfficientNetConfig {
        &self.cfg
    }

    /// Width of the features.
    pub fn num_features(&self) -> usize {
        self.cfg.feature_channels()
    }

    pub fn num_stages(&self) -> usize {
        self.stages.len()
    }

    pub fn stage(&self, i: usize) -> Option<&[Block]> {
        self.stages.get(i).map(|s| s.as_slice())
    }

    /// `conv_stem`, `bn1`, SiLU.
    pub fn forward_stem(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = x.dims4()?;
        if c != 3 {
            candle_core::bail!("EfficientNet expects 3 input channels, got {c}")
        }
        self.stem.forward(&x.to_dtype(self.stem.weight.dtype())?)
    }

    /// The blocks of stage `i` (timm `blocks[i]`).
    pub fn forward_stage(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        let stage = self
            .stages
            .get(i)
            .ok_or_else(|| candle_core::Error::Msg(format!("no stage {i}")))?;
        let mut x = x.clone();
        for b in stage {
            x = b.forward(&x)?;
        }
        Ok(x)
    }

    /// `conv_head`, `bn2`, SiLU.
    pub fn forward_conv_head(&self, x: &Tensor) -> Result<Tensor> {
        self.head.forward(x)
    }

    /// timm's `forward_features`: `[b, 3, h, w]` to `[b, num_features, ⌈h/32⌉, ⌈w/32⌉]`.
    pub fn forward_features(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.forward_stem(x)?;
        for i in 0..self.stages.len() {
            x = self.forward_stage(i, &x)?;
        }
        self.forward_conv_head(&x)
    }
}

impl Module for EfficientNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_features(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn rounding_matches_timm() {
        // b5: stem 48, head 2048, first stages 24 and 40 (see the BriVL manifest).
        let b5 = EfficientNetConfig::tf_variant("tf_efficientnet_b5_ns").unwrap();
        assert_eq!(b5.stem_channels(), 48);
        assert_eq!(b5.feature_channels(), 2048);
        let st = b5.stages();
        let depths: Vec<usize> = st.iter().map(|s| s.len()).collect();
        assert_eq!(depths, vec![3, 5, 5, 7, 7, 9, 3]);
        assert_eq!(st[0][0].out_chs, 24);
        assert_eq!(st[0][0].se_chs, 12);
        assert_eq!(st[1][0].mid_chs, 144);
        assert_eq!(st[6][2].out_chs, 512);
        // 32 * 0.3 = 9.6 rounds to 8 < 0.9 * 9.6, so it goes up to 16.
        assert_eq!(round_channels(32, 0.3), 16);
        assert_eq!(round_channels(32, 0.125), 8);
        assert!(EfficientNetConfig::tf_variant("efficientnet_b5").is_none());
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64) - want).abs() / want);
            x += 0.001_3;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert!(silu(-200.0).abs() < 1e-30);
        assert_eq!(silu(200.0), 200.0);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
    }

    #[test]
    fn same_padding_matches_tf() {
        // 67 with k3 s2: out 34, total pad (33*2 + 3) - 67 = 2 -> (1, 1).
        assert_eq!(same_padding(67, 3, 2), (1, 1));
        // 90 with k3 s2: out 45, total (44*2+3) - 90 = 1 -> (0, 1).
        assert_eq!(same_padding(90, 3, 2), (0, 1));
        assert_eq!(same_padding(96, 5, 2), (1, 2));
        assert_eq!(same_padding(10, 5, 1), (2, 2));
    }

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
}

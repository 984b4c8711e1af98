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
//! padded input (differentiable, any device and dtype). In `f32` on the CPU the crate's
//! kernels (`nn::kernels`) take over: at inference the depthwise convolution with its
//! padding, BN shift and SiLU fused, and the BN shift plus SiLU (plus residual) applied in
//! place after the 1×1 convolutions; in training the depthwise and 1×1 convolutions and that
//! epilogue as ops with their own backward passes.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use std::sync::Arc;

use candle_nn::{Linear, VarBuilder};

pub use crate::nn::batch_norm::BatchNorm;
use crate::nn::batch_norm::{BnMode, FoldedConvBn};
use crate::nn::kernels::gemm::conv1x1;
use crate::nn::kernels::{cpu_f32, cpu_f32_no_grad, depthwise, epilogue};
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

/// TF "same" padding `[top, bottom, left, right]` of an `h × w` plane.
fn same_pads(h: usize, w: usize, kernel: usize, stride: usize) -> [usize; 4] {
    let (top, bottom) = same_padding(h, kernel, stride);
    let (left, right) = same_padding(w, kernel, stride);
    [top, bottom, left, right]
}

/// Zero-pads a `[b, c, h, w]` tensor for a TF "same" convolution.
pub fn pad_same(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (top, bottom) = same_padding(h, kernel, stride);
    let (left, right) = same_padding(w, kernel, stride);
    x.pad_with_zeros(2, top, bottom)?
        .pad_with_zeros(3, left, right)
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
    conv: FoldedConvBn,
    kind: ConvKind,
    act: bool,
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
        let bn = BatchNorm::new(out_chs, cfg.bn_eps, cfg.bn_momentum, vb.pp(bn))?;
        Ok(Self {
            conv: FoldedConvBn::new(weight, bn, mode)?,
            kind,
            act,
        })
    }

    /// The BN-scaled weights (`[out, in]`, `[out, k·k]` or `[out, in, k, k]`) and the shift.
    fn folded(&self) -> Result<(Tensor, Tensor)> {
        let (w, shift) = self.conv.folded()?;
        let o = w.dim(0)?;
        let w = match self.kind {
            ConvKind::Pointwise => w.flatten_from(1)?,
            ConvKind::Depthwise { kernel, .. } => w.reshape((o, kernel * kernel))?,
            ConvKind::Dense { .. } => w,
        };
        Ok((w, shift))
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
        let weight = self.conv.weight();
        let out_chs = weight.dim(0)?;
        let y = match self.kind {
            ConvKind::Pointwise => {
                let xr = x.reshape((b, c, h * wd))?;
                let xr = match gate {
                    Some(g) => xr.broadcast_mul(&g.unsqueeze(2)?)?,
                    None => xr,
                };
                conv1x1(&weight.flatten_from(1)?, &xr)?.reshape((b, out_chs, h, wd))?
            }
            ConvKind::Depthwise { kernel, stride } => depthwise_conv2d_same(
                x,
                &weight.reshape((out_chs, kernel * kernel))?,
                kernel,
                stride,
            )?,
            ConvKind::Dense { kernel, stride } => {
                pad_same(x, kernel, stride)?.conv2d(weight, 0, stride, 1, 1)?
            }
        };
        if gate.is_some() && self.kind != ConvKind::Pointwise {
            candle_core::bail!("only 1×1 convolutions take a gate")
        }
        let y = self.conv.bn().forward_train(&y)?;
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
        if self.conv.training() {
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
                if cpu_f32_no_grad(&[x, &w, &shift]) {
                    let pad = same_pads(h, wd, kernel, stride);
                    return depthwise::conv2d_shift_act(
                        x,
                        &w,
                        &shift,
                        (kernel, stride),
                        pad,
                        self.act,
                    );
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

    /// `act(y + shift[c] (+ residual))` over channel dim 1: by the CPU kernels in `f32` (in
    /// place without gradients), composed otherwise.
    fn epilogue(&self, y: Tensor, shift: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        if let Some(out) = epilogue::shift_act(&y, shift, residual, self.act)? {
            return Ok(out);
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
    if cpu_f32_no_grad(&[x, weight]) {
        let zeros = Tensor::zeros(c, DType::F32, &Device::Cpu)?;
        let w = weight.contiguous()?;
        depthwise::conv2d_shift_act(x, &w, &zeros, (kernel, stride), [0; 4], false)
    } else {
        depthwise_conv2d_composed(x, weight, kernel, stride)
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
    if !cpu_f32(&[x, weight]) {
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
    let pad = same_pads(h, w, kernel, stride);
    depthwise::conv2d_train(x, weight, (kernel, stride), pad)
}

/// The differentiable depthwise convolution, `Σ_taps view(x) · weight[:, tap]` on the
/// unpadded `x`: any device and dtype, and the reference of the kernels' tests.
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
        if vb.device().is_cpu() && vb.dtype() == DType::BF16 {
            candle_core::bail!(
                "EfficientNet (BriVL's image tower) cannot run in bf16 on the CPU: candle's \
                 CPU convolutions have no bf16 product. Use f32 or f16 on the CPU, or bf16 on \
                 CUDA or Metal"
            )
        }
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
        self.mode.set_training(on);
    }

    /// Whether BatchNorm uses batch statistics.
    pub fn batch_norm_training(&self) -> bool {
        self.mode.training()
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
        self.stem
            .forward(&x.to_dtype(self.stem.conv.weight().dtype())?)
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
    fn same_padding_matches_tf() {
        // 67 with k3 s2: out 34, total pad (33*2 + 3) - 67 = 2 -> (1, 1).
        assert_eq!(same_padding(67, 3, 2), (1, 1));
        // 90 with k3 s2: out 45, total (44*2+3) - 90 = 1 -> (0, 1).
        assert_eq!(same_padding(90, 3, 2), (0, 1));
        assert_eq!(same_padding(96, 5, 2), (1, 2));
        assert_eq!(same_padding(10, 5, 1), (2, 2));
    }
}

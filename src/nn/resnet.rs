//! OpenAI CLIP's modified ResNet, the image tower of Chinese-CLIP RN50 (`cn_clip`'s
//! `ModifiedResNet`), with its parameter names.
//!
//! What differs from torchvision's ResNet, and what this port reproduces:
//!
//! * **A three-convolution stem**: 3×3 convolutions `3 → w/2` (stride 2), `w/2 → w/2` and
//!   `w/2 → w`, each with BatchNorm and ReLU, then a 2×2 average pool (no max pool).
//! * **Anti-aliased strides.** Every convolution has stride 1 (except the stem's first). A
//!   [`Bottleneck`] of stride `s > 1` average-pools `s×s` after its 3×3 convolution, and its
//!   shortcut average-pools `s×s` before the 1×1 convolution (`downsample.0`) and its BN
//!   (`downsample.1`). The shortcut exists when `s > 1` or the width changes.
//! * **Attention pooling** ([`AttentionPool2d`]): the `h·w` positions of the last stage,
//!   preceded by their mean, plus `positional_embedding`, go through one multi-head
//!   attention with separate `q_proj`, `k_proj`, `v_proj` and the output projection `c_proj`
//!   (to `output_dim`). cn_clip queries with every token and keeps token 0; the other
//!   queries never reach the output, so only token 0 is queried here (same values, same
//!   gradients).
//!
//! Names are those of cn_clip's state dict under `visual.` (`conv1.weight`,
//! `bn1.running_var`, `layer1.0.conv2.weight`, `layer2.0.downsample.0.weight`,
//! `layer2.0.downsample.1.bias`, `attnpool.positional_embedding`, `attnpool.c_proj.bias`, …):
//! pass `vb.pp("visual")` for a whole-CLIP state dict. The BN buffers
//! `num_batches_tracked` are not read ([`UNUSED_KEYS`]).
//!
//! # BatchNorm
//!
//! By default BatchNorm uses the running statistics (PyTorch's eval mode), BN eps 1e-5:
//!
//! * with nothing tracking gradients, each BN is folded once into its convolution (scaled
//!   weights, the shift as a bias). On the CPU in `f32` the 1×1 convolutions run as matrix
//!   products, the 3×3 ones as an im2col matrix times the weights (faster than candle's CPU
//!   convolution, in both directions), and the shift, residual and ReLU are applied in
//!   place;
//! * with trainable variables the fold is recomputed on every forward from the convolution
//!   weight and the BN weight and bias, so all three get their gradients; the running
//!   statistics stay constants. This is cn_clip's `--freeze_vision` behaviour (BN in eval
//!   mode) and the usual choice when fine-tuning with small batches.
//!
//! [`ModifiedResNet::set_batch_norm_training`] switches to PyTorch's train mode (cn_clip's
//! `model.train()` without `--freeze_vision`): batch statistics, and the running statistics
//! move by `bn_momentum` (0.1) on every forward, in place.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::attention::MultiHeadAttention;
use super::batch_norm::{BatchNorm, BnMode, FoldedConvBn};
use super::conv::{avg_pool, conv3x3};
use super::kernels::act::{bias_act_inplace, FusedAct};
use super::kernels::cpu_f32_no_grad;
use super::kernels::epilogue::shift_act;
use super::kernels::gemm::conv1x1;
use super::linear::linear;

/// The channel expansion of a [`Bottleneck`]: its output is `4 · planes` wide.
pub const EXPANSION: usize = 4;

/// Checkpoint keys of a cn_clip image tower that the model does not read (BatchNorm's
/// `num_batches_tracked` counters), for [`crate::checkpoint::Loader::finish`].
pub const UNUSED_KEYS: &[&str] = &["num_batches_tracked"];

fn default_bn_eps() -> f64 {
    1e-5
}

fn default_bn_momentum() -> f64 {
    0.1
}

/// The shape of a [`ModifiedResNet`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModifiedResNetConfig {
    /// Blocks per stage (`[3, 4, 6, 3]` for RN50).
    pub layers: [usize; 4],
    /// Stem width; stage `i` has `width · 2^i` planes, the features `width · 32` channels.
    pub width: usize,
    /// Attention heads of the pooling (cn_clip: `width · 32 / 64`).
    pub heads: usize,
    /// Width of the pooled output (`c_proj`): the CLIP embedding dimension.
    pub output_dim: usize,
    /// Input resolution (square, a multiple of 32): it fixes the positional embedding.
    pub image_size: usize,
    /// BatchNorm epsilon (PyTorch's default, 1e-5).
    #[serde(default = "default_bn_eps")]
    pub bn_eps: f64,
    /// BatchNorm momentum of the running statistics in train mode (PyTorch's convention:
    /// `running ← (1 − momentum)·running + momentum·batch`).
    #[serde(default = "default_bn_momentum")]
    pub bn_momentum: f64,
}

impl ModifiedResNetConfig {
    /// Chinese-CLIP RN50 (`cn_clip/clip/model_configs/RN50.json`): layers `[3, 4, 6, 3]`,
    /// width 64 (2048-channel features on a 7×7 map), 32 heads, 1024-d output, 224 px.
    pub fn rn50() -> Self {
        Self {
            layers: [3, 4, 6, 3],
            width: 64,
            heads: heads_for_width(64, 64),
            output_dim: 1024,
            image_size: 224,
            bn_eps: default_bn_eps(),
            bn_momentum: default_bn_momentum(),
        }
    }

    /// A preset by name: `RN50` (also `rn50`, `chinese-clip-rn50`).
    pub fn preset(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "rn50" | "chinese-clip-rn50" | "cn-clip-rn50" => Some(Self::rn50()),
            _ => None,
        }
    }

    /// The image-tower part of a cn_clip vision config (`model_configs/RN50.json`):
    /// `embed_dim`, `image_resolution`, `vision_layers` (a list, or a string holding one,
    /// as cn_clip writes it), `vision_width`, and the optional `vision_head_width` (64).
    pub fn from_cn_clip_json(json: &str) -> std::result::Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("cn_clip vision config: {e}"))?;
        let field = |k: &str| {
            v.get(k)
                .ok_or_else(|| format!("cn_clip vision config has no `{k}`"))
        };
        let uint = |k: &str| -> std::result::Result<usize, String> {
            field(k)?
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| format!("cn_clip vision config: `{k}` is not an integer"))
        };
        let layers_v = field("vision_layers")?;
        let layers: Vec<usize> = match layers_v {
            serde_json::Value::String(s) => serde_json::from_str(s),
            other => serde_json::from_value(other.clone()),
        }
        .map_err(|_| {
            format!("cn_clip vision config: `vision_layers` {layers_v} is not a list of 4 integers")
        })?;
        let layers: [usize; 4] = layers.try_into().map_err(|l: Vec<usize>| {
            format!(
                "cn_clip vision config: `vision_layers` has {} stages, the modified ResNet \
                 has 4 (a ViT config has an integer here)",
                l.len()
            )
        })?;
        let width = uint("vision_width")?;
        let head_width = match v.get("vision_head_width") {
            None | Some(serde_json::Value::Null) => 64,
            Some(_) => uint("vision_head_width")?,
        };
        if head_width == 0 {
            return Err("cn_clip vision config: `vision_head_width` is 0".into());
        }
        let cfg = Self {
            layers,
            width,
            heads: heads_for_width(width, head_width),
            output_dim: uint("embed_dim")?,
            image_size: uint("image_resolution")?,
            bn_eps: default_bn_eps(),
            bn_momentum: default_bn_momentum(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Channels of the last stage (the attention pool's width): `width · 32`.
    pub fn embed_dim(&self) -> usize {
        self.width * 8 * EXPANSION
    }

    /// Side of the last stage's map at `image_size`: `image_size / 32`.
    pub fn grid_size(&self) -> usize {
        self.image_size / 32
    }

    /// Planes (the 3×3 convolutions' width) of stage `i`: `width · 2^i`.
    pub fn planes(&self, stage: usize) -> usize {
        self.width << stage
    }

    /// Checks the shape.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.layers.contains(&0) {
            return Err(format!(
                "modified ResNet layers {:?}: every stage needs at least one block",
                self.layers
            ));
        }
        if self.width < 2 {
            return Err(format!(
                "modified ResNet width {} must be at least 2 (the stem starts at width / 2)",
                self.width
            ));
        }
        if self.image_size == 0 || !self.image_size.is_multiple_of(32) {
            return Err(format!(
                "modified ResNet image size {} must be a positive multiple of 32",
                self.image_size
            ));
        }
        let d = self.embed_dim();
        if self.heads == 0 || !d.is_multiple_of(self.heads) {
            return Err(format!(
                "modified ResNet: {} attention heads do not divide the feature width {d}",
                self.heads
            ));
        }
        if self.output_dim == 0 {
            return Err("modified ResNet output_dim must be positive".into());
        }
        if !(self.bn_eps.is_finite() && self.bn_eps > 0.0) {
            return Err(format!(
                "modified ResNet BatchNorm epsilon {} must be positive",
                self.bn_eps
            ));
        }
        if !(0.0..=1.0).contains(&self.bn_momentum) {
            return Err(format!(
                "modified ResNet BatchNorm momentum {} must be in [0, 1]",
                self.bn_momentum
            ));
        }
        Ok(())
    }
}

/// cn_clip's head count for a modified ResNet: `vision_width · 32 / vision_head_width`
/// (the head width is 64, so RN50's 2048-channel features get 32 heads).
pub fn heads_for_width(width: usize, head_width: usize) -> usize {
    (width * 32).checked_div(head_width).unwrap_or(0)
}

/// A bias-free convolution (1×1, or 3×3 with padding 1) and its BatchNorm, folded
/// ([`FoldedConvBn`]).
#[derive(Debug, Clone)]
struct ConvBn {
    conv: FoldedConvBn,
    kernel: usize,
    stride: usize,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        in_chs: usize,
        out_chs: usize,
        kernel: usize,
        stride: usize,
        cfg: &ModifiedResNetConfig,
        mode: &Arc<BnMode>,
        conv: VarBuilder,
        bn: VarBuilder,
    ) -> Result<Self> {
        let weight = conv.get((out_chs, in_chs, kernel, kernel), "weight")?;
        let bn = BatchNorm::new(out_chs, cfg.bn_eps, cfg.bn_momentum, bn)?;
        Ok(Self {
            conv: FoldedConvBn::new(weight, bn, mode)?,
            kernel,
            stride,
        })
    }

    fn dtype(&self) -> DType {
        self.conv.weight().dtype()
    }

    /// The convolution of `x` with `w` `[out, in, k, k]`: a matrix product for 1×1,
    /// [`conv3x3`] otherwise. Contiguous output.
    fn conv(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (b, c, h, wd) = x.dims4()?;
        if self.kernel == 1 {
            let o = w.dim(0)?;
            let w = w.flatten_from(1)?;
            conv1x1(&w, &x.reshape((b, c, h * wd))?)?
                .reshape((b, o, h, wd))?
                .contiguous()
        } else {
            conv3x3(x, w, self.stride)?.contiguous()
        }
    }

    /// `relu?(bn(conv(x)) + residual)`.
    fn forward(&self, x: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        if self.conv.training() {
            let y = self
                .conv
                .bn()
                .forward_train(&self.conv(x, self.conv.weight())?)?;
            let y = match residual {
                Some(r) => (y + r)?,
                None => y,
            };
            return if relu { y.relu() } else { Ok(y) };
        }
        let (w, shift) = self.conv.folded()?;
        let y = self.conv(x, &w)?;
        let residual = residual.map(|r| r.contiguous()).transpose()?;
        // The CPU `f32` kernels: in place at inference, one op with a backward in training.
        let y = match shift_act(&y, &shift, residual.as_ref(), false)? {
            Some(y) => y,
            None => {
                let y = y.broadcast_add(&shift.reshape((1, shift.dim(0)?, 1, 1))?)?;
                match &residual {
                    Some(r) => (y + r)?,
                    None => y,
                }
            }
        };
        if !relu {
            return Ok(y);
        }
        if cpu_f32_no_grad(&[&y]) && y.is_contiguous() {
            // `y` is this layer's fresh output: nothing else refers to it.
            bias_act_inplace(&y, None, Some(FusedAct::Relu))?;
            Ok(y)
        } else {
            y.relu()
        }
    }
}

/// CLIP's bottleneck block: `conv1` 1×1, `conv2` 3×3, the stride as an average pool,
/// `conv3` 1×1 to `4 · planes`, each with BN; ReLU after each and after the residual sum.
#[derive(Debug, Clone)]
pub struct Bottleneck {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
    downsample: Option<ConvBn>,
    stride: usize,
}

impl Bottleneck {
    fn new(
        inplanes: usize,
        planes: usize,
        stride: usize,
        (cfg, mode): (&ModifiedResNetConfig, &Arc<BnMode>),
        vb: VarBuilder,
    ) -> Result<Self> {
        let out = planes * EXPANSION;
        let conv1 = ConvBn::new(
            inplanes,
            planes,
            1,
            1,
            cfg,
            mode,
            vb.pp("conv1"),
            vb.pp("bn1"),
        )?;
        let conv2 = ConvBn::new(
            planes,
            planes,
            3,
            1,
            cfg,
            mode,
            vb.pp("conv2"),
            vb.pp("bn2"),
        )?;
        let conv3 = ConvBn::new(planes, out, 1, 1, cfg, mode, vb.pp("conv3"), vb.pp("bn3"))?;
        let downsample = if stride > 1 || inplanes != out {
            let ds = vb.pp("downsample");
            Some(ConvBn::new(
                inplanes,
                out,
                1,
                1,
                cfg,
                mode,
                ds.pp("0"),
                ds.pp("1"),
            )?)
        } else {
            None
        };
        Ok(Self {
            conv1,
            conv2,
            conv3,
            downsample,
            stride,
        })
    }

    /// The stride (the pool after `conv2` and in the shortcut).
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Whether the block has a shortcut convolution (`downsample`).
    pub fn has_downsample(&self) -> bool {
        self.downsample.is_some()
    }
}

impl Module for Bottleneck {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv1.forward(x, None, true)?;
        let mut y = self.conv2.forward(&y, None, true)?;
        if self.stride > 1 {
            y = avg_pool(&y, self.stride)?;
        }
        let identity = match &self.downsample {
            Some(ds) if self.stride > 1 => ds.forward(&avg_pool(x, self.stride)?, None, false)?,
            Some(ds) => ds.forward(x, None, false)?,
            None => x.clone(),
        };
        self.conv3.forward(&y, Some(&identity), true)
    }
}

/// CLIP's attention pooling: the mean of the `h·w` positions and the positions themselves,
/// plus `positional_embedding` `[h·w + 1, d]`, attended by the mean token; `c_proj` maps the
/// result to `output_dim`.
#[derive(Debug, Clone)]
pub struct AttentionPool2d {
    positional_embedding: Tensor,
    attn: MultiHeadAttention,
}

impl AttentionPool2d {
    /// `spacial_dim` is the side of the map (`image_size / 32`), as in cn_clip.
    pub fn new(
        spacial_dim: usize,
        embed_dim: usize,
        heads: usize,
        output_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let positional_embedding = vb.get(
            (spacial_dim * spacial_dim + 1, embed_dim),
            "positional_embedding",
        )?;
        let q = linear(embed_dim, embed_dim, vb.pp("q_proj"))?;
        let k = linear(embed_dim, embed_dim, vb.pp("k_proj"))?;
        let v = linear(embed_dim, embed_dim, vb.pp("v_proj"))?;
        let c = linear(embed_dim, output_dim, vb.pp("c_proj"))?;
        Ok(Self {
            positional_embedding,
            attn: MultiHeadAttention::from_parts(q, k, v, c, embed_dim, heads)?,
        })
    }

    /// `x` `[b, d, h, w]` (with `h·w + 1` rows in the positional embedding) to
    /// `[b, output_dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, d, h, w) = x.dims4()?;
        let (len, pd) = self.positional_embedding.dims2()?;
        if pd != d || h * w + 1 != len {
            candle_core::bail!(
                "attention pool: a {d}-channel {h}×{w} map does not fit the positional \
                 embedding {:?} (the image size must be the configured one)",
                self.positional_embedding.dims()
            )
        }
        let x = x.to_dtype(self.positional_embedding.dtype())?;
        let tokens = x.flatten_from(2)?.transpose(1, 2)?; // [b, hw, d]
        let mean = tokens.mean_keepdim(1)?;
        let tokens = Tensor::cat(&[&mean, &tokens], 1)?
            .broadcast_add(&self.positional_embedding.unsqueeze(0)?)?
            .contiguous()?;
        let query = tokens.narrow(1, 0, 1)?.contiguous()?;
        self.attn
            .forward(&query, Some(&tokens), None)?
            .reshape((b, ()))
    }
}

/// CLIP's modified ResNet: the stem (`conv1`/`bn1` … `conv3`/`bn3`, average pool),
/// `layer1` … `layer4` of [`Bottleneck`]s, and `attnpool`.
#[derive(Debug, Clone)]
pub struct ModifiedResNet {
    stem: [ConvBn; 3],
    stages: Vec<Vec<Bottleneck>>,
    attnpool: AttentionPool2d,
    cfg: ModifiedResNetConfig,
    mode: Arc<BnMode>,
}

impl ModifiedResNet {
    /// Builds from cn_clip's names relative to `vb` (`vb.pp("visual")` for a CLIP state
    /// dict).
    pub fn new(cfg: &ModifiedResNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        if vb.device().is_cpu() && vb.dtype() == DType::BF16 {
            candle_core::bail!(
                "the modified ResNet (Chinese-CLIP RN50's image tower) cannot run in bf16 on \
                 the CPU: candle's CPU convolutions have no bf16 product. Use f32 or f16 on \
                 the CPU, or bf16 on CUDA or Metal"
            )
        }
        let mode = Arc::new(BnMode::default());
        let w = cfg.width;
        let stem_conv = |i: usize, cin: usize, cout: usize, stride: usize| {
            ConvBn::new(
                cin,
                cout,
                3,
                stride,
                cfg,
                &mode,
                vb.pp(format!("conv{i}")),
                vb.pp(format!("bn{i}")),
            )
        };
        let stem = [
            stem_conv(1, 3, w / 2, 2)?,
            stem_conv(2, w / 2, w / 2, 1)?,
            stem_conv(3, w / 2, w, 1)?,
        ];
        let mut inplanes = w;
        let mut stages = Vec::with_capacity(4);
        for (si, &n) in cfg.layers.iter().enumerate() {
            let planes = cfg.planes(si);
            let vbs = vb.pp(format!("layer{}", si + 1));
            let mut blocks = Vec::with_capacity(n);
            for bi in 0..n {
                let stride = if bi == 0 && si > 0 { 2 } else { 1 };
                blocks.push(Bottleneck::new(
                    inplanes,
                    planes,
                    stride,
                    (cfg, &mode),
                    vbs.pp(bi),
                )?);
                inplanes = planes * EXPANSION;
            }
            stages.push(blocks);
        }
        let attnpool = AttentionPool2d::new(
            cfg.grid_size(),
            cfg.embed_dim(),
            cfg.heads,
            cfg.output_dim,
            vb.pp("attnpool"),
        )?;
        Ok(Self {
            stem,
            stages,
            attnpool,
            cfg: cfg.clone(),
            mode,
        })
    }

    pub fn config(&self) -> &ModifiedResNetConfig {
        &self.cfg
    }

    /// Width of the pooled output.
    pub fn output_dim(&self) -> usize {
        self.cfg.output_dim
    }

    /// Channels of the feature map ([`ModifiedResNet::forward_features`]).
    pub fn num_features(&self) -> usize {
        self.cfg.embed_dim()
    }

    /// Switches every BatchNorm between inference mode (running statistics, the default)
    /// and PyTorch's train mode (batch statistics; each forward moves the running
    /// statistics in place). Clones of this network share the setting.
    pub fn set_batch_norm_training(&self, on: bool) {
        self.mode.set_training(on);
    }

    /// Whether BatchNorm uses batch statistics.
    pub fn batch_norm_training(&self) -> bool {
        self.mode.training()
    }

    /// The stage `i` (`layer{i+1}`).
    pub fn stage(&self, i: usize) -> Option<&[Bottleneck]> {
        self.stages.get(i).map(|s| s.as_slice())
    }

    pub fn attnpool(&self) -> &AttentionPool2d {
        &self.attnpool
    }

    /// The stem: three convolutions with BN and ReLU, then a 2×2 average pool. `x`
    /// `[b, 3, h, w]` (cast to the weights' dtype) to `[b, width, h/4, w/4]`.
    pub fn forward_stem(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if c != 3 {
            candle_core::bail!("the modified ResNet expects 3 input channels, got {c}")
        }
        if h < 4 || w < 4 {
            candle_core::bail!("the modified ResNet needs at least 4×4 pixels, got {h}×{w}")
        }
        let mut x = x.to_dtype(self.stem[0].dtype())?;
        for conv in &self.stem {
            x = conv.forward(&x, None, true)?;
        }
        avg_pool(&x, 2)
    }

    /// The blocks of stage `i` (`layer{i+1}`).
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

    /// The feature map before the attention pool (`layer4`'s output): `[b, 3, h, w]` to
    /// `[b, width · 32, h/32, w/32]`.
    pub fn forward_features(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.forward_stem(x)?;
        for i in 0..self.stages.len() {
            x = self.forward_stage(i, &x)?;
        }
        Ok(x)
    }

    /// The attention pool over a feature map: `[b, width · 32, s, s]` to `[b, output_dim]`.
    pub fn forward_pool(&self, features: &Tensor) -> Result<Tensor> {
        self.attnpool.forward(features)
    }

    /// Both the feature map ([`ModifiedResNet::forward_features`]) and the pooled output
    /// ([`Module::forward`]) of one pass.
    pub fn forward_features_and_pool(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let f = self.forward_features(x)?;
        let y = self.forward_pool(&f)?;
        Ok((f, y))
    }
}

impl Module for ModifiedResNet {
    /// `[b, 3, image_size, image_size]` to `[b, output_dim]`: cn_clip's `visual(image)`,
    /// not normalised.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_pool(&self.forward_features(x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{max_diff, randn};
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    fn tiny() -> ModifiedResNetConfig {
        ModifiedResNetConfig {
            layers: [2, 1, 1, 1],
            width: 4,
            heads: 2,
            output_dim: 8,
            image_size: 64,
            bn_eps: 1e-5,
            bn_momentum: 0.1,
        }
    }

    /// A var map of the tiny model filled with seeded random values (positive variances).
    fn random_vars(cfg: &ModifiedResNetConfig) -> (VarMap, ModifiedResNet) {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let net = ModifiedResNet::new(cfg, vb).unwrap();
        let data = vars.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for (i, name) in names.into_iter().enumerate() {
            let var = &data[name];
            let r = randn(var.dims(), 100 + i as u64);
            let v = if name.ends_with("running_var") {
                (r.abs().unwrap() + 0.5).unwrap()
            } else if name.ends_with("bn1.weight")
                || name.ends_with("bn2.weight")
                || name.ends_with("bn3.weight")
                || name.ends_with("downsample.1.weight")
            {
                ((r * 0.2).unwrap() + 1.0).unwrap()
            } else {
                (r * 0.5).unwrap()
            };
            var.set(&v).unwrap();
        }
        drop(data);
        (vars, net)
    }

    #[test]
    fn rn50_preset_matches_cn_clip() {
        let c = ModifiedResNetConfig::rn50();
        assert_eq!(c.embed_dim(), 2048);
        assert_eq!(c.heads, 32);
        assert_eq!(c.grid_size(), 7);
        assert_eq!(c.output_dim, 1024);
        c.validate().unwrap();
        // cn_clip's RN50.json, as published.
        let json = r#"{"embed_dim": 1024, "image_resolution": 224,
            "vision_layers": "[3,4,6,3]", "vision_width": 64, "vision_patch_size": null}"#;
        assert_eq!(ModifiedResNetConfig::from_cn_clip_json(json).unwrap(), c);
        assert_eq!(ModifiedResNetConfig::preset("RN50"), Some(c));
        let vit = r#"{"embed_dim": 512, "image_resolution": 224, "vision_layers": 12,
            "vision_width": 768, "vision_patch_size": 16}"#;
        assert!(ModifiedResNetConfig::from_cn_clip_json(vit).is_err());
    }

    #[test]
    fn validate_rejects_bad_shapes() {
        let bad = [
            ModifiedResNetConfig {
                image_size: 100,
                ..tiny()
            },
            ModifiedResNetConfig { heads: 3, ..tiny() },
            ModifiedResNetConfig { heads: 0, ..tiny() },
            ModifiedResNetConfig {
                layers: [1, 0, 1, 1],
                ..tiny()
            },
            ModifiedResNetConfig { width: 1, ..tiny() },
            ModifiedResNetConfig {
                output_dim: 0,
                ..tiny()
            },
            ModifiedResNetConfig {
                bn_eps: 0.0,
                ..tiny()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
            let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
            assert!(ModifiedResNet::new(&c, vb).is_err());
        }
        tiny().validate().unwrap();
    }

    #[test]
    fn rn50_parameter_names_and_count() {
        let shapes = crate::checkpoint::parameter_shapes(|vb| {
            ModifiedResNet::new(&ModifiedResNetConfig::rn50(), vb)
        })
        .unwrap();
        // 339 `visual.*` tensors in cn_clip's state dict, less 55 `num_batches_tracked`.
        assert_eq!(shapes.len(), 284);
        assert_eq!(shapes["conv1.weight"], vec![32, 3, 3, 3]);
        assert_eq!(shapes["layer1.0.downsample.0.weight"], vec![256, 64, 1, 1]);
        assert_eq!(shapes["layer4.2.bn3.running_var"], vec![2048]);
        assert_eq!(shapes["attnpool.positional_embedding"], vec![50, 2048]);
        assert_eq!(shapes["attnpool.c_proj.weight"], vec![1024, 2048]);
        assert!(!shapes.contains_key("layer1.1.downsample.0.weight"));
        let params: usize = shapes
            .iter()
            .filter(|(k, _)| !k.contains("running_"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let buffers: usize = shapes
            .iter()
            .filter(|(k, _)| k.contains("running_"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        // cn_clip: 38,370,144 floats in `visual.*` (parameters and running statistics).
        assert_eq!(params + buffers, 38_370_144);
    }

    #[test]
    fn shapes_of_features_and_output() {
        let (_, net) = random_vars(&tiny());
        let x = randn(&[2, 3, 64, 64], 1);
        let f = net.forward_features(&x).unwrap();
        assert_eq!(f.dims(), &[2, 128, 2, 2]);
        assert_eq!(net.forward(&x).unwrap().dims(), &[2, 8]);
        let wrong = randn(&[1, 3, 96, 96], 2);
        let err = net.forward(&wrong).unwrap_err().to_string();
        assert!(err.contains("positional"), "{err}");
        // The feature map works at any size.
        assert_eq!(
            net.forward_features(&wrong).unwrap().dims(),
            &[1, 128, 3, 3]
        );
    }

    /// Every trainable parameter gets a non-zero gradient through the eval-mode BN (folded
    /// per forward), and the trainable model computes what the frozen, pre-folded one does.
    #[test]
    fn every_parameter_gets_a_gradient() {
        let cfg = tiny();
        let (vars, net) = random_vars(&cfg);
        let x = randn(&[2, 3, 64, 64], 3);
        let y = net.forward(&x).unwrap();
        let probe = randn(y.dims(), 4);
        let grads = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let data = vars.data().lock().unwrap();
        let mut checked = 0;
        for (name, var) in data.iter() {
            if crate::checkpoint::is_buffer(name) {
                assert!(
                    grads.get(var.as_tensor()).is_none(),
                    "{name} got a gradient"
                );
                continue;
            }
            // The key bias adds the same score to every key of a query: softmax cancels it,
            // its true gradient is zero (PyTorch's too).
            if name == "attnpool.k_proj.bias" {
                continue;
            }
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let n = g
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0 && n.is_finite(), "{name}: |grad| max {n}");
            checked += 1;
        }
        assert!(checked > 60, "only {checked} parameters");

        // The same weights as constants: BN folded once at construction.
        let frozen: std::collections::HashMap<String, Tensor> = data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach().copy().unwrap()))
            .collect();
        drop(data);
        let fnet = ModifiedResNet::new(
            &cfg,
            VarBuilder::from_tensors(frozen, DType::F32, &Device::Cpu),
        )
        .unwrap();
        assert!(fnet.stem[0].conv.is_prefolded());
        assert!(!net.stem[0].conv.is_prefolded());
        let d = max_diff(&fnet.forward(&x).unwrap(), &y);
        assert!(d < 1e-4, "frozen vs trainable: {d}");
    }

    /// Train mode moves the running statistics (in the var map) and inference afterwards
    /// uses the new ones, also in a model whose BN was folded at construction.
    #[test]
    fn train_mode_moves_running_statistics() {
        let cfg = tiny();
        let (vars, net) = random_vars(&cfg);
        let frozen: std::collections::HashMap<String, Tensor> = vars
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach().copy().unwrap()))
            .collect();
        let fnet = ModifiedResNet::new(
            &cfg,
            VarBuilder::from_tensors(frozen, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let x = randn(&[2, 3, 64, 64], 5);
        let before = fnet.forward(&x).unwrap();
        let mean = |vars: &VarMap| {
            vars.data().lock().unwrap()["bn3.running_mean"]
                .as_tensor()
                .copy()
                .unwrap()
        };
        let mean0 = mean(&vars);
        net.set_batch_norm_training(true);
        fnet.set_batch_norm_training(true);
        assert!(fnet.batch_norm_training());
        let yt = net.forward(&x).unwrap();
        let ft = fnet.forward(&x).unwrap();
        assert!(max_diff(&yt, &ft) < 1e-4);
        assert!(
            max_diff(&mean0, &mean(&vars)) > 1e-4,
            "running mean did not move"
        );
        fnet.set_batch_norm_training(false);
        net.set_batch_norm_training(false);
        let after = fnet.forward(&x).unwrap();
        assert!(max_diff(&before, &after) > 1e-4, "stale folded BN");
        assert!(max_diff(&net.forward(&x).unwrap(), &after) < 1e-4);
    }

    /// f16 on the CPU takes candle's convolutions and composed ops; bf16 is refused.
    #[test]
    fn half_precision_on_the_cpu() {
        let cfg = tiny();
        let (vars, net) = random_vars(&cfg);
        let x = randn(&[1, 3, 64, 64], 7);
        let want = net.forward(&x).unwrap();
        let half: std::collections::HashMap<String, Tensor> = vars
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach().copy().unwrap()))
            .collect();
        let vb = VarBuilder::from_tensors(half.clone(), DType::F16, &Device::Cpu);
        let y = ModifiedResNet::new(&cfg, vb).unwrap().forward(&x).unwrap();
        assert_eq!(y.dtype(), DType::F16);
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d = max_diff(&y.to_dtype(DType::F32).unwrap(), &want);
        assert!(d < 2e-2 * scale.max(1.0), "f16 vs f32: {d} (scale {scale})");
        let vb = VarBuilder::from_tensors(half, DType::BF16, &Device::Cpu);
        let err = ModifiedResNet::new(&cfg, vb).unwrap_err().to_string();
        assert!(err.contains("bf16"), "{err}");
    }

    /// The im2col paths (direct at inference, composed views with gradients) agree with
    /// candle's convolution, for both strides and odd sizes, in value and gradient.
    #[test]
    fn conv3x3_matches_candle() {
        // candle's own backward (the reference) is wrong for stride 2 when the height and
        // width differ in parity (it takes the output padding of both from the height), so
        // the odd stride-2 cases keep the parities equal.
        for (c, o, h, w, s) in [
            (3, 4, 9, 7, 2),
            (5, 6, 8, 8, 1),
            (4, 3, 5, 6, 1),
            (2, 3, 6, 8, 2),
        ] {
            let x = Var::from_tensor(&randn(&[2, c, h, w], 8)).unwrap();
            let k = Var::from_tensor(&randn(&[o, c, 3, 3], 9)).unwrap();
            let want = x.as_tensor().conv2d(k.as_tensor(), 1, s, 1, 1).unwrap();
            let fast = conv3x3(&x.as_tensor().detach(), &k.as_tensor().detach(), s).unwrap();
            assert!(max_diff(&fast, &want) < 1e-5, "inference c{c} {h}x{w} s{s}");
            let ours = conv3x3(x.as_tensor(), k.as_tensor(), s).unwrap();
            assert!(max_diff(&ours, &want) < 1e-5, "training c{c} {h}x{w} s{s}");
            let (ga, gb) = crate::nn::test_util::probe_grads(&want, &ours, 10);
            for v in [&x, &k] {
                let d = max_diff(
                    ga.get(v.as_tensor()).unwrap(),
                    gb.get(v.as_tensor()).unwrap(),
                );
                assert!(d < 1e-4, "gradient c{c} {h}x{w} s{s}: {d}");
            }
        }
    }

    /// The pool over a map the kernel does not divide reads what PyTorch's does, and its
    /// backward puts nothing on the dropped row and column.
    #[test]
    fn avg_pool_crops_odd_maps() {
        let x = Var::from_tensor(&randn(&[1, 2, 5, 5], 6)).unwrap();
        let y = avg_pool(x.as_tensor(), 2).unwrap();
        assert_eq!(y.dims(), &[1, 2, 2, 2]);
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap();
        let g = g.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
        for c in &g {
            for (i, row) in c.iter().enumerate() {
                for (j, &e) in row.iter().enumerate() {
                    let want = if i < 4 && j < 4 { 0.25 } else { 0.0 };
                    assert_eq!(e, want, "grad at {i},{j}");
                }
            }
        }
    }
}

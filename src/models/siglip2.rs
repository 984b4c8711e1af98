//! SigLIP 2: fixed resolution (HF `SiglipModel`, the SigLIP v1 architecture the published
//! fixed-resolution SigLIP 2 checkpoints use) and NaFlex (HF `Siglip2Model`).
//!
//! The whole forward pass is in this file:
//!
//! * vision: patch embedding (a conv written as one matmul, or NaFlex's linear over
//!   (row, col, channel) patches) plus a learned position table (resized per image for
//!   NaFlex with antialiased bilinear interpolation), a pre-LN encoder, `post_layernorm`
//!   and the multi-head attention pooling ("MAP") head;
//! * text: token plus position embeddings, a pre-LN encoder, `final_layer_norm`, the state
//!   at the **last** position, and a linear `head`;
//! * logits: `exp(logit_scale) · cos + logit_bias`.
//!
//! Images are preprocessed by [`ImageProcessor::siglip2`] (fixed resolution) or
//! [`NaFlexProcessor`]; the weight files of a directory are found by
//! [`crate::checkpoint::discover::safetensors_files`] (re-exported here).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{LoadReport, Loader, TensorSource};
use crate::error::{Error, Result};
use crate::models::{cosine_matrix, DualEncoder, Family, LoadOptions, Scoring};
use crate::nn::linear::{linear, Linear};
use crate::nn::ops::{self, key_padding_bias, Activation, LayerNorm};
use crate::nn::{LayerDims, Mlp, MultiHeadAttention, PreNormEncoder};
use crate::preprocess::image::aa_bilinear_weights;
use crate::preprocess::{
    read_max_num_patches, ImageInput, ImageProcessor, NaFlexBatch, NaFlexProcessor, TextProcessor,
    TextStyle,
};

pub use crate::checkpoint::discover::safetensors_files;

/// Additive mask value for padded keys (HF uses the dtype's minimum; any value this
/// negative gives exactly zero attention weight).
const MASK_VALUE: f64 = -1e9;

fn default_hidden() -> usize {
    768
}
fn default_intermediate() -> usize {
    3072
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_channels() -> usize {
    3
}
fn default_image_size() -> usize {
    224
}
fn default_patch() -> usize {
    16
}
fn default_act() -> Activation {
    Activation::GeluPytorchTanh
}
fn default_eps() -> f64 {
    1e-6
}
fn default_true() -> bool {
    true
}
fn default_num_patches() -> usize {
    256
}
fn default_text_vocab() -> usize {
    32000
}
fn default_text_positions() -> usize {
    64
}

/// Vision tower configuration (HF `SiglipVisionConfig` / `Siglip2VisionConfig` names and
/// defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// Fixed-resolution input size (SigLIP); unused by NaFlex.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    /// Size of the NaFlex position table (a square grid); unused by fixed resolution.
    #[serde(default = "default_num_patches")]
    pub num_patches: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_true")]
    pub vision_use_head: bool,
}

/// Text tower configuration (HF `SiglipTextConfig` names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    #[serde(default = "default_text_vocab")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_text_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Output width of the text `head`; `None` means `hidden_size` (g-opt uses 1536).
    #[serde(default)]
    pub projection_size: Option<usize>,
}

impl TextConfig {
    pub fn projection_size(&self) -> usize {
        self.projection_size.unwrap_or(self.hidden_size)
    }
}

/// A SigLIP / SigLIP 2 configuration, readable from an HF `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiglipConfig {
    /// `siglip` (fixed resolution) or `siglip2` (NaFlex).
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
}

fn default_model_type() -> String {
    "siglip".into()
}

impl SiglipConfig {
    /// Whether this is the NaFlex architecture (`Siglip2Model`).
    pub fn is_naflex(&self) -> bool {
        self.model_type == "siglip2"
    }

    /// Reads an HF `config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let cfg: Self =
            serde_json::from_str(&s).map_err(|e| Error::parse(path.display().to_string(), e))?;
        if cfg.model_type != "siglip" && cfg.model_type != "siglip2" {
            return Err(Error::WrongFamily {
                path: path.to_path_buf(),
                expected: "SigLIP / SigLIP 2 (model_type siglip or siglip2)".into(),
                found: format!("model_type `{}`", cfg.model_type),
            });
        }
        Ok(cfg)
    }

    fn tower(hidden: usize, layers: usize, heads: usize, mlp: usize) -> (VisionConfig, TextConfig) {
        (
            VisionConfig {
                hidden_size: hidden,
                intermediate_size: mlp,
                num_hidden_layers: layers,
                num_attention_heads: heads,
                num_channels: 3,
                image_size: 224,
                patch_size: 16,
                num_patches: 256,
                hidden_act: Activation::GeluPytorchTanh,
                layer_norm_eps: 1e-6,
                vision_use_head: true,
            },
            TextConfig {
                vocab_size: 256_000,
                hidden_size: hidden,
                intermediate_size: mlp,
                num_hidden_layers: layers,
                num_attention_heads: heads,
                max_position_embeddings: 64,
                hidden_act: Activation::GeluPytorchTanh,
                layer_norm_eps: 1e-6,
                projection_size: None,
            },
        )
    }

    /// The configuration of a published SigLIP 2 checkpoint by preset name, e.g.
    /// `siglip2-base-patch16-224`, `siglip2-so400m-patch14-384`,
    /// `siglip2-giant-opt-patch16-256`, `siglip2-base-patch16-naflex`.
    pub fn preset(name: &str) -> Option<Self> {
        let rest = name.strip_prefix("siglip2-")?;
        let (size, rest) = rest.split_once("-patch")?;
        let (patch, res) = rest.split_once('-')?;
        let patch: usize = patch.parse().ok()?;
        let (mut vision, mut text) = match size {
            "base" => Self::tower(768, 12, 12, 3072),
            "large" => Self::tower(1024, 24, 16, 4096),
            "so400m" => Self::tower(1152, 27, 16, 4304),
            "giant-opt" => {
                let (v, _) = Self::tower(1536, 40, 16, 6144);
                let (_, mut t) = Self::tower(1152, 27, 16, 4304);
                t.projection_size = Some(1536);
                (v, t)
            }
            _ => return None,
        };
        vision.patch_size = patch;
        text.vocab_size = 256_000;
        if res == "naflex" {
            vision.num_patches = 256;
            return Some(Self {
                model_type: "siglip2".into(),
                text_config: text,
                vision_config: vision,
            });
        }
        vision.image_size = res.parse().ok()?;
        Some(Self {
            model_type: "siglip".into(),
            text_config: text,
            vision_config: vision,
        })
    }
}

/// Every published SigLIP 2 checkpoint, by preset name (the HF repo is `google/<name>`).
pub const PRESETS: &[&str] = &[
    "siglip2-base-patch16-224",
    "siglip2-base-patch16-256",
    "siglip2-base-patch16-384",
    "siglip2-base-patch16-512",
    "siglip2-base-patch32-256",
    "siglip2-large-patch16-256",
    "siglip2-large-patch16-384",
    "siglip2-large-patch16-512",
    "siglip2-so400m-patch14-224",
    "siglip2-so400m-patch14-384",
    "siglip2-so400m-patch16-256",
    "siglip2-so400m-patch16-384",
    "siglip2-so400m-patch16-512",
    "siglip2-giant-opt-patch16-256",
    "siglip2-giant-opt-patch16-384",
    "siglip2-base-patch16-naflex",
    "siglip2-so400m-patch16-naflex",
];

/// The multi-head attention pooling head: a learned probe attends over the tokens, then
/// a residual MLP.
#[derive(Debug, Clone)]
struct MapHead {
    probe: Tensor,
    attention: MultiHeadAttention,
    layernorm: LayerNorm,
    mlp: Mlp,
}

impl MapHead {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            probe: vb.get((1, 1, h), "probe")?,
            attention: MultiHeadAttention::new_packed(
                h,
                cfg.num_attention_heads,
                vb.pp("attention"),
            )?,
            layernorm: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("layernorm"))?,
            mlp: Mlp::new(
                h,
                cfg.intermediate_size,
                cfg.hidden_act,
                ("fc1", "fc2"),
                vb.pp("mlp"),
            )?,
        })
    }

    fn forward(&self, xs: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, _, h) = xs.dims3()?;
        let probe = self.probe.broadcast_as((b, 1, h))?.contiguous()?;
        let x = self.attention.forward(&probe, Some(xs), bias)?;
        let residual = x.clone();
        let x = (residual + self.mlp.forward(&self.layernorm.forward(&x)?)?)?;
        x.squeeze(1)
    }
}

/// How pixels become patch tokens.
#[derive(Debug, Clone)]
enum PatchEmbed {
    /// A `p×p` stride-`p` conv (weight `[d, c, p, p]`), computed as one matmul over
    /// `(c, dy, dx)`-ordered patches.
    Conv { weight: Tensor, bias: Tensor },
    /// NaFlex: a linear over `(dy, dx, c)`-ordered patches.
    Linear(Linear),
}

/// The vision tower.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    patch: PatchEmbed,
    /// `[num_positions, hidden]`.
    position_embedding: Tensor,
    encoder: PreNormEncoder,
    post_layernorm: LayerNorm,
    head: Option<MapHead>,
    cfg: VisionConfig,
    naflex: bool,
}

impl VisionTransformer {
    pub fn new(cfg: &VisionConfig, naflex: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let emb = vb.pp("embeddings");
        let patch = if naflex {
            PatchEmbed::Linear(linear(c * p * p, h, emb.pp("patch_embedding"))?)
        } else {
            PatchEmbed::Conv {
                weight: emb.get((h, c, p, p), "patch_embedding.weight")?,
                bias: emb.get(h, "patch_embedding.bias")?,
            }
        };
        let positions = if naflex {
            let side = (cfg.num_patches as f64).sqrt() as usize;
            if side * side != cfg.num_patches {
                candle_core::bail!("NaFlex num_patches {} is not a square", cfg.num_patches)
            }
            cfg.num_patches
        } else {
            // Like a stride-p conv, trailing pixels that do not fill a patch are dropped
            // (so400m/14 at 384 px has 27x27 patches).
            (cfg.image_size / p).pow(2)
        };
        let dims = LayerDims {
            hidden: h,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size,
            eps: cfg.layer_norm_eps,
            act: cfg.hidden_act,
        };
        Ok(Self {
            patch,
            position_embedding: emb.get((positions, h), "position_embedding.weight")?,
            encoder: PreNormEncoder::new(&dims, cfg.num_hidden_layers, vb.pp("encoder"))?,
            post_layernorm: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("post_layernorm"))?,
            head: if cfg.vision_use_head {
                Some(MapHead::new(cfg, vb.pp("head"))?)
            } else {
                None
            },
            cfg: cfg.clone(),
            naflex,
        })
    }

    /// Fixed resolution: `pixel_values` `[b, c, s, s]` to `(last_hidden_state, pooled)`.
    pub fn forward(&self, pixel_values: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let PatchEmbed::Conv { weight, bias } = &self.patch else {
            candle_core::bail!("this is a NaFlex vision tower: use forward_naflex")
        };
        let (b, c, hgt, wid) = pixel_values.dims4()?;
        let p = self.cfg.patch_size;
        if c != self.cfg.num_channels || hgt != self.cfg.image_size || wid != self.cfg.image_size {
            candle_core::bail!(
                "pixel_values shape {:?} does not match the model's input [_, {}, {}, {}]",
                pixel_values.dims(),
                self.cfg.num_channels,
                self.cfg.image_size,
                self.cfg.image_size
            )
        }
        let (nh, nw) = (hgt / p, wid / p);
        let patches = pixel_values
            .narrow(2, 0, nh * p)?
            .narrow(3, 0, nw * p)?
            .to_dtype(weight.dtype())?
            .reshape((b, c, nh, p, nw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, nh * nw, c * p * p))?;
        // The conv as one linear layer over the patches (the crate's product, with its own
        // backward pass in training).
        let w = weight.reshape((weight.dim(0)?, c * p * p))?;
        let x = Linear::new(w, Some(bias.clone())).forward(&patches)?;
        let x = x.broadcast_add(&self.position_embedding)?;
        self.finish(&x, None)
    }

    /// NaFlex: `pixel_values` `[b, n, c·p·p]`, `mask` `[b, n]`, `spatial_shapes` `(rows,
    /// cols)` per image, to `(last_hidden_state, pooled)`.
    pub fn forward_naflex(
        &self,
        pixel_values: &Tensor,
        mask: &Tensor,
        spatial_shapes: &[(usize, usize)],
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let PatchEmbed::Linear(linear) = &self.patch else {
            candle_core::bail!("this is a fixed-resolution vision tower: use forward")
        };
        let (b, n, _) = pixel_values.dims3()?;
        if spatial_shapes.len() != b {
            candle_core::bail!("{} spatial shapes for a batch of {b}", spatial_shapes.len())
        }
        let x = linear.forward(&pixel_values.to_dtype(self.position_embedding.dtype())?)?;
        let pos = spatial_shapes
            .iter()
            .map(|&(h, w)| self.resized_positions(h, w, n))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let x = (x + Tensor::stack(&pos, 0)?)?;
        let bias = key_padding_bias(mask, MASK_VALUE, x.dtype())?;
        self.finish(&x, Some(&bias))
    }

    /// The position table resized to `h × w` (bilinear, antialiased, `align_corners=False`,
    /// in f32), flattened row-major and padded to `max_len` rows with its first row.
    pub fn resized_positions(
        &self,
        h: usize,
        w: usize,
        max_len: usize,
    ) -> candle_core::Result<Tensor> {
        if h == 0 || w == 0 || h * w > max_len {
            candle_core::bail!("spatial shape ({h}, {w}) does not fit {max_len} patches")
        }
        let side = (self.cfg.num_patches as f64).sqrt() as usize;
        let dev = self.position_embedding.device();
        let wh = Tensor::from_vec(aa_bilinear_weights(side, h), (h, side), dev)?;
        let ww = Tensor::from_vec(aa_bilinear_weights(side, w), (w, side), dev)?;
        // kron(wh, ww): [h·w, side·side]
        let k = wh
            .unsqueeze(1)?
            .unsqueeze(3)?
            .broadcast_mul(&ww.unsqueeze(0)?.unsqueeze(2)?)?
            .reshape((h * w, side * side))?;
        let dtype = self.position_embedding.dtype();
        let resized = k
            .matmul(&self.position_embedding.to_dtype(DType::F32)?)?
            .to_dtype(dtype)?;
        if h * w == max_len {
            return Ok(resized);
        }
        let pad = resized
            .narrow(0, 0, 1)?
            .broadcast_as((max_len - h * w, resized.dim(1)?))?;
        Tensor::cat(&[&resized, &pad], 0)
    }

    fn finish(&self, x: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<(Tensor, Tensor)> {
        let x = self.encoder.forward(x, bias)?;
        let x = self.post_layernorm.forward(&x)?;
        let pooled = match &self.head {
            Some(head) => head.forward(&x, bias)?,
            None => x.mean(1)?,
        };
        Ok((x, pooled))
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    pub fn is_naflex(&self) -> bool {
        self.naflex
    }
}

/// The text tower.
#[derive(Debug, Clone)]
pub struct TextTransformer {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: PreNormEncoder,
    final_layer_norm: LayerNorm,
    head: Linear,
    cfg: TextConfig,
}

impl TextTransformer {
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let dims = LayerDims {
            hidden: h,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size,
            eps: cfg.layer_norm_eps,
            act: cfg.hidden_act,
        };
        Ok(Self {
            token_embedding: candle_nn::embedding(cfg.vocab_size, h, emb.pp("token_embedding"))?,
            position_embedding: emb.get(
                (cfg.max_position_embeddings, h),
                "position_embedding.weight",
            )?,
            encoder: PreNormEncoder::new(&dims, cfg.num_hidden_layers, vb.pp("encoder"))?,
            final_layer_norm: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?,
            head: linear(h, cfg.projection_size(), vb.pp("head"))?,
            cfg: cfg.clone(),
        })
    }

    /// `input_ids` `[b, len]` to `(last_hidden_state, pooled)`. The published models were
    /// trained without a text mask, so `attention_mask` is optional and normally `None`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (x, bias) = self.embed(input_ids, attention_mask)?;
        let x = self.encoder.forward(&x, bias.as_ref())?;
        let x = self.final_layer_norm.forward(&x)?;
        let len = x.dim(1)?;
        let last = x.narrow(1, len - 1, 1)?.squeeze(1)?;
        let pooled = self.head.forward(&last)?;
        Ok((x, pooled))
    }

    /// The pooled output of [`TextTransformer::forward`] alone: the last layer runs for the
    /// last position only ([`PreNormEncoder::forward_last`]), the only one pooled.
    pub fn forward_pooled(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (x, bias) = self.embed(input_ids, attention_mask)?;
        let last = self.encoder.forward_last(&x, bias.as_ref())?;
        let last = self.final_layer_norm.forward(&last)?.squeeze(1)?;
        self.head.forward(&last)
    }

    /// Token and position embeddings, and the attention bias of `attention_mask`.
    fn embed(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let (_, len) = input_ids.dims2()?;
        if len == 0 {
            candle_core::bail!("empty token sequence")
        }
        crate::nn::ops::check_token_ids(input_ids, self.cfg.vocab_size)?;
        if len > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "text length {len} exceeds the {} positions of the model",
                self.cfg.max_position_embeddings
            )
        }
        let x = self.token_embedding.forward(input_ids)?;
        let x = x.broadcast_add(&self.position_embedding.narrow(0, 0, len)?)?;
        let bias = match attention_mask {
            Some(m) => Some(key_padding_bias(m, MASK_VALUE, x.dtype())?),
            None => None,
        };
        Ok((x, bias))
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }
}

/// The SigLIP network: both towers and the logit scale and bias.
#[derive(Debug, Clone)]
pub struct Siglip {
    pub vision: VisionTransformer,
    pub text: TextTransformer,
    logit_scale: Tensor,
    logit_bias: Tensor,
    cfg: SiglipConfig,
}

impl Siglip {
    /// Builds the network from HF-named tensors (`vision_model.*`, `text_model.*`,
    /// `logit_scale`, `logit_bias`).
    pub fn new(cfg: &SiglipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let naflex = cfg.is_naflex();
        let vision = VisionTransformer::new(&cfg.vision_config, naflex, vb.pp("vision_model"))?;
        let text = TextTransformer::new(&cfg.text_config, vb.pp("text_model"))?;
        if cfg.text_config.projection_size() != cfg.vision_config.hidden_size {
            candle_core::bail!(
                "text projection size {} differs from the vision width {}",
                cfg.text_config.projection_size(),
                cfg.vision_config.hidden_size
            )
        }
        Ok(Self {
            vision,
            text,
            logit_scale: vb.get(1, "logit_scale")?,
            logit_bias: vb.get(1, "logit_bias")?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &SiglipConfig {
        &self.cfg
    }

    /// Pooled, **unnormalised** image features for fixed-resolution pixels.
    pub fn get_image_features(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.vision.forward(pixel_values)?.1)
    }

    /// Pooled, unnormalised image features for a NaFlex batch.
    pub fn get_image_features_naflex(&self, batch: &NaFlexBatch) -> candle_core::Result<Tensor> {
        Ok(self
            .vision
            .forward_naflex(
                &batch.pixel_values,
                &batch.pixel_attention_mask,
                &batch.spatial_shapes,
            )?
            .1)
    }

    /// Pooled, unnormalised text features.
    pub fn get_text_features(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.text.forward_pooled(input_ids, attention_mask)
    }

    /// `[n_images, n_texts]` logits from **normalised** embeddings.
    pub fn logits(
        &self,
        image_embeds: &Tensor,
        text_embeds: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let dtype = image_embeds.dtype();
        let cos = cosine_matrix(image_embeds, text_embeds)?;
        let scale = self.logit_scale.to_dtype(dtype)?.exp()?;
        cos.broadcast_mul(&scale)?
            .broadcast_add(&self.logit_bias.to_dtype(dtype)?)
    }

    /// The trainable logit scale (log of the temperature's inverse) and bias.
    pub fn logit_params(&self) -> (&Tensor, &Tensor) {
        (&self.logit_scale, &self.logit_bias)
    }
}

/// The image preprocessing of a SigLIP model.
#[derive(Debug, Clone)]
pub enum SiglipImageProcessor {
    Fixed(ImageProcessor),
    NaFlex(NaFlexProcessor),
}

/// A complete SigLIP 2 model: network, image processor and tokenizer.
pub struct SiglipEncoder {
    pub model: Siglip,
    pub image_processor: SiglipImageProcessor,
    pub text_processor: Option<TextProcessor>,
    device: Device,
    /// The most inputs one forward pass takes ([`LoadOptions::max_batch`]).
    max_batch: usize,
    dtype: DType,
    report: LoadReport,
}

/// Keys a SigLIP checkpoint may hold that the model does not use.
const IGNORED_KEYS: &[&str] = &["position_ids"];

impl SiglipEncoder {
    /// Loads from a directory holding `config.json`, `model.safetensors` (or sharded
    /// `model-*.safetensors`) and optionally `tokenizer.json` and `preprocessor_config.json`.
    pub fn from_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let cfg = SiglipConfig::from_json_file(&dir.join("config.json"))?;
        let weights = safetensors_files(dir)?;
        let tokenizer = dir.join("tokenizer.json");
        let tokenizer = tokenizer.exists().then_some(tokenizer);
        let max_patches = read_max_num_patches(dir)?;
        Self::from_files(&cfg, &weights, tokenizer.as_deref(), max_patches, opts)
    }

    /// Loads from explicit files.
    pub fn from_files(
        cfg: &SiglipConfig,
        weights: &[PathBuf],
        tokenizer: Option<&Path>,
        max_num_patches: Option<usize>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let source = crate::checkpoint::open_safetensors(weights)?;
        let name = weights
            .first()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Self::from_source(cfg, source, &name, tokenizer, max_num_patches, opts)
    }

    /// Loads from any tensor source.
    pub fn from_source(
        cfg: &SiglipConfig,
        source: TensorSource,
        source_name: &str,
        tokenizer: Option<&Path>,
        max_num_patches: Option<usize>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let (model, report) = Loader::new(source, source_name).build_model(
            opts.dtype,
            &opts.device,
            IGNORED_KEYS,
            |vb| Siglip::new(cfg, vb),
        )?;
        let v = &cfg.vision_config;
        let image_processor = if cfg.is_naflex() {
            let p = NaFlexProcessor::new(v.patch_size, max_num_patches.unwrap_or(v.num_patches));
            p.validate()?;
            SiglipImageProcessor::NaFlex(p)
        } else {
            SiglipImageProcessor::Fixed(ImageProcessor::siglip2(v.image_size))
        };
        if opts.strict {
            report.check_strict(source_name)?;
        }
        Ok(Self {
            model,
            image_processor,
            text_processor: TextProcessor::from_optional_file(
                tokenizer,
                TextStyle::Gemma,
                cfg.text_config.max_position_embeddings,
            )?,
            device: opts.device.clone(),
            max_batch: opts.max_batch.max(1),
            dtype: opts.dtype,
            report,
        })
    }

    /// What the loader found: unused and ignored checkpoint keys.
    pub fn load_report(&self) -> &LoadReport {
        &self.report
    }

    /// Normalised embeddings of preprocessed fixed-resolution pixels.
    pub fn image_embeds_from_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let f = self
            .model
            .get_image_features(&pixel_values.to_device(&self.device)?)?;
        Ok(ops::l2_normalize(&f.to_dtype(DType::F32)?)?)
    }

    /// Normalised embeddings of a preprocessed NaFlex batch.
    pub fn image_embeds_from_naflex(&self, batch: &NaFlexBatch) -> Result<Tensor> {
        let f = self.model.get_image_features_naflex(batch)?;
        Ok(ops::l2_normalize(&f.to_dtype(DType::F32)?)?)
    }

    /// Normalised embeddings of token ids `[m, 64]`.
    pub fn text_embeds_from_ids(&self, input_ids: &Tensor) -> Result<Tensor> {
        let f = self
            .model
            .get_text_features(&input_ids.to_device(&self.device)?, None)?;
        Ok(ops::l2_normalize(&f.to_dtype(DType::F32)?)?)
    }

    fn text_processor(&self) -> Result<&TextProcessor> {
        self.text_processor
            .as_ref()
            .ok_or_else(|| Error::Tokenizer {
                origin: "model directory".into(),
                reason: "no tokenizer.json was loaded with this model".into(),
            })
    }
}

impl DualEncoder for SiglipEncoder {
    fn load_report(&self) -> &LoadReport {
        &self.report
    }

    fn family(&self) -> Family {
        if self.model.cfg.is_naflex() {
            Family::Siglip2Naflex
        } else {
            Family::Siglip
        }
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn embed_dim(&self) -> usize {
        self.model.cfg.vision_config.hidden_size
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn embed_image_batch(&self, images: &[ImageInput]) -> Result<Tensor> {
        match &self.image_processor {
            SiglipImageProcessor::Fixed(p) => {
                self.image_embeds_from_pixels(&p.process_batch(images, &self.device)?)
            }
            SiglipImageProcessor::NaFlex(p) => {
                self.image_embeds_from_naflex(&p.process_batch(images, &self.device)?)
            }
        }
    }

    fn embed_text_batch(&self, texts: &[&str]) -> Result<Tensor> {
        let batch = self.text_processor()?.encode_batch(texts, &self.device)?;
        self.text_embeds_from_ids(&batch.input_ids)
    }

    fn logits(&self, image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        let l = self.model.logits(
            &image_embeds.to_dtype(DType::F32)?,
            &text_embeds.to_dtype(DType::F32)?,
        )?;
        Ok(l)
    }

    fn scoring(&self) -> Scoring {
        Scoring::Sigmoid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse() {
        for p in PRESETS {
            let c = SiglipConfig::preset(p).unwrap_or_else(|| panic!("preset {p}"));
            assert_eq!(c.is_naflex(), p.ends_with("naflex"));
        }
        let g = SiglipConfig::preset("siglip2-giant-opt-patch16-256").unwrap();
        assert_eq!(g.text_config.projection_size(), 1536);
        assert!(SiglipConfig::preset("siglip2-huge-patch16-224").is_none());
    }
}

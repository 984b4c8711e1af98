//! BriVL (WenLan 1.0): a region-based image tower and a BERT text tower trained with MoCo.
//!
//! The whole forward pass is in this file, following the official inference code
//! (BAAI-WuDao/BriVL, `models/vl_model.py`) and the Nature Communications release
//! (neilfei/brivl-nmi), which share it:
//!
//! * **image** (`imgencoder`): timm `tf_efficientnet_b5_ns` `forward_features` → for every
//!   box an affine sampling grid (θ in the `align_corners=True` convention, sampled with
//!   `align_corners=False`, exactly as the original; it is not RoIAlign) of `GRID_SIZE²`
//!   bilinear samples → a 1×1 conv with bias (`learnable.max_pool.0`) and the average of the
//!   samples → L2-normalise each box vector → `IMG_TRANSFORMER_LAYER` post-norm
//!   `nn.TransformerEncoderLayer`s (`learnable.imgAtt`, ReLU, feed-forward 2048, eps 1e-5)
//!   with the box mask as key-padding mask → mean over the real boxes → `learnable.imgFC`
//!   (Linear, ReLU, Linear) → L2-normalise;
//! * **text** (`textencoder`): `hfl/chinese-roberta-wwm-ext` BERT **called without an
//!   attention mask** (it attends to `[PAD]`, so outputs depend on the padding to
//!   `MAX_TEXT_LEN`) → L2-normalise each token → `learnable.textAtt` with the padding mask →
//!   mean over the real tokens (`[CLS]` and `[SEP]` included) → `learnable.textFC` →
//!   L2-normalise.
//!
//! The 1×1 conv and the average pool are both linear, so the samples are averaged first and
//! the conv applied once per box: the same numbers as conv-then-pool, `GRID_SIZE²` times
//! cheaper.
//!
//! **Boxes** are `[x1, y1, x2, y2]` in original-image pixels (a detector's output). They are
//! clipped to the image, scaled anisotropically to `IMG_SIZE` (the image is resized to a
//! square without keeping its aspect ratio), followed by the whole-image box
//! `[0, 0, IMG_SIZE, IMG_SIZE]`, and zero-padded to `MAX_IMG_LEN` with a 0/1 mask. Without
//! boxes an `N × N` grid plus the whole image is used (`BOX_GRID`, 6 in both published
//! configs, as the Nature Communications code does), or only the whole image with `N = 0`
//! ([`LoadOptions::box_grid`] overrides `BOX_GRID`).
//!
//! **Scores.** Retrieval in the original ranks by the cosine (the dot product of the
//! normalised embeddings). [`DualEncoder::logits`] returns `cosine / TEMPERATURE` (0.07, the
//! temperature of the training loss), so that [`Scoring::Softmax`] over texts gives the
//! distribution the model was trained to produce; the ranking is the cosine's.
//!
//! **Image preprocessing** follows the pinned torchvision 0.9.1: `ToTensor`, a square
//! bilinear resize of the float tensor **without** antialias (`F.interpolate`,
//! `align_corners=False`), ImageNet mean and std ([`ImageProcessor::brivl`]). Newer
//! torchvision antialiases tensors by default;
//! [`ResizeKind::BilinearAntialias`](crate::preprocess::ResizeKind::BilinearAntialias)
//! reproduces that for comparisons.
//!
//! Boxes are prepared by [`crate::preprocess::boxes`], checkpoints found and recognised by
//! [`crate::checkpoint::discover`]; both are re-exported here under their former names.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::checkpoint::discover;
use crate::checkpoint::{LoadReport, Loader, TensorSource};
use crate::error::{Error, Result};
use crate::models::{cosine_matrix, DualEncoder, Family, LoadOptions, Scoring};
use crate::nn::efficientnet::{EfficientNet, EfficientNetConfig};
use crate::nn::grid_sample::{affine_grid, sampling_matrix};
use crate::nn::ops::{self, key_padding_bias, Activation};
use crate::nn::{Bert, BertConfig, LayerDims, PostNormLayer};
use crate::preprocess::processor::map_decoded;
use crate::preprocess::{ImageInput, ImageProcessor, TextProcessor, TextStyle};

pub use crate::checkpoint::discover::is_brivl_path;
pub use crate::preprocess::boxes::{pad_boxes, prepare_boxes};
pub use crate::preprocess::{IMAGENET_MEAN, IMAGENET_STD};

/// Additive attention bias for padded keys (PyTorch fills `-inf`; this gives the same
/// weights, exactly zero, without infinities).
const MASK_VALUE: f64 = -1e9;

/// Keys of a BriVL checkpoint that inference does not read.
pub const IGNORED_KEYS: &[&str] = &[
    "position_ids",
    "num_batches_tracked",
    "backbone.classifier.",
    "bert.pooler.",
    "imgencoder_mom.*",
    "textencoder_mom.*",
];

/// A published BriVL checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrivlPreset {
    pub name: &'static str,
    /// The Hugging Face repository and file of the weights, when there is a mirror.
    pub hub: Option<(&'static str, &'static str)>,
    /// Where the weights come from otherwise.
    pub note: &'static str,
}

/// The Chinese BERT whose tokenizer every BriVL model uses.
pub const TOKENIZER_REPO: &str = "hfl/chinese-roberta-wwm-ext";

/// Every BriVL preset.
pub const PRESETS: &[BrivlPreset] = &[
    BrivlPreset {
        name: "brivl-1.0",
        hub: Some((
            "shunxing1234/BriVL",
            "BriVL-pretrain-model/BriVL-1.0-5500w.pth",
        )),
        note: "BriVL-1.0-5500w.pth (2,192,894,015 bytes, sha256 \
               a5965b402c0c13d7745afb108b0d043c65784aa623c3cab4a68cea4eb40b2e97); the \
               official host wudaoai.cn needs an application",
    },
    BrivlPreset {
        name: "brivl-nmi",
        hub: None,
        note: "the Nature Communications model (brivl-with-roberta-base.pth) has no Hugging \
               Face mirror: download it from the Google Drive link in the README of \
               github.com/neilfei/brivl-nmi and open it with `load_path` (a file named \
               brivl-with-roberta-base*.pth gets this preset's config)",
    },
];

fn default_name() -> String {
    "VL".into()
}
fn default_encoder() -> String {
    TOKENIZER_REPO.into()
}
fn default_cnn() -> String {
    "tf_efficientnet_b5_ns".into()
}
fn default_box_grid() -> usize {
    6
}
fn default_grid_size() -> usize {
    4
}
fn default_topk() -> usize {
    1
}
fn default_queue() -> usize {
    9600
}
fn default_momentum() -> f64 {
    0.99
}
fn default_temperature() -> f64 {
    0.07
}
fn default_true() -> bool {
    true
}
fn default_ff() -> usize {
    2048
}

/// A BriVL configuration: the `MODEL:` section of the original YAML files (`test_xyb.yml`,
/// `eval.yml`) with its upper-case keys, plus optional lower-case fields that state the
/// backbone and BERT shapes directly (otherwise derived from `CNN` and `ENCODER`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BrivlConfig {
    #[serde(rename = "NAME", default = "default_name")]
    pub name: String,
    /// The text BERT (`hfl/chinese-roberta-wwm-ext` or `...-large`).
    #[serde(rename = "ENCODER", default = "default_encoder")]
    pub encoder: String,
    #[serde(rename = "TEXT_FEATURE_DIM")]
    pub text_feature_dim: usize,
    #[serde(rename = "TEXT_TRANSFORMER_HEAD")]
    pub text_transformer_head: usize,
    #[serde(rename = "TEXT_TRANSFORMER_LAYER")]
    pub text_transformer_layer: usize,
    /// Texts are padded (and cut) to this many tokens; the BERT sees the padding.
    #[serde(rename = "MAX_TEXT_LEN")]
    pub max_text_len: usize,
    /// The timm backbone (`tf_efficientnet_b5_ns`).
    #[serde(rename = "CNN", default = "default_cnn")]
    pub cnn: String,
    #[serde(rename = "IMG_SIZE")]
    pub img_size: usize,
    #[serde(rename = "IMG_FEATURE_DIM")]
    pub img_feature_dim: usize,
    #[serde(rename = "IMG_TRANSFORMER_HEAD")]
    pub img_transformer_head: usize,
    #[serde(rename = "IMG_TRANSFORMER_LAYER")]
    pub img_transformer_layer: usize,
    /// Boxes per image including the whole-image box (37 = 36 detector boxes + 1).
    #[serde(rename = "MAX_IMG_LEN")]
    pub max_img_len: usize,
    /// The `N × N` grid of boxes used for images without boxes (the NMI recipe).
    #[serde(rename = "BOX_GRID", default = "default_box_grid")]
    pub box_grid: usize,
    /// Sampling points per box side.
    #[serde(rename = "GRID_SIZE", default = "default_grid_size")]
    pub grid_size: usize,
    #[serde(rename = "TOPK", default = "default_topk")]
    pub topk: usize,
    /// MoCo queue length (training).
    #[serde(rename = "QUEUE_SIZE", default = "default_queue")]
    pub queue_size: usize,
    /// MoCo momentum (training).
    #[serde(rename = "MOMENTUM", default = "default_momentum")]
    pub momentum: f64,
    /// Contrastive temperature (training; also the logit scale of [`DualEncoder::logits`]).
    #[serde(rename = "TEMPERATURE", default = "default_temperature")]
    pub temperature: f64,
    #[serde(rename = "IS_EXTRACT", default = "default_true")]
    pub is_extract: bool,
    /// The backbone's multipliers; derived from `CNN` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub efficientnet: Option<EfficientNetConfig>,
    /// The text BERT's shape; derived from `ENCODER` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder: Option<BertConfig>,
    /// Feed-forward width of the `imgAtt`/`textAtt` layers (PyTorch's default 2048).
    #[serde(default = "default_ff")]
    pub transformer_ff_dim: usize,
}

impl BrivlConfig {
    /// `brivl-1.0` (cfg `test_xyb.yml`: 380 px, detector boxes) or `brivl-nmi` (the Nature
    /// Communications model: 456 px, 6×6 grid boxes, texts of 32 tokens as in its example).
    pub fn preset(name: &str) -> Option<Self> {
        let base = Self {
            name: "VL".into(),
            encoder: TOKENIZER_REPO.into(),
            text_feature_dim: 768,
            text_transformer_head: 4,
            text_transformer_layer: 4,
            max_text_len: 80,
            cnn: "tf_efficientnet_b5_ns".into(),
            img_size: 380,
            img_feature_dim: 2048,
            img_transformer_head: 4,
            img_transformer_layer: 4,
            max_img_len: 37,
            box_grid: 6,
            grid_size: 4,
            topk: 1,
            queue_size: 9600,
            momentum: 0.99,
            temperature: 0.07,
            is_extract: true,
            efficientnet: None,
            text_encoder: None,
            transformer_ff_dim: 2048,
        };
        match name {
            "brivl-1.0" => Some(base),
            "brivl-nmi" => Some(Self {
                img_size: 456,
                max_text_len: 32,
                ..base
            }),
            _ => None,
        }
    }

    /// Reads a config file: the original YAML (`MODEL:` section), or JSON / YAML holding the
    /// fields at the top level or under `MODEL` or `config` (with `efficientnet` and
    /// `text_encoder` beside it, as in the reference fixtures' JSON).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let origin = path.display().to_string();
        let value: serde_json::Value = if path.extension().and_then(|e| e.to_str()) == Some("json")
        {
            serde_json::from_str(&text).map_err(|e| Error::parse(&origin, e))?
        } else {
            serde_yaml::from_str(&text).map_err(|e| Error::parse(&origin, e))?
        };
        Self::from_value(&value, &origin)
    }

    /// Parses a config from YAML text (see [`BrivlConfig::from_file`]).
    pub fn from_yaml_str(text: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_yaml::from_str(text).map_err(|e| Error::parse("BriVL YAML config", e))?;
        Self::from_value(&value, "BriVL YAML config")
    }

    /// Parses a config from a JSON value (see [`BrivlConfig::from_file`]).
    pub fn from_value(value: &serde_json::Value, origin: &str) -> Result<Self> {
        let mut section = value
            .get("MODEL")
            .or_else(|| value.get("config"))
            .cloned()
            .unwrap_or_else(|| value.clone());
        if let (Some(obj), Some(top)) = (section.as_object_mut(), value.as_object()) {
            for extra in ["efficientnet", "text_encoder", "transformer_ff_dim"] {
                if let (false, Some(v)) = (obj.contains_key(extra), top.get(extra)) {
                    obj.insert(extra.to_string(), v.clone());
                }
            }
        }
        let cfg: Self = serde_json::from_value(section).map_err(|e| Error::parse(origin, e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The backbone: the explicit `efficientnet` section, or the multipliers of `CNN`.
    pub fn efficientnet_config(&self) -> Result<EfficientNetConfig> {
        match &self.efficientnet {
            Some(e) => Ok(e.clone()),
            None => EfficientNetConfig::tf_variant(&self.cnn).ok_or_else(|| {
                Error::Config(format!(
                    "unknown BriVL CNN `{}` (expected tf_efficientnet_b0..b8[_ns|_ap] or an \
                     `efficientnet` section with the multipliers)",
                    self.cnn
                ))
            }),
        }
    }

    /// The text BERT: the explicit `text_encoder` section, or the shape `ENCODER` names.
    pub fn bert_config(&self) -> Result<BertConfig> {
        if let Some(b) = &self.text_encoder {
            return Ok(b.clone());
        }
        let name = self.encoder.to_ascii_lowercase();
        if name.contains("chinese-roberta-wwm-ext") || name.contains("chinese-bert-wwm") {
            Ok(if name.contains("large") {
                BertConfig::chinese_roberta_wwm_ext_large()
            } else {
                BertConfig::chinese_roberta_wwm_ext()
            })
        } else {
            Err(Error::Config(format!(
                "unknown BriVL text ENCODER `{}`: add a `text_encoder` section with the BERT \
                 shape",
                self.encoder
            )))
        }
    }

    /// Checks that the dimensions fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let eff = self.efficientnet_config()?;
        eff.validate().map_err(Error::Config)?;
        let bert = self.bert_config()?;
        if bert.hidden_size != self.text_feature_dim {
            return bad(format!(
                "TEXT_FEATURE_DIM {} differs from the BERT width {}",
                self.text_feature_dim, bert.hidden_size
            ));
        }
        if eff.feature_channels() != self.img_feature_dim {
            return bad(format!(
                "IMG_FEATURE_DIM {} differs from the backbone's {} features",
                self.img_feature_dim,
                eff.feature_channels()
            ));
        }
        for (what, dim, heads) in [
            ("image", self.img_feature_dim, self.img_transformer_head),
            ("text", self.text_feature_dim, self.text_transformer_head),
        ] {
            if heads == 0 || dim % heads != 0 {
                return bad(format!(
                    "{what} transformer width {dim} is not divisible by {heads} heads"
                ));
            }
        }
        if self.max_img_len == 0 || self.grid_size == 0 || self.img_size < 32 {
            return bad(format!(
                "MAX_IMG_LEN {}, GRID_SIZE {} and IMG_SIZE {} must be positive (IMG_SIZE >= 32)",
                self.max_img_len, self.grid_size, self.img_size
            ));
        }
        if self.max_text_len < 2 || self.max_text_len > bert.max_position_embeddings {
            return bad(format!(
                "MAX_TEXT_LEN {} must be between 2 and the BERT's {} positions",
                self.max_text_len, bert.max_position_embeddings
            ));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!("TEMPERATURE {} must be positive", self.temperature));
        }
        Ok(())
    }

    fn layer_dims(&self, hidden: usize, heads: usize) -> LayerDims {
        LayerDims {
            hidden,
            heads,
            intermediate: self.transformer_ff_dim,
            eps: 1e-5,
            act: Activation::Relu,
        }
    }
}

/// BriVL's `FakeTransformer`: `fc2(relu(fc1(x)))`.
#[derive(Debug, Clone)]
pub struct FcHead {
    fc1: Linear,
    fc2: Linear,
}

impl FcHead {
    pub fn new(inp: usize, hidden: usize, out: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            fc1: candle_nn::linear(inp, hidden, vb.pp("fc1"))?,
            fc2: candle_nn::linear(hidden, out, vb.pp("fc2"))?,
        })
    }
}

impl Module for FcHead {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(xs)?.relu()?)
    }
}

/// `(x · m).sum(1) / m.sum(1)` for `x` `[b, l, d]` and a 0/1 mask `[b, l]`.
fn masked_mean(x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let m = mask.to_dtype(x.dtype())?.unsqueeze(2)?;
    x.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?)
}

fn encode_layers(
    layers: &[PostNormLayer],
    x: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let bias = key_padding_bias(mask, MASK_VALUE, x.dtype())?;
    let mut x = x.clone();
    for layer in layers {
        x = layer.forward(&x, Some(&bias))?;
    }
    Ok(x)
}

/// The affine θ `[2, 3]` of one box in feature-map coordinates (the original's
/// `align_corners=True`-style formula), in f32 as PyTorch computes it.
pub fn box_theta(b: [f32; 4], ratio: f32, h: usize, w: usize) -> [f32; 6] {
    let (x1, y1, x2, y2) = (b[0] / ratio, b[1] / ratio, b[2] / ratio, b[3] / ratio);
    let (wm, hm) = (w as f32 - 1.0, h as f32 - 1.0);
    [
        (x2 - x1) / wm,
        0.0,
        (x1 + x2 - w as f32 + 1.0) / wm,
        0.0,
        (y2 - y1) / hm,
        (y1 + y2 - h as f32 + 1.0) / hm,
    ]
}

/// The image tower (`imgencoder`).
#[derive(Debug, Clone)]
pub struct BrivlImageEncoder {
    pub backbone: EfficientNet,
    /// `learnable.max_pool.0`, the 1×1 conv as a linear map.
    pool_conv: Linear,
    img_att: Vec<PostNormLayer>,
    img_fc: FcHead,
    img_size: usize,
    grid_size: usize,
}

impl BrivlImageEncoder {
    pub fn new(cfg: &BrivlConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let eff = cfg
            .efficientnet_config()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let d = cfg.img_feature_dim;
        let backbone = EfficientNet::new(&eff, vb.pp("backbone"))?;
        let vl = vb.pp("learnable");
        let pool = vl.pp("max_pool").pp("0");
        let pool_conv = Linear::new(
            pool.get((d, d, 1, 1), "weight")?.reshape((d, d))?,
            Some(pool.get(d, "bias")?),
        );
        let dims = cfg.layer_dims(d, cfg.img_transformer_head);
        let va = vl.pp("imgAtt").pp("layers");
        let img_att = (0..cfg.img_transformer_layer)
            .map(|i| PostNormLayer::new(&dims, va.pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            backbone,
            pool_conv,
            img_att,
            img_fc: FcHead::new(d, d, d, vl.pp("imgFC"))?,
            img_size: cfg.img_size,
            grid_size: cfg.grid_size,
        })
    }

    /// RoI grid pooling: `features` `[b, c, h, w]` and `boxes` `[b, l, 4]` (model pixels) to
    /// one vector per box `[b, l, c]` (after the 1×1 conv and the average pool).
    pub fn roi_grid_pool(&self, features: &Tensor, boxes: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = features.dims4()?;
        let (bb, l, four) = boxes.dims3()?;
        if bb != b || four != 4 {
            candle_core::bail!(
                "boxes {:?} do not fit a batch of {b} feature maps",
                boxes.dims()
            )
        }
        if h < 2 || w < 2 {
            candle_core::bail!("feature map {h}x{w} is too small for RoI grid pooling")
        }
        let ratio = self.img_size as f32 / h as f32;
        let flat = boxes
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut thetas = Vec::with_capacity(b * l * 6);
        for bx in flat.chunks_exact(4) {
            thetas.extend_from_slice(&box_theta([bx[0], bx[1], bx[2], bx[3]], ratio, h, w));
        }
        let theta = Tensor::from_vec(thetas, (b * l, 2, 3), &Device::Cpu)?;
        let g = self.grid_size;
        let grid = affine_grid(&theta, g, g)?;
        // [b·l, g·g, h·w] -> the average of the g·g samples of each box: [b, l, h·w].
        let m = sampling_matrix(&grid, h, w, DType::F32, &Device::Cpu)?
            .mean(1)?
            .reshape((b, l, h * w))?
            .to_dtype(features.dtype())?
            .to_device(features.device())?;
        let feats = features.reshape((b, c, h * w))?.transpose(1, 2)?;
        let sampled = m.matmul(&feats.contiguous()?)?;
        self.pool_conv.forward(&sampled)
    }

    /// Unnormalised image features `[b, d]` from `pixel_values` `[b, 3, s, s]`, `boxes`
    /// `[b, l, 4]` in model pixels and `box_mask` `[b, l]` (1 for real boxes).
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        boxes: &Tensor,
        box_mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let feats = self.backbone.forward_features(pixel_values)?;
        let x = self.roi_grid_pool(&feats, boxes)?;
        let x = ops::l2_normalize(&x)?;
        let x = encode_layers(&self.img_att, &x, box_mask)?;
        self.img_fc.forward(&masked_mean(&x, box_mask)?)
    }
}

/// The text tower (`textencoder`).
#[derive(Debug, Clone)]
pub struct BrivlTextEncoder {
    pub bert: Bert,
    text_att: Vec<PostNormLayer>,
    text_fc: FcHead,
    max_positions: usize,
}

impl BrivlTextEncoder {
    pub fn new(cfg: &BrivlConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let bert_cfg = cfg
            .bert_config()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let bert = Bert::new(&bert_cfg, vb.pp("backbone").pp("bert"))?;
        let vl = vb.pp("learnable");
        let d = cfg.text_feature_dim;
        let dims = cfg.layer_dims(d, cfg.text_transformer_head);
        let va = vl.pp("textAtt").pp("layers");
        let text_att = (0..cfg.text_transformer_layer)
            .map(|i| PostNormLayer::new(&dims, va.pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            bert,
            text_att,
            text_fc: FcHead::new(d, cfg.img_feature_dim, cfg.img_feature_dim, vl.pp("textFC"))?,
            max_positions: bert_cfg.max_position_embeddings,
        })
    }

    /// Unnormalised text features `[b, d]` from `input_ids` `[b, len]` and the 0/1 mask of
    /// the real tokens `[b, len]` (the BERT itself sees every position).
    pub fn forward(&self, input_ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (_, len) = input_ids.dims2()?;
        if len > self.max_positions {
            candle_core::bail!(
                "text length {len} exceeds the BERT's {} positions",
                self.max_positions
            )
        }
        let h = self.bert.forward(input_ids, None, None)?;
        let x = ops::l2_normalize(&h)?;
        let x = encode_layers(&self.text_att, &x, mask)?;
        self.text_fc.forward(&masked_mean(&x, mask)?)
    }
}

/// The BriVL network: the query encoders `imgencoder` and `textencoder` (the momentum copies
/// `*_mom` are only needed for MoCo training).
#[derive(Debug, Clone)]
pub struct Brivl {
    pub image: BrivlImageEncoder,
    pub text: BrivlTextEncoder,
    cfg: BrivlConfig,
}

impl Brivl {
    /// Builds the network from tensors named as in the checkpoint's `learnable` dict.
    pub fn new(cfg: &BrivlConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(Self {
            image: BrivlImageEncoder::new(cfg, vb.pp("imgencoder"))?,
            text: BrivlTextEncoder::new(cfg, vb.pp("textencoder"))?,
            cfg: cfg.clone(),
        })
    }

    /// Switches the image backbone's BatchNorm to batch statistics (PyTorch's train mode;
    /// see [`EfficientNet::set_batch_norm_training`]) or back to the running ones.
    pub fn set_batch_norm_training(&self, on: bool) {
        self.image.backbone.set_batch_norm_training(on);
    }

    /// Whether the image backbone's BatchNorm uses batch statistics.
    pub fn batch_norm_training(&self) -> bool {
        self.image.backbone.batch_norm_training()
    }

    pub fn config(&self) -> &BrivlConfig {
        &self.cfg
    }

    /// L2-normalised image embeddings (see [`BrivlImageEncoder::forward`]).
    pub fn image_embeds(
        &self,
        pixel_values: &Tensor,
        boxes: &Tensor,
        box_mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        ops::l2_normalize(&self.image.forward(pixel_values, boxes, box_mask)?)
    }

    /// L2-normalised text embeddings (see [`BrivlTextEncoder::forward`]).
    pub fn text_embeds(&self, input_ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        ops::l2_normalize(&self.text.forward(input_ids, mask)?)
    }
}

/// A complete BriVL model: network, image and box preprocessing, tokenizer.
pub struct BrivlEncoder {
    pub model: Brivl,
    pub image_processor: ImageProcessor,
    pub text_processor: Option<TextProcessor>,
    /// Grid used for images without boxes (0: the whole image only).
    pub box_grid: usize,
    device: Device,
    /// The most inputs one forward pass takes ([`LoadOptions::max_batch`]).
    max_batch: usize,
    dtype: DType,
    report: LoadReport,
}

impl std::fmt::Debug for BrivlEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrivlEncoder")
            .field("config", self.model.config())
            .field("box_grid", &self.box_grid)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .finish()
    }
}

/// Opens a BriVL checkpoint (`.pth` with the `learnable` dict, or a converted
/// `.safetensors`), or says what the file holds instead ([`Error::WrongFamily`]).
pub fn open_checkpoint(path: &Path) -> Result<TensorSource> {
    discover::open_checkpoint(path, &discover::BRIVL).map(|(source, _)| source)
}

/// The config of a checkpoint without a config file: the published shapes give the preset
/// (`brivl-nmi` for a file named like the NMI release, `brivl-1.0` otherwise).
fn infer_config(source: &TensorSource, path: &Path) -> Result<BrivlConfig> {
    let shapes = source.shapes();
    let shape = |k: &str| shapes.get(k).cloned().unwrap_or_default();
    let published = shape("imgencoder.backbone.conv_stem.weight") == [48, 3, 3, 3]
        && shape("imgencoder.learnable.max_pool.0.weight") == [2048, 2048, 1, 1]
        && shape("textencoder.backbone.bert.embeddings.word_embeddings.weight") == [21128, 768]
        && shape("textencoder.learnable.textFC.fc1.weight") == [2048, 768];
    if !published {
        return Err(Error::Config(format!(
            "{}: the tensor shapes are not those of a published BriVL model; put a config \
             (config.yaml with the original MODEL: section, or config.json) next to it",
            path.display()
        )));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let preset = if name.contains("roberta-base") || name.contains("nmi") {
        "brivl-nmi"
    } else {
        "brivl-1.0"
    };
    BrivlConfig::preset(preset)
        .ok_or_else(|| Error::Config(format!("missing BriVL preset {preset}")))
}

impl BrivlEncoder {
    /// Loads from any tensor source holding the `learnable` dict's tensors.
    pub fn from_source(
        cfg: &BrivlConfig,
        source: TensorSource,
        source_name: &str,
        tokenizer: Option<&Path>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        cfg.validate()?;
        let (model, report) = Loader::new(source, source_name).build_model(
            opts.dtype,
            &opts.device,
            IGNORED_KEYS,
            |vb| Brivl::new(cfg, vb),
        )?;
        if opts.strict {
            report.check_strict(source_name)?;
        }
        Self::from_model(model, report, tokenizer, opts)
    }

    /// Wraps a built network (e.g. one made trainable with [`Loader::trainable`]).
    pub fn from_model(
        model: Brivl,
        report: LoadReport,
        tokenizer: Option<&Path>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let cfg = model.config();
        Ok(Self {
            text_processor: TextProcessor::from_optional_file(
                tokenizer,
                TextStyle::Bert,
                cfg.max_text_len,
            )?,
            image_processor: ImageProcessor::brivl(cfg.img_size),
            box_grid: opts.box_grid.unwrap_or(cfg.box_grid),
            model,
            device: opts.device.clone(),
            max_batch: opts.max_batch.max(1),
            dtype: opts.dtype,
            report,
        })
    }

    /// Loads a checkpoint file (`.pth` with `learnable`, or converted `.safetensors`).
    pub fn from_checkpoint(
        cfg: &BrivlConfig,
        checkpoint: &Path,
        tokenizer: Option<&Path>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let source = open_checkpoint(checkpoint)?;
        Self::from_source(
            cfg,
            source,
            &checkpoint.display().to_string(),
            tokenizer,
            opts,
        )
    }

    /// Loads a checkpoint file, or a directory holding one. The config comes from
    /// `config.yaml` / `config.yml` / `config.json` beside it, else from the tensor shapes
    /// (the published models); the tokenizer from `tokenizer.json` beside it, if any.
    pub fn from_path(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let (dir, ckpt) = if path.is_dir() {
            (
                path.to_path_buf(),
                discover::first_checkpoint(path, &discover::BRIVL)?,
            )
        } else {
            let dir = path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            (dir, path.to_path_buf())
        };
        let source = open_checkpoint(&ckpt)?;
        let cfg = match discover::brivl_config_in_dir(&dir) {
            Some(p) => BrivlConfig::from_file(&p)?,
            None => infer_config(&source, &ckpt)?,
        };
        let tok = dir.join("tokenizer.json");
        let tok = tok.is_file().then_some(tok);
        Self::from_source(
            &cfg,
            source,
            &ckpt.display().to_string(),
            tok.as_deref(),
            opts,
        )
    }

    /// Downloads (or finds in the cache) a preset's weights and the tokenizer.
    #[cfg(feature = "hub")]
    pub fn from_preset(name: &str, opts: &LoadOptions) -> Result<Self> {
        use crate::checkpoint::hub;
        let preset =
            PRESETS
                .iter()
                .find(|p| p.name == name)
                .ok_or_else(|| Error::UnknownPreset {
                    name: name.to_string(),
                    known: PRESETS
                        .iter()
                        .map(|p| p.name)
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
        let cfg = BrivlConfig::preset(name)
            .ok_or_else(|| Error::Config(format!("no config for preset {name}")))?;
        let Some((repo, file)) = preset.hub else {
            return Err(Error::Download {
                repo: "(no mirror)".into(),
                file: name.into(),
                reason: preset.note.into(),
            });
        };
        let weights = hub::fetch(repo, file, true)?;
        let tokenizer = hub::fetch(TOKENIZER_REPO, "tokenizer.json", false)?;
        Self::from_checkpoint(&cfg, &weights, Some(&tokenizer), opts)
    }

    /// Without the `hub` feature presets cannot be downloaded.
    #[cfg(not(feature = "hub"))]
    pub fn from_preset(name: &str, _opts: &LoadOptions) -> Result<Self> {
        Err(Error::Download {
            repo: "shunxing1234/BriVL".into(),
            file: name.into(),
            reason: "built without the `hub` feature; pass a local checkpoint instead".into(),
        })
    }

    /// What the loader found: unused and ignored checkpoint keys.
    pub fn load_report(&self) -> &LoadReport {
        &self.report
    }

    pub fn config(&self) -> &BrivlConfig {
        self.model.config()
    }

    /// Normalised image embeddings `[b, d]` (f32) of preprocessed `pixel_values`
    /// `[b, 3, IMG_SIZE, IMG_SIZE]`, `boxes` `[b, MAX_IMG_LEN, 4]` in model pixels (the
    /// whole-image box included) and `box_mask` `[b, MAX_IMG_LEN]`.
    pub fn image_embeds_from_pixels(
        &self,
        pixel_values: &Tensor,
        boxes: &Tensor,
        box_mask: &Tensor,
    ) -> Result<Tensor> {
        let cfg = self.model.config();
        let (b, c, h, w) = pixel_values.dims4()?;
        if c != 3 || h != cfg.img_size || w != cfg.img_size {
            return Err(Error::InvalidArgument(format!(
                "pixel_values {:?} must be [b, 3, {s}, {s}]",
                pixel_values.dims(),
                s = cfg.img_size
            )));
        }
        let (bb, l, four) = boxes.dims3()?;
        if bb != b || four != 4 || box_mask.dims() != [b, l] {
            return Err(Error::InvalidArgument(format!(
                "boxes {:?} and box_mask {:?} do not fit {b} images",
                boxes.dims(),
                box_mask.dims()
            )));
        }
        let mask = box_mask.to_dtype(DType::F32)?.to_device(&self.device)?;
        let counts = mask.sum(1)?.to_vec1::<f32>()?;
        if let Some(i) = counts.iter().position(|&n| n < 1.0) {
            return Err(Error::InvalidArgument(format!(
                "image {i} has no box in its mask (the whole-image box is always needed)"
            )));
        }
        let f = self.model.image.forward(
            &pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?,
            &boxes.to_device(&self.device)?,
            &mask,
        )?;
        Ok(ops::l2_normalize(&f.to_dtype(DType::F32)?)?)
    }

    /// Normalised text embeddings `[b, d]` of token ids `[b, len]` (padded with `[PAD]` = 0;
    /// the real tokens are those up to the last non-padding id, as the tokenizer's mask
    /// says). The published models saw `len = MAX_TEXT_LEN`.
    pub fn text_embeds_from_ids(&self, input_ids: &Tensor) -> Result<Tensor> {
        let ids = input_ids.to_dtype(DType::U32)?.to_device(&Device::Cpu)?;
        let (b, len) = ids.dims2()?;
        let rows = ids.to_vec2::<u32>()?;
        let mut mask = vec![0f32; b * len];
        for (i, row) in rows.iter().enumerate() {
            let n = row.iter().rposition(|&t| t != 0).map_or(0, |p| p + 1);
            if n == 0 {
                return Err(Error::Text(format!("text {i} has no tokens")));
            }
            mask[i * len..i * len + n].iter_mut().for_each(|v| *v = 1.0);
        }
        let mask = Tensor::from_vec(mask, (b, len), &self.device)?;
        self.text_embeds_with_mask(input_ids, &mask)
    }

    /// Normalised text embeddings with an explicit 0/1 mask of the real tokens.
    pub fn text_embeds_with_mask(&self, input_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        if input_ids.dims() != mask.dims() {
            return Err(Error::InvalidArgument(format!(
                "input_ids {:?} and mask {:?} differ in shape",
                input_ids.dims(),
                mask.dims()
            )));
        }
        let f = self.model.text.forward(
            &input_ids.to_device(&self.device)?,
            &mask.to_dtype(DType::F32)?.to_device(&self.device)?,
        )?;
        Ok(ops::l2_normalize(&f.to_dtype(DType::F32)?)?)
    }

    /// Decodes, resizes and normalises images and prepares their boxes: `(pixel_values,
    /// boxes, box_mask)` on the model's device.
    pub fn preprocess_images(&self, images: &[ImageInput]) -> Result<(Tensor, Tensor, Tensor)> {
        let cfg = self.model.config();
        let parts = map_decoded(images, |input, img| {
            let boxes = prepare_boxes(
                input.boxes.as_deref(),
                img.width(),
                img.height(),
                cfg.img_size,
                cfg.max_img_len,
                self.box_grid,
                &input.origin(),
            )?;
            Ok((self.image_processor.process_rgb(&img)?, boxes))
        })?;
        let (pixels, rows): (Vec<Tensor>, Vec<Vec<[f32; 4]>>) = parts.into_iter().unzip();
        let pixels = Tensor::stack(&pixels, 0)?.to_device(&self.device)?;
        let (boxes, mask) = pad_boxes(&rows, cfg.max_img_len, &self.device)?;
        Ok((pixels, boxes, mask))
    }

    fn text_processor(&self) -> Result<&TextProcessor> {
        self.text_processor
            .as_ref()
            .ok_or_else(|| Error::Tokenizer {
                origin: "BriVL model".into(),
                reason: format!(
                    "no tokenizer.json was loaded with this model (use {TOKENIZER_REPO}'s \
                     tokenizer.json)"
                ),
            })
    }
}

impl DualEncoder for BrivlEncoder {
    fn load_report(&self) -> &LoadReport {
        &self.report
    }

    fn family(&self) -> Family {
        Family::Brivl
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn embed_dim(&self) -> usize {
        self.model.config().img_feature_dim
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn embed_image_batch(&self, images: &[ImageInput]) -> Result<Tensor> {
        let (pixels, boxes, mask) = self.preprocess_images(images)?;
        self.image_embeds_from_pixels(&pixels, &boxes, &mask)
    }

    fn embed_text_batch(&self, texts: &[&str]) -> Result<Tensor> {
        let batch = self.text_processor()?.encode_batch(texts, &self.device)?;
        self.text_embeds_with_mask(&batch.input_ids, &batch.attention_mask)
    }

    /// `cosine / TEMPERATURE`.
    fn logits(&self, image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        let cos = cosine_matrix(&image_embeds.to_dtype(DType::F32)?, text_embeds)?;
        Ok((cos / self.model.config().temperature)?)
    }

    fn scoring(&self) -> Scoring {
        Scoring::Softmax
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate() {
        for p in PRESETS {
            let c = BrivlConfig::preset(p.name).unwrap();
            c.validate().unwrap();
            assert_eq!(c.efficientnet_config().unwrap().feature_channels(), 2048);
        }
        assert!(BrivlConfig::preset("brivl-2.0").is_none());
    }

    #[test]
    fn original_yaml_parses() {
        let yaml = "MODEL:\n    NAME: VL\n    ENCODER: 'hfl/chinese-roberta-wwm-ext'\n    \
                    TEXT_FEATURE_DIM: 768\n    TEXT_TRANSFORMER_HEAD: 4\n    \
                    TEXT_TRANSFORMER_LAYER: 4\n    MAX_TEXT_LEN: 80\n    \
                    CNN: 'tf_efficientnet_b5_ns'\n    IMG_SIZE: 380\n    \
                    IMG_FEATURE_DIM: 2048\n    IMG_TRANSFORMER_HEAD: 4\n    \
                    IMG_TRANSFORMER_LAYER: 4\n    MAX_IMG_LEN: 37\n    BOX_GRID: 6\n    \
                    TOPK: 1\n    QUEUE_SIZE: 9600\n    MOMENTUM: 0.99\n    \
                    TEMPERATURE: 0.07\n    GRID_SIZE: 4\n    IS_EXTRACT: True\n\
                    DATASET:\n    NAME: 'XYBDataset_all'\n";
        let c = BrivlConfig::from_yaml_str(yaml).unwrap();
        assert_eq!(c, BrivlConfig::preset("brivl-1.0").unwrap());
        let bad = yaml.replace("IMG_FEATURE_DIM: 2048", "IMG_FEATURE_DIM: 1024");
        assert!(matches!(
            BrivlConfig::from_yaml_str(&bad),
            Err(Error::Config(_))
        ));
    }
}

//! R2D2 and PRD2 (the yuxie11/R2D2 repository, "CCMB and R2D2", ACM MM 2023).
//!
//! The whole forward pass is in this file:
//!
//! * **image tower**: HF `CLIPVisionTransformer` ([`ClipVisionTransformer`]); R2D2 keeps
//!   every token of `last_hidden_state`, which is taken after `pre_layrnorm` and the encoder.
//!   `post_layernorm` is in the checkpoints but unused.
//! * **text tower**: HF `BertModel` (`hfl/chinese-roberta-wwm-ext`), called with the padding
//!   mask; texts are padded to 64 tokens. Token types are all zero.
//! * **dual encoder**: `vision_proj` and `text_proj` on the CLS token, then L2
//!   normalisation; logits are `cos / temp` with the raw temperature `temp`.
//! * **cross encoders** (R2D2 only): two 6-layer BLIP-style BERTs that skip their
//!   embeddings (`encoder_embeds`):
//!   * `text_joint_layer`: queries are the text hidden states, self-attention masked by the
//!     text padding mask, cross-attention over all image tokens (keys and values
//!     `Linear(vision_width, 768)`, no mask);
//!   * `img_joint_layer`: queries are `img_joint_proj(image tokens)`, self-attention over
//!     all image tokens (no mask), cross-attention over the text hidden states masked by the
//!     text padding mask.
//!
//!   Masks are additive: `(1 − m)·−10000` for self-attention (HF BERT) and `(1 − m)·−1e9`
//!   for cross-attention (`invert_attention_mask` in fp32).
//! * **ITM score**: `½[softmax(itm_head(text-joint CLS))₁ + softmax(itm_head_i(image-joint
//!   CLS))₁]`.
//!
//! PRD2 is the same dual encoder without the cross encoders.
//!
//! Checkpoints are `torch.save({'model': state_dict, ...})` zip files; they load directly or
//! after conversion to safetensors ([`convert_checkpoint`]). Keys the network does not use
//! (`position_ids`, the text pooler, the joint layers' embedding tables, `post_layernorm`)
//! are reported as ignored; anything else unused is reported as unexpected. The published
//! files are on Google Drive only (see [`PRESETS`]): download them by hand.
//!
//! ```no_run
//! use tuwen::models::r2d2::R2d2Encoder;
//! use tuwen::{DualEncoder, ImageInput, LoadOptions};
//!
//! # fn main() -> tuwen::Result<()> {
//! // A preset whose file is in $TUWEN_WEIGHTS_DIR, a .pth / .safetensors file, or a folder.
//! let model = R2d2Encoder::load("r2d2_pretrain_250m.pth", &LoadOptions::default())?;
//! let image = [ImageInput::path("jordan.jpg")];
//! let texts = ["乔丹投篮", "乔丹运球", "詹姆斯投篮"];
//! // Cross-encoder matching scores in [0, 1], [1, 3].
//! let itm = model.itm_scores(&image, &texts)?;
//! // Dual-encoder probabilities: softmax over the texts of cos / temp.
//! let probs = model.classify(&image, &texts, "{}")?;
//! println!("{itm:?}\n{probs}");
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::checkpoint::discover;
use crate::checkpoint::{LoadReport, Loader, TensorSource};
use crate::error::{Error, Result};
use crate::models::{
    cosine_matrix, CrossEncoder, CrossFeatures, DualEncoder, Family, LoadOptions, Scoring,
};
use crate::nn::linear::{linear, Linear};
use crate::nn::ops::{self, Activation};
use crate::nn::{Bert, BertConfig, ClipVisionConfig, ClipVisionTransformer};
use crate::preprocess::{ImageInput, ImageProcessor, TextProcessor, TextStyle};

pub use crate::checkpoint::discover::weights_dir;

/// Additive value for masked cross-attention keys (HF `invert_attention_mask` in fp32).
pub const CROSS_MASK_VALUE: f64 = -1e9;
/// The same in fp16, where HF used −1e4.
pub const CROSS_MASK_VALUE_F16: f64 = -1e4;
/// The text length the published models were trained with.
pub const MAX_TEXT_LEN: usize = 64;
/// Hugging Face repository of the text tokenizer (`hfl/chinese-roberta-wwm-ext`, the same
/// files as the R2D2 repository's `checkpoints/hfl_roberta`).
pub const TOKENIZER_REPO: &str = "hfl/chinese-roberta-wwm-ext";

/// Checkpoint keys that are present in the published files but unused by the network.
pub const IGNORED_KEYS: &[&str] = &[
    "position_ids",
    "text_encoder.pooler.*",
    "text_joint_layer.embeddings.*",
    "img_joint_layer.embeddings.*",
    "visual_encoder.post_layernorm.*",
];

fn default_joint_layers() -> usize {
    6
}
fn default_heads() -> usize {
    12
}
fn default_intermediate() -> usize {
    3072
}
fn default_joint_eps() -> f64 {
    1e-12
}
fn default_embed_dim() -> usize {
    768
}
fn default_max_text_len() -> usize {
    MAX_TEXT_LEN
}

/// The two cross encoders (`checkpoints/r2d2_config/bert_config.json` with 6 layers).
/// Their width is the text width; the cross-attention input widths follow the towers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JointConfig {
    #[serde(default = "default_joint_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    #[serde(default)]
    pub hidden_act: Activation,
    #[serde(default = "default_joint_eps")]
    pub layer_norm_eps: f64,
}

impl Default for JointConfig {
    fn default() -> Self {
        Self {
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-12,
        }
    }
}

impl JointConfig {
    /// The BERT config of one joint layer stack: width `text_width`, cross-attention
    /// input width `encoder_width`.
    pub fn bert(&self, text_width: usize, encoder_width: usize) -> BertConfig {
        BertConfig {
            vocab_size: 21128,
            hidden_size: text_width,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            hidden_act: self.hidden_act,
            max_position_embeddings: 512,
            type_vocab_size: 0,
            layer_norm_eps: self.layer_norm_eps,
            encoder_width: Some(encoder_width),
        }
    }
}

/// An R2D2 or PRD2 configuration; `config.json` of a model directory holds this.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct R2d2Config {
    /// `r2d2` or `prd2`.
    pub model_type: String,
    pub vision_config: ClipVisionConfig,
    pub text_config: BertConfig,
    /// The cross encoders; required for R2D2, absent for PRD2.
    #[serde(default)]
    pub joint_config: Option<JointConfig>,
    /// Width of the shared embedding space (`vision_proj`, `text_proj`).
    #[serde(default = "default_embed_dim")]
    pub embed_dim: usize,
    /// Texts are padded (and truncated) to this many tokens.
    #[serde(default = "default_max_text_len")]
    pub max_text_len: usize,
}

impl R2d2Config {
    /// An R2D2 config with the ViT-L/14 or ViT-B/16 image tower.
    pub fn r2d2(vision: ClipVisionConfig) -> Self {
        Self {
            model_type: "r2d2".into(),
            vision_config: vision,
            text_config: BertConfig::chinese_roberta_wwm_ext(),
            joint_config: Some(JointConfig::default()),
            embed_dim: 768,
            max_text_len: MAX_TEXT_LEN,
        }
    }

    /// A PRD2 config (no cross encoders).
    pub fn prd2(vision: ClipVisionConfig) -> Self {
        Self {
            model_type: "prd2".into(),
            joint_config: None,
            ..Self::r2d2(vision)
        }
    }

    /// The configuration of a preset (see [`PRESETS`]).
    pub fn preset(name: &str) -> Option<Self> {
        let p = PRESETS.iter().find(|p| p.name == name)?;
        Some(p.config())
    }

    /// The family: R2D2 or PRD2.
    pub fn family(&self) -> Family {
        if self.model_type == "prd2" {
            Family::Prd2
        } else {
            Family::R2d2
        }
    }

    /// Whether the cross encoders are part of the model.
    pub fn has_joint_layers(&self) -> bool {
        self.joint_config.is_some()
    }

    /// Checks that the configuration describes a network that can be built.
    pub fn validate(&self) -> Result<()> {
        match (self.model_type.as_str(), &self.joint_config) {
            ("r2d2", Some(_)) | ("prd2", None) => {}
            ("r2d2", None) => {
                return Err(Error::Config(
                    "an R2D2 config needs a joint_config (PRD2 is the family without one)".into(),
                ))
            }
            ("prd2", Some(_)) => {
                return Err(Error::Config(
                    "a PRD2 config has no joint_config (use model_type r2d2)".into(),
                ))
            }
            (other, _) => {
                return Err(Error::Config(format!(
                    "model_type `{other}` is neither r2d2 nor prd2"
                )))
            }
        }
        self.vision_config.validate().map_err(Error::Config)?;
        let t = &self.text_config;
        if t.num_attention_heads == 0 || !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return Err(Error::Config(format!(
                "text width {} is not divisible by {} heads",
                t.hidden_size, t.num_attention_heads
            )));
        }
        if let Some(j) = &self.joint_config {
            if j.num_attention_heads == 0 || !t.hidden_size.is_multiple_of(j.num_attention_heads) {
                return Err(Error::Config(format!(
                    "joint-layer width {} is not divisible by {} heads",
                    t.hidden_size, j.num_attention_heads
                )));
            }
        }
        if self.max_text_len < 2 || self.max_text_len > t.max_position_embeddings {
            return Err(Error::Config(format!(
                "max_text_len {} must lie in 2..={}",
                self.max_text_len, t.max_position_embeddings
            )));
        }
        if self.embed_dim == 0 {
            return Err(Error::Config("embed_dim must be positive".into()));
        }
        Ok(())
    }

    /// Reads a `config.json` written by [`Self::to_json_file`].
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let v: serde_json::Value =
            serde_json::from_str(&s).map_err(|e| Error::parse(path.display().to_string(), e))?;
        let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        if model_type != "r2d2" && model_type != "prd2" {
            return Err(Error::WrongFamily {
                path: path.to_path_buf(),
                expected: "R2D2 / PRD2 (model_type r2d2 or prd2)".into(),
                found: format!("model_type `{model_type}`"),
            });
        }
        let cfg: Self =
            serde_json::from_value(v).map_err(|e| Error::parse(path.display().to_string(), e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes the configuration as pretty JSON (atomically).
    pub fn to_json_file(&self, path: &Path) -> Result<()> {
        let s = serde_json::to_string_pretty(self)
            .map_err(|e| Error::parse(path.display().to_string(), e))?;
        crate::checkpoint::write_atomic(path, s.as_bytes())
    }

    /// Infers the configuration from a checkpoint's tensor shapes. Head counts are not
    /// stored in a checkpoint: every published model uses 64-wide heads, which is what this
    /// assumes (pass a `config.json` for anything else).
    pub fn infer(shapes: &BTreeMap<String, Vec<usize>>) -> Result<Self> {
        let family = family_of_keys(shapes.keys().map(String::as_str)).ok_or_else(|| {
            Error::Config("the tensors are not an R2D2 or PRD2 state dict".into())
        })?;
        let dim = |key: &str, i: usize| -> Result<usize> {
            shapes
                .get(key)
                .and_then(|s| s.get(i).copied())
                .ok_or_else(|| Error::Config(format!("cannot infer the config: no tensor `{key}`")))
        };
        let count = |prefix: &str| -> usize {
            let mut n = 0;
            while shapes
                .keys()
                .any(|k| k.starts_with(&format!("{prefix}{n}.")))
            {
                n += 1;
            }
            n
        };
        let heads = |width: usize| (width / 64).max(1);
        let vw = dim("visual_encoder.embeddings.class_embedding", 0)?;
        let patch = dim("visual_encoder.embeddings.patch_embedding.weight", 2)?;
        let positions = dim("visual_encoder.embeddings.position_embedding.weight", 0)?;
        let grid = ((positions.saturating_sub(1)) as f64).sqrt().round() as usize;
        if grid * grid + 1 != positions {
            return Err(Error::Config(format!(
                "cannot infer the image size from {positions} vision positions"
            )));
        }
        let vision = ClipVisionConfig {
            hidden_size: vw,
            intermediate_size: dim("visual_encoder.encoder.layers.0.mlp.fc1.weight", 0)?,
            num_hidden_layers: count("visual_encoder.encoder.layers."),
            num_attention_heads: heads(vw),
            num_channels: dim("visual_encoder.embeddings.patch_embedding.weight", 1)?,
            image_size: grid * patch,
            patch_size: patch,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        };
        let tw = dim("text_encoder.embeddings.word_embeddings.weight", 1)?;
        let text = BertConfig {
            vocab_size: dim("text_encoder.embeddings.word_embeddings.weight", 0)?,
            hidden_size: tw,
            num_hidden_layers: count("text_encoder.encoder.layer."),
            num_attention_heads: heads(tw),
            intermediate_size: dim("text_encoder.encoder.layer.0.intermediate.dense.weight", 0)?,
            hidden_act: Activation::Gelu,
            max_position_embeddings: dim("text_encoder.embeddings.position_embeddings.weight", 0)?,
            type_vocab_size: dim("text_encoder.embeddings.token_type_embeddings.weight", 0)?,
            layer_norm_eps: 1e-12,
            encoder_width: None,
        };
        let joint = if family == Family::R2d2 {
            Some(JointConfig {
                num_hidden_layers: count("text_joint_layer.encoder.layer."),
                num_attention_heads: heads(tw),
                intermediate_size: dim(
                    "text_joint_layer.encoder.layer.0.intermediate.dense.weight",
                    0,
                )?,
                hidden_act: Activation::Gelu,
                layer_norm_eps: 1e-12,
            })
        } else {
            None
        };
        let cfg = Self {
            model_type: if family == Family::R2d2 {
                "r2d2"
            } else {
                "prd2"
            }
            .into(),
            vision_config: vision,
            text_config: text,
            joint_config: joint,
            embed_dim: dim("vision_proj.weight", 0)?,
            max_text_len: MAX_TEXT_LEN,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The image-tower size of a preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VitSize {
    /// CLIP ViT-L/14 at 224 px.
    L14,
    /// CLIP ViT-B/16 at 224 px.
    B16,
}

/// A published R2D2 / PRD2 checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2d2Preset {
    /// The name [`crate::load`] accepts.
    pub name: &'static str,
    pub family: Family,
    pub vit: VitSize,
    /// What it was trained on.
    pub description: &'static str,
    /// Where the authors published it (Google Drive; there is no Hub mirror).
    pub url: &'static str,
    /// The file name the authors' scripts use for it, when they name it.
    pub original_file: Option<&'static str>,
}

impl R2d2Preset {
    /// The preset's configuration.
    pub fn config(&self) -> R2d2Config {
        let vision = match self.vit {
            VitSize::L14 => ClipVisionConfig::vit_l14_224(),
            VitSize::B16 => ClipVisionConfig::vit_b16_224(),
        };
        match self.family {
            Family::Prd2 => R2d2Config::prd2(vision),
            _ => R2d2Config::r2d2(vision),
        }
    }
}

/// Every checkpoint published in the R2D2 README: the pre-trained ViT-L/14 models and the
/// ViT-B/16 (23M pairs) models fine-tuned on the CCMB downstream tasks.
pub const PRESETS: &[R2d2Preset] = &[
    R2d2Preset {
        name: "r2d2-vit-l14-250m",
        family: Family::R2d2,
        vit: VitSize::L14,
        description: "R2D2 ViT-L/14, pre-trained on 250M pairs (Zero)",
        url: "https://drive.google.com/file/d/18Fd3vGvj0Dz8rPlxROxugjZaF8Z4jf7g/view",
        original_file: Some("r2d2_pretrain_250m.pth"),
    },
    R2d2Preset {
        name: "r2d2-vit-l14-23m",
        family: Family::R2d2,
        vit: VitSize::L14,
        description: "R2D2 ViT-L/14, pre-trained on 23M pairs",
        url: "https://drive.google.com/file/d/1vvvMv3mTRFGAUojbSJoZiTuqYPJqIquh/view",
        original_file: None,
    },
    R2d2Preset {
        name: "prd2-vit-l14-250m",
        family: Family::Prd2,
        vit: VitSize::L14,
        description: "PRD2 ViT-L/14 (dual encoder only), pre-trained on 250M pairs",
        url: "https://drive.google.com/file/d/15zDdam7_-YT0suA3Wc226vvxcyBxWZ_O/view",
        original_file: Some("prd2_pretrain_250m.pth"),
    },
    R2d2Preset {
        name: "r2d2-vit-b16-flickr30k-cna",
        family: Family::R2d2,
        vit: VitSize::B16,
        description: "R2D2 ViT-B/16 (23M), fine-tuned for Flickr30k-CNA retrieval",
        url: "https://drive.google.com/file/d/1qgbDIqSUBqGz6rGCGKtW14wzPTIcnLLg/view",
        original_file: None,
    },
    R2d2Preset {
        name: "r2d2-vit-b16-iqr",
        family: Family::R2d2,
        vit: VitSize::B16,
        description: "R2D2 ViT-B/16 (23M), fine-tuned for IQR (image-query retrieval)",
        url: "https://drive.google.com/file/d/1lQ6rqMXukzul6XQJ8uZe_BQh-tuL1KNm/view",
        original_file: None,
    },
    R2d2Preset {
        name: "r2d2-vit-b16-icr",
        family: Family::R2d2,
        vit: VitSize::B16,
        description: "R2D2 ViT-B/16 (23M), fine-tuned for ICR (image-caption retrieval)",
        url: "https://drive.google.com/file/d/15Zsr8n49AEjOi2MkOfp1ZtUAKGss_Xbz/view",
        original_file: None,
    },
    R2d2Preset {
        name: "r2d2-vit-b16-iqm",
        family: Family::R2d2,
        vit: VitSize::B16,
        description: "R2D2 ViT-B/16 (23M), fine-tuned for IQM (image-query matching)",
        url: "https://drive.google.com/file/d/1JxLL6mlhDz_pjoUuyeeRVTHw0q8gW5et/view",
        original_file: Some("iqm_base_23m.pth"),
    },
    R2d2Preset {
        name: "r2d2-vit-b16-icm",
        family: Family::R2d2,
        vit: VitSize::B16,
        description: "R2D2 ViT-B/16 (23M), fine-tuned for ICM (image-caption matching)",
        url: "https://drive.google.com/file/d/1FI9RzJT-0j30ftcfkx0zDF2v3T7iXZtG/view",
        original_file: Some("icm_base_23m.pth"),
    },
];

/// Finds the local file of a preset in [`weights_dir`]: `<name>.safetensors`,
/// `<name>.pth`, or the authors' file name. The files cannot be downloaded automatically
/// (they are on Google Drive), so a missing file is an [`Error::Download`] that says where
/// to get it.
pub fn locate_preset(name: &str) -> Result<PathBuf> {
    let p = find_preset(name)?;
    discover::locate_in_weights_dir(name, p.original_file, p.description, p.url)
}

fn find_preset(name: &str) -> Result<&'static R2d2Preset> {
    PRESETS
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| Error::UnknownPreset {
            name: name.into(),
            known: PRESETS
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// R2D2 or PRD2 from checkpoint key names ([`discover::family_of_keys`]), `None` for
/// anything else.
pub fn family_of_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Option<Family> {
    discover::family_of_keys(keys).filter(|f| matches!(f, Family::R2d2 | Family::Prd2))
}

/// Opens an R2D2 / PRD2 checkpoint (`.pth` with the state dict under `'model'`, or at the
/// top level; or `.safetensors`) and checks it is one: anything else is
/// [`Error::WrongFamily`] saying what was found.
pub fn open_checkpoint(path: &Path) -> Result<(TensorSource, Family)> {
    discover::open_checkpoint(path, &discover::R2D2)
}

/// The family of a checkpoint file, if it is R2D2 or PRD2; `Ok(None)` for other
/// checkpoints and files that are not checkpoints.
pub fn sniff(path: &Path) -> Result<Option<Family>> {
    discover::sniff(path, &discover::R2D2)
}

/// The checkpoint file of a model directory: `model.safetensors`, else the only
/// `.safetensors` or `.pth` file.
pub fn checkpoint_in_dir(dir: &Path) -> Result<Option<PathBuf>> {
    discover::only_checkpoint(dir, discover::R2D2.extensions)
}

/// Converts an R2D2 / PRD2 `.pth` checkpoint to a safetensors file holding the same
/// tensors (the `'model'` state dict), written atomically. `position_ids` buffers, which
/// PyTorch stores as broadcast views, are made contiguous.
pub fn convert_checkpoint(pth: &Path, out: &Path) -> Result<LoadReport> {
    let (source, _) = open_checkpoint(pth)?;
    let mut tensors = BTreeMap::new();
    for name in source.shapes().into_keys() {
        let t = source.load(&name).map_err(|e| Error::Checkpoint {
            path: pth.to_path_buf(),
            reason: format!("cannot read tensor `{name}`: {e}"),
        })?;
        if let Some(t) = t {
            tensors.insert(name, t.contiguous()?);
        }
    }
    let n = tensors.len();
    crate::checkpoint::save_safetensors(&tensors, None, out)?;
    Ok(LoadReport {
        loaded: n,
        ..LoadReport::default()
    })
}

/// The two cross encoders and their heads.
#[derive(Debug, Clone)]
pub struct JointLayers {
    pub text_joint_layer: Bert,
    pub img_joint_layer: Bert,
    pub img_joint_proj: Linear,
    pub itm_head: Linear,
    pub itm_head_i: Linear,
}

/// The R2D2 / PRD2 network with the original parameter names.
#[derive(Debug, Clone)]
pub struct R2d2 {
    pub visual_encoder: ClipVisionTransformer,
    pub text_encoder: Bert,
    pub vision_proj: Linear,
    pub text_proj: Linear,
    /// The raw temperature (a 0-d tensor): logits are `cos / temp`.
    pub temp: Tensor,
    pub joint: Option<JointLayers>,
    cfg: R2d2Config,
}

impl R2d2 {
    /// Builds the network from tensors named as in the original state dict.
    pub fn new(cfg: &R2d2Config, vb: VarBuilder) -> candle_core::Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let vw = cfg.vision_config.hidden_size;
        let tw = cfg.text_config.hidden_size;
        let visual_encoder =
            ClipVisionTransformer::new(&cfg.vision_config, vb.pp("visual_encoder"))?;
        let text_encoder = Bert::new(&cfg.text_config, vb.pp("text_encoder"))?;
        let joint = match &cfg.joint_config {
            Some(j) => Some(JointLayers {
                text_joint_layer: Bert::new_without_embeddings(
                    &j.bert(tw, vw),
                    vb.pp("text_joint_layer"),
                )?,
                img_joint_layer: Bert::new_without_embeddings(
                    &j.bert(tw, tw),
                    vb.pp("img_joint_layer"),
                )?,
                img_joint_proj: linear(vw, tw, vb.pp("img_joint_proj"))?,
                itm_head: linear(tw, 2, vb.pp("itm_head"))?,
                itm_head_i: linear(tw, 2, vb.pp("itm_head_i"))?,
            }),
            None => None,
        };
        Ok(Self {
            visual_encoder,
            text_encoder,
            vision_proj: linear(vw, cfg.embed_dim, vb.pp("vision_proj"))?,
            text_proj: linear(tw, cfg.embed_dim, vb.pp("text_proj"))?,
            temp: vb.get((), "temp")?,
            joint,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &R2d2Config {
        &self.cfg
    }

    /// `pixel_values` `[n, 3, s, s]` to the image tokens `[n, 1 + (s/p)², vision_width]`
    /// and the normalised embeddings `[n, embed_dim]` (in the weights' dtype).
    pub fn encode_image(&self, pixel_values: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let tokens = self.visual_encoder.forward(pixel_values)?;
        let cls = tokens.i((.., 0))?;
        let embeds = ops::l2_normalize(&self.vision_proj.forward(&cls)?)?;
        Ok((tokens, embeds))
    }

    /// Token ids and the 0/1 padding mask `[m, len]` to the text hidden states
    /// `[m, len, text_width]` and the normalised embeddings `[m, embed_dim]`.
    pub fn encode_text(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let states = self
            .text_encoder
            .forward(input_ids, None, Some(attention_mask))?;
        let cls = states.i((.., 0))?;
        let embeds = ops::l2_normalize(&self.text_proj.forward(&cls)?)?;
        Ok((states, embeds))
    }

    /// `[n_images, n_texts]` logits `cos / temp` from normalised embeddings.
    pub fn logits(
        &self,
        image_embeds: &Tensor,
        text_embeds: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let cos = cosine_matrix(image_embeds, text_embeds)?;
        cos.broadcast_div(&self.temp.to_dtype(image_embeds.dtype())?)
    }

    fn joint(&self) -> candle_core::Result<&JointLayers> {
        self.joint.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("PRD2 has no cross encoder: ITM scores need R2D2".into())
        })
    }

    /// ITM logits of aligned pairs: image tokens `[k, L, vision_width]`, text hidden states
    /// `[k, T, text_width]` and the text mask `[k, T]`. Returns the `itm_head` logits of
    /// the text-joint CLS and the `itm_head_i` logits of the image-joint CLS, `[k, 2]`
    /// each.
    pub fn itm_logits(
        &self,
        image_tokens: &Tensor,
        text_states: &Tensor,
        text_mask: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let j = self.joint()?;
        let neg = if text_states.dtype() == DType::F16 {
            CROSS_MASK_VALUE_F16
        } else {
            CROSS_MASK_VALUE
        };
        let image_tokens = image_tokens.to_dtype(text_states.dtype())?;
        // Text queries, text padding mask; cross-attention over every image token.
        // Only the [CLS] states are read: the last layers run for that row alone.
        let t = j.text_joint_layer.forward_embeds_cls(
            text_states,
            Some(text_mask),
            Some((&image_tokens, None, neg)),
        )?;
        // Projected image queries, no self mask; cross-attention over the unpadded text.
        let q = j.img_joint_proj.forward(&image_tokens)?;
        let i = j.img_joint_layer.forward_embeds_cls(
            &q,
            None,
            Some((text_states, Some(text_mask), neg)),
        )?;
        let lt = j.itm_head.forward(&t.i((.., 0))?)?;
        let li = j.itm_head_i.forward(&i.i((.., 0))?)?;
        Ok((lt, li))
    }

    /// ITM scores `[k]` in `[0, 1]` of aligned pairs (see [`Self::itm_logits`]).
    pub fn itm_scores_paired(
        &self,
        image_tokens: &Tensor,
        text_states: &Tensor,
        text_mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (lt, li) = self.itm_logits(image_tokens, text_states, text_mask)?;
        let pt = ops::softmax_last_dim(&lt.to_dtype(DType::F32)?)?.i((.., 1))?;
        let pi = ops::softmax_last_dim(&li.to_dtype(DType::F32)?)?.i((.., 1))?;
        (pt + pi)? * 0.5
    }
}

/// Image features: the tokens the cross encoders read and the normalised embeddings.
#[derive(Debug, Clone)]
pub struct ImageFeatures {
    /// `[n, 1 + patches, vision_width]`, the vision tower's `last_hidden_state`.
    pub tokens: Tensor,
    /// `[n, embed_dim]` f32, L2-normalised.
    pub embeds: Tensor,
}

/// Text features: the hidden states and mask the cross encoders read and the normalised
/// embeddings.
#[derive(Debug, Clone)]
pub struct TextFeatures {
    /// `[m, max_text_len, text_width]`.
    pub states: Tensor,
    /// `[m, max_text_len]` 0/1 padding mask.
    pub mask: Tensor,
    /// `[m, embed_dim]` f32, L2-normalised.
    pub embeds: Tensor,
    /// Indices of the texts that were longer than `max_text_len` tokens and were cut.
    pub truncated: Vec<usize>,
}

/// A complete R2D2 / PRD2 model: network, image processor and tokenizer.
pub struct R2d2Encoder {
    pub model: R2d2,
    pub image_processor: ImageProcessor,
    pub text_processor: Option<TextProcessor>,
    /// Image–text pairs per cross-encoder forward pass in [`Self::itm_scores_from_tensors`].
    pub itm_batch_size: usize,
    tokenizer_problem: Option<String>,
    device: Device,
    /// The most inputs one forward pass takes ([`LoadOptions::max_batch`]).
    max_batch: usize,
    dtype: DType,
    report: LoadReport,
}

impl std::fmt::Debug for R2d2Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("R2d2Encoder")
            .field("family", &self.model.cfg.family())
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl R2d2Encoder {
    /// Opens a preset name (a manually downloaded file, see [`locate_preset`]), a
    /// checkpoint file, or a model directory.
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Self> {
        let path = Path::new(spec);
        if path.exists() {
            return Self::from_path(path, opts);
        }
        Self::from_path(&locate_preset(spec)?, opts)
    }

    /// Opens a checkpoint file or a model directory.
    pub fn from_path(path: &Path, opts: &LoadOptions) -> Result<Self> {
        if path.is_dir() {
            Self::from_dir(path, opts)
        } else {
            Self::from_checkpoint(path, None, None, opts)
        }
    }

    /// Loads from a directory holding a checkpoint (`model.safetensors`, or one `.pth` /
    /// `.safetensors` file), optionally `config.json` (else the config is inferred from
    /// the tensor shapes) and `tokenizer.json`.
    pub fn from_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let weights = checkpoint_in_dir(dir)?.ok_or_else(|| Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: "no model.safetensors, .safetensors or .pth checkpoint in the directory".into(),
        })?;
        let cfg_path = dir.join("config.json");
        let cfg = if cfg_path.exists() {
            Some(R2d2Config::from_json_file(&cfg_path)?)
        } else {
            None
        };
        let tok = dir.join("tokenizer.json");
        Self::from_checkpoint(
            &weights,
            cfg.as_ref(),
            tok.exists().then_some(tok.as_path()),
            opts,
        )
    }

    /// Loads a checkpoint file. `cfg` defaults to the one inferred from the tensors;
    /// `tokenizer` defaults to `tokenizer.json` beside the checkpoint, then (with the `hub`
    /// feature) to [`TOKENIZER_REPO`]'s.
    pub fn from_checkpoint(
        path: &Path,
        cfg: Option<&R2d2Config>,
        tokenizer: Option<&Path>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let (source, family) = open_checkpoint(path)?;
        let cfg = match cfg {
            Some(c) => c.clone(),
            None => R2d2Config::infer(&source.shapes())?,
        };
        if cfg.family() != family {
            return Err(Error::WrongFamily {
                path: path.to_path_buf(),
                expected: format!("{} (as the config says)", cfg.family()),
                found: format!("a {family} checkpoint"),
            });
        }
        let beside = path.parent().map(|d| d.join("tokenizer.json"));
        let tokenizer = tokenizer
            .map(Path::to_path_buf)
            .or_else(|| beside.filter(|p| p.is_file()));
        let mut enc = Self::from_source(
            &cfg,
            source,
            &path.display().to_string(),
            tokenizer.as_deref(),
            opts,
        )?;
        if enc.text_processor.is_none() {
            enc.fetch_tokenizer();
        }
        Ok(enc)
    }

    #[cfg(feature = "hub")]
    fn fetch_tokenizer(&mut self) {
        let max = self.model.cfg.max_text_len;
        let result = crate::checkpoint::hub::fetch(TOKENIZER_REPO, "tokenizer.json", false)
            .and_then(|p| TextProcessor::from_file(&p, TextStyle::Bert, max));
        match result {
            Ok(t) => self.text_processor = Some(t),
            Err(e) => self.tokenizer_problem = Some(e.to_string()),
        }
    }

    #[cfg(not(feature = "hub"))]
    fn fetch_tokenizer(&mut self) {
        self.tokenizer_problem = Some(format!(
            "no tokenizer.json beside the checkpoint, and built without the `hub` feature to \
             fetch {TOKENIZER_REPO}'s"
        ));
    }

    /// Loads from any tensor source with an explicit configuration.
    pub fn from_source(
        cfg: &R2d2Config,
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
            |vb| R2d2::new(cfg, vb),
        )?;
        if opts.strict {
            report.check_strict(source_name)?;
        }
        Ok(Self {
            model,
            image_processor: ImageProcessor::clip(cfg.vision_config.image_size),
            text_processor: TextProcessor::from_optional_file(
                tokenizer,
                TextStyle::Bert,
                cfg.max_text_len,
            )?,
            itm_batch_size: 64,
            tokenizer_problem: None,
            device: opts.device.clone(),
            max_batch: opts.max_batch.max(1),
            dtype: opts.dtype,
            report,
        })
    }

    /// What the loader found: ignored and unexpected checkpoint keys.
    pub fn load_report(&self) -> &LoadReport {
        &self.report
    }

    pub fn config(&self) -> &R2d2Config {
        self.model.config()
    }

    /// Whether this model has the cross encoders (R2D2) or not (PRD2).
    pub fn has_itm(&self) -> bool {
        self.model.joint.is_some()
    }

    /// The tokenizer, or an error saying why there is none.
    pub fn text_processor(&self) -> Result<&TextProcessor> {
        self.text_processor
            .as_ref()
            .ok_or_else(|| Error::Tokenizer {
                origin: "R2D2 model".into(),
                reason: self
                    .tokenizer_problem
                    .clone()
                    .unwrap_or_else(|| "no tokenizer.json was loaded with this model".into()),
            })
    }

    /// Image features of preprocessed pixels `[n, 3, s, s]`.
    pub fn image_features_from_pixels(&self, pixel_values: &Tensor) -> Result<ImageFeatures> {
        let (tokens, embeds) = self
            .model
            .encode_image(&pixel_values.to_device(&self.device)?)?;
        Ok(ImageFeatures {
            tokens,
            embeds: embeds.to_dtype(DType::F32)?,
        })
    }

    /// Normalised embeddings `[n, embed_dim]` of preprocessed pixels.
    pub fn image_embeds_from_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self.image_features_from_pixels(pixel_values)?.embeds)
    }

    /// Text features of token ids and the padding mask `[m, len]`.
    pub fn text_features_from_ids(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<TextFeatures> {
        let ids = input_ids.to_device(&self.device)?;
        let mask = attention_mask.to_device(&self.device)?;
        if ids.dims() != mask.dims() || ids.rank() != 2 {
            return Err(Error::InvalidArgument(format!(
                "input_ids {:?} and attention_mask {:?} must be the same [m, len] shape",
                ids.dims(),
                mask.dims()
            )));
        }
        let (states, embeds) = self.model.encode_text(&ids, &mask)?;
        Ok(TextFeatures {
            states,
            mask,
            embeds: embeds.to_dtype(DType::F32)?,
            truncated: Vec::new(),
        })
    }

    /// Normalised embeddings `[m, embed_dim]` of token ids and the padding mask.
    pub fn text_embeds_from_ids(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        Ok(self
            .text_features_from_ids(input_ids, attention_mask)?
            .embeds)
    }

    /// Decodes, preprocesses and encodes images.
    pub fn image_features(&self, images: &[ImageInput]) -> Result<ImageFeatures> {
        let pixels = self.image_processor.process_batch(images, &self.device)?;
        self.image_features_from_pixels(&pixels)
    }

    /// Tokenises (padding to 64, truncating longer texts: see
    /// [`TextFeatures::truncated`]) and encodes texts.
    pub fn text_features(&self, texts: &[&str]) -> Result<TextFeatures> {
        let batch = self.text_processor()?.encode_batch(texts, &self.device)?;
        let mut f = self.text_features_from_ids(&batch.input_ids, &batch.attention_mask)?;
        f.truncated = batch.truncated;
        Ok(f)
    }

    /// ITM scores `[k]` of aligned pairs of image tokens, text states and text masks.
    pub fn itm_scores_paired(
        &self,
        image_tokens: &Tensor,
        text_states: &Tensor,
        text_mask: &Tensor,
    ) -> Result<Tensor> {
        if !self.has_itm() {
            return Err(Error::Config(
                "PRD2 has no cross encoder: ITM scores need an R2D2 checkpoint".into(),
            ));
        }
        let k = image_tokens.dim(0)?;
        if text_states.dim(0)? != k || text_mask.dim(0)? != k {
            return Err(Error::InvalidArgument(format!(
                "{k} images but {} texts to pair",
                text_states.dim(0)?
            )));
        }
        Ok(self.model.itm_scores_paired(
            &image_tokens.to_device(&self.device)?,
            &text_states.to_device(&self.device)?,
            &text_mask.to_device(&self.device)?,
        )?)
    }

    /// ITM scores `[n_images, n_texts]` of every image (tokens `[n, L, vw]`) against every
    /// text (states `[m, T, tw]`, mask `[m, T]`), `itm_batch_size` pairs at a time.
    pub fn itm_scores_from_tensors(
        &self,
        image_tokens: &Tensor,
        text_states: &Tensor,
        text_mask: &Tensor,
    ) -> Result<Tensor> {
        let (n, l, vw) = image_tokens.dims3()?;
        let m = text_states.dim(0)?;
        if n == 0 || m == 0 {
            return Err(Error::InvalidArgument(format!(
                "ITM scores of {n} images and {m} texts"
            )));
        }
        let chunk = self.itm_batch_size.max(1);
        let mut rows = Vec::with_capacity(n);
        for i in 0..n {
            let img = image_tokens.narrow(0, i, 1)?;
            let mut row = Vec::new();
            let mut start = 0;
            while start < m {
                let k = chunk.min(m - start);
                // A stride-0 broadcast: the cross encoders project the shared image once.
                let imgs = img.broadcast_as((k, l, vw))?;
                row.push(self.itm_scores_paired(
                    &imgs,
                    &text_states.narrow(0, start, k)?,
                    &text_mask.narrow(0, start, k)?,
                )?);
                start += k;
            }
            rows.push(Tensor::cat(&row, 0)?);
        }
        Ok(Tensor::stack(&rows, 0)?)
    }
}

impl DualEncoder for R2d2Encoder {
    fn load_report(&self) -> &LoadReport {
        &self.report
    }

    fn family(&self) -> Family {
        self.model.cfg.family()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn embed_dim(&self) -> usize {
        self.model.cfg.embed_dim
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn embed_image_batch(&self, images: &[ImageInput]) -> Result<Tensor> {
        Ok(self.image_features(images)?.embeds)
    }

    fn embed_text_batch(&self, texts: &[&str]) -> Result<Tensor> {
        Ok(self.text_features(texts)?.embeds)
    }

    fn logits(&self, image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        Ok(self.model.logits(
            &image_embeds.to_dtype(DType::F32)?,
            &text_embeds.to_dtype(DType::F32)?,
        )?)
    }

    fn scoring(&self) -> Scoring {
        Scoring::Softmax
    }

    fn cross_encoder(&self) -> Option<&dyn CrossEncoder> {
        self.has_itm().then_some(self as &dyn CrossEncoder)
    }

    fn itm_scores(&self, images: &[ImageInput], texts: &[&str]) -> Result<Option<Tensor>> {
        if !self.has_itm() {
            return Ok(None);
        }
        if images.is_empty() {
            return Err(Error::InvalidArgument("no images given".into()));
        }
        let img = self.image_features(images)?;
        let txt = self.text_features(texts)?;
        Ok(Some(self.itm_scores_from_tensors(
            &img.tokens,
            &txt.states,
            &txt.mask,
        )?))
    }
}

impl CrossEncoder for R2d2Encoder {
    fn image_features_kept(&self, images: &[ImageInput]) -> Result<CrossFeatures> {
        let f = self.image_features(images)?;
        Ok(CrossFeatures {
            embeds: f.embeds,
            states: f.tokens,
            mask: None,
            truncated: Vec::new(),
        })
    }

    fn text_features_kept(&self, texts: &[&str]) -> Result<CrossFeatures> {
        let f = self.text_features(texts)?;
        Ok(CrossFeatures {
            embeds: f.embeds,
            states: f.states,
            mask: Some(f.mask),
            truncated: f.truncated,
        })
    }

    fn pair_scores(
        &self,
        image_states: &Tensor,
        text_states: &Tensor,
        text_mask: &Tensor,
    ) -> Result<Tensor> {
        R2d2Encoder::itm_scores_paired(self, image_states, text_states, text_mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_build_valid_configs() {
        assert_eq!(PRESETS.len(), 8);
        for p in PRESETS {
            let c = p.config();
            c.validate().unwrap_or_else(|e| panic!("{}: {e}", p.name));
            assert_eq!(c.family(), p.family);
            assert!(p.url.starts_with("https://drive.google.com/"));
            let back: R2d2Config =
                serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
            assert_eq!(back, c);
        }
        let l = R2d2Config::preset("r2d2-vit-l14-250m").unwrap();
        assert_eq!(l.vision_config.num_positions(), 257);
        let b = R2d2Config::preset("r2d2-vit-b16-icm").unwrap();
        assert_eq!(b.vision_config.num_positions(), 197);
        assert!(R2d2Config::preset("prd2-vit-l14-250m")
            .unwrap()
            .joint_config
            .is_none());
    }

    #[test]
    fn validate_rejects_inconsistent_family() {
        let mut c = R2d2Config::r2d2(ClipVisionConfig::vit_b16_224());
        c.joint_config = None;
        assert!(c.validate().is_err());
        let mut c = R2d2Config::prd2(ClipVisionConfig::vit_b16_224());
        c.joint_config = Some(JointConfig::default());
        assert!(c.validate().is_err());
    }

    #[test]
    fn missing_preset_file_says_where_to_get_it() {
        let e = locate_preset("r2d2-vit-b16-iqr");
        // The test machine has no such file; if a user has one, the path is returned.
        if let Err(e) = e {
            let msg = e.to_string();
            assert!(msg.contains("drive.google.com"), "{msg}");
            assert!(msg.contains("manually"), "{msg}");
        }
        assert!(matches!(
            locate_preset("r2d2-nope"),
            Err(Error::UnknownPreset { .. })
        ));
    }

    #[test]
    fn family_detection() {
        let r = [
            "visual_encoder.embeddings.x",
            "text_encoder.embeddings.y",
            "vision_proj.weight",
        ];
        assert_eq!(family_of_keys(r), Some(Family::Prd2));
        let mut r2 = r.to_vec();
        r2.push("text_joint_layer.encoder.layer.0.x");
        assert_eq!(family_of_keys(r2), Some(Family::R2d2));
        assert_eq!(family_of_keys(["imgencoder.backbone.x"]), None);
    }
}

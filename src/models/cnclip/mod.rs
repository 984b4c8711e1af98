//! Chinese-CLIP (OFA-Sys; HF `ChineseCLIPModel`): a CLIP ViT image tower and a Chinese
//! RoBERTa text tower, each with a bias-free projection into the shared space, scored by
//! `logit_scale.exp() · cos` with softmax over the texts.
//!
//! The published folders (`OFA-Sys/chinese-clip-vit-*`) hold `config.json`,
//! `preprocessor_config.json`, the tokenizer as `vocab.txt` (no `tokenizer.json`; the
//! WordPiece tokenizer is built from it, [`TextProcessor::bert_from_vocab`]) and the weights
//! as `pytorch_model.bin` (read in pure Rust) or `model.safetensors`. Text is padded and cut
//! to [`DEFAULT_CONTEXT_LENGTH`] tokens (Chinese-CLIP's 52), token types are zero, and the
//! `[CLS]` state goes through `text_projection`; the image's class token goes through
//! `post_layernorm` and `visual_projection`.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::{DualEncoder, Family, LoadOptions, Scoring};
use crate::checkpoint::{LoadReport, Loader, TensorSource};
use crate::error::{Error, Result};
use crate::nn::linear::linear_no_bias;
use crate::nn::resnet::{ModifiedResNet, ModifiedResNetConfig};
use crate::nn::{
    ops, Activation, Bert, BertConfig, ClipVisionConfig, ClipVisionTransformer, Linear,
};
pub mod original;

use crate::preprocess::{
    ImageInput, ImageProcessor, Resample, ResizeKind, TextProcessor, CLIP_MEAN, CLIP_STD,
};

/// Chinese-CLIP's text length (`context_length` of its training and evaluation code).
pub const DEFAULT_CONTEXT_LENGTH: usize = 52;

/// A published Chinese-CLIP checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CnClipPreset {
    /// The preset name (also the Hub repository's name under `OFA-Sys/`).
    pub name: &'static str,
    /// The Hugging Face repository.
    pub repo: &'static str,
}

/// Every published checkpoint (sources, licences and sizes: `weights/README.md`).
pub const PRESETS: &[CnClipPreset] = &[
    CnClipPreset {
        name: "chinese-clip-vit-base-patch16",
        repo: "OFA-Sys/chinese-clip-vit-base-patch16",
    },
    CnClipPreset {
        name: "chinese-clip-vit-large-patch14",
        repo: "OFA-Sys/chinese-clip-vit-large-patch14",
    },
    CnClipPreset {
        name: "chinese-clip-vit-large-patch14-336px",
        repo: "OFA-Sys/chinese-clip-vit-large-patch14-336px",
    },
    CnClipPreset {
        name: "chinese-clip-vit-huge-patch14",
        repo: "OFA-Sys/chinese-clip-vit-huge-patch14",
    },
    // Only cn_clip's release checkpoint (`clip_cn_rn50.pt`): no config, no vocabulary.
    CnClipPreset {
        name: RN50_PRESET,
        repo: "OFA-Sys/chinese-clip-rn50",
    },
];

/// The RN50 preset: cn_clip's modified ResNet-50 and RBT3, published only as
/// [`RN50_CHECKPOINT`] (configuration from [`ChineseClipConfig::preset`], vocabulary from
/// [`VOCAB_REPO`]).
pub const RN50_PRESET: &str = "chinese-clip-rn50";

/// The file of `OFA-Sys/chinese-clip-rn50`.
pub const RN50_CHECKPOINT: &str = "clip_cn_rn50.pt";

/// The repository whose `vocab.txt` the RN50 preset uses (every Chinese-CLIP shares the
/// chinese-roberta-wwm-ext vocabulary).
pub const VOCAB_REPO: &str = "OFA-Sys/chinese-clip-vit-base-patch16";

/// Checkpoint keys the model never reads: HF's buffers, the unused BERT pooler, and
/// BatchNorm's `num_batches_tracked` counters (RN50).
pub const IGNORED_KEYS: &[&str] = &[
    "position_ids",
    "token_type_ids",
    "text_model.pooler.",
    "num_batches_tracked",
];

fn d_vocab() -> usize {
    30522
}
fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_intermediate() -> usize {
    3072
}
fn d_max_pos() -> usize {
    512
}
fn d_type_vocab() -> usize {
    2
}
fn d_text_eps() -> f64 {
    1e-12
}
fn d_gelu() -> Activation {
    Activation::Gelu
}
fn d_quick_gelu() -> Activation {
    Activation::QuickGelu
}
fn d_channels() -> usize {
    3
}
fn d_image_size() -> usize {
    224
}
fn d_patch() -> usize {
    32
}
fn d_vision_eps() -> f64 {
    1e-5
}
fn d_projection() -> usize {
    512
}
fn d_logit_scale() -> f64 {
    2.6592
}
fn d_model_type() -> String {
    "chinese_clip".into()
}

/// HF `ChineseCLIPTextConfig`, with HF's defaults for every field a `config.json` leaves out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CnClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_layers")]
    pub num_attention_heads: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "d_text_eps")]
    pub layer_norm_eps: f64,
}

/// HF `ChineseCLIPVisionConfig`, with HF's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CnClipVisionConfig {
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_layers")]
    pub num_attention_heads: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_image_size")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "d_vision_eps")]
    pub layer_norm_eps: f64,
}

/// HF `ChineseCLIPConfig` (`model_type: chinese_clip`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChineseClipConfig {
    #[serde(default = "d_model_type")]
    pub model_type: String,
    pub text_config: CnClipTextConfig,
    pub vision_config: CnClipVisionConfig,
    #[serde(default = "d_projection")]
    pub projection_dim: usize,
    #[serde(default = "d_logit_scale")]
    pub logit_scale_init_value: f64,
    /// cn_clip's modified ResNet image tower (RN50), which HF does not have. When set,
    /// `vision_config` is unused, the tower's tensors are `visual.*` (cn_clip's names) and
    /// its attention pool projects straight to `projection_dim` (no `visual_projection`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_resnet: Option<ModifiedResNetConfig>,
}

impl ChineseClipConfig {
    /// Reads an HF `config.json`; another `model_type` is [`Error::WrongFamily`].
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let cfg: Self =
            serde_json::from_str(&s).map_err(|e| Error::parse(path.display().to_string(), e))?;
        if cfg.model_type != "chinese_clip" {
            return Err(Error::WrongFamily {
                path: path.to_path_buf(),
                expected: "Chinese-CLIP (model_type chinese_clip)".into(),
                found: format!("model_type `{}`", cfg.model_type),
            });
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configuration of a preset, as its `config.json` on the Hub gives it.
    pub fn preset(name: &str) -> Option<Self> {
        let text = |hidden, layers, heads, mlp| CnClipTextConfig {
            vocab_size: 21128,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: mlp,
            hidden_act: Activation::Gelu,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
        };
        let vision = |hidden, layers, heads, mlp, size, patch| CnClipVisionConfig {
            hidden_size: hidden,
            intermediate_size: mlp,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_channels: 3,
            image_size: size,
            patch_size: patch,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        };
        let (text_config, vision_config, projection_dim) = match name {
            "chinese-clip-vit-base-patch16" => (
                text(768, 12, 12, 3072),
                vision(768, 12, 12, 3072, 224, 16),
                512,
            ),
            "chinese-clip-vit-large-patch14" => (
                text(768, 12, 12, 3072),
                vision(1024, 24, 16, 4096, 224, 14),
                768,
            ),
            "chinese-clip-vit-large-patch14-336px" => (
                text(768, 12, 12, 3072),
                vision(1024, 24, 16, 4096, 336, 14),
                768,
            ),
            "chinese-clip-vit-huge-patch14" => (
                text(1024, 24, 16, 4096),
                vision(1280, 32, 16, 5120, 224, 14),
                1024,
            ),
            // cn_clip's `RN50.json` and `RBT3-chinese.json`.
            RN50_PRESET => {
                let resnet = ModifiedResNetConfig::rn50();
                return Some(Self {
                    model_type: d_model_type(),
                    text_config: text(768, 3, 12, 3072),
                    vision_config: vision(768, 12, 12, 3072, resnet.image_size, 16),
                    projection_dim: resnet.output_dim,
                    logit_scale_init_value: d_logit_scale(),
                    vision_resnet: Some(resnet),
                });
            }
            _ => return None,
        };
        Some(Self {
            model_type: d_model_type(),
            text_config,
            vision_config,
            projection_dim,
            logit_scale_init_value: d_logit_scale(),
            vision_resnet: None,
        })
    }

    /// The text tower as a [`BertConfig`].
    pub fn bert(&self) -> BertConfig {
        let t = &self.text_config;
        BertConfig {
            vocab_size: t.vocab_size,
            hidden_size: t.hidden_size,
            num_hidden_layers: t.num_hidden_layers,
            num_attention_heads: t.num_attention_heads,
            intermediate_size: t.intermediate_size,
            hidden_act: t.hidden_act,
            max_position_embeddings: t.max_position_embeddings,
            type_vocab_size: t.type_vocab_size,
            layer_norm_eps: t.layer_norm_eps,
            encoder_width: None,
        }
    }

    /// The image tower as a [`ClipVisionConfig`].
    pub fn vit(&self) -> ClipVisionConfig {
        let v = &self.vision_config;
        ClipVisionConfig {
            hidden_size: v.hidden_size,
            intermediate_size: v.intermediate_size,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            num_channels: v.num_channels,
            image_size: v.image_size,
            patch_size: v.patch_size,
            hidden_act: v.hidden_act,
            layer_norm_eps: v.layer_norm_eps,
        }
    }

    /// The side of the square images the image tower takes.
    pub fn image_size(&self) -> usize {
        match &self.vision_resnet {
            Some(r) => r.image_size,
            None => self.vision_config.image_size,
        }
    }

    /// Checks that the dimensions fit together.
    pub fn validate(&self) -> Result<()> {
        match &self.vision_resnet {
            Some(r) => {
                r.validate().map_err(Error::Config)?;
                if r.output_dim != self.projection_dim {
                    return Err(Error::Config(format!(
                        "the ResNet's attention pool gives {} values, projection_dim is {}",
                        r.output_dim, self.projection_dim
                    )));
                }
            }
            None => self.vit().validate().map_err(Error::Config)?,
        }
        let t = &self.text_config;
        if t.num_attention_heads == 0 || !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return Err(Error::Config(format!(
                "text width {} is not divisible by {} heads",
                t.hidden_size, t.num_attention_heads
            )));
        }
        if self.projection_dim == 0 || t.vocab_size == 0 || t.max_position_embeddings < 2 {
            return Err(Error::Config(format!(
                "projection_dim {}, vocab_size {} and max_position_embeddings {} must be \
                 positive (at least 2 positions)",
                self.projection_dim, t.vocab_size, t.max_position_embeddings
            )));
        }
        if !self.logit_scale_init_value.is_finite() {
            return Err(Error::Config("logit_scale_init_value is not finite".into()));
        }
        Ok(())
    }
}

/// The image tower of a [`ChineseClip`].
#[derive(Debug, Clone)]
pub enum ImageTower {
    /// HF's `vision_model` (a CLIP ViT) and `visual_projection`.
    Vit {
        vision_model: ClipVisionTransformer,
        visual_projection: Linear,
    },
    /// cn_clip's `visual` (the modified ResNet of RN50), whose attention pool projects to
    /// the shared space.
    ResNet(Box<ModifiedResNet>),
}

/// The network, with HF's tensor names (and cn_clip's `visual.*` for the RN50 tower).
#[derive(Debug, Clone)]
pub struct ChineseClip {
    pub text_model: Bert,
    pub image_tower: ImageTower,
    text_projection: Linear,
    /// The 0-d log of the logit scale: logits are `logit_scale.exp() · cos`.
    pub logit_scale: Tensor,
    cfg: ChineseClipConfig,
}

impl ChineseClip {
    pub fn new(cfg: &ChineseClipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (tw, vw) = (cfg.text_config.hidden_size, cfg.vision_config.hidden_size);
        let image_tower = match &cfg.vision_resnet {
            Some(r) => ImageTower::ResNet(Box::new(ModifiedResNet::new(r, vb.pp("visual"))?)),
            None => ImageTower::Vit {
                vision_model: ClipVisionTransformer::new_with_post_layernorm(
                    &cfg.vit(),
                    vb.pp("vision_model"),
                )?,
                visual_projection: linear_no_bias(
                    vw,
                    cfg.projection_dim,
                    vb.pp("visual_projection"),
                )?,
            },
        };
        Ok(Self {
            text_model: Bert::new(&cfg.bert(), vb.pp("text_model"))?,
            image_tower,
            text_projection: linear_no_bias(tw, cfg.projection_dim, vb.pp("text_projection"))?,
            logit_scale: vb.get((), "logit_scale")?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ChineseClipConfig {
        &self.cfg
    }

    /// The image tower's last states: for the ViT, HF's `vision_model(...).last_hidden_state`
    /// (before `post_layernorm`); for the ResNet, `layer4`'s feature map (before the
    /// attention pool).
    pub fn vision_hidden(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        match &self.image_tower {
            ImageTower::Vit { vision_model, .. } => vision_model.forward(pixel_values),
            ImageTower::ResNet(r) => r.forward_features(pixel_values),
        }
    }

    /// HF's `text_model(...).last_hidden_state` (token types zero).
    pub fn text_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.text_model
            .forward(input_ids, None, Some(attention_mask))
    }

    /// HF's `get_image_features` (cn_clip's `encode_image`), not normalised.
    pub fn image_features(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        match &self.image_tower {
            ImageTower::Vit {
                vision_model,
                visual_projection,
            } => {
                let pooled = vision_model.pooled(&vision_model.forward(pixel_values)?)?;
                visual_projection.forward(&pooled)
            }
            ImageTower::ResNet(r) => r.forward(pixel_values),
        }
    }

    /// HF's `get_text_features` (not normalised): the `[CLS]` state through
    /// `text_projection`.
    pub fn text_features(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let cls = self.text_hidden(input_ids, attention_mask)?.i((.., 0))?;
        self.text_projection.forward(&cls)
    }

    /// `logit_scale.exp() · image · textᵀ` of normalised embeddings.
    pub fn logits(&self, image: &Tensor, text: &Tensor) -> candle_core::Result<Tensor> {
        let scale = self.logit_scale.to_dtype(DType::F32)?.exp()?;
        image.matmul(&text.t()?)?.broadcast_mul(&scale)
    }
}

/// A loaded Chinese-CLIP with its preprocessing: the [`DualEncoder`] for the family.
pub struct ChineseClipEncoder {
    model: ChineseClip,
    image_processor: ImageProcessor,
    text_processor: TextProcessor,
    device: Device,
    dtype: DType,
    max_batch: usize,
    report: LoadReport,
}

impl std::fmt::Debug for ChineseClipEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChineseClipEncoder")
            .field("config", &self.model.cfg)
            .field("image_processor", &self.image_processor)
            .finish()
    }
}

/// Reads a Chinese-CLIP `preprocessor_config.json`: `size` as `{height, width}` (resize, no
/// crop) or `{shortest_edge}` (then `crop_size` when `do_center_crop`), the mean, the std
/// and the resampling filter (PIL's 3, bicubic, by default). Without the file: resize to
/// the model's image size, bicubic, CLIP's mean and std.
pub fn read_image_processor(dir: &Path, image_size: usize) -> Result<ImageProcessor> {
    let path = dir.join("preprocessor_config.json");
    let base = ImageProcessor::square(
        image_size,
        ResizeKind::Pil(Resample::Bicubic),
        CLIP_MEAN,
        CLIP_STD,
    );
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(base),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let origin = path.display().to_string();
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::parse(&origin, e))?;
    let bad = |what: &str| Error::Config(format!("{origin}: {what}"));
    let positive = |x: &serde_json::Value, what: &str| -> Result<usize> {
        x.as_u64()
            .filter(|&n| (1..=8192).contains(&n))
            .map(|n| n as usize)
            .ok_or_else(|| {
                bad(&format!(
                    "{what} must be an integer from 1 to 8192, not {x}"
                ))
            })
    };
    let hw = |x: &serde_json::Value, what: &str| -> Result<(usize, usize)> {
        match x {
            serde_json::Value::Object(o) => Ok((
                positive(o.get("height").unwrap_or(&serde_json::Value::Null), what)?,
                positive(o.get("width").unwrap_or(&serde_json::Value::Null), what)?,
            )),
            other => {
                let n = positive(other, what)?;
                Ok((n, n))
            }
        }
    };
    let mut p = base;
    if let Some(size) = v.get("size") {
        match size.get("shortest_edge") {
            Some(edge) => {
                let edge = positive(edge, "size.shortest_edge")?;
                let crop = v
                    .get("do_center_crop")
                    .and_then(|c| c.as_bool())
                    .unwrap_or(true);
                p.size = if crop {
                    match v.get("crop_size") {
                        Some(c) => hw(c, "crop_size")?,
                        None => (edge, edge),
                    }
                } else {
                    return Err(bad(
                        "size.shortest_edge without a center crop gives images of varying \
                         size; a dual encoder needs do_center_crop",
                    ));
                };
                p.shortest_edge = Some(edge);
            }
            None => p.size = hw(size, "size")?,
        }
    }
    let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
        match v.get(key) {
            None => Ok(default),
            Some(x) => {
                let a: Vec<f32> = x
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|f| f.as_f64().map(|f| f as f32))
                            .collect()
                    })
                    .unwrap_or_default();
                match a.as_slice() {
                    [r, g, b] if a.iter().all(|f| f.is_finite()) => Ok([*r, *g, *b]),
                    _ => Err(bad(&format!("{key} must be three numbers"))),
                }
            }
        }
    };
    p.mean = triple("image_mean", CLIP_MEAN)?;
    p.std = triple("image_std", CLIP_STD)?;
    if p.std.iter().any(|s| *s <= 0.0) {
        return Err(bad("image_std must be positive"));
    }
    p.resize = match v.get("resample").and_then(|r| r.as_u64()) {
        None | Some(3) => ResizeKind::Pil(Resample::Bicubic),
        Some(2) => ResizeKind::Pil(Resample::Bilinear),
        Some(other) => {
            return Err(bad(&format!(
                "resample {other} is not supported (2 bilinear, 3 bicubic)"
            )))
        }
    };
    Ok(p)
}

/// What a Chinese-CLIP path holds, ready to build a model from: the configuration, the
/// weights under the crate's names and the preprocessing.
pub struct ModelFiles {
    pub config: ChineseClipConfig,
    pub source: TensorSource,
    /// The weights file, as errors and reports name it.
    pub source_name: String,
    pub text_processor: TextProcessor,
    pub image_processor: ImageProcessor,
}

/// Opens a Chinese-CLIP at `path`:
///
/// * an HF folder (`config.json`, `model.safetensors` or `pytorch_model.bin`, `vocab.txt`,
///   `preprocessor_config.json`);
/// * a cn_clip checkpoint (`clip_cn_*.pt`, see [`original`]), or a folder holding one and no
///   `config.json`: the configuration is read off the shapes, or is `config` when given;
///   the vocabulary is `vocab` when given, else the `vocab.txt` beside the checkpoint.
///   Images are resized to the square image size, bicubic, with CLIP's mean and std (cn_clip's
///   `image_transform`) unless a `preprocessor_config.json` beside it says otherwise.
pub fn open_model_files(
    path: &Path,
    config: Option<&ChineseClipConfig>,
    vocab: Option<&Path>,
) -> Result<ModelFiles> {
    if path.is_dir() && path.join("config.json").exists() {
        let cfg = ChineseClipConfig::from_json_file(&path.join("config.json"))?;
        let (source, source_name) = open_weights(path)?;
        let len = DEFAULT_CONTEXT_LENGTH.min(cfg.text_config.max_position_embeddings);
        return Ok(ModelFiles {
            text_processor: folder_text_processor(path, len)?,
            image_processor: read_image_processor(path, cfg.image_size())?,
            config: cfg,
            source,
            source_name,
        });
    }
    let file = if path.is_dir() {
        crate::checkpoint::discover::only_checkpoint(path, &["pt", "pth", "bin"])?.ok_or_else(
            || Error::Checkpoint {
                path: path.to_path_buf(),
                reason: "no config.json and no cn_clip checkpoint (.pt) in the folder".into(),
            },
        )?
    } else {
        path.to_path_buf()
    };
    let origin = file.display().to_string();
    let converted = {
        let source = original::open(&file)?;
        original::convert(&source, &origin, config)?
    };
    let cfg = converted.config;
    let dir = file.parent().unwrap_or(Path::new("."));
    let len = DEFAULT_CONTEXT_LENGTH.min(cfg.text_config.max_position_embeddings);
    let text_processor = match vocab {
        Some(v) => TextProcessor::bert_from_vocab(v, true, len)?,
        None if dir.join("vocab.txt").exists() || dir.join("tokenizer.json").exists() => {
            folder_text_processor(dir, len)?
        }
        None => {
            return Err(Error::Tokenizer {
                origin: dir.join("vocab.txt").display().to_string(),
                reason: format!(
                    "missing: cn_clip checkpoints carry no vocabulary; put the vocab.txt of                      {VOCAB_REPO} beside {origin}"
                ),
            })
        }
    };
    Ok(ModelFiles {
        image_processor: read_image_processor(dir, cfg.image_size())?,
        config: cfg,
        source: TensorSource::Map(converted.tensors),
        source_name: format!("{origin} (cn_clip layout)"),
        text_processor,
    })
}

impl ChineseClipEncoder {
    /// Opens a preset name (through the Hub cache) or a local path ([`open_model_files`]).
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Self> {
        let path = Path::new(spec);
        if path.exists() {
            return Self::from_path(path, opts);
        }
        if ChineseClipConfig::preset(spec).is_some() {
            return Self::from_preset(spec, opts);
        }
        Err(Error::Config(format!(
            "{spec}: not a Chinese-CLIP path or preset"
        )))
    }

    /// Loads an HF-layout folder: `config.json`, `model.safetensors` (sharded or not) or
    /// `pytorch_model.bin`, `vocab.txt` (or `tokenizer.json`) and an optional
    /// `preprocessor_config.json`.
    pub fn from_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        if !dir.join("config.json").exists() {
            return Err(Error::Config(format!(
                "{}: an HF Chinese-CLIP folder needs config.json",
                dir.display()
            )));
        }
        Self::from_path(dir, opts)
    }

    /// Loads any path [`open_model_files`] opens.
    pub fn from_path(path: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::from_files(open_model_files(path, None, None)?, opts)
    }

    /// Loads a cn_clip checkpoint with a given configuration (e.g. a preset's) and
    /// vocabulary.
    pub fn from_cn_clip_checkpoint(
        checkpoint: &Path,
        config: Option<&ChineseClipConfig>,
        vocab: Option<&Path>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        Self::from_files(open_model_files(checkpoint, config, vocab)?, opts)
    }

    fn from_files(f: ModelFiles, opts: &LoadOptions) -> Result<Self> {
        Self::from_source(
            &f.config,
            f.source,
            &f.source_name,
            f.text_processor,
            f.image_processor,
            opts,
        )
    }

    /// Downloads (or finds in the Hub cache) a preset and loads it. The ViT presets are HF
    /// folders; the RN50 is [`RN50_CHECKPOINT`] with its preset configuration and the
    /// vocabulary of [`VOCAB_REPO`].
    pub fn from_preset(name: &str, opts: &LoadOptions) -> Result<Self> {
        let repo = preset_repo(name).ok_or_else(|| Error::UnknownPreset {
            name: name.to_string(),
            known: PRESETS
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        if name != RN50_PRESET {
            return Self::from_dir(&download_folder(repo)?, opts);
        }
        let cfg = ChineseClipConfig::preset(name)
            .ok_or_else(|| Error::Config(format!("no config for preset {name}")))?;
        let (checkpoint, vocab) = download_rn50()?;
        Self::from_cn_clip_checkpoint(&checkpoint, Some(&cfg), Some(&vocab), opts)
    }

    /// Builds from any tensor source with the crate's names.
    pub fn from_source(
        cfg: &ChineseClipConfig,
        source: TensorSource,
        source_name: &str,
        text_processor: TextProcessor,
        image_processor: ImageProcessor,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let (model, report) = Loader::new(source, source_name).build_model(
            opts.dtype,
            &opts.device,
            IGNORED_KEYS,
            |vb| ChineseClip::new(cfg, vb),
        )?;
        if opts.strict {
            report.check_strict(source_name)?;
        }
        Ok(Self {
            model,
            image_processor,
            text_processor,
            device: opts.device.clone(),
            dtype: opts.dtype,
            max_batch: opts.max_batch.max(1),
            report,
        })
    }

    pub fn model(&self) -> &ChineseClip {
        &self.model
    }

    pub fn image_processor(&self) -> &ImageProcessor {
        &self.image_processor
    }

    pub fn text_processor(&self) -> &TextProcessor {
        &self.text_processor
    }

    /// Sets the text length (52 by default; at most the model's positions).
    pub fn set_context_length(&mut self, len: usize) -> Result<()> {
        let max = self.model.cfg.text_config.max_position_embeddings;
        if !(2..=max).contains(&len) {
            return Err(Error::InvalidArgument(format!(
                "context length {len} must be from 2 to the model's {max} positions"
            )));
        }
        self.text_processor.set_max_len(len);
        Ok(())
    }

    /// Normalised embeddings of preprocessed pixels `[n, 3, h, w]`.
    pub fn image_embeds_from_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let x = pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?;
        let f = self.model.image_features(&x)?;
        Ok(ops::l2_normalize(&f.to_dtype(DType::F32)?)?)
    }

    /// Normalised embeddings of token ids and their 0/1 mask `[m, len]`.
    pub fn text_embeds_from_ids(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        let mask = attention_mask
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        let f = self
            .model
            .text_features(&input_ids.to_device(&self.device)?, &mask)?;
        Ok(ops::l2_normalize(&f.to_dtype(DType::F32)?)?)
    }

    pub fn load_report(&self) -> &LoadReport {
        &self.report
    }
}

/// The weights of a folder: `model.safetensors` (or its shards), else
/// `pytorch_model.bin`.
pub fn open_weights(dir: &Path) -> Result<(TensorSource, String)> {
    if dir.join("model.safetensors").exists() || dir.join("model.safetensors.index.json").exists() {
        let files = crate::checkpoint::discover::safetensors_files(dir)?;
        let name = files
            .first()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        return Ok((crate::checkpoint::open_safetensors(&files)?, name));
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.exists() {
        return Ok((
            crate::checkpoint::open_pth(&bin, None)?,
            bin.display().to_string(),
        ));
    }
    Err(Error::Checkpoint {
        path: dir.to_path_buf(),
        reason: "no model.safetensors or pytorch_model.bin in the folder".into(),
    })
}

/// The folder's tokenizer: `tokenizer.json` when present, else WordPiece from `vocab.txt`
/// (lower-cased unless `tokenizer_config.json` says `do_lower_case: false`).
pub fn folder_text_processor(dir: &Path, max_len: usize) -> Result<TextProcessor> {
    let json = dir.join("tokenizer.json");
    if json.exists() {
        return TextProcessor::from_file(&json, crate::preprocess::TextStyle::Bert, max_len);
    }
    let vocab = dir.join("vocab.txt");
    if !vocab.exists() {
        return Err(Error::Tokenizer {
            origin: vocab.display().to_string(),
            reason: "missing: a Chinese-CLIP folder needs vocab.txt (or tokenizer.json)".into(),
        });
    }
    let lowercase = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v.get("do_lower_case").and_then(|b| b.as_bool()))
        .unwrap_or(true);
    TextProcessor::bert_from_vocab(&vocab, lowercase, max_len)
}

/// Downloads (or finds in the Hub cache) an HF-layout Chinese-CLIP repository and returns
/// the folder: `config.json` (checked), `vocab.txt`, `preprocessor_config.json`, the optional
/// `tokenizer_config.json`, and `model.safetensors` or else `pytorch_model.bin`.
#[cfg(feature = "hub")]
pub fn download_folder(repo: &str) -> Result<std::path::PathBuf> {
    use crate::checkpoint::hub;
    let config = hub::fetch(repo, "config.json", true)?;
    ChineseClipConfig::from_json_file(&config)?;
    for f in ["vocab.txt", "preprocessor_config.json"] {
        hub::fetch(repo, f, false)?;
    }
    hub::fetch_optional(repo, "tokenizer_config.json", false)?;
    if hub::fetch_optional(repo, "model.safetensors", true)?.is_none() {
        hub::fetch(repo, "pytorch_model.bin", true)?;
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Without the `hub` feature presets cannot be downloaded.
#[cfg(not(feature = "hub"))]
pub fn download_folder(repo: &str) -> Result<std::path::PathBuf> {
    Err(Error::Download {
        repo: repo.into(),
        file: String::new(),
        reason: "built without the `hub` feature; pass a local directory instead".into(),
    })
}

/// Downloads (or finds in the Hub cache) the RN50 checkpoint and the vocabulary it uses.
#[cfg(feature = "hub")]
pub fn download_rn50() -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    use crate::checkpoint::hub;
    let repo = preset_repo(RN50_PRESET).unwrap_or("OFA-Sys/chinese-clip-rn50");
    let checkpoint = hub::fetch(repo, RN50_CHECKPOINT, true)?;
    let vocab = hub::fetch(VOCAB_REPO, "vocab.txt", false)?;
    Ok((checkpoint, vocab))
}

/// Without the `hub` feature presets cannot be downloaded.
#[cfg(not(feature = "hub"))]
pub fn download_rn50() -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    Err(Error::Download {
        repo: "OFA-Sys/chinese-clip-rn50".into(),
        file: RN50_CHECKPOINT.into(),
        reason: "built without the `hub` feature; pass a local checkpoint instead".into(),
    })
}

/// The Hub repository of a preset.
pub fn preset_repo(name: &str) -> Option<&'static str> {
    PRESETS.iter().find(|p| p.name == name).map(|p| p.repo)
}

impl DualEncoder for ChineseClipEncoder {
    fn family(&self) -> Family {
        Family::ChineseClip
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn embed_dim(&self) -> usize {
        self.model.cfg.projection_dim
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn embed_image_batch(&self, images: &[ImageInput]) -> Result<Tensor> {
        self.image_embeds_from_pixels(&self.image_processor.process_batch(images, &self.device)?)
    }

    fn embed_text_batch(&self, texts: &[&str]) -> Result<Tensor> {
        let b = self.text_processor.encode_batch(texts, &self.device)?;
        self.text_embeds_from_ids(&b.input_ids, &b.attention_mask)
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

    fn load_report(&self) -> &LoadReport {
        &self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for p in PRESETS {
            let c = ChineseClipConfig::preset(p.name).unwrap();
            c.validate().unwrap();
            assert_eq!(preset_repo(p.name), Some(p.repo));
        }
        assert!(ChineseClipConfig::preset("nope").is_none());
    }
}

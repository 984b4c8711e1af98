//! cn_clip's release checkpoints (`clip_cn_vit-b-16.pt`, `clip_cn_vit-l-14.pt`,
//! `clip_cn_vit-l-14-336.pt`, `clip_cn_vit-h-14.pt`, `clip_cn_rn50.pt`, and the checkpoints
//! of cn_clip's own training runs).
//!
//! Such a file is a pickle `{"epoch", "step", "name", "state_dict", …}` whose `state_dict`
//! holds cn_clip's `CLIP` under `module.` (it was saved from a `DistributedDataParallel`):
//! `module.visual.*` (OpenAI CLIP's `VisualTransformer` or `ModifiedResNet`),
//! `module.bert.*` (a BERT with HF's names), `module.text_projection` `[text width, embed]`
//! and `module.logit_scale`. [`convert`] maps it to the names of [`super::ChineseClip`]:
//!
//! | cn_clip | tuwen (HF `ChineseCLIPModel`) |
//! |---|---|
//! | `bert.X` | `text_model.X` |
//! | `text_projection` `[w, e]` | `text_projection.weight` `[e, w]` (transposed) |
//! | `visual.conv1.weight` | `vision_model.embeddings.patch_embedding.weight` |
//! | `visual.class_embedding` | `vision_model.embeddings.class_embedding` |
//! | `visual.positional_embedding` | `vision_model.embeddings.position_embedding.weight` |
//! | `visual.ln_pre.*` / `visual.ln_post.*` | `vision_model.pre_layrnorm.*` / `post_layernorm.*` |
//! | `…resblocks.i.ln_1.*` / `ln_2.*` | `…encoder.layers.i.layer_norm1.*` / `layer_norm2.*` |
//! | `…resblocks.i.attn.in_proj_{weight,bias}` | `…self_attn.{q,k,v}_proj.*` (split in three) |
//! | `…resblocks.i.attn.out_proj.*` | `…self_attn.out_proj.*` |
//! | `…resblocks.i.mlp.c_fc.*` / `c_proj.*` | `…mlp.fc1.*` / `fc2.*` |
//! | `visual.proj` `[w, e]` | `visual_projection.weight` `[e, w]` (transposed) |
//! | `visual.*` of the RN50 | `visual.*` (cn_clip's names are the crate's) |
//!
//! The map is strict: a key it does not know keeps its name, so the load report lists it
//! as unused (and a strict load fails on it). The BERT pooler (`text_model.pooler.*`) and
//! BatchNorm's `num_batches_tracked` are mapped but read by nobody: the report lists them
//! as ignored. The configuration is
//! read off the shapes, as cn_clip's configs define it ([`config_from_shapes`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;

use super::{ChineseClipConfig, CnClipTextConfig, CnClipVisionConfig};
use crate::checkpoint::{open_pth, TensorSource};
use crate::error::{Error, Result};
use crate::nn::resnet::{heads_for_width, ModifiedResNetConfig};
use crate::nn::Activation;

/// The key of the state dict in a cn_clip checkpoint.
pub const STATE_DICT_KEY: &str = "state_dict";

/// The prefix `DistributedDataParallel` puts on every key.
pub const DDP_PREFIX: &str = "module.";

/// cn_clip's attention head width, in both towers (`vision_width // 64`,
/// `text_hidden_size / 64` in every published config).
pub const HEAD_WIDTH: usize = 64;

pub use crate::checkpoint::discover::is_cn_clip_keys;

/// Opens a cn_clip checkpoint: the `state_dict` of a release `.pt`, or a bare state dict.
pub fn open(path: &Path) -> Result<TensorSource> {
    match open_pth(path, Some(STATE_DICT_KEY)) {
        Ok(s) => Ok(s),
        Err(first @ Error::Checkpoint { .. }) => match open_pth(path, None) {
            Ok(s) if is_cn_clip_keys(s.shapes().keys().map(String::as_str)) => Ok(s),
            _ => Err(first),
        },
        Err(e) => Err(e),
    }
}

/// The shapes of a cn_clip state dict, without `module.`.
fn stripped_shapes(source: &TensorSource) -> BTreeMap<String, Vec<usize>> {
    source
        .shapes()
        .into_iter()
        .map(|(k, v)| (k.strip_prefix(DDP_PREFIX).unwrap_or(&k).to_string(), v))
        .collect()
}

/// Reads the configuration off a cn_clip state dict's shapes (`module.` stripped or not),
/// as OpenAI CLIP's `build_model` does: widths, depths, the patch and image size, the
/// ResNet's stages; heads are [`HEAD_WIDTH`] wide (the ResNet's pool has `width · 32 / 64`).
/// `origin` names the checkpoint in errors.
pub fn config_from_shapes(
    shapes: &BTreeMap<String, Vec<usize>>,
    origin: &str,
) -> Result<ChineseClipConfig> {
    let shapes: BTreeMap<&str, &Vec<usize>> = shapes
        .iter()
        .map(|(k, v)| (k.strip_prefix(DDP_PREFIX).unwrap_or(k), v))
        .collect();
    let dims = |key: &str, rank: usize| -> Result<Vec<usize>> {
        match shapes.get(key) {
            Some(s) if s.len() == rank => Ok(s.to_vec()),
            Some(s) => Err(Error::Checkpoint {
                path: origin.into(),
                reason: format!("`{key}` has shape {s:?}, a rank-{rank} tensor was expected"),
            }),
            None => Err(Error::MissingTensor {
                source_name: origin.into(),
                key: key.into(),
                expected: vec![],
            }),
        }
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
    let heads = |width: usize, what: &str| -> Result<usize> {
        if width == 0 || !width.is_multiple_of(HEAD_WIDTH) {
            return Err(Error::Config(format!(
                "{origin}: the {what} width {width} is not a multiple of cn_clip's head width \
                 {HEAD_WIDTH}"
            )));
        }
        Ok(width / HEAD_WIDTH)
    };
    let words = dims("bert.embeddings.word_embeddings.weight", 2)?;
    let hidden = words[1];
    let text_config = CnClipTextConfig {
        vocab_size: words[0],
        hidden_size: hidden,
        num_hidden_layers: count("bert.encoder.layer."),
        num_attention_heads: heads(hidden, "text")?,
        intermediate_size: dims("bert.encoder.layer.0.intermediate.dense.weight", 2)?[0],
        hidden_act: Activation::Gelu,
        max_position_embeddings: dims("bert.embeddings.position_embeddings.weight", 2)?[0],
        type_vocab_size: dims("bert.embeddings.token_type_embeddings.weight", 2)?[0],
        layer_norm_eps: 1e-12,
    };
    let proj = dims("text_projection", 2)?;
    if proj[0] != hidden {
        return Err(Error::ShapeMismatch {
            source_name: origin.into(),
            key: "text_projection".into(),
            expected: vec![hidden, proj[1]],
            found: proj,
        });
    }
    let embed = proj[1];
    let grid = |key: &str| -> Result<usize> {
        let n = dims(key, 2)?[0];
        let g = (1..=n).find(|g| g * g + 1 >= n).unwrap_or(0);
        if g * g + 1 != n {
            return Err(Error::Checkpoint {
                path: origin.into(),
                reason: format!("`{key}` has {n} positions, not a square grid plus one"),
            });
        }
        Ok(g)
    };
    let resnet = shapes.contains_key("visual.layer1.0.conv1.weight");
    let (vision_config, vision_resnet) = if resnet {
        let width = dims("visual.layer1.0.conv1.weight", 4)?[0];
        let mut layers = [0usize; 4];
        for (i, l) in layers.iter_mut().enumerate() {
            *l = count(&format!("visual.layer{}.", i + 1));
        }
        let r = ModifiedResNetConfig {
            layers,
            width,
            heads: heads_for_width(width, HEAD_WIDTH),
            output_dim: dims("visual.attnpool.c_proj.weight", 2)?[0],
            image_size: grid("visual.attnpool.positional_embedding")? * 32,
            ..ModifiedResNetConfig::rn50()
        };
        // The ViT fields are unused with a ResNet: the RN50 preset's.
        let mut v = ChineseClipConfig::preset(super::RN50_PRESET)
            .map(|c| c.vision_config)
            .ok_or_else(|| Error::Config("no RN50 preset".into()))?;
        v.image_size = r.image_size;
        (v, Some(r))
    } else {
        let conv = dims("visual.conv1.weight", 4)?;
        let width = conv[0];
        let patch = conv[2];
        let v = CnClipVisionConfig {
            hidden_size: width,
            intermediate_size: dims("visual.transformer.resblocks.0.mlp.c_fc.weight", 2)?[0],
            num_hidden_layers: count("visual.transformer.resblocks."),
            num_attention_heads: heads(width, "image")?,
            num_channels: conv[1],
            image_size: grid("visual.positional_embedding")? * patch,
            patch_size: patch,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        };
        (v, None)
    };
    let cfg = ChineseClipConfig {
        model_type: "chinese_clip".into(),
        text_config,
        vision_config,
        projection_dim: embed,
        logit_scale_init_value: 2.6592,
        vision_resnet,
    };
    cfg.validate()
        .map_err(|e| Error::Config(format!("{origin}: {e}")))?;
    Ok(cfg)
}

/// How one cn_clip key becomes the crate's.
enum Target {
    /// The same tensor under another name.
    Rename(String),
    /// The transpose of a `[w, e]` projection matrix, as a linear weight `[e, w]`.
    Transpose(String),
    /// `in_proj_{weight,bias}` `[3d, …]`: q, k and v under `{prefix}.{q,k,v}_proj.{suffix}`.
    SplitQkv {
        prefix: String,
        suffix: &'static str,
    },
}

/// The crate's name of cn_clip key `k` (`module.` stripped); `None`: no counterpart.
fn target(k: &str, resnet: bool) -> Option<Target> {
    use Target::*;
    if let Some(rest) = k.strip_prefix("bert.") {
        return Some(Rename(format!("text_model.{rest}")));
    }
    match k {
        "text_projection" => return Some(Transpose("text_projection.weight".into())),
        "logit_scale" => return Some(Rename("logit_scale".into())),
        _ => {}
    }
    let v = k.strip_prefix("visual.")?;
    if resnet {
        return Some(Rename(k.to_string()));
    }
    let vm = "vision_model";
    let fixed = match v {
        "conv1.weight" => Some(format!("{vm}.embeddings.patch_embedding.weight")),
        "class_embedding" => Some(format!("{vm}.embeddings.class_embedding")),
        "positional_embedding" => Some(format!("{vm}.embeddings.position_embedding.weight")),
        "proj" => return Some(Transpose("visual_projection.weight".into())),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(Rename(f));
    }
    for (ln, hf) in [
        ("ln_pre.", "pre_layrnorm."),
        ("ln_post.", "post_layernorm."),
    ] {
        if let Some(w) = v.strip_prefix(ln) {
            return Some(Rename(format!("{vm}.{hf}{w}")));
        }
    }
    let rest = v.strip_prefix("transformer.resblocks.")?;
    let (i, rest) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let layer = format!("{vm}.encoder.layers.{i}");
    match rest {
        "attn.in_proj_weight" => {
            return Some(SplitQkv {
                prefix: format!("{layer}.self_attn"),
                suffix: "weight",
            })
        }
        "attn.in_proj_bias" => {
            return Some(SplitQkv {
                prefix: format!("{layer}.self_attn"),
                suffix: "bias",
            })
        }
        _ => {}
    }
    let pairs = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ];
    pairs.iter().find_map(|(cn, hf)| {
        rest.strip_prefix(cn)
            .map(|w| Rename(format!("{layer}.{hf}{w}")))
    })
}

/// A cn_clip checkpoint under the crate's names.
#[derive(Debug)]
pub struct Converted {
    /// The configuration read off the shapes.
    pub config: ChineseClipConfig,
    /// The tensors, in their stored dtypes, under [`super::ChineseClip`]'s names; keys
    /// without a counterpart keep their cn_clip name (without `module.`).
    pub tensors: HashMap<String, Tensor>,
    /// The cn_clip keys without a counterpart (none in a release checkpoint).
    pub unmapped: Vec<String>,
}

/// Maps a cn_clip state dict to the crate's names, with `config` (or the one
/// [`config_from_shapes`] reads off it). `origin` names the checkpoint in errors.
pub fn convert(
    source: &TensorSource,
    origin: &str,
    config: Option<&ChineseClipConfig>,
) -> Result<Converted> {
    let config = match config {
        Some(c) => c.clone(),
        None => config_from_shapes(&stripped_shapes(source), origin)?,
    };
    let resnet = config.vision_resnet.is_some();
    let mut tensors = HashMap::new();
    let mut unmapped = Vec::new();
    for (key, tensor) in source.load_all()? {
        let k = key.strip_prefix(DDP_PREFIX).unwrap_or(&key).to_string();
        let put = |tensors: &mut HashMap<String, Tensor>, name: String, t: Tensor| {
            if tensors.insert(name.clone(), t).is_some() {
                return Err(Error::Checkpoint {
                    path: origin.into(),
                    reason: format!("two keys map to `{name}` (one of them `{key}`)"),
                });
            }
            Ok(())
        };
        match target(&k, resnet) {
            Some(Target::Rename(name)) => put(&mut tensors, name, tensor)?,
            Some(Target::Transpose(name)) => {
                if tensor.rank() != 2 {
                    return Err(Error::Checkpoint {
                        path: origin.into(),
                        reason: format!(
                            "`{key}` is a projection matrix, but has shape {:?}",
                            tensor.dims()
                        ),
                    });
                }
                put(&mut tensors, name, tensor.t()?.contiguous()?)?
            }
            Some(Target::SplitQkv { prefix, suffix }) => {
                let n = tensor.dims().first().copied().unwrap_or(0);
                if tensor.rank() == 0 || !n.is_multiple_of(3) || n == 0 {
                    return Err(Error::Checkpoint {
                        path: origin.into(),
                        reason: format!(
                            "`{key}` holds q, k and v stacked, so its first dimension must be \
                             a multiple of 3; it has shape {:?}",
                            tensor.dims()
                        ),
                    });
                }
                let d = n / 3;
                for (i, p) in ["q", "k", "v"].iter().enumerate() {
                    let part = tensor.narrow(0, i * d, d)?.contiguous()?;
                    put(&mut tensors, format!("{prefix}.{p}_proj.{suffix}"), part)?;
                }
            }
            None => {
                unmapped.push(k.clone());
                put(&mut tensors, k, tensor)?
            }
        }
    }
    unmapped.sort();
    Ok(Converted {
        config,
        tensors,
        unmapped,
    })
}

/// The names and shapes [`convert`] gives a cn_clip state dict with these `shapes`
/// (`module.` stripped or not), without reading a tensor: for checking a checkpoint's
/// layout (e.g. the published tensor lists) against the model.
pub fn converted_shapes(
    shapes: &BTreeMap<String, Vec<usize>>,
    resnet: bool,
) -> BTreeMap<String, Vec<usize>> {
    let mut out = BTreeMap::new();
    for (key, shape) in shapes {
        let k = key.strip_prefix(DDP_PREFIX).unwrap_or(key);
        match target(k, resnet) {
            Some(Target::Rename(name)) => {
                out.insert(name, shape.clone());
            }
            Some(Target::Transpose(name)) => {
                out.insert(name, shape.iter().rev().copied().collect());
            }
            Some(Target::SplitQkv { prefix, suffix }) => {
                let mut part = shape.clone();
                if let Some(n) = part.first_mut() {
                    *n /= 3;
                }
                for p in ["q", "k", "v"] {
                    out.insert(format!("{prefix}.{p}_proj.{suffix}"), part.clone());
                }
            }
            None => {
                out.insert(k.to_string(), shape.clone());
            }
        }
    }
    out
}

//! Chinese-CLIP fine-tuning and continued pre-training: CLIP's InfoNCE loss with a
//! trainable temperature, over the features of every rank gathered with gradient, and
//! Chinese-CLIP's options to lock the image tower.
//!
//! **The loss.** For the `b` local images `x_i` and texts `t_i` of a rank (L2-normalised)
//! and the `N·b` of all ranks, with `s = exp(logit_scale)`:
//!
//! ```text
//! L = ½ · [ CE(s · X · T_allᵀ, offset + i) + CE(s · T · X_allᵀ, offset + i) ]
//! ```
//!
//! the symmetric cross-entropy of HF `ChineseCLIPModel(return_loss=True)` (a group of one
//! is exactly it) and of cn_clip's training loop with `gather_with_grad`: each rank takes
//! its rows against everyone's columns, and the trainer's averaging of gradients over ranks
//! gives the single-worker gradient over batch `N·b`.
//!
//! **The temperature** `logit_scale` trains, and is clamped to `[0, ln 100]` as cn_clip
//! does after every optimiser step (here: at the start of each step, on its first
//! micro-batch, and again by [`CnClipObjective::clamp_logit_scale`] before export).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use super::{scalar, LossTerms, Objective};
use crate::checkpoint::{LoadReport, Loader};
use crate::error::{Error, Result};
use crate::models::cnclip::{open_model_files, ChineseClip, ChineseClipConfig, IGNORED_KEYS};
use crate::nn::ops;
use crate::preprocess::{ImageProcessor, TextProcessor};
use crate::train::dist::{all_gather_with_grad, Collective};
use crate::train::optim::ParamGroupConfig;
use crate::train::trainer::StepCtx;

/// The largest `logit_scale` (ln 100), as in CLIP and cn_clip.
pub const MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_092;

/// What trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct CnClipLossConfig {
    /// Freeze the image tower (cn_clip's `--freeze-vision`; open_clip's
    /// `lock_image_tower`), its projection included.
    pub lock_image: bool,
    /// With `lock_image`: keep the last N transformer layers, `post_layernorm` and the
    /// projection trainable (0: the whole tower is frozen).
    pub unlocked_layers: usize,
}

/// One micro-batch for [`CnClipObjective`]: `pixel_values[i]` pairs with text `i`.
#[derive(Debug, Clone, Copy)]
pub struct CnClipInputs<'a> {
    /// `[b, 3, h, w]`.
    pub pixel_values: &'a Tensor,
    /// `[b, len]` u32 token ids.
    pub input_ids: &'a Tensor,
    /// `[b, len]` 0/1 padding mask.
    pub attention_mask: &'a Tensor,
}

/// The parts of a loss evaluation.
#[derive(Debug, Clone)]
pub struct CnClipLoss {
    /// The symmetric InfoNCE loss.
    pub total: Tensor,
    /// Its image→text half.
    pub i2t: Tensor,
    /// Its text→image half.
    pub t2i: Tensor,
}

impl LossTerms for CnClipLoss {
    fn total(&self) -> &Tensor {
        &self.total
    }

    fn terms(&self) -> Result<Vec<(&'static str, f64)>> {
        Ok(vec![
            ("i2t", scalar(&self.i2t)?),
            ("t2i", scalar(&self.t2i)?),
        ])
    }
}

/// `½ · [CE(s · img · all_txtᵀ) + CE(s · txt · all_imgᵀ)]` with targets `offset + i`.
pub fn clip_loss(
    img: &Tensor,
    txt: &Tensor,
    all_img: &Tensor,
    all_txt: &Tensor,
    logit_scale: &Tensor,
    offset: usize,
) -> Result<(Tensor, Tensor)> {
    let b = img.dim(0)?;
    let s = logit_scale.to_dtype(DType::F32)?.exp()?;
    let targets = Tensor::arange(offset as u32, (offset + b) as u32, img.device())?;
    let li = img.matmul(&all_txt.t()?)?.broadcast_mul(&s)?;
    let lt = txt.matmul(&all_img.t()?)?.broadcast_mul(&s)?;
    Ok((
        ops::cross_entropy(&li, &targets)?,
        ops::cross_entropy(&lt, &targets)?,
    ))
}

/// Chinese-CLIP's training objective.
pub struct CnClipObjective {
    model: ChineseClip,
    logit_scale: Option<Var>,
    comm: Option<Arc<dyn Collective>>,
    config: CnClipLossConfig,
}

impl std::fmt::Debug for CnClipObjective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CnClipObjective")
            .field("config", &self.config)
            .finish()
    }
}

impl CnClipObjective {
    /// An objective for `model` (built from trainable vars); `logit_scale` is the var
    /// behind its temperature, which the objective clamps (`None`: not clamped).
    pub fn new(
        model: ChineseClip,
        logit_scale: Option<Var>,
        config: CnClipLossConfig,
    ) -> Result<Self> {
        // The ResNet's groups: the stem, four stages and the attention pool.
        let (layers, what) = match &model.config().vision_resnet {
            Some(r) => (r.layers.len() + 2, "groups"),
            None => (model.config().vision_config.num_hidden_layers, "layers"),
        };
        if config.unlocked_layers > layers {
            return Err(Error::Config(format!(
                "{} unlocked image layers, but the image tower has {layers} {what}",
                config.unlocked_layers
            )));
        }
        if config.unlocked_layers > 0 && !config.lock_image {
            return Err(Error::Config(
                "unlocked_layers only applies with lock_image".into(),
            ));
        }
        Ok(Self {
            model,
            logit_scale,
            comm: None,
            config,
        })
    }

    /// Computes the loss over the features of every rank of `comm`.
    pub fn with_collective(mut self, comm: Arc<dyn Collective>) -> Self {
        self.comm = Some(comm);
        self
    }

    pub fn model(&self) -> &ChineseClip {
        &self.model
    }

    /// Clamps `logit_scale` to `[0, ln 100]` in place.
    pub fn clamp_logit_scale(&self) -> Result<()> {
        if let Some(v) = &self.logit_scale {
            let c = v.as_tensor().clamp(0.0, MAX_LOGIT_SCALE)?;
            v.set(&c)?;
        }
        Ok(())
    }

    fn loss_of(&self, x: &CnClipInputs<'_>) -> Result<CnClipLoss> {
        let img = self.model.image_features(x.pixel_values)?;
        let img = ops::l2_normalize(&img.to_dtype(DType::F32)?)?;
        let txt = self.model.text_features(x.input_ids, x.attention_mask)?;
        let txt = ops::l2_normalize(&txt.to_dtype(DType::F32)?)?;
        let b = img.dim(0)?;
        if txt.dim(0)? != b {
            return Err(Error::InvalidArgument(format!(
                "{b} images for {} texts",
                txt.dim(0)?
            )));
        }
        let (all_img, all_txt, offset) = match &self.comm {
            Some(c) if c.world_size() > 1 => (
                all_gather_with_grad(&img, c)?,
                all_gather_with_grad(&txt, c)?,
                c.rank() * b,
            ),
            _ => (img.clone(), txt.clone(), 0),
        };
        let (i2t, t2i) = clip_loss(
            &img,
            &txt,
            &all_img,
            &all_txt,
            &self.model.logit_scale,
            offset,
        )?;
        let total = ((&i2t + &t2i)? * 0.5)?;
        Ok(CnClipLoss { total, i2t, t2i })
    }
}

impl Objective for CnClipObjective {
    type Inputs<'a> = CnClipInputs<'a>;
    type Losses = CnClipLoss;

    /// The loss of one micro-batch. On a step's first micro-batch `logit_scale` is first
    /// clamped to `[0, ln 100]` (the previous step's update, as cn_clip clamps it).
    fn loss(&self, x: &CnClipInputs<'_>, ctx: &StepCtx) -> Result<CnClipLoss> {
        if ctx.micro == 0 {
            self.clamp_logit_scale()?;
        }
        self.loss_of(x)
    }

    /// Frozen: the image tower when locked (all of it, or all but its last
    /// `unlocked_layers` layers, `post_layernorm` and the projection; for the RN50 tower all
    /// but its last `unlocked_layers` of the groups stem, `layer1` … `layer4`, `attnpool`).
    fn param_groups(&self) -> ParamGroupConfig {
        let mut g = ParamGroupConfig::default();
        if !self.config.lock_image {
            return g;
        }
        if let Some(r) = &self.model.config().vision_resnet {
            // open_clip's groups for the modified ResNet: the stem, layer1 … layer4 and the
            // attention pool; the last `unlocked_layers` groups stay trainable.
            let groups: Vec<String> = ["visual.conv*", "visual.bn*"]
                .iter()
                .map(|p| p.to_string())
                .chain((1..=r.layers.len()).map(|i| format!("visual.layer{i}.*")))
                .chain(std::iter::once("visual.attnpool.*".to_string()))
                .collect();
            // The stem is two patterns, one group.
            let n_groups = groups.len() - 1;
            let keep = self.config.unlocked_layers.min(n_groups);
            let frozen_groups = n_groups - keep;
            g.frozen = groups
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i.saturating_sub(1) < frozen_groups)
                .map(|(_, p)| p)
                .collect();
            return g;
        }
        let layers = self.model.config().vision_config.num_hidden_layers;
        let n = self.config.unlocked_layers.min(layers);
        let mut frozen = vec![
            "vision_model.embeddings.*".to_string(),
            "vision_model.pre_layrnorm.*".to_string(),
        ];
        if layers > n {
            frozen.push(format!(
                "vision_model.encoder.layers.{{0..{}}}.*",
                layers - n - 1
            ));
        }
        if n == 0 {
            frozen.push("vision_model.post_layernorm.*".into());
            frozen.push("visual_projection.*".into());
        }
        g.frozen = frozen;
        g
    }
}

/// A Chinese-CLIP whose weights are trainable vars, with its preprocessing.
pub struct TrainableCnClip {
    pub model: ChineseClip,
    /// The vars under their checkpoint names (HF's).
    pub vars: VarMap,
    pub config: ChineseClipConfig,
    pub image_processor: ImageProcessor,
    pub text_processor: TextProcessor,
    pub report: LoadReport,
}

impl TrainableCnClip {
    /// The var behind `logit_scale` (for [`CnClipObjective::new`]).
    pub fn logit_scale_var(&self) -> Result<Var> {
        let data = self
            .vars
            .data()
            .lock()
            .map_err(|_| Error::LockPoisoned("var map"))?;
        data.get("logit_scale")
            .cloned()
            .ok_or_else(|| Error::Training("the model has no logit_scale var".into()))
    }
}

/// Loads a Chinese-CLIP (an HF folder or a cn_clip checkpoint, as
/// [`crate::models::cnclip::open_model_files`] opens it) with trainable weights.
pub fn load_trainable(path: &Path, dtype: DType, device: &Device) -> Result<TrainableCnClip> {
    let f = open_model_files(path, None, None)?;
    let (loader, vars) = Loader::new(f.source, f.source_name).trainable()?;
    let vb = loader.var_builder(dtype, device);
    let model = ChineseClip::new(&f.config, vb).map_err(|e| loader.error(e))?;
    let report = loader.finish(IGNORED_KEYS);
    Ok(TrainableCnClip {
        model,
        vars,
        image_processor: f.image_processor,
        text_processor: f.text_processor,
        config: f.config,
        report,
    })
}

/// Writes a trained Chinese-CLIP to `out_dir` as an HF-style folder that
/// [`crate::models::cnclip::ChineseClipEncoder::from_dir`] loads: `model.safetensors` with
/// `weights` (the crate's names) in `dtype`, `config.json`, and the tokenizer and
/// preprocessor files of the source. `src` is what training started from: an HF folder
/// (its non-weight files are copied) or a cn_clip checkpoint (then `config` is written as
/// `config.json`, with the RN50 tower as `vision_resnet`, and the files beside it that the
/// folder loader reads are copied).
pub fn export_model_dir(
    src: &Path,
    out_dir: &Path,
    weights: &std::collections::BTreeMap<String, Tensor>,
    dtype: DType,
    config: &ChineseClipConfig,
) -> Result<std::path::PathBuf> {
    if src.is_dir() && src.join("config.json").exists() {
        return crate::train::siglip::export_model_dir(src, out_dir, weights, dtype);
    }
    let dir = if src.is_dir() {
        src
    } else {
        src.parent().unwrap_or(Path::new("."))
    };
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::io(format!("creating {}", out_dir.display()), e))?;
    for name in [
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ] {
        let from = dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, out_dir.join(name))
                .map_err(|e| Error::io(format!("copying {}", from.display()), e))?;
        }
    }
    let json = serde_json::to_string_pretty(config)
        .map_err(|e| Error::Config(format!("serialising the config: {e}")))?;
    crate::checkpoint::write_atomic(&out_dir.join("config.json"), json.as_bytes())?;
    let cast = weights
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?)))
        .collect::<Result<std::collections::BTreeMap<_, _>>>()?;
    let out = out_dir.join("model.safetensors");
    crate::checkpoint::save_safetensors(&cast, None, &out)?;
    Ok(out)
}

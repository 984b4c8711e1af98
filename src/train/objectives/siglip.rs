//! SigLIP / SigLIP 2 continued pre-training: the sigmoid loss with a trainable
//! `logit_scale` and `logit_bias`, over image features gathered from every rank with
//! gradient, and optional distillation toward the frozen starting checkpoint.
//!
//! **The loss.** For texts `t_i` and images `x_j` (L2-normalised), the logits are
//! `l_ij = exp(logit_scale) · t_i·x_j + logit_bias` and
//!
//! ```text
//! L = −1/m · Σ_i Σ_j log σ(z_ij · l_ij),   z_ij = +1 for the pair (i, i), −1 otherwise
//! ```
//!
//! over the `m` texts of the batch and all images: HF `SiglipModel(return_loss=True)`,
//! with `log σ` computed stably ([`crate::nn::ops::log_sigmoid`]). In data parallelism each
//! rank takes its `b` texts against the `N·b` images of all ranks
//! ([`crate::train::dist::all_gather_with_grad`]); the trainer's averaging of gradients over ranks
//! then gives exactly the gradient of the single-worker loss over batch `N·b`, and the mean
//! of the ranks' losses is that loss.
//!
//! **Distillation** ([`DistillKind`]) keeps the model near the checkpoint it started from,
//! computed with a frozen copy of it (the "teacher"):
//! * `Features`: `1 − cos` between the student's and the teacher's normalised image
//!   embeddings, plus the same for text embeddings, averaged over the batch;
//! * `Logits`: the binary KL divergence `KL(σ(teacher logit) ‖ σ(student logit))` per
//!   (text, image) pair, normalised like the sigmoid loss (summed over all images,
//!   averaged over texts), over the gathered images.
//!
//! Fixed-resolution and NaFlex models train the same way ([`SiglipPixels`]); NaFlex
//! batches may mix aspect ratios.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::{scalar, LossTerms, Objective};
use crate::checkpoint::discover::safetensors_files;
use crate::checkpoint::{LoadReport, Loader};
use crate::error::{Error, Result};
use crate::models::siglip2::{Siglip, SiglipConfig, SiglipImageProcessor};
use crate::nn::ops;
use crate::preprocess::{
    read_max_num_patches, ImageProcessor, NaFlexBatch, NaFlexProcessor, TextProcessor, TextStyle,
};
use crate::train::dist::{all_gather_with_grad, Collective};
use crate::train::trainer::StepCtx;

/// `[m, n]` logits `exp(scale) · text · imagesᵀ + bias`, in f32.
pub fn pair_logits(
    text: &Tensor,
    images: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
) -> Result<Tensor> {
    let text = text.to_dtype(DType::F32)?;
    let images = images.to_dtype(DType::F32)?;
    let cos = text.matmul(&images.t()?)?;
    let scale = logit_scale.to_dtype(DType::F32)?.exp()?;
    Ok(cos
        .broadcast_mul(&scale)?
        .broadcast_add(&logit_bias.to_dtype(DType::F32)?)?)
}

/// The `±1` labels of `m` texts against `n` images where text `i` matches image
/// `offset + i`.
fn pair_signs(m: usize, n: usize, offset: usize, device: &Device) -> Result<Tensor> {
    if offset + m > n {
        return Err(Error::InvalidArgument(format!(
            "sigmoid loss: texts {offset}..{} have no images among {n}",
            offset + m
        )));
    }
    let mut z = vec![-1f32; m * n];
    for i in 0..m {
        z[i * n + offset + i] = 1.0;
    }
    Ok(Tensor::from_vec(z, (m, n), device)?)
}

/// The sigmoid loss of `text` `[m, d]` against `images` `[n, d]` (both L2-normalised),
/// where text `i` pairs with image `offset + i` and every other pair is negative:
/// `−1/m · Σ_ij log σ(z_ij · l_ij)`. With `offset = 0` and `m = n` this is HF
/// `SiglipModel`'s loss; in data parallelism pass all ranks' images and
/// `offset = rank · m`.
pub fn sigmoid_loss(
    text: &Tensor,
    images: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
    offset: usize,
) -> Result<Tensor> {
    let logits = pair_logits(text, images, logit_scale, logit_bias)?;
    sigmoid_loss_from_logits(&logits, offset)
}

/// [`sigmoid_loss`] from `[m, n]` logits.
pub fn sigmoid_loss_from_logits(logits: &Tensor, offset: usize) -> Result<Tensor> {
    let (m, n) = logits.dims2()?;
    let z = pair_signs(m, n, offset, logits.device())?.to_dtype(logits.dtype())?;
    let ll = ops::log_sigmoid(&(logits * z)?)?;
    Ok((ll.sum_all()? * (-1.0 / m as f64))?)
}

/// The sigmoid loss where every pair with equal group ids is positive (several captions of
/// one image, or samples of one class): `z_ij = +1` when `text_groups[i] ==
/// image_groups[j]`. Normalised like [`sigmoid_loss_from_logits`].
pub fn sigmoid_loss_grouped(
    logits: &Tensor,
    text_groups: &[u64],
    image_groups: &[u64],
) -> Result<Tensor> {
    let (m, n) = logits.dims2()?;
    if text_groups.len() != m || image_groups.len() != n {
        return Err(Error::InvalidArgument(format!(
            "grouped sigmoid loss: {} text and {} image groups for logits {m}x{n}",
            text_groups.len(),
            image_groups.len()
        )));
    }
    let z: Vec<f32> = text_groups
        .iter()
        .flat_map(|t| {
            image_groups
                .iter()
                .map(move |i| if t == i { 1.0 } else { -1.0 })
        })
        .collect();
    let z = Tensor::from_vec(z, (m, n), logits.device())?.to_dtype(logits.dtype())?;
    let ll = ops::log_sigmoid(&(logits * z)?)?;
    Ok((ll.sum_all()? * (-1.0 / m as f64))?)
}

/// The binary KL divergence `KL(σ(t) ‖ σ(s))` per pair, summed over the last dimension
/// and averaged over the first, for student logits `s` and (constant) teacher logits `t`.
pub fn sigmoid_kl(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let (m, _) = student.dims2()?;
    let t = teacher.detach().to_dtype(DType::F32)?;
    let s = student.to_dtype(DType::F32)?;
    let p = ops::sigmoid(&t)?;
    let q = (1.0 - &p)?;
    let pos = (ops::log_sigmoid(&t)? - ops::log_sigmoid(&s)?)?;
    let neg = (ops::log_sigmoid(&t.neg()?)? - ops::log_sigmoid(&s.neg()?)?)?;
    let kl = ((p * pos)? + (q * neg)?)?;
    Ok((kl.sum_all()? / m as f64)?)
}

/// `mean_i (1 − cos(a_i, b_i))` of two `[n, d]` batches of normalised rows; `b` is constant.
pub fn cosine_distance(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let b = b.detach().to_dtype(DType::F32)?;
    let cos = (a.to_dtype(DType::F32)? * b)?.sum(D::Minus1)?;
    Ok((1.0 - cos.mean_all()?)?)
}

/// How distillation toward the frozen starting checkpoint is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DistillKind {
    /// `1 − cos` between student and teacher embeddings, images and texts.
    #[default]
    Features,
    /// Binary KL between the teacher's and the student's pair probabilities.
    Logits,
}

/// The objective's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SiglipLossConfig {
    /// Weight of the distillation term (0 disables it; a teacher is then not needed).
    pub distill_weight: f64,
    pub distill: DistillKind,
}

impl Default for SiglipLossConfig {
    fn default() -> Self {
        Self {
            distill_weight: 0.0,
            distill: DistillKind::Features,
        }
    }
}

/// Images for a SigLIP forward pass.
#[derive(Debug, Clone, Copy)]
pub enum SiglipPixels<'a> {
    /// `[b, 3, h, w]` for fixed-resolution models.
    Fixed(&'a Tensor),
    /// A NaFlex batch (patches, mask, spatial shapes); aspect ratios may differ.
    NaFlex(&'a NaFlexBatch),
}

/// One micro-batch for [`SiglipObjective`].
#[derive(Debug, Clone, Copy)]
pub struct SiglipInputs<'a> {
    /// The images; `images[i]` pairs with text `i`.
    pub images: SiglipPixels<'a>,
    /// `[b, len]` u32 token ids.
    pub input_ids: &'a Tensor,
    /// An optional attention mask (SigLIP trains without one, on texts padded to the full
    /// length).
    pub attention_mask: Option<&'a Tensor>,
    /// Group ids: every (text, image) pair whose samples share one is positive
    /// ([`sigmoid_loss_grouped`]), across ranks too (e.g. the image id when an image has
    /// several captions in the batch, or a class). `None`: only `(i, i)` is positive.
    pub groups: Option<&'a [u64]>,
}

impl<'a> SiglipInputs<'a> {
    /// Images paired with texts, no mask, no groups.
    pub fn new(images: SiglipPixels<'a>, input_ids: &'a Tensor) -> Self {
        Self {
            images,
            input_ids,
            attention_mask: None,
            groups: None,
        }
    }

    /// With positives by group id.
    pub fn with_groups(mut self, groups: &'a [u64]) -> Self {
        self.groups = Some(groups);
        self
    }

    /// With an attention mask.
    pub fn with_mask(mut self, mask: &'a Tensor) -> Self {
        self.attention_mask = Some(mask);
        self
    }
}

/// The parts of a loss evaluation.
#[derive(Debug, Clone)]
pub struct SiglipLoss {
    /// `sigmoid + distill_weight · distill`: what to minimise.
    pub total: Tensor,
    /// The sigmoid loss.
    pub sigmoid: Tensor,
    /// The distillation term, when enabled.
    pub distill: Option<Tensor>,
}

fn image_features(model: &Siglip, pixels: SiglipPixels<'_>) -> Result<Tensor> {
    let f = match pixels {
        SiglipPixels::Fixed(px) => model.get_image_features(px)?,
        SiglipPixels::NaFlex(b) => model.get_image_features_naflex(b)?,
    };
    Ok(ops::l2_normalize(&f.to_dtype(DType::F32)?)?)
}

fn text_features(model: &Siglip, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let f = model.get_text_features(ids, mask)?;
    Ok(ops::l2_normalize(&f.to_dtype(DType::F32)?)?)
}

/// SigLIP's training objective: a trainable student, an optional frozen teacher, an
/// optional data-parallel group.
#[derive(Debug, Clone)]
pub struct SiglipObjective {
    student: Siglip,
    teacher: Option<Siglip>,
    comm: Option<Arc<dyn Collective>>,
    config: SiglipLossConfig,
}

impl SiglipObjective {
    /// An objective for `student` (built from trainable vars). A positive
    /// `config.distill_weight` needs a `teacher`.
    pub fn new(student: Siglip, teacher: Option<Siglip>, config: SiglipLossConfig) -> Result<Self> {
        if !(config.distill_weight.is_finite() && config.distill_weight >= 0.0) {
            return Err(Error::Config(format!(
                "distill_weight {} must be finite and non-negative",
                config.distill_weight
            )));
        }
        if config.distill_weight > 0.0 && teacher.is_none() {
            return Err(Error::Config(
                "distillation is enabled but no teacher model was given".into(),
            ));
        }
        Ok(Self {
            student,
            teacher,
            comm: None,
            config,
        })
    }

    /// Computes the loss over the images of every rank of `comm`.
    pub fn with_collective(mut self, comm: Arc<dyn Collective>) -> Self {
        self.comm = Some(comm);
        self
    }

    /// The trained model.
    pub fn student(&self) -> &Siglip {
        &self.student
    }

    pub fn config(&self) -> &SiglipLossConfig {
        &self.config
    }

    fn loss_of(&self, x: &SiglipInputs<'_>) -> Result<SiglipLoss> {
        let SiglipInputs {
            images,
            input_ids,
            attention_mask,
            groups,
        } = *x;
        let img = image_features(&self.student, images)?;
        let txt = text_features(&self.student, input_ids, attention_mask)?;
        let b = img.dim(0)?;
        if txt.dim(0)? != b {
            return Err(Error::InvalidArgument(format!(
                "{b} images for {} texts",
                txt.dim(0)?
            )));
        }
        let (all_img, offset) = match &self.comm {
            Some(c) if c.world_size() > 1 => (all_gather_with_grad(&img, c)?, c.rank() * b),
            _ => (img.clone(), 0),
        };
        let (scale, bias) = self.student.logit_params();
        let logits = pair_logits(&txt, &all_img, scale, bias)?;
        let sigmoid = match groups {
            None => sigmoid_loss_from_logits(&logits, offset)?,
            Some(g) => {
                let all = match &self.comm {
                    Some(c) if c.world_size() > 1 => {
                        let mine: Vec<i64> = g.iter().map(|&x| x as i64).collect();
                        let t = Tensor::from_vec(mine, g.len(), &Device::Cpu)?;
                        c.all_gather(&t)?
                            .to_device(&Device::Cpu)?
                            .to_vec1::<i64>()?
                            .into_iter()
                            .map(|x| x as u64)
                            .collect()
                    }
                    _ => g.to_vec(),
                };
                sigmoid_loss_grouped(&logits, g, &all)?
            }
        };
        let w = self.config.distill_weight;
        let (total, distill) = match (&self.teacher, w > 0.0) {
            (Some(teacher), true) => {
                let t_img = image_features(teacher, images)?.detach();
                let t_txt = text_features(teacher, input_ids, attention_mask)?.detach();
                let d = match self.config.distill {
                    DistillKind::Features => {
                        (cosine_distance(&img, &t_img)? + cosine_distance(&txt, &t_txt)?)?
                    }
                    DistillKind::Logits => {
                        let t_all = match &self.comm {
                            Some(c) if c.world_size() > 1 => c.all_gather(&t_img)?,
                            _ => t_img,
                        };
                        let (ts, tb) = teacher.logit_params();
                        let t_logits = pair_logits(&t_txt, &t_all, ts, tb)?;
                        sigmoid_kl(&logits, &t_logits)?
                    }
                };
                ((&sigmoid + (&d * w)?)?, Some(d))
            }
            _ => (sigmoid.clone(), None),
        };
        Ok(SiglipLoss {
            total,
            sigmoid,
            distill,
        })
    }
}

impl LossTerms for SiglipLoss {
    fn total(&self) -> &Tensor {
        &self.total
    }

    fn terms(&self) -> Result<Vec<(&'static str, f64)>> {
        let mut out = vec![("sigmoid", scalar(&self.sigmoid)?)];
        if let Some(d) = &self.distill {
            out.push(("distill", scalar(d)?));
        }
        Ok(out)
    }
}

impl Objective for SiglipObjective {
    type Inputs<'a> = SiglipInputs<'a>;
    type Losses = SiglipLoss;

    /// The loss of one (micro-)batch: `images[i]` pairs with text `i` (or, with
    /// [`SiglipInputs::groups`], every pair whose samples share a group id is positive).
    /// Under data parallelism the images of every rank are gathered once, with gradient.
    /// The step context is not used: the loss has no randomness.
    fn loss(&self, x: &SiglipInputs<'_>, _ctx: &StepCtx) -> Result<SiglipLoss> {
        self.loss_of(x)
    }
}

/// A SigLIP model whose weights are trainable vars, with its preprocessing.
pub struct TrainableSiglip {
    pub model: Siglip,
    /// The vars under their checkpoint names (HF's).
    pub vars: VarMap,
    pub config: SiglipConfig,
    pub image_processor: SiglipImageProcessor,
    /// From `tokenizer.json`, when the directory has one.
    pub text_processor: Option<TextProcessor>,
    pub report: LoadReport,
}

impl std::fmt::Debug for TrainableSiglip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainableSiglip")
            .field("config", &self.config)
            .field("image_processor", &self.image_processor)
            .finish()
    }
}

/// Loads a SigLIP / SigLIP 2 model directory (`config.json`, safetensors weights, an
/// optional `tokenizer.json` and `preprocessor_config.json`) with trainable weights.
pub fn load_trainable(dir: &Path, dtype: DType, device: &Device) -> Result<TrainableSiglip> {
    let config = SiglipConfig::from_json_file(&dir.join("config.json"))?;
    let files = safetensors_files(dir)?;
    let source = crate::checkpoint::open_safetensors(&files)?;
    let name = files
        .first()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let (loader, vars) = Loader::new(source, name).trainable()?;
    let vb = loader.var_builder(dtype, device);
    let model = Siglip::new(&config, vb).map_err(|e| loader.error(e))?;
    let report = loader.finish(&["position_ids"]);
    let v = &config.vision_config;
    let image_processor = if config.is_naflex() {
        let p = NaFlexProcessor::new(
            v.patch_size,
            read_max_num_patches(dir)?.unwrap_or(v.num_patches),
        );
        p.validate()?;
        SiglipImageProcessor::NaFlex(p)
    } else {
        SiglipImageProcessor::Fixed(ImageProcessor::siglip2(v.image_size))
    };
    let tok = dir.join("tokenizer.json");
    let text_processor = if tok.exists() {
        Some(TextProcessor::from_file(
            &tok,
            TextStyle::Gemma,
            config.text_config.max_position_embeddings,
        )?)
    } else {
        None
    };
    Ok(TrainableSiglip {
        model,
        vars,
        config,
        image_processor,
        text_processor,
        report,
    })
}

/// Writes a model directory the inference API loads (`tuwen::load`, the `zero_shot`
/// example): `model.safetensors` from `weights` (cast to `dtype`) and every other file of
/// `src_dir` (config, tokenizer, preprocessor config) copied; the source's own weights
/// (`*.safetensors`, `pytorch_model.bin`, `*.pth`) are not. Returns the weights file. Any
/// family whose folders keep HF's layout uses it (SigLIP, Chinese-CLIP).
pub fn export_model_dir(
    src_dir: &Path,
    out_dir: &Path,
    weights: &BTreeMap<String, Tensor>,
    dtype: DType,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::io(format!("creating {}", out_dir.display()), e))?;
    let entries = std::fs::read_dir(src_dir)
        .map_err(|e| Error::io(format!("reading {}", src_dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("reading {}", src_dir.display()), e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        let is_weights = name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
            || name == "pytorch_model.bin"
            || name.ends_with(".pth");
        if path.is_file() && !is_weights {
            std::fs::copy(&path, out_dir.join(&name))
                .map_err(|e| Error::io(format!("copying {}", path.display()), e))?;
        }
    }
    let mut cast = BTreeMap::new();
    for (k, t) in weights {
        cast.insert(k.clone(), t.to_dtype(dtype)?);
    }
    let out = out_dir.join("model.safetensors");
    crate::checkpoint::save_safetensors(&cast, None, &out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm_rows(v: Vec<f32>, rows: usize) -> Tensor {
        let t = Tensor::from_vec(v, (rows, 3), &Device::Cpu).unwrap();
        ops::l2_normalize(&t).unwrap()
    }

    #[test]
    fn sigmoid_loss_is_the_hf_formula_and_splits_over_ranks() {
        let txt = norm_rows((0..12).map(|i| ((i * 7 % 5) as f32) - 2.0).collect(), 4);
        let img = norm_rows((0..12).map(|i| ((i * 3 % 7) as f32) - 3.0).collect(), 4);
        let s = Tensor::new(&[1.5f32], &Device::Cpu).unwrap();
        let b = Tensor::new(&[-0.7f32], &Device::Cpu).unwrap();
        let full = sigmoid_loss(&txt, &img, &s, &b, 0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Reference by hand.
        let t = txt.to_vec2::<f32>().unwrap();
        let x = img.to_vec2::<f32>().unwrap();
        let mut r = 0f64;
        for (i, ti) in t.iter().enumerate() {
            for (j, xj) in x.iter().enumerate() {
                let cos: f32 = (0..3).map(|k| ti[k] * xj[k]).sum();
                let l = (1.5f64.exp() * cos as f64) - 0.7;
                let z = if i == j { 1.0 } else { -1.0 };
                r -= -(1.0 + (-z * l).exp()).ln();
            }
        }
        r /= 4.0;
        assert!((full as f64 - r).abs() < 1e-5, "{full} vs {r}");
        // Two "ranks" of two texts against all images average to the full loss.
        let half = |k: usize| {
            sigmoid_loss(&txt.narrow(0, 2 * k, 2).unwrap(), &img, &s, &b, 2 * k)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(((half(0) + half(1)) / 2.0 - full).abs() < 1e-5);
        assert!(sigmoid_loss(&txt, &img, &s, &b, 1).is_err());
    }

    #[test]
    fn kl_is_zero_at_the_teacher_and_positive_elsewhere() {
        let t = Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap();
        let z = sigmoid_kl(&t, &t).unwrap().to_scalar::<f32>().unwrap();
        assert!(z.abs() < 1e-6);
        let s = (&t + 0.5).unwrap();
        assert!(sigmoid_kl(&s, &t).unwrap().to_scalar::<f32>().unwrap() > 1e-3);
    }
}

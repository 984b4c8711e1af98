//! Training objectives for R2D2 and PRD2 (continued pre-training and fine-tuning).
//!
//! Each objective is a separate function with its own weight in [`R2d2LossConfig`]:
//!
//! * **GCPR** ([`gcpr_loss`], global contrastive pre-ranking): in-batch InfoNCE over
//!   `cos / temp` with multi-positive targets (pairs whose images share an id are
//!   positives; each row of targets is `pos / pos.sum()`), i2t and t2i averaged. This is
//!   `compute_gcpr_loss` of the official `models/r2d2_retrieval.py`. `temp` is a learnable
//!   parameter clamped to `[0.001, 0.5]` (without gradient) before every step, as there.
//! * **FGR** ([`fgr_loss`], fine-grained ranking): ITM on both cross encoders. For each
//!   positive pair one hard negative image and one hard negative text are drawn from
//!   `softmax(sim / temp)` with positives zeroed ([`hard_negative_weights`],
//!   [`sample_hard_negatives`], seeded by [`StepCtx::rng`]); the `3B` pairs are labelled
//!   `[1]·B + [0]·2B` and scored by `cross_entropy(weight = [1, 2])` on `itm_head`
//!   (text-joint CLS) and `itm_head_i` (image-joint CLS), averaged. Under data
//!   parallelism ([`R2d2Objective::with_collective`]) the negatives come from the batch of
//!   every rank, as in BLIP's `negative_all_rank` (ALBEF's successor): each rank's
//!   positives are scored against the gathered features, the negative images' tokens are
//!   gathered with gradient ([`crate::train::dist::all_gather_with_grad`]) and the negative
//!   texts' ids and masks are gathered and re-encoded locally ([`World::gather`]; for one
//!   worker [`World::local`] is the same code over the local batch).
//! * **TgD** ([`tgd_loss`], teacher-guided distillation): an EMA teacher (momentum 0.995,
//!   updated before its features are computed, as ALBEF's `_momentum_update`) gives the
//!   keys, in-batch teacher features plus a [`FeatureQueue`] of earlier ones; the targets
//!   are `α·softmax(teacher sims) + (1 − α)·hard` with α = 0.4 and multi-positive hard
//!   targets (queued image ids included), as ALBEF's retrieval model. The paper's
//!   pre-training code was never released; this follows ALBEF, which R2D2 builds on.
//! * **FgD** ([`fgd_loss`], feature-guided distillation): the teacher sees the full input,
//!   the student a masked one ([`mask_text_tokens`]: 15% of the text tokens become
//!   `[MASK]`; [`sample_kept_tokens`]: a fraction of the image patches is dropped before
//!   the ViT); a feature loss (cosine or MSE, [`FeatureLoss`]) pulls the student's
//!   normalised embeddings to the teacher's.
//!
//! [`R2d2Objective`] ties them together as an [`Objective`] for [`crate::train::Fit`]; its
//! teacher weights and queue are saved in training checkpoints through
//! [`Objective::extra_state`]. [`R2d2LossConfig::finetune`] and
//! [`finetune_trainer_config`] are the official fine-tuning recipe (ViT frozen, AdamW lr
//! 1e-5, weight decay 0.05, 500 warm-up steps, cosine); [`R2d2LossConfig::prd2`] trains
//! PRD2 with GCPR and TgD only.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Module, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{scalar, LossTerms, Objective};
use crate::error::{Error, Result};
use crate::models::r2d2::R2d2;
use crate::nn::ops;
use crate::train::dist::{all_gather_with_grad, Collective};
use crate::train::fit::ExtraState;
use crate::train::optim::{AdamWConfig, ParamGroupConfig};
use crate::train::rng::{derive_rng, standard_normal, streams, ChaCha8Rng};
use crate::train::schedule::Schedule;
use crate::train::trainer::{lock_vars, EmaPairs, StepCtx, TrainerConfig};

/// [`StepCtx::rng`] stream of the FGR hard-negative sampler.
pub const STREAM_FGR: u64 = 100;
/// [`StepCtx::rng`] stream of the FgD text masking.
pub const STREAM_TEXT_MASK: u64 = 101;
/// [`StepCtx::rng`] stream of the FgD patch dropping.
pub const STREAM_PATCH_DROP: u64 = 102;
/// The id of empty queue slots (never equal to an image key).
pub const EMPTY_ID: i64 = -1;

/// The feature loss of FgD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureLoss {
    /// Mean over the batch of `1 − cos(student, teacher)`.
    #[default]
    Cosine,
    /// Mean squared error of the normalised embeddings (all elements).
    Mse,
}

/// Weights and knobs of the R2D2 / PRD2 objectives. A weight of 0 turns an objective off
/// (it is then not computed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct R2d2LossConfig {
    /// Weight of GCPR.
    pub gcpr_weight: f64,
    /// Weight of FGR (R2D2 only: needs the cross encoders).
    pub fgr_weight: f64,
    /// Weight of TgD.
    pub tgd_weight: f64,
    /// Weight of FgD.
    pub fgd_weight: f64,
    /// `temp` is clamped into `[temp_min, temp_max]` before every step (0.001, 0.5).
    pub temp_min: f64,
    pub temp_max: f64,
    /// Cross-entropy class weights of FGR, `[negative, positive]` (`[1, 2]`).
    pub fgr_class_weights: [f64; 2],
    /// Momentum of the EMA teacher (0.995).
    pub ema_momentum: f64,
    /// Weight α of the teacher's soft targets in TgD (0.4).
    pub distill_alpha: f64,
    /// Teacher features kept in the TgD queue (0: in-batch only).
    pub queue_size: usize,
    /// Fraction of text tokens the FgD student sees as `[MASK]` (0.15).
    pub text_mask_ratio: f64,
    /// The `[MASK]` token id (103 in the chinese-roberta-wwm-ext vocabulary).
    pub mask_token_id: u32,
    /// Fraction of image patches dropped from the FgD student's ViT input (0.25).
    pub patch_drop_ratio: f64,
    /// FgD's feature loss.
    pub feature_loss: FeatureLoss,
    /// Run the ViT without gradient (it is frozen in the official fine-tuning).
    pub freeze_vision: bool,
    /// Seed of the initial (random, normalised) queue contents.
    pub queue_seed: u64,
}

impl Default for R2d2LossConfig {
    /// Continued pre-training: all four objectives with weight 1.
    fn default() -> Self {
        Self {
            gcpr_weight: 1.0,
            fgr_weight: 1.0,
            tgd_weight: 1.0,
            fgd_weight: 1.0,
            temp_min: 0.001,
            temp_max: 0.5,
            fgr_class_weights: [1.0, 2.0],
            ema_momentum: 0.995,
            distill_alpha: 0.4,
            queue_size: 4096,
            text_mask_ratio: 0.15,
            mask_token_id: 103,
            patch_drop_ratio: 0.25,
            feature_loss: FeatureLoss::Cosine,
            freeze_vision: false,
            queue_seed: 0,
        }
    }
}

impl R2d2LossConfig {
    /// The official fine-tuning objectives (`train_r2d2_retrieval.py`): GCPR + FGR, ViT
    /// frozen.
    pub fn finetune() -> Self {
        Self {
            tgd_weight: 0.0,
            fgd_weight: 0.0,
            freeze_vision: true,
            ..Self::default()
        }
    }

    /// PRD2 (no cross encoders): GCPR and TgD.
    pub fn prd2() -> Self {
        Self {
            fgr_weight: 0.0,
            fgd_weight: 0.0,
            ..Self::default()
        }
    }

    /// Whether an EMA teacher is needed.
    pub fn needs_teacher(&self) -> bool {
        self.tgd_weight > 0.0 || self.fgd_weight > 0.0
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        let ws = [
            self.gcpr_weight,
            self.fgr_weight,
            self.tgd_weight,
            self.fgd_weight,
        ];
        if ws.iter().any(|w| !(w.is_finite() && *w >= 0.0)) || ws.iter().all(|w| *w == 0.0) {
            return Err(Error::Config(format!(
                "objective weights {ws:?} must be finite, non-negative and not all zero"
            )));
        }
        if !(self.temp_min > 0.0 && self.temp_min <= self.temp_max && self.temp_max.is_finite()) {
            return Err(Error::Config(format!(
                "temp range [{}, {}] is empty or not positive",
                self.temp_min, self.temp_max
            )));
        }
        for (name, v) in [
            ("ema_momentum", self.ema_momentum),
            ("distill_alpha", self.distill_alpha),
            ("text_mask_ratio", self.text_mask_ratio),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::Config(format!("{name} {v} is outside [0, 1]")));
            }
        }
        if !(0.0..1.0).contains(&self.patch_drop_ratio) {
            return Err(Error::Config(format!(
                "patch_drop_ratio {} is outside [0, 1)",
                self.patch_drop_ratio
            )));
        }
        if !self
            .fgr_class_weights
            .iter()
            .all(|w| w.is_finite() && *w > 0.0)
        {
            return Err(Error::Config("FGR class weights must be positive".into()));
        }
        Ok(())
    }
}

/// The official fine-tuning optimiser recipe: ViT frozen (`visual_encoder.*`), AdamW
/// (betas 0.9/0.999, eps 1e-8) with lr 1e-5 and weight decay 0.05 on every parameter
/// (the official optimiser has no no-decay group), 500 linear warm-up steps, then cosine
/// to 0 at `total_steps`. (The official script warms up from 1e-6 and decays per epoch.)
pub fn finetune_trainer_config(total_steps: u64) -> TrainerConfig {
    TrainerConfig {
        optimizer: AdamWConfig {
            lr: 1e-5,
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        groups: ParamGroupConfig {
            no_decay: Vec::new(),
            no_decay_rank_le1: false,
            ..ParamGroupConfig::default()
        }
        .with_frozen(["visual_encoder.*"]),
        schedule: Schedule::warmup_cosine(500, total_steps, 0.0),
        ..TrainerConfig::default()
    }
}

/// A 63-bit key for an image id string (FNV-1a), or for a manifest index when there is no
/// id; keys are what [`gcpr_loss`] and [`tgd_loss`] compare.
pub fn image_keys(ids: &[Option<String>], indices: &[usize]) -> Vec<i64> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| match id {
            Some(s) => {
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for b in s.as_bytes() {
                    h ^= u64::from(*b);
                    h = h.wrapping_mul(0x0100_0000_01b3);
                }
                (h & ((1u64 << 62) - 1)) as i64
            }
            None => (1i64 << 62) | indices.get(i).copied().unwrap_or(i) as i64,
        })
        .collect()
}

/// `[rows, cols]` f32 matrix with 1 where the keys are equal.
pub fn positive_mask(rows: &[i64], cols: &[i64], device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = rows
        .iter()
        .flat_map(|r| cols.iter().map(move |c| f32::from(u8::from(r == c))))
        .collect();
    Ok(Tensor::from_vec(v, (rows.len(), cols.len()), device)?)
}

/// Multi-positive targets: [`positive_mask`] with each row divided by its sum. Every row
/// must have a positive.
pub fn multi_positive_targets(rows: &[i64], cols: &[i64], device: &Device) -> Result<Tensor> {
    let pos = positive_mask(rows, cols, device)?;
    let sums = pos.sum_keepdim(1)?;
    let min = sums.min_all()?.to_scalar::<f32>()?;
    if min <= 0.0 {
        return Err(Error::InvalidArgument(
            "a row has no positive: every query's own key must be among the keys".into(),
        ));
    }
    Ok(pos.broadcast_div(&sums)?)
}

fn check_ids(n: usize, ids: &[i64]) -> Result<()> {
    if ids.len() != n {
        return Err(Error::InvalidArgument(format!(
            "{} image keys for a batch of {n}",
            ids.len()
        )));
    }
    Ok(())
}

/// The pairs that every loss term compares against: the batches of all ranks in rank
/// order, gathered once at the top of [`R2d2Objective::loss`] ([`World::gather`]), or the
/// local batch for a single worker ([`World::local`]), the degenerate case.
#[derive(Debug, Clone)]
pub struct World {
    /// `[n, E]` normalised image embeddings (with gradient: a column's gradient returns to
    /// its rank).
    pub image_feat: Tensor,
    /// `[n, E]` normalised text embeddings (with gradient).
    pub text_feat: Tensor,
    /// The image keys of the `n` pairs.
    pub ids: Vec<i64>,
    /// This rank's first row, `rank · b` (0 for a single worker).
    pub offset: usize,
    /// What FGR draws its negatives from, when FGR runs.
    pub fgr: Option<FgrWorld>,
}

/// FGR's share of the [`World`]: the pairs its hard negatives are drawn from.
#[derive(Debug, Clone)]
pub struct FgrWorld {
    /// `[n, P, D]` image tokens (gathered with gradient: a negative image's gradient
    /// returns to its rank).
    pub image_tokens: Tensor,
    /// The negative texts.
    pub texts: NegativeTexts,
}

/// Where FGR's negative texts come from.
#[derive(Debug, Clone)]
pub enum NegativeTexts {
    /// A single worker: the batch's encoded `[n, T, H]` states and `[n, T]` masks, indexed
    /// directly.
    States { states: Tensor, mask: Tensor },
    /// Data parallelism: every rank's `[n, T]` token ids and masks; a negative text is
    /// re-encoded by the rank that uses it (BLIP's `negative_all_rank`).
    Ids {
        input_ids: Tensor,
        attention_mask: Tensor,
    },
}

impl World {
    /// The local batch as the world: `n = b`, offset 0.
    pub fn local(image_feat: &Tensor, text_feat: &Tensor, ids: &[i64]) -> Result<Self> {
        check_ids(image_feat.dim(0)?, ids)?;
        Ok(Self {
            image_feat: image_feat.clone(),
            text_feat: text_feat.clone(),
            ids: ids.to_vec(),
            offset: 0,
            fgr: None,
        })
    }

    /// Adds FGR's share for a single worker: the batch's image tokens, text states and mask.
    pub fn with_local_fgr(
        mut self,
        image_tokens: &Tensor,
        text_states: &Tensor,
        text_mask: &Tensor,
    ) -> Self {
        self.fgr = Some(FgrWorld {
            image_tokens: image_tokens.clone(),
            texts: NegativeTexts::States {
                states: text_states.clone(),
                mask: text_mask.clone(),
            },
        });
        self
    }

    /// Gathers every rank's embeddings (with gradient) and image keys over `comm`, and,
    /// with `fgr = Some((image_tokens, input_ids, attention_mask))`, FGR's share. Every
    /// rank must call it with the same shapes. A group of one gives [`World::local`].
    pub fn gather(
        comm: &Arc<dyn Collective>,
        image_feat: &Tensor,
        text_feat: &Tensor,
        ids: &[i64],
        fgr: Option<(&Tensor, &Tensor, &Tensor)>,
    ) -> Result<Self> {
        let b = image_feat.dim(0)?;
        check_ids(b, ids)?;
        Ok(Self {
            image_feat: all_gather_with_grad(image_feat, comm)?,
            text_feat: all_gather_with_grad(text_feat, comm)?,
            ids: gather_ids(comm, ids, image_feat.device())?,
            offset: comm.rank() * b,
            fgr: match fgr {
                None => None,
                Some((tokens, input_ids, attention_mask)) => Some(FgrWorld {
                    image_tokens: all_gather_with_grad(tokens, comm)?,
                    texts: NegativeTexts::Ids {
                        input_ids: comm.all_gather(input_ids)?,
                        attention_mask: comm.all_gather(attention_mask)?,
                    },
                }),
            },
        })
    }

    /// The number of pairs, `n`.
    pub fn num_pairs(&self) -> Result<usize> {
        Ok(self.image_feat.dim(0)?)
    }
}

/// The image keys of every rank's pairs, in rank order (sent from `device`, which the
/// collective must accept: the GPU for NCCL).
pub fn gather_ids(comm: &Arc<dyn Collective>, ids: &[i64], device: &Device) -> Result<Vec<i64>> {
    let keys = Tensor::new(ids, device)?;
    Ok(comm
        .all_gather(&keys)?
        .to_device(&Device::Cpu)?
        .to_vec1::<i64>()?)
}

/// GCPR: InfoNCE with multi-positive targets, both directions averaged, of this rank's
/// `b` pairs (rows: `image_feat`, `text_feat` `[b, D]` normalised, keys `ids`) against the
/// `n` pairs of the [`World`] (columns). `temp` is the 0-d temperature (gradients flow into
/// it). The mean is over this rank's rows, so averaging the ranks' gradients gives the
/// gradient of the single-worker loss over the concatenated batch.
pub fn gcpr_loss(
    image_feat: &Tensor,
    text_feat: &Tensor,
    ids: &[i64],
    world: &World,
    temp: &Tensor,
) -> Result<Tensor> {
    check_ids(image_feat.dim(0)?, ids)?;
    check_ids(world.num_pairs()?, &world.ids)?;
    let targets = multi_positive_targets(ids, &world.ids, image_feat.device())?
        .to_dtype(image_feat.dtype())?;
    let temp = temp.to_dtype(image_feat.dtype())?;
    let sim_i2t = image_feat
        .matmul(&world.text_feat.t()?)?
        .broadcast_div(&temp)?;
    let sim_t2i = text_feat
        .matmul(&world.image_feat.t()?)?
        .broadcast_div(&temp)?;
    let l_i2t = ops::soft_cross_entropy(&sim_i2t, &targets)?;
    let l_t2i = ops::soft_cross_entropy(&sim_t2i, &targets)?;
    Ok(((l_i2t + l_t2i)? * 0.5)?)
}

/// The FGR sampling weights (no gradient) of this rank's `b` pairs (rows) against the
/// [`World`]'s `n` (columns): `softmax(image·textᵀ / temp)` per image row (`w_i2t`, picks
/// a text for each image) and `softmax(text·imageᵀ / temp)` per text row (`w_t2i`, picks an
/// image for each text), `[b, n]`, with 0 where the keys match (this rank's own pairs
/// included).
pub fn hard_negative_weights(
    image_feat: &Tensor,
    text_feat: &Tensor,
    ids: &[i64],
    world: &World,
    temp: &Tensor,
) -> Result<(Tensor, Tensor)> {
    check_ids(image_feat.dim(0)?, ids)?;
    check_ids(world.num_pairs()?, &world.ids)?;
    let img = image_feat.detach().to_dtype(DType::F32)?;
    let txt = text_feat.detach().to_dtype(DType::F32)?;
    let w_img = world.image_feat.detach().to_dtype(DType::F32)?;
    let w_txt = world.text_feat.detach().to_dtype(DType::F32)?;
    let temp = temp.detach().to_dtype(DType::F32)?;
    let keep = (1.0 - positive_mask(ids, &world.ids, img.device())?)?;
    let w_i2t = ops::softmax_last_dim(&img.matmul(&w_txt.t()?)?.broadcast_div(&temp)?)?;
    let w_t2i = ops::softmax_last_dim(&txt.matmul(&w_img.t()?)?.broadcast_div(&temp)?)?;
    Ok(((w_i2t * &keep)?, (w_t2i * &keep)?))
}

/// The hard negatives of FGR: indices into the batch, or, under data parallelism, into
/// the gathered batch of all ranks (rank `r`'s pairs are rows `r·b .. (r+1)·b`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HardNegatives {
    /// For text `i`, the negative image (official `image_embeds_neg`).
    pub image_for_text: Vec<usize>,
    /// For image `i`, the negative text (official `text_hidden_states_neg`).
    pub text_for_image: Vec<usize>,
}

impl HardNegatives {
    /// Checks that there is one negative of each kind for each of `b` pairs and that every
    /// index points into the `n` pairs the negatives are drawn from.
    fn check(&self, b: usize, n: usize) -> Result<()> {
        if self.image_for_text.len() != b || self.text_for_image.len() != b {
            return Err(Error::InvalidArgument(format!(
                "FGR: {} / {} negatives for a batch of {b}",
                self.image_for_text.len(),
                self.text_for_image.len()
            )));
        }
        if let Some(j) = self
            .image_for_text
            .iter()
            .chain(&self.text_for_image)
            .find(|&&j| j >= n)
        {
            return Err(Error::InvalidArgument(format!(
                "FGR: negative index {j} is out of range of the {n} pairs"
            )));
        }
        Ok(())
    }
}

fn sample_row(w: &[f32], i: usize, rng: &mut ChaCha8Rng) -> usize {
    let total: f64 = w.iter().map(|x| f64::from(x.max(0.0))).sum();
    if total > 0.0 && total.is_finite() {
        let mut u = rng.random::<f64>() * total;
        let mut last = i;
        for (j, x) in w.iter().enumerate() {
            let x = f64::from(x.max(0.0));
            if x > 0.0 {
                last = j;
                if u < x {
                    return j;
                }
                u -= x;
            }
        }
        return last;
    }
    // Every other pair is a positive (or the weights underflowed): any other index.
    let n = w.len();
    if n <= 1 {
        return i;
    }
    let k = rng.random_range(0..n - 1);
    if k >= i {
        k + 1
    } else {
        k
    }
}

/// Draws one negative per row of each weight matrix (`torch.multinomial(w[i], 1)`). The
/// rows are the pairs `offset..offset + b` of the columns ([`World::offset`]: 0 for a
/// single worker): a row whose weights are all zero (every column a positive) falls back
/// to any column but its own, `offset + i`.
pub fn sample_hard_negatives(
    weights_i2t: &Tensor,
    weights_t2i: &Tensor,
    offset: usize,
    rng: &mut ChaCha8Rng,
) -> Result<HardNegatives> {
    let w_t2i = weights_t2i.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let w_i2t = weights_i2t.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    // Same order as the official loop: images for texts first, then texts for images.
    let image_for_text = w_t2i
        .iter()
        .enumerate()
        .map(|(i, r)| sample_row(r, offset + i, rng))
        .collect();
    let text_for_image = w_i2t
        .iter()
        .enumerate()
        .map(|(i, r)| sample_row(r, offset + i, rng))
        .collect();
    Ok(HardNegatives {
        image_for_text,
        text_for_image,
    })
}

fn index(v: &[usize], device: &Device) -> Result<Tensor> {
    let v: Vec<u32> = v.iter().map(|&x| x as u32).collect();
    Ok(Tensor::new(v.as_slice(), device)?)
}

fn weighted_ce(logits: &Tensor, labels: &[u32], class_weights: [f64; 2]) -> Result<Tensor> {
    let dev = logits.device();
    let logp = ops::log_softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
    let lab = Tensor::new(labels, dev)?.unsqueeze(1)?;
    let picked = logp.gather(&lab, 1)?.squeeze(1)?;
    let w: Vec<f32> = labels
        .iter()
        .map(|&l| class_weights[l as usize] as f32)
        .collect();
    let total: f32 = w.iter().sum();
    let w = Tensor::new(w.as_slice(), dev)?;
    Ok(((picked * w)?.sum_all()? / f64::from(-total))?)
}

/// FGR: ITM cross-entropy with class weights on both cross encoders, averaged. The pairs
/// are this rank's `b` positives `(text i, image i)` (`image_tokens`, `text_states`,
/// `text_mask`), then `(text i, image image_for_text[i])`, then `(text text_for_image[i],
/// image i)`, where `negatives` index the pairs of `world` (which must hold FGR's share:
/// [`World::with_local_fgr`] or [`World::gather`]). Under data parallelism a negative
/// image's tokens come from the gathered tokens and a negative text is encoded here from
/// its ids; averaging the ranks' gradients gives the gradient of the single-worker loss
/// over the concatenated batch with the same negatives.
pub fn fgr_loss(
    model: &R2d2,
    image_tokens: &Tensor,
    text_states: &Tensor,
    text_mask: &Tensor,
    world: &World,
    negatives: &HardNegatives,
    class_weights: [f64; 2],
) -> Result<Tensor> {
    let fgr = world.fgr.as_ref().ok_or_else(|| {
        Error::InvalidArgument("FGR: the world holds no image tokens or texts".into())
    })?;
    let b = image_tokens.dim(0)?;
    negatives.check(b, fgr.image_tokens.dim(0)?)?;
    let dev = image_tokens.device();
    let img_neg = fgr
        .image_tokens
        .index_select(&index(&negatives.image_for_text, dev)?, 0)?;
    let (txt_neg, mask_neg) = match &fgr.texts {
        NegativeTexts::States { states, mask } => {
            let ti = index(&negatives.text_for_image, states.device())?;
            (states.index_select(&ti, 0)?, mask.index_select(&ti, 0)?)
        }
        NegativeTexts::Ids {
            input_ids,
            attention_mask,
        } => {
            let ti = index(&negatives.text_for_image, input_ids.device())?;
            let ids_neg = input_ids.index_select(&ti, 0)?;
            let mask_neg = attention_mask.index_select(&ti, 0)?;
            (model.encode_text(&ids_neg, &mask_neg)?.0, mask_neg)
        }
    };
    let images = Tensor::cat(&[image_tokens, &img_neg, image_tokens], 0)?;
    let texts = Tensor::cat(&[text_states, text_states, &txt_neg], 0)?;
    let masks = Tensor::cat(&[text_mask, text_mask, &mask_neg], 0)?;
    let (lt, li) = model.itm_logits(&images, &texts, &masks)?;
    let mut labels = vec![1u32; b];
    labels.extend(std::iter::repeat_n(0u32, 2 * b));
    let l_t = weighted_ce(&lt, &labels, class_weights)?;
    let l_i = weighted_ce(&li, &labels, class_weights)?;
    Ok(((l_t + l_i)? * 0.5)?)
}

/// The generator of FGR's sampler: [`StepCtx::rng`]`(`[`STREAM_FGR`]`)` for a single
/// worker; with several ranks each rank draws from its own stream (the rank is part of
/// the seed), so that ranks do not repeat each other's draws.
pub fn fgr_rng(ctx: &StepCtx, rank: usize, world_size: usize) -> ChaCha8Rng {
    if world_size <= 1 {
        ctx.rng(STREAM_FGR)
    } else {
        derive_rng(
            ctx.seed,
            &[
                streams::STEP,
                STREAM_FGR,
                ctx.step,
                ctx.micro as u64,
                rank as u64,
            ],
        )
    }
}

/// A FIFO queue of teacher features for TgD (ALBEF's `image_queue`, `text_queue`,
/// `idx_queue`), stored row-major `[size, dim]`.
#[derive(Debug, Clone)]
pub struct FeatureQueue {
    /// `[size, dim]` normalised teacher image features.
    pub image: Tensor,
    /// `[size, dim]` normalised teacher text features.
    pub text: Tensor,
    /// Image keys of the rows ([`EMPTY_ID`] for never-filled rows).
    pub ids: Vec<i64>,
    /// The next row to overwrite.
    pub ptr: usize,
}

impl FeatureQueue {
    /// A queue of `size` random normalised features (as ALBEF initialises it) with empty
    /// ids.
    pub fn new(size: usize, dim: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng =
            crate::train::rng::derive_rng(seed, &[crate::train::rng::streams::INIT, 0x5155]);
        let mut gen =
            |n: usize| -> Vec<f32> { (0..n).map(|_| standard_normal(&mut rng)).collect() };
        let image = Tensor::from_vec(gen(size * dim), (size, dim), device)?;
        let text = Tensor::from_vec(gen(size * dim), (size, dim), device)?;
        Ok(Self {
            image: ops::l2_normalize(&image)?,
            text: ops::l2_normalize(&text)?,
            ids: vec![EMPTY_ID; size],
            ptr: 0,
        })
    }

    /// A queue with given contents.
    pub fn from_parts(image: Tensor, text: Tensor, ids: Vec<i64>, ptr: usize) -> Result<Self> {
        let (n, d) = image.dims2()?;
        if text.dims() != [n, d] || ids.len() != n || (n > 0 && ptr >= n) {
            return Err(Error::InvalidArgument(format!(
                "queue parts disagree: image {:?}, text {:?}, {} ids, ptr {ptr}",
                image.dims(),
                text.dims(),
                ids.len()
            )));
        }
        Ok(Self {
            image,
            text,
            ids,
            ptr,
        })
    }

    /// Rows in the queue.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Writes the rows at the pointer, wrapping around (ALBEF `_dequeue_and_enqueue`).
    pub fn enqueue(&mut self, image: &Tensor, text: &Tensor, ids: &[i64]) -> Result<()> {
        let n = self.len();
        if n == 0 {
            return Ok(());
        }
        let b = ids.len();
        let image = image.detach().to_dtype(self.image.dtype())?;
        let text = text.detach().to_dtype(self.text.dtype())?;
        // Only the last `n` rows matter when the batch is larger than the queue.
        let skip = b.saturating_sub(n);
        let mut rows: Vec<usize> = (0..n).collect();
        for (k, i) in (skip..b).enumerate() {
            let r = (self.ptr + k) % n;
            rows[r] = n + i;
            self.ids[r] = ids[i];
        }
        let idx = index(&rows, self.image.device())?;
        self.image = Tensor::cat(&[&self.image, &image], 0)?.index_select(&idx, 0)?;
        self.text = Tensor::cat(&[&self.text, &text], 0)?.index_select(&idx, 0)?;
        self.ptr = (self.ptr + (b - skip)) % n;
        Ok(())
    }

    fn save(&self, prefix: &str, out: &mut BTreeMap<String, Tensor>) -> Result<()> {
        let dev = self.image.device();
        out.insert(format!("{prefix}image"), self.image.copy()?);
        out.insert(format!("{prefix}text"), self.text.copy()?);
        out.insert(
            format!("{prefix}ids"),
            Tensor::new(self.ids.as_slice(), dev)?,
        );
        out.insert(
            format!("{prefix}ptr"),
            Tensor::new(&[self.ptr as i64], dev)?,
        );
        Ok(())
    }

    fn load(prefix: &str, s: &BTreeMap<String, Tensor>, device: &Device) -> Result<Option<Self>> {
        let get = |k: &str| s.get(&format!("{prefix}{k}"));
        let (Some(image), Some(text), Some(ids), Some(ptr)) =
            (get("image"), get("text"), get("ids"), get("ptr"))
        else {
            return Ok(None);
        };
        let ids = ids.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        let ptr = ptr.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        let ptr = ptr.first().copied().unwrap_or(0).max(0) as usize;
        Ok(Some(Self::from_parts(
            image.to_dtype(DType::F32)?.to_device(device)?,
            text.to_dtype(DType::F32)?.to_device(device)?,
            ids,
            ptr,
        )?))
    }
}

/// The teacher features of every rank's pairs (no gradient) and their keys, for
/// [`tgd_loss`]; for a single worker, the batch's own.
pub struct TeacherWorld<'a> {
    pub image: &'a Tensor,
    pub text: &'a Tensor,
    pub ids: &'a [i64],
}

/// TgD: distillation from an EMA teacher over in-batch and queued teacher features.
///
/// `s_*`: this rank's student features `[b, D]`, normalised (with gradient); `t_*`: the
/// teacher's of the same pairs (no gradient); `ids`: their image keys; `world`: the teacher
/// features of every rank's pairs (the in-batch keys); `queue`: earlier teacher features;
/// `temp`: the temperature (gradient flows through the student side only); `alpha`: weight
/// of the teacher's soft targets. The mean is over this rank's rows.
#[allow(clippy::too_many_arguments)]
pub fn tgd_loss(
    s_img: &Tensor,
    s_txt: &Tensor,
    t_img: &Tensor,
    t_txt: &Tensor,
    ids: &[i64],
    world: TeacherWorld<'_>,
    queue: Option<&FeatureQueue>,
    temp: &Tensor,
    alpha: f64,
) -> Result<Tensor> {
    check_ids(s_img.dim(0)?, ids)?;
    check_ids(world.image.dim(0)?, world.ids)?;
    let dtype = s_img.dtype();
    let t_img = t_img.detach().to_dtype(dtype)?;
    let t_txt = t_txt.detach().to_dtype(dtype)?;
    let w_img = world.image.detach().to_dtype(dtype)?;
    let w_txt = world.text.detach().to_dtype(dtype)?;
    let mut all_ids = world.ids.to_vec();
    let (img_keys, txt_keys) = match queue {
        Some(q) if !q.is_empty() => {
            all_ids.extend_from_slice(&q.ids);
            (
                Tensor::cat(&[&w_img, &q.image.to_dtype(dtype)?], 0)?,
                Tensor::cat(&[&w_txt, &q.text.to_dtype(dtype)?], 0)?,
            )
        }
        _ => (w_img, w_txt),
    };
    let hard = multi_positive_targets(ids, &all_ids, s_img.device())?.to_dtype(dtype)?;
    let temp_d = temp.detach().to_dtype(dtype)?;
    let soft = |q: &Tensor, k: &Tensor| -> Result<Tensor> {
        let p = ops::softmax_last_dim(&q.matmul(&k.t()?)?.broadcast_div(&temp_d)?)?;
        Ok(((p * alpha)? + (&hard * (1.0 - alpha))?)?)
    };
    let tg_i2t = soft(&t_img, &txt_keys)?;
    let tg_t2i = soft(&t_txt, &img_keys)?;
    let temp = temp.to_dtype(dtype)?;
    let sim_i2t = s_img.matmul(&txt_keys.t()?)?.broadcast_div(&temp)?;
    let sim_t2i = s_txt.matmul(&img_keys.t()?)?.broadcast_div(&temp)?;
    let l_i2t = ops::soft_cross_entropy(&sim_i2t, &tg_i2t)?;
    let l_t2i = ops::soft_cross_entropy(&sim_t2i, &tg_t2i)?;
    Ok(((l_i2t + l_t2i)? * 0.5)?)
}

/// The feature loss between student and teacher features `[B, D]` (teacher detached).
pub fn feature_loss(student: &Tensor, teacher: &Tensor, kind: FeatureLoss) -> Result<Tensor> {
    let t = teacher.detach().to_dtype(student.dtype())?;
    match kind {
        FeatureLoss::Cosine => {
            let dot = (student * &t)?.sum(D::Minus1)?;
            let ns = student.sqr()?.sum(D::Minus1)?.sqrt()?;
            let nt = t.sqr()?.sum(D::Minus1)?.sqrt()?;
            // torch cosine_similarity: dot / max(|a|·|b|, 1e-8).
            let den = (ns * nt)?.clamp(1e-8, f64::INFINITY)?;
            Ok((1.0 - (dot / den)?.mean_all()?)?)
        }
        FeatureLoss::Mse => Ok((student - &t)?.sqr()?.mean_all()?),
    }
}

/// FgD: ½[feature loss of the image embeddings + that of the text embeddings].
pub fn fgd_loss(
    s_img: &Tensor,
    s_txt: &Tensor,
    t_img: &Tensor,
    t_txt: &Tensor,
    kind: FeatureLoss,
) -> Result<Tensor> {
    let li = feature_loss(s_img, t_img, kind)?;
    let lt = feature_loss(s_txt, t_txt, kind)?;
    Ok(((li + lt)? * 0.5)?)
}

/// Replaces each text token by `mask_id` with probability `ratio`; `[CLS]` (position 0),
/// the last real token (`[SEP]`) and padding are never masked. Keeps the ids' dtype.
pub fn mask_text_tokens(
    input_ids: &Tensor,
    attention_mask: &Tensor,
    ratio: f64,
    mask_id: u32,
    rng: &mut ChaCha8Rng,
) -> Result<Tensor> {
    let mut ids = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let mask = attention_mask.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    for (row, m) in ids.iter_mut().zip(&mask) {
        let len = m.iter().filter(|&&x| x != 0).count();
        for tok in row.iter_mut().take(len.saturating_sub(1)).skip(1) {
            if rng.random::<f64>() < ratio {
                *tok = i64::from(mask_id);
            }
        }
    }
    let (b, t) = input_ids.dims2()?;
    let flat: Vec<i64> = ids.into_iter().flatten().collect();
    Ok(Tensor::from_vec(flat, (b, t), input_ids.device())?.to_dtype(input_ids.dtype())?)
}

/// For each of `n` images, the ViT tokens to keep: CLS (0) and a random
/// `round((1 − drop_ratio)·patches)` of the patch tokens (at least one), ascending.
pub fn sample_kept_tokens(
    n: usize,
    patches: usize,
    drop_ratio: f64,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<usize>> {
    let keep = (((1.0 - drop_ratio) * patches as f64).round() as usize).clamp(1, patches.max(1));
    (0..n)
        .map(|_| {
            let mut all: Vec<usize> = (1..=patches).collect();
            for i in 0..keep.min(all.len()) {
                let j = rng.random_range(i..all.len());
                all.swap(i, j);
            }
            let mut k: Vec<usize> = all.into_iter().take(keep).collect();
            k.sort_unstable();
            let mut out = vec![0];
            out.extend(k);
            out
        })
        .collect()
}

/// An EMA teacher: a copy of the student built from plain (non-tracking) tensors that
/// share storage with the vars the EMA updates.
struct Teacher {
    model: R2d2,
    vars: BTreeMap<String, Var>,
    ema: EmaPairs,
}

impl Teacher {
    fn new(student: &R2d2, student_vars: &VarMap) -> Result<Self> {
        let data = lock_vars(student_vars)?;
        let mut vars = BTreeMap::new();
        let mut plain = HashMap::new();
        let mut pairs = Vec::new();
        for (name, v) in data.iter() {
            let t = Var::from_tensor(&v.as_detached_tensor().copy()?)?;
            plain.insert(name.clone(), t.as_detached_tensor());
            pairs.push((name.clone(), t.clone(), v.clone()));
            vars.insert(name.clone(), t);
        }
        drop(data);
        let first = plain
            .values()
            .next()
            .ok_or_else(|| Error::InvalidArgument("the student's var map is empty".into()))?;
        let (dtype, device) = (first.dtype(), first.device().clone());
        let vb = VarBuilder::from_tensors(plain, dtype, &device);
        let model = R2d2::new(student.config(), vb)?;
        Ok(Self {
            model,
            vars,
            ema: EmaPairs::new(pairs)?,
        })
    }
}

/// Inputs of one R2D2 training micro-batch.
#[derive(Debug, Clone, Copy)]
pub struct R2d2Inputs<'a> {
    /// `[B, 3, S, S]` normalised pixels.
    pub pixel_values: &'a Tensor,
    /// `[B, T]` token ids.
    pub input_ids: &'a Tensor,
    /// `[B, T]` 0/1 padding mask.
    pub attention_mask: &'a Tensor,
    /// Image keys ([`image_keys`]): equal keys are positives.
    pub image_ids: &'a [i64],
}

/// The weighted total and the value of each objective that ran.
#[derive(Debug, Clone)]
pub struct R2d2Losses {
    /// Σ weight · loss (with gradient).
    pub total: Tensor,
    pub gcpr: Option<f64>,
    pub fgr: Option<f64>,
    pub tgd: Option<f64>,
    pub fgd: Option<f64>,
    /// FGR's sampled negatives (indices into the gathered batch of all ranks under data
    /// parallelism), when FGR ran.
    pub fgr_negatives: Option<HardNegatives>,
}

struct MutState {
    teacher: Option<Teacher>,
    queue: Option<FeatureQueue>,
}

/// The R2D2 / PRD2 objectives over a student model, as an [`Objective`]: call
/// [`Objective::loss`] from the [`crate::train::Fit`] loss closure, and pass
/// [`Objective::extra_state`] to [`crate::train::Fit::extra_state`] so that the teacher and
/// queue are checkpointed.
pub struct R2d2Objective {
    cfg: R2d2LossConfig,
    student: R2d2,
    temp: Option<Var>,
    comm: Option<Arc<dyn Collective>>,
    state: RefCell<MutState>,
}

impl std::fmt::Debug for R2d2Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("R2d2Objective")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl R2d2Objective {
    /// Sets up the objectives for `student`, built over the trainable `vars` (e.g. from
    /// `Loader::trainable` or a [`VarMap`]): the EMA teacher (a copy of the student) and the
    /// queue when TgD or FgD is on.
    pub fn new(cfg: R2d2LossConfig, student: &R2d2, vars: &VarMap) -> Result<Self> {
        cfg.validate()?;
        if cfg.fgr_weight > 0.0 && !student.config().has_joint_layers() {
            return Err(Error::Config(
                "FGR needs the cross encoders: PRD2 trains with GCPR and TgD (fgr_weight 0)".into(),
            ));
        }
        let temp = lock_vars(vars)?.get("temp").cloned();
        let teacher = if cfg.needs_teacher() {
            Some(Teacher::new(student, vars)?)
        } else {
            None
        };
        let queue = if cfg.tgd_weight > 0.0 && cfg.queue_size > 0 {
            Some(FeatureQueue::new(
                cfg.queue_size,
                student.config().embed_dim,
                cfg.queue_seed,
                student.temp.device(),
            )?)
        } else {
            None
        };
        Ok(Self {
            cfg,
            student: student.clone(),
            temp,
            comm: None,
            state: RefCell::new(MutState { teacher, queue }),
        })
    }

    pub fn config(&self) -> &R2d2LossConfig {
        &self.cfg
    }

    /// The trained model.
    pub fn student(&self) -> &R2d2 {
        &self.student
    }

    /// Computes the losses against the batches of every rank of `comm` (a group of one
    /// changes nothing): GCPR's columns, FGR's negatives and TgD's in-batch keys.
    pub fn with_collective(mut self, comm: Arc<dyn Collective>) -> Self {
        self.comm = Some(comm);
        self
    }

    /// Replaces the TgD queue (tests; a resumed run restores it through
    /// [`Objective::extra_state`]).
    pub fn set_queue(&self, queue: Option<FeatureQueue>) {
        self.state.borrow_mut().queue = queue;
    }

    /// A copy of the TgD queue.
    pub fn queue(&self) -> Option<FeatureQueue> {
        self.state.borrow().queue.clone()
    }

    /// The teacher's normalised image and text embeddings of full inputs.
    pub fn teacher_features(
        &self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let st = self.state.borrow();
        let Some(t) = st.teacher.as_ref() else {
            return Ok(None);
        };
        let (_, img) = t.model.encode_image(pixel_values)?;
        let (_, txt) = t.model.encode_text(input_ids, attention_mask)?;
        Ok(Some((img.detach(), txt.detach())))
    }

    /// Clamps `temp` into the configured range (no gradient), as the official code does
    /// before every forward pass.
    pub fn clamp_temp(&self) -> Result<()> {
        if let Some(t) = &self.temp {
            let c = t
                .as_detached_tensor()
                .clamp(self.cfg.temp_min, self.cfg.temp_max)?;
            t.set(&c)?;
        }
        Ok(())
    }

    /// Whether FgD's student drops image patches.
    fn drops_patches(&self) -> bool {
        self.cfg.fgd_weight > 0.0 && self.cfg.patch_drop_ratio > 0.0
    }

    /// The student's image tokens and embeddings over the tokens `keep` (all of them for
    /// `None`); with `freeze_vision`, the ViT runs without gradient.
    fn student_image(
        &self,
        pixels: &Tensor,
        keep: Option<&[Vec<usize>]>,
        freeze: bool,
    ) -> Result<(Tensor, Tensor)> {
        let model = &self.student;
        let tokens = match keep {
            Some(keep) => model.visual_encoder.forward_kept(pixels, keep)?,
            None => model.visual_encoder.forward(pixels)?,
        };
        let tokens = if freeze { tokens.detach() } else { tokens };
        let embeds = ops::l2_normalize(&model.vision_proj.forward(&tokens.i((.., 0))?)?)?;
        Ok((tokens, embeds))
    }

    /// The pairs the loss terms compare against: every rank's, gathered once, or this
    /// batch's.
    fn world(
        &self,
        x: &R2d2Inputs,
        (tokens, img): (&Tensor, &Tensor),
        (states, txt): (&Tensor, &Tensor),
    ) -> Result<World> {
        let fgr = self.cfg.fgr_weight > 0.0;
        match self.comm.as_ref().filter(|c| c.world_size() > 1) {
            None => {
                let world = World::local(img, txt, x.image_ids)?;
                Ok(if fgr {
                    world.with_local_fgr(tokens, states, x.attention_mask)
                } else {
                    world
                })
            }
            Some(comm) => World::gather(
                comm,
                img,
                txt,
                x.image_ids,
                fgr.then_some((tokens, x.input_ids, x.attention_mask)),
            ),
        }
    }

    /// The FgD loss with the masks given (for tests and analysis): the student sees
    /// `masked_ids` and the image tokens `keep`, the teacher the full inputs.
    pub fn fgd_with_masks(
        &self,
        x: &R2d2Inputs,
        masked_ids: &Tensor,
        keep: Option<&[Vec<usize>]>,
    ) -> Result<Tensor> {
        let (t_img, t_txt) = self
            .teacher_features(x.pixel_values, x.input_ids, x.attention_mask)?
            .ok_or_else(|| Error::Config("FgD needs the teacher (fgd_weight > 0)".into()))?;
        if !self.drops_patches() {
            return Err(Error::Config(
                "patch dropping needs patch_drop_ratio > 0".into(),
            ));
        }
        let (_, s_img) = self.student_image(x.pixel_values, keep, false)?;
        let (_, s_txt) = self.student.encode_text(masked_ids, x.attention_mask)?;
        fgd_loss(&s_img, &s_txt, &t_img, &t_txt, self.cfg.feature_loss)
    }
}

impl LossTerms for R2d2Losses {
    fn total(&self) -> &Tensor {
        &self.total
    }

    fn terms(&self) -> Result<Vec<(&'static str, f64)>> {
        Ok([
            ("gcpr", self.gcpr),
            ("fgr", self.fgr),
            ("tgd", self.tgd),
            ("fgd", self.fgd),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect())
    }
}

impl Objective for R2d2Objective {
    type Inputs<'a> = R2d2Inputs<'a>;
    type Losses = R2d2Losses;

    /// The weighted loss of one micro-batch. On the first micro-batch of a step this
    /// clamps `temp` and moves the EMA teacher toward the student (before the teacher's
    /// features are computed, as ALBEF). Under data parallelism every rank's features are
    /// gathered once, at the top ([`World::gather`]). FGR negatives, text masks and dropped
    /// patches come from `ctx.rng` ([`STREAM_FGR`], [`STREAM_TEXT_MASK`],
    /// [`STREAM_PATCH_DROP`]).
    fn loss(&self, x: &R2d2Inputs<'_>, ctx: &StepCtx) -> Result<R2d2Losses> {
        let c = &self.cfg;
        let model = &self.student;
        let b = x.pixel_values.dim(0)?;
        check_ids(b, x.image_ids)?;
        if ctx.micro == 0 {
            self.clamp_temp()?;
            if let Some(t) = self.state.borrow_mut().teacher.as_mut() {
                t.ema.update(c.ema_momentum)?;
            }
        }
        let temp = &model.temp;
        let (tokens, img) = self.student_image(x.pixel_values, None, c.freeze_vision)?;
        let (states, txt) = model.encode_text(x.input_ids, x.attention_mask)?;
        let comm = self.comm.as_ref().filter(|c| c.world_size() > 1);
        // Gathered once: the students' pairs, FGR's share, and the teacher's features.
        let world = self.world(x, (&tokens, &img), (&states, &txt))?;
        let teacher = match self.teacher_features(x.pixel_values, x.input_ids, x.attention_mask)? {
            None => None,
            Some((t_img, t_txt)) => {
                let (w_img, w_txt) = match comm {
                    Some(comm) if c.tgd_weight > 0.0 => {
                        (comm.all_gather(&t_img)?, comm.all_gather(&t_txt)?)
                    }
                    _ => (t_img.clone(), t_txt.clone()),
                };
                Some((t_img, t_txt, w_img, w_txt))
            }
        };

        let mut total: Option<Tensor> = None;
        let mut add = |l: &Tensor, w: f64| -> Result<f64> {
            let lw = (l.to_dtype(DType::F32)? * w)?;
            total = Some(match total.take() {
                None => lw,
                Some(t) => (t + lw)?,
            });
            scalar(l)
        };
        let (mut gcpr, mut fgr, mut tgd, mut fgd, mut fgr_negatives) =
            (None, None, None, None, None);
        if c.gcpr_weight > 0.0 {
            let l = gcpr_loss(&img, &txt, x.image_ids, &world, temp)?;
            gcpr = Some(add(&l, c.gcpr_weight)?);
        }
        if c.fgr_weight > 0.0 {
            let (w_i2t, w_t2i) = hard_negative_weights(&img, &txt, x.image_ids, &world, temp)?;
            let (rank, size) = comm.map_or((0, 1), |c| (c.rank(), c.world_size()));
            let mut rng = fgr_rng(ctx, rank, size);
            let negs = sample_hard_negatives(&w_i2t, &w_t2i, world.offset, &mut rng)?;
            let l = fgr_loss(
                model,
                &tokens,
                &states,
                x.attention_mask,
                &world,
                &negs,
                c.fgr_class_weights,
            )?;
            fgr = Some(add(&l, c.fgr_weight)?);
            fgr_negatives = Some(negs);
        }
        if let Some((t_img, t_txt, w_img, w_txt)) = &teacher {
            if c.tgd_weight > 0.0 {
                // The in-batch keys and the queue's new entries are every rank's teacher
                // features, so all ranks hold the same queue.
                let keys = TeacherWorld {
                    image: w_img,
                    text: w_txt,
                    ids: &world.ids,
                };
                let l = {
                    let st = self.state.borrow();
                    tgd_loss(
                        &img,
                        &txt,
                        t_img,
                        t_txt,
                        x.image_ids,
                        keys,
                        st.queue.as_ref(),
                        temp,
                        c.distill_alpha,
                    )?
                };
                tgd = Some(add(&l, c.tgd_weight)?);
                if let Some(q) = self.state.borrow_mut().queue.as_mut() {
                    q.enqueue(w_img, w_txt, &world.ids)?;
                }
            }
            if c.fgd_weight > 0.0 {
                let masked = mask_text_tokens(
                    x.input_ids,
                    x.attention_mask,
                    c.text_mask_ratio,
                    c.mask_token_id,
                    &mut ctx.rng(STREAM_TEXT_MASK),
                )?;
                let keep = if self.drops_patches() {
                    let patches = model.config().vision_config.num_positions() - 1;
                    Some(sample_kept_tokens(
                        b,
                        patches,
                        c.patch_drop_ratio,
                        &mut ctx.rng(STREAM_PATCH_DROP),
                    ))
                } else {
                    None
                };
                let (_, s_img) =
                    self.student_image(x.pixel_values, keep.as_deref(), c.freeze_vision)?;
                let (_, s_txt) = model.encode_text(&masked, x.attention_mask)?;
                let l = fgd_loss(&s_img, &s_txt, t_img, t_txt, c.feature_loss)?;
                fgd = Some(add(&l, c.fgd_weight)?);
            }
        }
        let total = total.ok_or_else(|| Error::Config("no objective is enabled".into()))?;
        Ok(R2d2Losses {
            total,
            gcpr,
            fgr,
            tgd,
            fgd,
            fgr_negatives,
        })
    }

    fn extra_state(&self) -> Option<Box<dyn ExtraState + '_>> {
        Some(Box::new(R2d2ExtraState(self)))
    }

    /// Everything trains, except the ViT with `freeze_vision` (the official fine-tuning).
    fn param_groups(&self) -> ParamGroupConfig {
        let groups = ParamGroupConfig::default();
        if self.cfg.freeze_vision {
            groups.with_frozen(["visual_encoder.*"])
        } else {
            groups
        }
    }
}

/// [`R2d2Objective`]'s teacher weights (`teacher.{name}`) and TgD queue (`tgd_queue.*`)
/// as a [`crate::train::ExtraState`].
#[derive(Debug)]
pub struct R2d2ExtraState<'a>(&'a R2d2Objective);

const QUEUE_PREFIX: &str = "tgd_queue.";
const TEACHER_PREFIX: &str = "teacher.";

impl ExtraState for R2d2ExtraState<'_> {
    fn save_state(&self) -> Result<BTreeMap<String, Tensor>> {
        let st = self.0.state.borrow();
        let mut out = BTreeMap::new();
        if let Some(t) = &st.teacher {
            for (name, v) in &t.vars {
                out.insert(
                    format!("{TEACHER_PREFIX}{name}"),
                    v.as_detached_tensor().copy()?,
                );
            }
            out.extend(t.ema.state_tensors()?);
        }
        if let Some(q) = &st.queue {
            q.save(QUEUE_PREFIX, &mut out)?;
        }
        Ok(out)
    }

    fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        let mut st = self.0.state.borrow_mut();
        if let Some(t) = st.teacher.as_mut() {
            for (name, v) in &t.vars {
                if let Some(x) = tensors.get(&format!("{TEACHER_PREFIX}{name}")) {
                    if x.dims() != v.dims() {
                        return Err(Error::StateMismatch(format!(
                            "teacher tensor `{name}` has shape {:?} in the checkpoint, {:?} here",
                            x.dims(),
                            v.dims()
                        )));
                    }
                    v.set(&x.to_dtype(v.dtype())?.to_device(v.device())?)?;
                }
            }
            t.ema.load_state_tensors(tensors)?;
        }
        if let Some(q) = st.queue.as_mut() {
            if let Some(loaded) = FeatureQueue::load(QUEUE_PREFIX, tensors, q.image.device())? {
                *q = loaded;
            }
        }
        Ok(())
    }
}

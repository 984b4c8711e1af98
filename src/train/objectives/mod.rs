//! Training objectives, apart from the engine that runs them.
//!
//! Each family's objective holds its model (or models: momentum encoders, EMA teachers),
//! its loss terms and whatever state those terms carry between steps, and implements the
//! one small [`Objective`] trait:
//!
//! * [`Objective::loss`]: the loss of one micro-batch at the step that [`StepCtx`] names
//!   (its randomness comes from [`StepCtx::rng`], so that a resumed run repeats itself);
//! * [`Objective::extra_state`]: the tensors beyond the trained weights that a training
//!   checkpoint must hold (MoCo queues and key encoders, EMA teachers and their queues);
//! * [`Objective::param_groups`]: what the recipe trains and freezes.
//!
//! Under data parallelism every objective gathers the features it compares against once,
//! at the top of its loss ([`crate::train::all_gather_with_grad`]); a group of one is the
//! degenerate case in which the "world" is the local batch, so each loss term is written
//! once.
//!
//! | objective | family | terms |
//! | --- | --- | --- |
//! | [`siglip::SiglipObjective`] | SigLIP / SigLIP 2 | sigmoid loss, optional distillation |
//! | [`r2d2::R2d2Objective`] | R2D2 / PRD2 | GCPR, FGR, TgD, FgD |
//! | [`brivl::BrivlMoco`] | BriVL | cross-modal MoCo with two queues |
//! | [`cnclip::CnClipObjective`] | Chinese-CLIP | symmetric InfoNCE, clamped temperature, image-tower locking |
//!
//! A new objective is a file here with a type that implements [`Objective`] (and a
//! [`LossTerms`] result), plus a line in the table above.

pub mod brivl;
pub mod cnclip;
pub mod r2d2;
pub mod siglip;

use candle_core::Tensor;

use crate::error::Result;
use crate::train::fit::ExtraState;
use crate::train::optim::ParamGroupConfig;
use crate::train::trainer::StepCtx;

/// The result of one loss evaluation: the total to minimise and its named terms.
pub trait LossTerms {
    /// What to minimise (a scalar, with gradient).
    fn total(&self) -> &Tensor;
    /// The value of each term that ran, by name (for logs and metrics).
    fn terms(&self) -> Result<Vec<(&'static str, f64)>>;
}

/// A training objective: the loss of a micro-batch given the step context, the extra state
/// to checkpoint, and the parameter groups of its recipe.
pub trait Objective {
    /// One micro-batch's inputs (borrowed tensors).
    type Inputs<'a>;
    /// What [`Objective::loss`] returns.
    type Losses: LossTerms;

    /// The loss of one micro-batch. Objectives whose state moves once per optimiser step
    /// (momentum encoders, EMA teachers) move it on the step's first micro-batch
    /// (`ctx.micro == 0`).
    fn loss(&self, inputs: &Self::Inputs<'_>, ctx: &StepCtx) -> Result<Self::Losses>;

    /// The state beyond the trained weights that a training checkpoint must hold, for
    /// [`crate::train::Fit::extra_state`]; `None` when there is none.
    fn extra_state(&self) -> Option<Box<dyn ExtraState + '_>> {
        None
    }

    /// What this objective's recipe trains and freezes.
    fn param_groups(&self) -> ParamGroupConfig {
        ParamGroupConfig::default()
    }
}

impl LossTerms for Tensor {
    fn total(&self) -> &Tensor {
        self
    }

    fn terms(&self) -> Result<Vec<(&'static str, f64)>> {
        Ok(vec![("loss", scalar(self)?)])
    }
}

/// The value of a 0-d tensor as `f64`.
pub(crate) fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

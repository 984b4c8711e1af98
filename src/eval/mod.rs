//! Evaluation: image–text retrieval with Recall@K, two-stage re-ranking with a cross
//! encoder (R2D2), and plain ITM scoring.
//!
//! * [`itm_scores`] scores one image against many texts with a model's cross encoder.
//! * [`retrieval`] embeds a dataset in batches, ranks by cosine similarity, optionally
//!   re-ranks the top k of every query by ITM score + cosine (as the R2D2 evaluation does),
//!   and reports Recall@1/5/10 in both directions.

pub mod retrieval;

pub use retrieval::{
    evaluate, recall_at_k, rerank, CosineOnly, Encoded, Recall, RetrievalDataset, RetrievalModel,
    RetrievalOptions, RetrievalReport,
};

use crate::error::{Error, Result};
use crate::models::DualEncoder;
use crate::preprocess::ImageInput;

/// Cross-encoder image–text matching scores in `[0, 1]` of one image against each text (for
/// R2D2, the mean of the two ITM heads' match probabilities). Fails for families without a
/// cross encoder and for an empty text list.
pub fn itm_scores(model: &dyn DualEncoder, image: &ImageInput, texts: &[&str]) -> Result<Vec<f32>> {
    if texts.is_empty() {
        return Err(Error::Text("empty list of texts".into()));
    }
    let scores = model
        .itm_scores(std::slice::from_ref(image), texts)?
        .ok_or_else(|| {
            Error::Config(format!(
                "the {} family has no cross encoder to compute ITM scores",
                model.family()
            ))
        })?;
    Ok(scores
        .to_dtype(candle_core::DType::F32)?
        .squeeze(0)?
        .to_vec1::<f32>()?)
}

/// A progress bar on standard error (with the `progress` feature; nothing without it).
pub(crate) struct Progress {
    #[cfg(feature = "progress")]
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub(crate) fn new(len: usize, message: &str, enabled: bool) -> Self {
        #[cfg(feature = "progress")]
        {
            let bar = enabled.then(|| {
                let bar = indicatif::ProgressBar::new(len as u64);
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{msg:>14} [{elapsed_precise}] {wide_bar} {pos}/{len} ({eta})",
                ) {
                    bar.set_style(style);
                }
                bar.set_message(message.to_string());
                bar
            });
            Self { bar }
        }
        #[cfg(not(feature = "progress"))]
        {
            let _ = (len, message, enabled);
            Self {}
        }
    }

    pub(crate) fn inc(&self, n: usize) {
        #[cfg(feature = "progress")]
        if let Some(b) = &self.bar {
            b.inc(n as u64);
        }
        #[cfg(not(feature = "progress"))]
        let _ = n;
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        #[cfg(feature = "progress")]
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

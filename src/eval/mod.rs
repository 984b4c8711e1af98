//! Evaluation for every family, on the formats the Chinese benchmarks ship in.
//!
//! * [`data`] reads the sets: Chinese-CLIP's `{split}_imgs.tsv` + `{split}_texts.jsonl`
//!   (Flickr30K-CN, COCO-CN, MUGE), the crate's JSON Lines manifest, ELEVATER class
//!   folders with `label_cn.txt`, `path,label` CSVs, and labelled pairs for matching.
//! * [`encode`] embeds a set in batches, decoding images one batch ahead on another thread.
//! * [`topk`] ranks by blocked similarity products (never a full score matrix).
//! * [`retrieval`] reports Recall@1/5/10 both ways and mean recall, with R2D2's two-stage
//!   re-ranking (cosine top k, then ITM + cosine) where the model has a cross encoder.
//! * [`zero_shot`] runs zero-shot classification with prompt ensembling (top-1, top-5,
//!   mean per-class recall) and the ITM matching tasks (AUC, accuracy).
//! * [`cache`] keeps embeddings keyed by model and dataset, so that a second evaluation
//!   skips encoding; [`report`] writes JSON records and tables.
//! * [`itm_scores`] scores one image against many texts with a model's cross encoder.

pub mod cache;
pub mod data;
pub mod encode;
pub mod report;
pub mod retrieval;
pub mod topk;
pub mod zero_shot;

pub use cache::EmbeddingCache;
pub use data::{ClassificationDataset, ImageRef, MatchingDataset, RetrievalDataset};
pub use encode::{EncodeOptions, Encoded};
pub use report::EvalRecord;
pub use retrieval::{
    evaluate, recall_at_k, recall_from_hits, rerank, Recall, RetrievalOptions, RetrievalReport,
};
pub use zero_shot::{
    evaluate_matching, evaluate_zero_shot, MatchingReport, ZeroShotOptions, ZeroShotReport,
    DEFAULT_TEMPLATES_ZH,
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

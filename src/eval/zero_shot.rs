//! Zero-shot classification benchmarks (ELEVATER-style) and R2D2's matching tasks.
//!
//! # Zero-shot
//!
//! 1. **Prompt ensembling**, as CLIP and Chinese-CLIP do: every class name is filled into
//!    every template (`{}` stands for the name); each class's prompt embeddings (already
//!    L2-normalised) are averaged, and the mean is normalised again. Templates come from a
//!    file (one a line) or [`DEFAULT_TEMPLATES_ZH`].
//! 2. Each image's logits against the class embeddings, through the family's own
//!    [`DualEncoder::logits`] (SigLIP's scale and bias, a contrastive model's temperature).
//!    Sigmoid and softmax scoring are both monotone in the logit, so the **argmax ranking
//!    is the same for both**; only the ranking is used here.
//! 3. Top-1 and top-5 accuracy (in percent; top-5 is top-`C` with fewer than five
//!    classes) and the mean per-class recall (the mean over classes of the share of its
//!    images ranked first correctly, ELEVATER's metric for some sets).
//!
//! Ties rank the lower class index first; NaN logits rank last.
//!
//! # Matching (ICM / IQM)
//!
//! Labelled (image, text, 0/1) pairs scored by the cross encoder's ITM probability:
//! AUC (the Mann–Whitney statistic, ties counted one half) and the accuracy of the
//! decision `ITM ≥ 0.5`.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::data::{ClassificationDataset, MatchingDataset};
use super::encode::{encode_images, encode_text_batch, EncodeOptions, EncodedImages};
use super::topk::{sort_hits, Hit};
use super::Progress;
use crate::error::{Error, Result};
use crate::models::{fill_template, DualEncoder};

/// The built-in Chinese prompt templates (written for this crate): plain photos, views,
/// sizes, renderings and qualities, as the ImageNet ensembles vary them.
pub const DEFAULT_TEMPLATES_ZH: &[&str] = &[
    "{}",
    "一张{}的照片。",
    "一张{}的图片。",
    "这是一张{}的照片。",
    "照片里是{}。",
    "一张清晰的{}的照片。",
    "一张模糊的{}的照片。",
    "一张{}的特写照片。",
    "一张小{}的照片。",
    "一张大{}的照片。",
    "一张{}的黑白照片。",
    "一张{}的裁剪照片。",
    "一张光线很暗的{}的照片。",
    "一张明亮的{}的照片。",
    "一幅{}的画。",
    "一幅{}的素描。",
    "一张{}的卡通图。",
    "一个{}的渲染图。",
    "{}的图像。",
    "一张好看的{}的照片。",
];

/// Reads templates, one a line (blank lines skipped). A template without `{}` gets the
/// class name appended.
pub fn read_templates(path: &Path) -> Result<Vec<String>> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let t: Vec<String> = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if t.is_empty() {
        return Err(Error::Data {
            origin: path.display().to_string(),
            line: None,
            reason: "no templates".into(),
        });
    }
    Ok(t)
}

/// The ensembled class embeddings `[classes, dim]` (f32, CPU, normalised): see the module
/// docs.
pub fn class_embeddings(
    model: &dyn DualEncoder,
    classes: &[String],
    templates: &[String],
    text_batch_size: usize,
) -> Result<Tensor> {
    if classes.is_empty() {
        return Err(Error::Text("no class names".into()));
    }
    if templates.is_empty() {
        return Err(Error::Text("no templates".into()));
    }
    let prompts: Vec<String> = classes
        .iter()
        .flat_map(|c| templates.iter().map(move |t| fill_template(t, c)))
        .collect();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let mut parts = Vec::new();
    for chunk in refs.chunks(text_batch_size.max(1)) {
        parts.push(encode_text_batch(model, chunk, false)?.embeds);
    }
    let e = Tensor::cat(&parts, 0)?; // [C*T, d]
    let d = e.dim(1)?;
    let mean = e.reshape((classes.len(), templates.len(), d))?.mean(1)?;
    let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(mean.broadcast_div(&norm)?)
}

/// Settings of [`evaluate_zero_shot`] and [`evaluate_matching`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZeroShotOptions {
    pub image_batch_size: usize,
    pub text_batch_size: usize,
    /// Leave out images that cannot be read (named in the report) instead of failing.
    pub skip_bad: bool,
    pub progress: bool,
}

impl Default for ZeroShotOptions {
    fn default() -> Self {
        Self {
            image_batch_size: 32,
            text_batch_size: 256,
            skip_bad: false,
            progress: false,
        }
    }
}

/// The result of [`evaluate_zero_shot`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZeroShotReport {
    /// Top-1 accuracy in percent.
    pub top1: f64,
    /// Top-5 accuracy in percent (top-`C` with fewer than five classes).
    pub top5: f64,
    /// Mean over classes with images of the per-class top-1 recall, in percent.
    pub mean_per_class_recall: f64,
    /// Per-class top-1 recall in percent (`None` for classes without images).
    pub per_class_recall: Vec<Option<f64>>,
    pub num_images: usize,
    pub num_classes: usize,
    pub num_templates: usize,
    /// The predicted class of each evaluated image, in dataset order (skipped left out).
    pub predictions: Vec<usize>,
    /// Paths and reasons of images left out with `skip_bad`.
    pub skipped_images: Vec<(String, String)>,
    pub seconds: f64,
}

impl ZeroShotReport {
    pub fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        [
            ("top1", self.top1),
            ("top5", self.top5),
            ("mean_per_class_recall", self.mean_per_class_recall),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// The classes ranked for one row of logits.
fn ranked_classes(row: &[f32]) -> Vec<usize> {
    let mut hits: Vec<Hit> = row
        .iter()
        .enumerate()
        .map(|(index, &score)| Hit { index, score })
        .collect();
    sort_hits(&mut hits);
    hits.into_iter().map(|h| h.index).collect()
}

/// Classification metrics computed from logits.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassMetrics {
    pub top1: f64,
    pub top5: f64,
    pub mean_per_class_recall: f64,
    pub per_class_recall: Vec<Option<f64>>,
    pub predictions: Vec<usize>,
}

/// Top-1, top-5 (top-`C` below five classes) and mean per-class recall, in percent, from
/// logits `[n][C]` and labels (see the module docs for the tie rule).
pub fn zero_shot_metrics(
    logits: &[Vec<f32>],
    labels: &[usize],
    num_classes: usize,
) -> Result<ClassMetrics> {
    if logits.is_empty() || logits.len() != labels.len() || num_classes == 0 {
        return Err(Error::InvalidArgument(format!(
            "{} rows of logits for {} labels and {num_classes} classes",
            logits.len(),
            labels.len()
        )));
    }
    let k5 = num_classes.min(5);
    let (mut top1, mut top5) = (0usize, 0usize);
    let mut per_class = vec![(0usize, 0usize); num_classes];
    let mut predictions = Vec::with_capacity(labels.len());
    for (row, &label) in logits.iter().zip(labels) {
        if row.len() != num_classes || label >= num_classes {
            return Err(Error::InvalidArgument(format!(
                "a row of {} logits, label {label}, {num_classes} classes",
                row.len()
            )));
        }
        let ranked = ranked_classes(row);
        let hit1 = ranked[0] == label;
        top1 += hit1 as usize;
        top5 += ranked[..k5].contains(&label) as usize;
        per_class[label].1 += 1;
        per_class[label].0 += hit1 as usize;
        predictions.push(ranked[0]);
    }
    let n = labels.len();
    let pct = |a: usize, b: usize| 100.0 * a as f64 / b as f64;
    let per_class_recall: Vec<Option<f64>> = per_class
        .iter()
        .map(|&(h, t)| (t > 0).then(|| pct(h, t)))
        .collect();
    let present: Vec<f64> = per_class_recall.iter().flatten().copied().collect();
    Ok(ClassMetrics {
        top1: pct(top1, n),
        top5: pct(top5, n),
        mean_per_class_recall: present.iter().sum::<f64>() / present.len().max(1) as f64,
        per_class_recall,
        predictions,
    })
}

/// Zero-shot accuracy of `model` on `data` with the given templates (see the module docs).
pub fn evaluate_zero_shot(
    model: &dyn DualEncoder,
    data: &ClassificationDataset,
    templates: &[String],
    opts: &ZeroShotOptions,
) -> Result<ZeroShotReport> {
    let started = Instant::now();
    if let Some(&bad) = data.labels.iter().find(|&&l| l >= data.classes.len()) {
        return Err(Error::Data {
            origin: data.origin.clone(),
            line: None,
            reason: format!("label {bad} but {} classes", data.classes.len()),
        });
    }
    let classes = class_embeddings(model, &data.classes, templates, opts.text_batch_size)?;
    let eo = EncodeOptions {
        image_batch_size: opts.image_batch_size,
        text_batch_size: opts.text_batch_size,
        keep_states: false,
        skip_bad: opts.skip_bad,
        progress: opts.progress,
    };
    let EncodedImages {
        encoded,
        kept,
        skipped,
    } = encode_images(model, &data.images, &[], &eo)?;
    let c = data.classes.len();
    let dev = model.device().clone();
    let cls = classes.to_device(&dev)?.to_dtype(model.dtype())?;
    let n = encoded.len();
    let labels: Vec<usize> = kept.iter().map(|&i| data.labels[i]).collect();
    let mut logits = Vec::with_capacity(n);
    let block = 1024;
    let mut start = 0;
    while start < n {
        let len = block.min(n - start);
        let img = encoded
            .embeds
            .narrow(0, start, len)?
            .to_device(&dev)?
            .to_dtype(model.dtype())?;
        logits.extend(
            model
                .logits(&img, &cls)?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .to_vec2::<f32>()?,
        );
        start += len;
    }
    let m = zero_shot_metrics(&logits, &labels, c)?;
    Ok(ZeroShotReport {
        top1: m.top1,
        top5: m.top5,
        mean_per_class_recall: m.mean_per_class_recall,
        per_class_recall: m.per_class_recall,
        num_images: n,
        num_classes: c,
        num_templates: templates.len(),
        predictions: m.predictions,
        skipped_images: skipped
            .into_iter()
            .map(|(i, why)| (data.images[i].origin(), why))
            .collect(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The result of [`evaluate_matching`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatchingReport {
    /// Area under the ROC curve of the ITM score.
    pub auc: f64,
    /// Accuracy (percent) of `ITM ≥ threshold`.
    pub accuracy: f64,
    pub threshold: f64,
    pub num_pairs: usize,
    pub num_positive: usize,
    /// The ITM score of every evaluated pair, in dataset order (skipped left out).
    pub scores: Vec<f32>,
    pub skipped_images: Vec<(String, String)>,
    pub seconds: f64,
}

impl MatchingReport {
    pub fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        [("auc", self.auc), ("accuracy", self.accuracy)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }
}

/// The ROC AUC of `scores` for `labels` (Mann–Whitney, ties counted one half). `None`
/// when one class is missing.
pub fn roc_auc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let n = scores.len().min(labels.len());
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks (1-based) over runs of equal scores.
    let mut ranks = vec![0f64; n];
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            ranks[k] = r;
        }
        i = j + 1;
    }
    let pos = labels[..n].iter().filter(|&&l| l).count();
    let neg = n - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let sum_pos: f64 = (0..n).filter(|&k| labels[k]).map(|k| ranks[k]).sum();
    Some((sum_pos - (pos * (pos + 1)) as f64 / 2.0) / (pos * neg) as f64)
}

/// ITM matching on labelled pairs (R2D2's ICM / IQM; see the module docs). An error for a
/// model without a cross encoder, or a set with only one label.
pub fn evaluate_matching(
    model: &dyn DualEncoder,
    data: &MatchingDataset,
    opts: &ZeroShotOptions,
) -> Result<MatchingReport> {
    let started = Instant::now();
    let cross = model.cross_encoder().ok_or_else(|| {
        Error::Config(format!(
            "ITM matching needs a cross encoder, and the {} model has none",
            model.family()
        ))
    })?;
    let eo = EncodeOptions {
        image_batch_size: opts.image_batch_size,
        text_batch_size: opts.text_batch_size,
        keep_states: true,
        skip_bad: opts.skip_bad,
        progress: false,
    };
    let bar = Progress::new(data.images.len(), "pairs", opts.progress);
    let bs = opts.image_batch_size.max(1);
    let mut scores = Vec::with_capacity(data.images.len());
    let mut labels = Vec::with_capacity(data.images.len());
    let mut skipped_images = Vec::new();
    let mut start = 0;
    while start < data.images.len() {
        let end = (start + bs).min(data.images.len());
        let imgs = encode_images(model, &data.images[start..end], &[], &eo);
        let imgs = match imgs {
            Ok(i) => i,
            Err(e) if opts.skip_bad => {
                for r in &data.images[start..end] {
                    skipped_images.push((r.origin(), e.to_string()));
                }
                start = end;
                continue;
            }
            Err(e) => return Err(e),
        };
        for (i, why) in &imgs.skipped {
            skipped_images.push((data.images[start + i].origin(), why.clone()));
        }
        let texts: Vec<&str> = imgs
            .kept
            .iter()
            .map(|&i| data.texts[start + i].as_str())
            .collect();
        let txt = encode_text_batch(model, &texts, true)?;
        let (is, ts, tm) = match (&imgs.encoded.states, &txt.states, &txt.mask) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => return Err(Error::Config("the cross encoder kept no states".into())),
        };
        let s = cross
            .pair_scores(is, ts, tm)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        scores.extend(s);
        labels.extend(imgs.kept.iter().map(|&i| data.labels[start + i]));
        bar.inc(end - start);
        start = end;
    }
    let auc = roc_auc(&scores, &labels).ok_or_else(|| Error::Data {
        origin: data.origin.clone(),
        line: None,
        reason: "AUC needs both matching and non-matching pairs".into(),
    })?;
    let threshold = 0.5;
    let correct = scores
        .iter()
        .zip(&labels)
        .filter(|(&s, &l)| (s as f64 >= threshold) == l)
        .count();
    Ok(MatchingReport {
        auc,
        accuracy: 100.0 * correct as f64 / scores.len() as f64,
        threshold,
        num_pairs: scores.len(),
        num_positive: labels.iter().filter(|&&l| l).count(),
        scores,
        skipped_images,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_ties_half() {
        assert_eq!(roc_auc(&[0.1, 0.9], &[false, true]), Some(1.0));
        assert_eq!(roc_auc(&[0.9, 0.1], &[false, true]), Some(0.0));
        assert_eq!(roc_auc(&[0.5, 0.5], &[false, true]), Some(0.5));
        // 2 positives, 2 negatives: pairs (p, n) won 3 of 4, one tie → 3.5 / 4.
        let s = [0.2, 0.6, 0.6, 0.9];
        let l = [false, false, true, true];
        assert_eq!(roc_auc(&s, &l), Some(0.875));
        assert_eq!(roc_auc(&[0.1, 0.2], &[true, true]), None);
    }

    #[test]
    fn ranked_classes_ties_lower_first() {
        assert_eq!(ranked_classes(&[0.5, 0.9, 0.5, f32::NAN]), vec![1, 0, 2, 3]);
    }
}

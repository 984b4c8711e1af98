//! Image–text retrieval: batched embedding, cosine ranking, cross-encoder re-ranking and
//! Recall@K, following the R2D2 evaluation (`train_r2d2_retrieval.py`).
//!
//! # Algorithm
//!
//! 1. Embed every text and every image in batches (`RetrievalOptions::{text,image}_batch_size`),
//!    keeping the token states the cross encoder needs when re-ranking.
//! 2. Cosine similarities `S = image_embeds · text_embedsᵀ` (no temperature).
//! 3. Re-ranking (optional): for every query (each image for image→text, each text for
//!    text→image) take its `top_k` candidates by cosine (128 in the original Flickr30k-CN
//!    configuration, 64 for ICR/IQR) and give each the score `ITM + cosine`; every other
//!    candidate gets −100, exactly as the original's `cross_score_matrix`.
//! 4. Recall@K: image→text counts an image as found at K when **any** of its captions is in
//!    its top K; text→image counts a caption as found when its image is in its top K. Both
//!    are percentages; the mean recall is the mean of the six numbers.
//!
//! Rankings sort by score, highest first; **ties keep the lower index first** (a stable
//! sort), and NaN ranks last. The original used `np.argsort(score)[::-1]`, whose order among
//! equal scores is unspecified.
//!
//! # Dataset manifest
//!
//! A JSON Lines file, one image per line:
//!
//! ```text
//! {"image": "images/1000092795.jpg", "captions": ["两个年轻人在户外", "草地上的两个男人"]}
//! {"image": "/data/flickr/10002456.jpg", "captions": ["一群人站在建筑物前"]}
//! ```
//!
//! * `image`: a path; relative paths are resolved against the manifest's directory.
//! * `captions`: one or more captions of that image (a non-empty list of strings).
//!
//! Blank lines are skipped. Lines naming the same image are merged. Texts are numbered in
//! file order, which is the column order of the score matrices.
//!
//! # Memory
//!
//! Re-ranking keeps every image's tokens and every text's hidden states in CPU memory: for
//! R2D2 ViT-L/14 on the Flickr30k-CN test set (1000 images, 5000 captions) that is about
//! 1 GB (257×1024 floats per image) plus 1 GB (64×768 per text).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::Progress;
use crate::error::{Error, Result};
use crate::models::r2d2::R2d2Encoder;
use crate::models::DualEncoder;
use crate::preprocess::ImageInput;

/// The score the original gives to candidates outside the re-ranked top k.
pub const NOT_RERANKED: f32 = -100.0;

/// An evaluation set: images, captions and which caption belongs to which image.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrievalDataset {
    pub images: Vec<PathBuf>,
    pub texts: Vec<String>,
    /// For each text, the index of its image.
    pub txt2img: Vec<usize>,
    /// For each image, the indices of its texts.
    pub img2txt: Vec<Vec<usize>>,
}

#[derive(Deserialize)]
struct ManifestLine {
    image: PathBuf,
    captions: Vec<String>,
}

impl RetrievalDataset {
    /// Builds from `(image, captions)` pairs; entries naming the same image are merged.
    pub fn from_entries(entries: impl IntoIterator<Item = (PathBuf, Vec<String>)>) -> Result<Self> {
        let mut d = Self {
            images: Vec::new(),
            texts: Vec::new(),
            txt2img: Vec::new(),
            img2txt: Vec::new(),
        };
        let mut index: HashMap<PathBuf, usize> = HashMap::new();
        for (image, captions) in entries {
            if captions.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "image {} has no captions",
                    image.display()
                )));
            }
            let i = *index.entry(image.clone()).or_insert_with(|| {
                d.images.push(image);
                d.img2txt.push(Vec::new());
                d.images.len() - 1
            });
            for c in captions {
                d.img2txt[i].push(d.texts.len());
                d.txt2img.push(i);
                d.texts.push(c);
            }
        }
        if d.images.is_empty() {
            return Err(Error::InvalidArgument("the dataset has no images".into()));
        }
        Ok(d)
    }

    /// Reads a JSON Lines manifest (see the module docs).
    pub fn from_jsonl(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let root = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let mut entries = Vec::new();
        for (n, line) in s.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let m: ManifestLine = serde_json::from_str(line)
                .map_err(|e| Error::parse(format!("{} line {}", path.display(), n + 1), e))?;
            if m.captions.is_empty() {
                return Err(Error::parse(
                    format!("{} line {}", path.display(), n + 1),
                    "`captions` is empty",
                ));
            }
            let image = if m.image.is_absolute() {
                m.image
            } else {
                root.join(m.image)
            };
            entries.push((image, m.captions));
        }
        Self::from_entries(entries)
    }
}

/// Embeddings of a batch of images or texts, plus what a cross encoder needs to re-rank
/// them. Every tensor is on the CPU.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `[n, d]` f32, L2-normalised.
    pub embeds: Tensor,
    /// Image tokens `[n, L, vw]` or text hidden states `[n, T, tw]`, when kept.
    pub states: Option<Tensor>,
    /// Text padding mask `[n, T]` (texts only), when kept.
    pub mask: Option<Tensor>,
    /// Indices of texts that were truncated to the model's maximum length.
    pub truncated: Vec<usize>,
}

impl Encoded {
    /// Number of items.
    pub fn len(&self) -> usize {
        self.embeds.dims().first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Concatenates batches, shifting the truncated indices.
    pub fn cat(parts: &[Encoded]) -> Result<Encoded> {
        if parts.is_empty() {
            return Err(Error::InvalidArgument("nothing to concatenate".into()));
        }
        let embeds = Tensor::cat(&parts.iter().map(|p| &p.embeds).collect::<Vec<_>>(), 0)?;
        let all = |f: fn(&Encoded) -> Option<&Tensor>| -> Result<Option<Tensor>> {
            let ts: Option<Vec<&Tensor>> = parts.iter().map(f).collect();
            Ok(match ts {
                Some(ts) => Some(Tensor::cat(&ts, 0)?),
                None => None,
            })
        };
        let states = all(|p| p.states.as_ref())?;
        let mask = all(|p| p.mask.as_ref())?;
        let mut truncated = Vec::new();
        let mut offset = 0;
        for p in parts {
            truncated.extend(p.truncated.iter().map(|i| i + offset));
            offset += p.len();
        }
        Ok(Encoded {
            embeds,
            states,
            mask,
            truncated,
        })
    }
}

/// A model that retrieval can run on: it embeds, and it may re-rank with a cross encoder.
pub trait RetrievalModel {
    /// Embeds images; with `keep_states`, also returns their cross-encoder inputs.
    fn encode_images(&self, images: &[ImageInput], keep_states: bool) -> Result<Encoded>;
    /// Embeds texts; with `keep_states`, also returns their cross-encoder inputs.
    fn encode_texts(&self, texts: &[&str], keep_states: bool) -> Result<Encoded>;
    /// Whether [`Self::pair_scores`] is available.
    fn can_rerank(&self) -> bool;
    /// Cross-encoder scores `[k]` of aligned pairs (image states `[k, ..]`, text states
    /// `[k, ..]`, text mask `[k, T]`).
    fn pair_scores(
        &self,
        image_states: &Tensor,
        text_states: &Tensor,
        text_mask: &Tensor,
    ) -> Result<Tensor>;
}

fn to_cpu_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
}

impl RetrievalModel for R2d2Encoder {
    fn encode_images(&self, images: &[ImageInput], keep_states: bool) -> Result<Encoded> {
        let f = self.image_features(images)?;
        Ok(Encoded {
            embeds: to_cpu_f32(&f.embeds)?,
            states: if keep_states {
                Some(f.tokens.to_device(&Device::Cpu)?)
            } else {
                None
            },
            mask: None,
            truncated: Vec::new(),
        })
    }

    fn encode_texts(&self, texts: &[&str], keep_states: bool) -> Result<Encoded> {
        let f = self.text_features(texts)?;
        let (states, mask) = if keep_states {
            (
                Some(f.states.to_device(&Device::Cpu)?),
                Some(f.mask.to_device(&Device::Cpu)?),
            )
        } else {
            (None, None)
        };
        Ok(Encoded {
            embeds: to_cpu_f32(&f.embeds)?,
            states,
            mask,
            truncated: f.truncated,
        })
    }

    fn can_rerank(&self) -> bool {
        self.has_itm()
    }

    fn pair_scores(
        &self,
        image_states: &Tensor,
        text_states: &Tensor,
        text_mask: &Tensor,
    ) -> Result<Tensor> {
        to_cpu_f32(&self.itm_scores_paired(image_states, text_states, text_mask)?)
    }
}

/// Any [`DualEncoder`], ranked by cosine similarity only (no re-ranking).
pub struct CosineOnly<'a>(pub &'a dyn DualEncoder);

impl RetrievalModel for CosineOnly<'_> {
    fn encode_images(&self, images: &[ImageInput], _keep_states: bool) -> Result<Encoded> {
        Ok(Encoded {
            embeds: to_cpu_f32(&self.0.embed_images(images)?)?,
            states: None,
            mask: None,
            truncated: Vec::new(),
        })
    }

    fn encode_texts(&self, texts: &[&str], _keep_states: bool) -> Result<Encoded> {
        Ok(Encoded {
            embeds: to_cpu_f32(&self.0.embed_texts(texts)?)?,
            states: None,
            mask: None,
            truncated: Vec::new(),
        })
    }

    fn can_rerank(&self) -> bool {
        false
    }

    fn pair_scores(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Tensor> {
        Err(Error::Config(format!(
            "the {} family has no cross encoder to re-rank with",
            self.0.family()
        )))
    }
}

/// Embeds images `batch_size` at a time, with an optional progress bar.
pub fn encode_images_batched(
    model: &dyn RetrievalModel,
    images: &[ImageInput],
    batch_size: usize,
    keep_states: bool,
    progress: bool,
) -> Result<Encoded> {
    if images.is_empty() {
        return Err(Error::InvalidArgument("no images to encode".into()));
    }
    encode_in_batches(images, "images", batch_size, progress, |chunk| {
        model.encode_images(chunk, keep_states)
    })
}

/// Embeds texts `batch_size` at a time, with an optional progress bar.
pub fn encode_texts_batched(
    model: &dyn RetrievalModel,
    texts: &[&str],
    batch_size: usize,
    keep_states: bool,
    progress: bool,
) -> Result<Encoded> {
    if texts.is_empty() {
        return Err(Error::Text("empty list of texts".into()));
    }
    encode_in_batches(texts, "texts", batch_size, progress, |chunk| {
        model.encode_texts(chunk, keep_states)
    })
}

/// Encodes `items` `batch_size` at a time with `encode`, counting them on a progress bar.
fn encode_in_batches<T>(
    items: &[T],
    what: &str,
    batch_size: usize,
    progress: bool,
    mut encode: impl FnMut(&[T]) -> Result<Encoded>,
) -> Result<Encoded> {
    let bar = Progress::new(items.len(), what, progress);
    let mut parts = Vec::new();
    for chunk in items.chunks(batch_size.max(1)) {
        parts.push(encode(chunk)?);
        bar.inc(chunk.len());
    }
    Encoded::cat(&parts)
}

/// Cosine similarities `[n_images][n_texts]` of normalised embeddings.
pub fn cosine_scores(images: &Encoded, texts: &Encoded) -> Result<Vec<Vec<f32>>> {
    let s = images
        .embeds
        .to_dtype(DType::F32)?
        .matmul(&texts.embeds.to_dtype(DType::F32)?.t()?)?;
    Ok(s.to_vec2::<f32>()?)
}

/// The transpose of a rectangular score matrix.
pub fn transpose(m: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let cols = m.first().map_or(0, Vec::len);
    (0..cols)
        .map(|j| m.iter().map(|row| row[j]).collect())
        .collect()
}

/// Indices of `scores` from the highest score to the lowest; ties keep the lower index
/// first and NaN ranks last.
pub fn rank_desc(scores: &[f32]) -> Vec<usize> {
    let key = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| key(scores[b]).total_cmp(&key(scores[a])));
    idx
}

/// The `k` best indices of `scores` in [`rank_desc`] order.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut r = rank_desc(scores);
    r.truncate(k);
    r
}

/// Two-stage re-ranking of a score matrix: for each row (query), its `k` best columns by
/// `sims` get `cross(row, columns)[j] + sims[row][column_j]`, every other column
/// [`NOT_RERANKED`] (−100), as in the original evaluation. `k` is capped at the number of
/// columns.
pub fn rerank(
    sims: &[Vec<f32>],
    k: usize,
    progress: bool,
    mut cross: impl FnMut(usize, &[usize]) -> Result<Vec<f32>>,
) -> Result<Vec<Vec<f32>>> {
    if k == 0 {
        return Err(Error::InvalidArgument("re-ranking needs k >= 1".into()));
    }
    let bar = Progress::new(sims.len(), "re-ranking", progress);
    let mut out = Vec::with_capacity(sims.len());
    for (i, row) in sims.iter().enumerate() {
        let cand = top_k(row, k);
        let scores = cross(i, &cand)?;
        if scores.len() != cand.len() {
            return Err(Error::InvalidArgument(format!(
                "the cross encoder returned {} scores for {} candidates",
                scores.len(),
                cand.len()
            )));
        }
        let mut r = vec![NOT_RERANKED; row.len()];
        for (&c, s) in cand.iter().zip(scores) {
            r[c] = s + row[c];
        }
        out.push(r);
        bar.inc(1);
    }
    Ok(out)
}

fn states_of<'a>(e: &'a Encoded, what: &str) -> Result<&'a Tensor> {
    e.states.as_ref().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "re-ranking needs the {what} states: encode with keep_states = true"
        ))
    })
}

fn text_mask_of(e: &Encoded) -> Result<&Tensor> {
    e.mask.as_ref().ok_or_else(|| {
        Error::InvalidArgument("re-ranking needs the text masks: encode with keep_states".into())
    })
}

/// Cross-encoder scores of image `i` against the texts `cand`, `batch` pairs at a time.
pub fn cross_scores_image_vs_texts(
    model: &dyn RetrievalModel,
    images: &Encoded,
    texts: &Encoded,
    i: usize,
    cand: &[usize],
    batch: usize,
) -> Result<Vec<f32>> {
    let img = states_of(images, "image")?.narrow(0, i, 1)?;
    let (ts, tm) = (states_of(texts, "text")?, text_mask_of(texts)?);
    let mut out = Vec::with_capacity(cand.len());
    for chunk in cand.chunks(batch.max(1)) {
        let idx = Tensor::from_vec(
            chunk.iter().map(|&c| c as u32).collect::<Vec<_>>(),
            chunk.len(),
            &Device::Cpu,
        )?;
        let mut shape = img.dims().to_vec();
        shape[0] = chunk.len();
        let imgs = img.broadcast_as(shape)?.contiguous()?;
        let s = model.pair_scores(
            &imgs,
            &ts.index_select(&idx, 0)?,
            &tm.index_select(&idx, 0)?,
        )?;
        out.extend(s.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Cross-encoder scores of text `t` against the images `cand`, `batch` pairs at a time.
pub fn cross_scores_text_vs_images(
    model: &dyn RetrievalModel,
    images: &Encoded,
    texts: &Encoded,
    t: usize,
    cand: &[usize],
    batch: usize,
) -> Result<Vec<f32>> {
    let is = states_of(images, "image")?;
    let ts = states_of(texts, "text")?.narrow(0, t, 1)?;
    let tm = text_mask_of(texts)?.narrow(0, t, 1)?;
    let mut out = Vec::with_capacity(cand.len());
    for chunk in cand.chunks(batch.max(1)) {
        let idx = Tensor::from_vec(
            chunk.iter().map(|&c| c as u32).collect::<Vec<_>>(),
            chunk.len(),
            &Device::Cpu,
        )?;
        let (_, l, h) = ts.dims3()?;
        let states = ts.broadcast_as((chunk.len(), l, h))?.contiguous()?;
        let mask = tm.broadcast_as((chunk.len(), l))?.contiguous()?;
        let s = model.pair_scores(&is.index_select(&idx, 0)?, &states, &mask)?;
        out.extend(s.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Recall@1/5/10 in both directions, in percent, with the original's names.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Recall {
    /// Image→text (text retrieval) Recall@1.
    pub txt_r1: f64,
    pub txt_r5: f64,
    pub txt_r10: f64,
    pub txt_r_mean: f64,
    /// Text→image (image retrieval) Recall@1.
    pub img_r1: f64,
    pub img_r5: f64,
    pub img_r10: f64,
    pub img_r_mean: f64,
    /// Mean of the six recalls.
    pub r_mean: f64,
}

impl std::fmt::Display for Recall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "image→text R@1 {:.2} R@5 {:.2} R@10 {:.2} | text→image R@1 {:.2} R@5 {:.2} \
             R@10 {:.2} | mean recall {:.2}",
            self.txt_r1,
            self.txt_r5,
            self.txt_r10,
            self.img_r1,
            self.img_r5,
            self.img_r10,
            self.r_mean
        )
    }
}

/// The 0-based rank of the best-ranked relevant item in `scores`, if any is relevant.
fn best_rank(scores: &[f32], relevant: impl Fn(usize) -> bool) -> Option<usize> {
    rank_desc(scores).iter().position(|&j| relevant(j))
}

/// Recall@K from score matrices `i2t` `[n_images][n_texts]` and `t2i` `[n_texts][n_images]`.
pub fn recall_at_k(
    i2t: &[Vec<f32>],
    t2i: &[Vec<f32>],
    img2txt: &[Vec<usize>],
    txt2img: &[usize],
) -> Result<Recall> {
    let (ni, nt) = (img2txt.len(), txt2img.len());
    if ni == 0 || nt == 0 {
        return Err(Error::InvalidArgument("recall of an empty dataset".into()));
    }
    if i2t.len() != ni || i2t.iter().any(|r| r.len() != nt) {
        return Err(Error::InvalidArgument(format!(
            "image→text scores must be {ni}×{nt}"
        )));
    }
    if t2i.len() != nt || t2i.iter().any(|r| r.len() != ni) {
        return Err(Error::InvalidArgument(format!(
            "text→image scores must be {nt}×{ni}"
        )));
    }
    let pct = |ranks: &[Option<usize>], k: usize| {
        100.0 * ranks.iter().filter(|r| r.is_some_and(|r| r < k)).count() as f64
            / ranks.len() as f64
    };
    let tr: Vec<Option<usize>> = i2t
        .iter()
        .zip(img2txt)
        .map(|(s, rel)| best_rank(s, |j| rel.contains(&j)))
        .collect();
    let ir: Vec<Option<usize>> = t2i
        .iter()
        .zip(txt2img)
        .map(|(s, &img)| best_rank(s, |j| j == img))
        .collect();
    let (txt_r1, txt_r5, txt_r10) = (pct(&tr, 1), pct(&tr, 5), pct(&tr, 10));
    let (img_r1, img_r5, img_r10) = (pct(&ir, 1), pct(&ir, 5), pct(&ir, 10));
    let txt_r_mean = (txt_r1 + txt_r5 + txt_r10) / 3.0;
    let img_r_mean = (img_r1 + img_r5 + img_r10) / 3.0;
    Ok(Recall {
        txt_r1,
        txt_r5,
        txt_r10,
        txt_r_mean,
        img_r1,
        img_r5,
        img_r10,
        img_r_mean,
        r_mean: (txt_r_mean + img_r_mean) / 2.0,
    })
}

/// Settings of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrievalOptions {
    /// Candidates re-ranked per query (128 in the original Flickr30k-CN evaluation).
    pub top_k: usize,
    /// Whether to re-rank with the cross encoder (if the model has one).
    pub rerank: bool,
    pub image_batch_size: usize,
    /// Texts per batch (256 in the original).
    pub text_batch_size: usize,
    /// Image–text pairs per cross-encoder pass.
    pub itm_batch_size: usize,
    /// Show progress bars on standard error (with the `progress` feature).
    pub progress: bool,
}

impl Default for RetrievalOptions {
    fn default() -> Self {
        Self {
            top_k: 128,
            rerank: true,
            image_batch_size: 32,
            text_batch_size: 256,
            itm_batch_size: 64,
            progress: false,
        }
    }
}

/// The result of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalReport {
    /// Recall of the first stage (cosine similarity only).
    pub cosine: Recall,
    /// Recall after re-ranking the top k by ITM + cosine, when re-ranking ran.
    pub reranked: Option<Recall>,
    pub top_k: usize,
    pub num_images: usize,
    pub num_texts: usize,
    /// Indices of texts that were truncated to the model's maximum length.
    pub truncated: Vec<usize>,
}

/// Evaluates retrieval on a dataset: embeds everything, ranks by cosine, re-ranks the top
/// k by ITM + cosine when asked and possible, and reports Recall@K for both stages.
pub fn evaluate(
    model: &dyn RetrievalModel,
    data: &RetrievalDataset,
    opts: &RetrievalOptions,
) -> Result<RetrievalReport> {
    if opts.rerank && !model.can_rerank() {
        return Err(Error::Config(
            "re-ranking asked for, but the model has no cross encoder".into(),
        ));
    }
    let keep = opts.rerank;
    let texts: Vec<&str> = data.texts.iter().map(String::as_str).collect();
    let txt = encode_texts_batched(model, &texts, opts.text_batch_size, keep, opts.progress)?;
    let images: Vec<ImageInput> = data.images.iter().map(ImageInput::path).collect();
    let img = encode_images_batched(model, &images, opts.image_batch_size, keep, opts.progress)?;
    let i2t = cosine_scores(&img, &txt)?;
    let t2i = transpose(&i2t);
    let cosine = recall_at_k(&i2t, &t2i, &data.img2txt, &data.txt2img)?;
    let reranked = if opts.rerank {
        let b = opts.itm_batch_size;
        let r_i2t = rerank(&i2t, opts.top_k, opts.progress, |i, cand| {
            cross_scores_image_vs_texts(model, &img, &txt, i, cand, b)
        })?;
        let r_t2i = rerank(&t2i, opts.top_k, opts.progress, |t, cand| {
            cross_scores_text_vs_images(model, &img, &txt, t, cand, b)
        })?;
        Some(recall_at_k(&r_i2t, &r_t2i, &data.img2txt, &data.txt2img)?)
    } else {
        None
    };
    Ok(RetrievalReport {
        cosine,
        reranked,
        top_k: opts.top_k,
        num_images: data.images.len(),
        num_texts: data.texts.len(),
        truncated: txt.truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_is_stable_and_nan_last() {
        assert_eq!(rank_desc(&[0.5, f32::NAN, 0.9, 0.5]), vec![2, 0, 3, 1]);
        assert_eq!(top_k(&[1.0, 3.0, 2.0], 5), vec![1, 2, 0]);
    }

    #[test]
    fn transpose_roundtrip() {
        let m = vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]];
        assert_eq!(transpose(&transpose(&m)), m);
        assert_eq!(transpose(&m)[2], vec![3.0, 6.0]);
    }
}

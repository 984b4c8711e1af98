//! Image–text retrieval for every [`DualEncoder`]: streamed batched embedding, blocked
//! top-k cosine ranking, cross-encoder re-ranking where the model has one (R2D2), and
//! Recall@K as the Chinese benchmarks report it.
//!
//! # Algorithm
//!
//! 1. Embed every text and every image in batches (see [`super::encode`]), decoding the
//!    next image batch while the model runs; with re-ranking, keep the states the cross
//!    encoder reads.
//! 2. For every image its best `k` texts, and for every text its best `k` images, by
//!    cosine similarity (no temperature), in blocks (see [`super::topk`]): `k` is 10, or
//!    the re-ranking depth if larger. No full score matrix is ever held.
//! 3. Re-ranking (optional, models with a cross encoder only; asking for it elsewhere is
//!    an error): every query's `top_k` cosine candidates (128 in the original Flickr30k-CN
//!    configuration, 64 for ICR/IQR) get the score `ITM + cosine`; every other candidate
//!    gets −100, as in the original's `cross_score_matrix`.
//! 4. Recall@K, as in Chinese-CLIP's evaluation: an image (image→text) is found at K when
//!    **any** of its texts is in its top K; a text (text→image) when **any** of its images
//!    is (MUGE's queries have several). Images without texts are only candidates, not
//!    queries. Both are percentages; the mean recall is the mean of the six numbers.
//!
//! **Ties**: rankings sort by score, highest first; equal scores keep the lower index
//! (dataset order) first, and NaN ranks last. The original used
//! `np.argsort(score)[::-1]`, whose order among equal scores is unspecified.
//!
//! Images that cannot be read fail the evaluation, or with
//! [`RetrievalOptions::skip_bad`] are left out (named in the report): they are then
//! neither candidates nor queries, and a text whose images were all left out is not a
//! query.
//!
//! # Memory
//!
//! Cosine ranking keeps the embeddings (`(images + texts) × dim` floats), one score block
//! and `k` candidates per query. Re-ranking also keeps every image's tokens and every
//! text's hidden states in CPU memory: for R2D2 ViT-L/14 on the Flickr30k-CN test set
//! (1000 images, 5000 captions) that is about 1 GB (257×1024 floats per image) plus 1 GB
//! (64×768 per text).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::cache::{CachedEmbeds, EmbeddingCache};
pub use super::data::RetrievalDataset;
pub use super::encode::Encoded;
use super::encode::{encode_images, encode_texts, EncodeOptions, EncodedImages};
use super::topk::{sort_hits, top_k_dot, Hit};
use super::Progress;
use crate::error::{Error, Result};
use crate::models::{CrossEncoder, DualEncoder};

/// The score the original gives to candidates outside the re-ranked top k.
pub const NOT_RERANKED: f32 = -100.0;

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
    // NaN lowest; −0 and +0 tie.
    let key = |x: f32| {
        if x.is_nan() {
            f32::NEG_INFINITY
        } else if x == 0.0 {
            0.0
        } else {
            x
        }
    };
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
    model: &dyn CrossEncoder,
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
    model: &dyn CrossEncoder,
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

impl Recall {
    /// From the 0-based rank of the best relevant item of every image→text query and every
    /// text→image query (`None`: not in the ranked list, a miss at every K).
    pub fn from_ranks(i2t: &[Option<usize>], t2i: &[Option<usize>]) -> Result<Recall> {
        if i2t.is_empty() || t2i.is_empty() {
            return Err(Error::InvalidArgument(
                "recall of an empty dataset (no image→text or no text→image query)".into(),
            ));
        }
        let pct = |ranks: &[Option<usize>], k: usize| {
            100.0 * ranks.iter().filter(|r| r.is_some_and(|r| r < k)).count() as f64
                / ranks.len() as f64
        };
        let (txt_r1, txt_r5, txt_r10) = (pct(i2t, 1), pct(i2t, 5), pct(i2t, 10));
        let (img_r1, img_r5, img_r10) = (pct(t2i, 1), pct(t2i, 5), pct(t2i, 10));
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

    /// The metrics by name (`txt_r1` … `r_mean`), for logs and JSON reports.
    pub fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        [
            ("txt_r1", self.txt_r1),
            ("txt_r5", self.txt_r5),
            ("txt_r10", self.txt_r10),
            ("txt_r_mean", self.txt_r_mean),
            ("img_r1", self.img_r1),
            ("img_r5", self.img_r5),
            ("img_r10", self.img_r10),
            ("img_r_mean", self.img_r_mean),
            ("r_mean", self.r_mean),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// The 0-based rank of the best-ranked relevant item in `scores`, if any is relevant.
fn best_rank(scores: &[f32], relevant: impl Fn(usize) -> bool) -> Option<usize> {
    rank_desc(scores).iter().position(|&j| relevant(j))
}

/// Recall@K from dense score matrices `i2t` `[n_images][n_texts]` and `t2i`
/// `[n_texts][n_images]`, one image per text (see [`recall_from_hits`] for the general
/// case and large sets).
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
    let tr: Vec<Option<usize>> = i2t
        .iter()
        .zip(img2txt)
        .filter(|(_, rel)| !rel.is_empty())
        .map(|(s, rel)| best_rank(s, |j| rel.contains(&j)))
        .collect();
    let ir: Vec<Option<usize>> = t2i
        .iter()
        .zip(txt2img)
        .map(|(s, &img)| best_rank(s, |j| j == img))
        .collect();
    Recall::from_ranks(&tr, &ir)
}

/// Recall@K from ranked candidate lists (each at least 10 long where there are 10
/// candidates): `i2t[i]` the ranked texts of image `i`, `t2i[t]` the ranked images of
/// text `t`. `img2txt` / `txt2img` name the relevant items; queries without any are left
/// out.
pub fn recall_from_hits(
    i2t: &[Vec<Hit>],
    t2i: &[Vec<Hit>],
    img2txt: &[Vec<usize>],
    txt2img: &[Vec<usize>],
) -> Result<Recall> {
    if i2t.len() != img2txt.len() || t2i.len() != txt2img.len() {
        return Err(Error::InvalidArgument(format!(
            "{} image rankings for {} images, {} text rankings for {} texts",
            i2t.len(),
            img2txt.len(),
            t2i.len(),
            txt2img.len()
        )));
    }
    let ranks = |lists: &[Vec<Hit>], rel: &[Vec<usize>]| -> Vec<Option<usize>> {
        lists
            .iter()
            .zip(rel)
            .filter(|(_, r)| !r.is_empty())
            .map(|(hits, r)| hits.iter().position(|h| r.contains(&h.index)))
            .collect()
    };
    Recall::from_ranks(&ranks(i2t, img2txt), &ranks(t2i, txt2img))
}

/// Re-ranks ranked lists: each query's first `k` candidates get `cross(query,
/// candidates)[j] + cosine`, sorted; after them come the other candidates at −100
/// ([`NOT_RERANKED`]) in index order (the tie rule), as many as needed to fill `depth`
/// places. `num_candidates` is the number of keys.
pub fn rerank_hits(
    lists: &[Vec<Hit>],
    k: usize,
    depth: usize,
    num_candidates: usize,
    progress: bool,
    mut cross: impl FnMut(usize, &[usize]) -> Result<Vec<f32>>,
) -> Result<Vec<Vec<Hit>>> {
    if k == 0 {
        return Err(Error::InvalidArgument("re-ranking needs k >= 1".into()));
    }
    let bar = Progress::new(lists.len(), "re-ranking", progress);
    let mut out = Vec::with_capacity(lists.len());
    for (q, hits) in lists.iter().enumerate() {
        let cand: Vec<&Hit> = hits.iter().take(k).collect();
        let idx: Vec<usize> = cand.iter().map(|h| h.index).collect();
        let scores = cross(q, &idx)?;
        if scores.len() != idx.len() {
            return Err(Error::InvalidArgument(format!(
                "the cross encoder returned {} scores for {} candidates",
                scores.len(),
                idx.len()
            )));
        }
        let mut r: Vec<Hit> = cand
            .iter()
            .zip(scores)
            .map(|(h, s)| Hit {
                index: h.index,
                score: s + h.score,
            })
            .collect();
        sort_hits(&mut r);
        let mut j = 0;
        while r.len() < depth.min(num_candidates) && j < num_candidates {
            if !idx.contains(&j) {
                r.push(Hit {
                    index: j,
                    score: NOT_RERANKED,
                });
            }
            j += 1;
        }
        out.push(r);
        bar.inc(1);
    }
    Ok(out)
}

/// Settings of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrievalOptions {
    /// Candidates re-ranked per query (128 in the original Flickr30k-CN evaluation).
    pub top_k: usize,
    /// Re-rank with the cross encoder. An error for a model without one.
    pub rerank: bool,
    pub image_batch_size: usize,
    /// Texts per batch (256 in the original).
    pub text_batch_size: usize,
    /// Image–text pairs per cross-encoder pass.
    pub itm_batch_size: usize,
    /// Leave out images that cannot be read (named in the report) instead of failing.
    pub skip_bad: bool,
    /// Reuse and store embeddings here (the cosine stage only).
    pub cache: Option<EmbeddingCache>,
    /// Show progress bars on standard error (with the `progress` feature).
    pub progress: bool,
}

impl Default for RetrievalOptions {
    fn default() -> Self {
        Self {
            top_k: 128,
            rerank: false,
            image_batch_size: 32,
            text_batch_size: 256,
            itm_batch_size: 64,
            skip_bad: false,
            cache: None,
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
    /// Image→text queries (images with at least one text, not skipped).
    pub i2t_queries: usize,
    /// Text→image queries (texts with at least one image not skipped).
    pub t2i_queries: usize,
    /// Ids of texts that were truncated to the model's maximum length (known for models
    /// with a cross encoder, which report it).
    pub truncated: Vec<String>,
    /// Ids and reasons of the images left out with `skip_bad`.
    pub skipped_images: Vec<(String, String)>,
    /// Whether the embeddings came from the cache.
    pub images_cached: bool,
    pub texts_cached: bool,
    /// Wall-clock seconds of encoding and of ranking (including re-ranking).
    pub encode_seconds: f64,
    pub rank_seconds: f64,
}

impl RetrievalReport {
    /// Every metric by name: the cosine stage's, and the re-ranked ones prefixed `rerank_`.
    pub fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        let mut m = self.cosine.metrics();
        if let Some(r) = &self.reranked {
            for (k, v) in r.metrics() {
                m.insert(format!("rerank_{k}"), v);
            }
        }
        m
    }
}

/// Encodes the dataset's images (or takes them from the cache).
fn images_of(
    model: &dyn DualEncoder,
    data: &RetrievalDataset,
    eo: &EncodeOptions,
    cache: Option<&EmbeddingCache>,
) -> Result<(EncodedImages, bool)> {
    let n = data.images.len();
    let key = cache.map(|c| c.image_key(model, &data.images, &data.boxes));
    if let (Some(c), Some(k), false) = (cache, &key, eo.keep_states) {
        if let Some(e) = c.get("images", k, n) {
            let skipped = e.skipped;
            if !skipped.is_empty() && !eo.skip_bad {
                let (i, why) = &skipped[0];
                return Err(Error::Image {
                    origin: data.images[*i].origin(),
                    reason: why.clone(),
                });
            }
            return Ok((
                EncodedImages {
                    encoded: Encoded {
                        embeds: e.embeds,
                        states: None,
                        mask: None,
                        truncated: Vec::new(),
                    },
                    kept: e.kept,
                    skipped,
                },
                true,
            ));
        }
    }
    let enc = encode_images(model, &data.images, &data.boxes, eo)?;
    if let (Some(c), Some(k)) = (cache, &key) {
        c.put(
            "images",
            k,
            n,
            &CachedEmbeds {
                embeds: enc.encoded.embeds.clone(),
                kept: enc.kept.clone(),
                skipped: enc.skipped.clone(),
            },
        )?;
    }
    Ok((enc, false))
}

/// Encodes texts (or takes them from the cache).
pub(crate) fn texts_of(
    model: &dyn DualEncoder,
    texts: &[&str],
    eo: &EncodeOptions,
    cache: Option<&EmbeddingCache>,
) -> Result<(Encoded, bool)> {
    let n = texts.len();
    let key = cache.map(|c| c.text_key(model, texts));
    if let (Some(c), Some(k), false) = (cache, &key, eo.keep_states) {
        if let Some(e) = c.get("texts", k, n) {
            if e.kept.len() == n {
                return Ok((
                    Encoded {
                        embeds: e.embeds,
                        states: None,
                        mask: None,
                        truncated: Vec::new(),
                    },
                    true,
                ));
            }
        }
    }
    let enc = encode_texts(model, texts, eo)?;
    if let (Some(c), Some(k)) = (cache, &key) {
        c.put(
            "texts",
            k,
            n,
            &CachedEmbeds {
                embeds: enc.embeds.clone(),
                kept: (0..n).collect(),
                skipped: Vec::new(),
            },
        )?;
    }
    Ok((enc, false))
}

/// Evaluates retrieval on a dataset with any [`DualEncoder`] (see the module docs).
pub fn evaluate(
    model: &dyn DualEncoder,
    data: &RetrievalDataset,
    opts: &RetrievalOptions,
) -> Result<RetrievalReport> {
    let cross = if opts.rerank {
        Some(model.cross_encoder().ok_or_else(|| {
            Error::Config(format!(
                "re-ranking asked for, but the {} model has no cross encoder (only R2D2 has \
                 one)",
                model.family()
            ))
        })?)
    } else {
        None
    };
    if opts.rerank && opts.top_k == 0 {
        return Err(Error::InvalidArgument("re-ranking needs top_k >= 1".into()));
    }
    let started = Instant::now();
    let eo = EncodeOptions {
        image_batch_size: opts.image_batch_size,
        text_batch_size: opts.text_batch_size,
        keep_states: opts.rerank,
        skip_bad: opts.skip_bad,
        progress: opts.progress,
    };
    let texts: Vec<&str> = data.texts.iter().map(String::as_str).collect();
    let (txt, texts_cached) = texts_of(model, &texts, &eo, opts.cache.as_ref())?;
    let (imgs, images_cached) = images_of(model, data, &eo, opts.cache.as_ref())?;
    let encode_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();

    // Restrict the relations to the kept images (renumbered in kept order).
    let mut new_index = vec![usize::MAX; data.images.len()];
    for (j, &i) in imgs.kept.iter().enumerate() {
        new_index[i] = j;
    }
    let img2txt: Vec<Vec<usize>> = imgs.kept.iter().map(|&i| data.img2txt[i].clone()).collect();
    let txt2img: Vec<Vec<usize>> = data
        .txt2img
        .iter()
        .map(|imgs| {
            imgs.iter()
                .map(|&i| new_index[i])
                .filter(|&j| j != usize::MAX)
                .collect()
        })
        .collect();

    let img = &imgs.encoded;
    let depth = if opts.rerank { opts.top_k.max(10) } else { 10 };
    let i2t = top_k_dot(&img.embeds, &txt.embeds, depth)?;
    let t2i = top_k_dot(&txt.embeds, &img.embeds, depth)?;
    let cosine = recall_from_hits(&i2t, &t2i, &img2txt, &txt2img)?;
    let reranked = match cross {
        Some(cross) => {
            let b = opts.itm_batch_size;
            let (nt, ni) = (txt.len(), img.len());
            let r_i2t = rerank_hits(&i2t, opts.top_k, 10, nt, opts.progress, |i, cand| {
                cross_scores_image_vs_texts(cross, img, &txt, i, cand, b)
            })?;
            let r_t2i = rerank_hits(&t2i, opts.top_k, 10, ni, opts.progress, |t, cand| {
                cross_scores_text_vs_images(cross, img, &txt, t, cand, b)
            })?;
            Some(recall_from_hits(&r_i2t, &r_t2i, &img2txt, &txt2img)?)
        }
        None => None,
    };
    Ok(RetrievalReport {
        cosine,
        reranked,
        top_k: opts.top_k,
        num_images: data.images.len(),
        num_texts: data.texts.len(),
        i2t_queries: img2txt.iter().filter(|r| !r.is_empty()).count(),
        t2i_queries: txt2img.iter().filter(|r| !r.is_empty()).count(),
        truncated: txt
            .truncated
            .iter()
            .map(|&i| data.text_ids[i].clone())
            .collect(),
        skipped_images: imgs
            .skipped
            .iter()
            .map(|(i, why)| (data.image_ids[*i].clone(), why.clone()))
            .collect(),
        images_cached,
        texts_cached,
        encode_seconds,
        rank_seconds: started.elapsed().as_secs_f64(),
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

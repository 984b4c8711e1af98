//! An embedding cache, so that a second evaluation with other k, templates or metrics skips
//! re-encoding.
//!
//! Each entry is one safetensors file, `{dir}/{kind}-{key}.safetensors`, holding `embeds`
//! `[n, d]` f32 and `kept` `[n]` u32 (the dataset indices of the rows), with the ids'
//! count, the skipped items and what the key was made of in its metadata. The key is a
//! 128-bit FNV-1a hash of:
//! * the model: the caller's description ([`EmbeddingCache::new`]'s `model_key`, e.g. the
//!   checkpoint path with its size and modification time), its family, dtype and width;
//! * the items: every image's origin (and, for files, size and modification time) and
//!   boxes, or every text;
//! * the settings that change embeddings (BriVL's box grid is part of `model_key`).
//!
//! Files are written atomically; an entry that cannot be read is ignored and rewritten.
//! Only the embeddings are cached: the states a cross encoder reads (gigabytes for R2D2
//! ViT-L) are recomputed when re-ranking.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::data::ImageRef;
use crate::error::{Error, Result};
use crate::models::DualEncoder;

/// Where cached embeddings live, and which model they belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingCache {
    pub dir: PathBuf,
    pub model_key: String,
}

/// A cached set of embeddings.
#[derive(Debug, Clone)]
pub struct CachedEmbeds {
    pub embeds: Tensor,
    pub kept: Vec<usize>,
    pub skipped: Vec<(usize, String)>,
}

/// A 128-bit FNV-1a hash, written as hex.
#[derive(Debug, Clone)]
pub struct KeyHasher(u64, u64);

impl Default for KeyHasher {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325, 0x6c62_272e_07bb_0142)
    }
}

impl KeyHasher {
    pub fn add(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes.iter().chain(&(bytes.len() as u64).to_le_bytes()) {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            self.1 = (self.1 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            self.1 = self.1.rotate_left(5) ^ self.0;
        }
        self
    }

    pub fn hex(&self) -> String {
        format!("{:016x}{:016x}", self.0, self.1)
    }
}

/// Size and modification time of a file, for cache keys ("missing" when it cannot be read).
pub fn file_stamp(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => {
            let t = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!("{}:{t}", m.len())
        }
        Err(_) => "missing".into(),
    }
}

impl EmbeddingCache {
    pub fn new(dir: impl Into<PathBuf>, model_key: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            model_key: model_key.into(),
        }
    }

    fn model_hasher(&self, model: &dyn DualEncoder) -> KeyHasher {
        let mut h = KeyHasher::default();
        h.add(self.model_key.as_bytes())
            .add(model.family().to_string().as_bytes())
            .add(format!("{:?}", model.dtype()).as_bytes())
            .add(&(model.embed_dim() as u64).to_le_bytes());
        h
    }

    /// The key of a list of images.
    pub fn image_key(
        &self,
        model: &dyn DualEncoder,
        images: &[ImageRef],
        boxes: &[Option<Vec<[f32; 4]>>],
    ) -> String {
        let mut h = self.model_hasher(model);
        h.add(b"images");
        let mut stamped: HashMap<PathBuf, String> = HashMap::new();
        for (i, r) in images.iter().enumerate() {
            h.add(r.origin().as_bytes());
            match r {
                ImageRef::Path(p) => {
                    h.add(file_stamp(p).as_bytes());
                }
                ImageRef::Tsv { file, offset, .. } => {
                    let s = stamped
                        .entry(file.to_path_buf())
                        .or_insert_with(|| file_stamp(file));
                    h.add(s.as_bytes()).add(&offset.to_le_bytes());
                }
            }
            if let Some(Some(b)) = boxes.get(i) {
                for v in b.iter().flatten() {
                    h.add(&v.to_le_bytes());
                }
            }
        }
        h.hex()
    }

    /// The key of a list of texts.
    pub fn text_key(&self, model: &dyn DualEncoder, texts: &[&str]) -> String {
        let mut h = self.model_hasher(model);
        h.add(b"texts");
        for t in texts {
            h.add(t.as_bytes());
        }
        h.hex()
    }

    fn path(&self, kind: &str, key: &str) -> PathBuf {
        self.dir.join(format!("{kind}-{key}.safetensors"))
    }

    /// The cached entry, if there is a readable one for `n` items.
    pub fn get(&self, kind: &str, key: &str, n: usize) -> Option<CachedEmbeds> {
        let path = self.path(kind, key);
        if !path.is_file() {
            return None;
        }
        let bytes = std::fs::read(&path).ok()?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get("count").and_then(|c| c.parse::<usize>().ok()) != Some(n) {
            return None;
        }
        let skipped: Vec<(usize, String)> =
            serde_json::from_str(meta.get("skipped").map(String::as_str).unwrap_or("[]")).ok()?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).ok()?;
        let embeds = tensors.get("embeds")?.to_dtype(DType::F32).ok()?;
        let kept: Vec<usize> = tensors
            .get("kept")?
            .to_vec1::<u32>()
            .ok()?
            .into_iter()
            .map(|i| i as usize)
            .collect();
        if embeds.dims().first() != Some(&kept.len()) || kept.iter().any(|&i| i >= n) {
            return None;
        }
        Some(CachedEmbeds {
            embeds,
            kept,
            skipped,
        })
    }

    /// Stores an entry (atomically).
    pub fn put(&self, kind: &str, key: &str, n: usize, e: &CachedEmbeds) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|err| Error::io(format!("creating {}", self.dir.display()), err))?;
        let kept = Tensor::from_vec(
            e.kept.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            e.kept.len(),
            &Device::Cpu,
        )?;
        let tensors = BTreeMap::from([
            ("embeds".to_string(), e.embeds.to_dtype(DType::F32)?),
            ("kept".to_string(), kept),
        ]);
        let skipped = serde_json::to_string(&e.skipped).map_err(|err| Error::Serialize {
            what: "skipped items".into(),
            reason: err.to_string(),
        })?;
        let meta = HashMap::from([
            ("count".to_string(), n.to_string()),
            ("skipped".to_string(), skipped),
            ("model".to_string(), self.model_key.clone()),
            ("kind".to_string(), kind.to_string()),
        ]);
        crate::checkpoint::save_safetensors(&tensors, Some(meta), &self.path(kind, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hasher_separates_fields() {
        let mut a = KeyHasher::default();
        a.add(b"ab").add(b"c");
        let mut b = KeyHasher::default();
        b.add(b"a").add(b"bc");
        assert_ne!(a.hex(), b.hex());
        assert_eq!(a.hex().len(), 32);
    }
}

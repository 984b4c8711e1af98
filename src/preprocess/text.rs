//! Text tokenisation: BERT WordPiece (Chinese models) and Gemma SentencePiece (SigLIP 2).

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// How a model's text is turned into ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextStyle {
    /// `[CLS] … [SEP]`, padded with `[PAD]` (0); the tokenizer's own normaliser lower-cases.
    Bert,
    /// Lower-cased, no BOS, EOS appended, padded with `<pad>` (0): SigLIP 2.
    Gemma,
}

/// Token ids and masks for a batch of texts.
#[derive(Debug, Clone)]
pub struct TokenizedBatch {
    /// `[n, max_len]` u32.
    pub input_ids: Tensor,
    /// `[n, max_len]` u32, 1 for real tokens.
    pub attention_mask: Tensor,
    /// Indices of the texts that were longer than `max_len` and were cut.
    pub truncated: Vec<usize>,
    /// The ids as plain vectors.
    pub ids: Vec<Vec<u32>>,
}

/// A tokenizer with the padding and truncation rules of one model family.
#[derive(Clone)]
pub struct TextProcessor {
    tokenizer: tokenizers::Tokenizer,
    style: TextStyle,
    max_len: usize,
    pad_id: u32,
    eos_id: Option<u32>,
    origin: String,
}

impl std::fmt::Debug for TextProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextProcessor")
            .field("style", &self.style)
            .field("max_len", &self.max_len)
            .field("origin", &self.origin)
            .finish()
    }
}

impl TextProcessor {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path, style: TextStyle, max_len: usize) -> Result<Self> {
        let tok = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            origin: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::new(tok, style, max_len, path.display().to_string())
    }

    /// Builds BERT's WordPiece tokenizer from a `vocab.txt` (one token per line), as HF's
    /// `BertTokenizerFast` does from the same file: text cleaning, Chinese characters split
    /// one per token, lower-casing and accent stripping when `lowercase`, BERT's
    /// whitespace-and-punctuation pre-tokenizer, `##` continuation pieces, `[UNK]` for
    /// words longer than 100 characters, and `[CLS] … [SEP]` around every text. Chinese-CLIP
    /// publishes its tokenizer this way (no `tokenizer.json`).
    pub fn bert_from_vocab(vocab: &Path, lowercase: bool, max_len: usize) -> Result<Self> {
        use tokenizers::models::wordpiece::WordPiece;
        use tokenizers::normalizers::bert::BertNormalizer;
        use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
        use tokenizers::processors::bert::BertProcessing;
        use tokenizers::AddedToken;
        let origin = vocab.display().to_string();
        let bad = |reason: String| Error::Tokenizer {
            origin: origin.clone(),
            reason,
        };
        let meta =
            std::fs::metadata(vocab).map_err(|e| bad(format!("cannot read vocab.txt: {e}")))?;
        if !meta.is_file() || meta.len() == 0 {
            return Err(bad("vocab.txt is empty or not a regular file".into()));
        }
        let path = vocab
            .to_str()
            .ok_or_else(|| bad("the path is not valid UTF-8".into()))?;
        let model = WordPiece::from_file(path)
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(100)
            .build()
            .map_err(|e| bad(format!("not a WordPiece vocabulary: {e}")))?;
        let mut tok = tokenizers::Tokenizer::new(model);
        let id = |t: &str| {
            tok.token_to_id(t)
                .ok_or_else(|| bad(format!("vocab.txt has no {t} token")))
        };
        let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
        id("[PAD]")?;
        id("[UNK]")?;
        tok.with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
            .map_err(|e| bad(e.to_string()))?;
        tok.with_pre_tokenizer(Some(BertPreTokenizer));
        tok.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), sep),
            ("[CLS]".into(), cls),
        )));
        let specials: Vec<AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            .iter()
            .filter(|t| tok.token_to_id(t).is_some())
            .map(|t| AddedToken::from(*t, true))
            .collect();
        tok.add_special_tokens(specials)
            .map_err(|e| bad(e.to_string()))?;
        Self::new(tok, TextStyle::Bert, max_len, origin)
    }

    /// Loads a `tokenizer.json` when there is one: `Ok(None)` for `None`.
    pub fn from_optional_file(
        path: Option<&Path>,
        style: TextStyle,
        max_len: usize,
    ) -> Result<Option<Self>> {
        path.map(|p| Self::from_file(p, style, max_len)).transpose()
    }

    /// Wraps an already-built tokenizer.
    pub fn new(
        mut tokenizer: tokenizers::Tokenizer,
        style: TextStyle,
        max_len: usize,
        origin: String,
    ) -> Result<Self> {
        if max_len < 2 {
            return Err(Error::InvalidArgument(format!(
                "text max length {max_len} is too small"
            )));
        }
        // Padding and truncation are applied here, not by the tokenizer's own settings.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer {
                origin: origin.clone(),
                reason: e.to_string(),
            })?;
        let find = |names: &[&str]| names.iter().find_map(|n| tokenizer.token_to_id(n));
        let (pad_id, eos_id) = match style {
            TextStyle::Bert => (find(&["[PAD]"]).unwrap_or(0), None),
            TextStyle::Gemma => {
                let eos = find(&["<eos>", "</s>"]).ok_or_else(|| Error::Tokenizer {
                    origin: origin.clone(),
                    reason: "Gemma-style tokenizer has no <eos> token".into(),
                })?;
                (find(&["<pad>"]).unwrap_or(0), Some(eos))
            }
        };
        Ok(Self {
            tokenizer,
            style,
            max_len,
            pad_id,
            eos_id,
            origin,
        })
    }

    /// Sets the length texts are padded and truncated to (at least 2: the special tokens).
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len.max(2);
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn style(&self) -> TextStyle {
        self.style
    }

    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// Ids of one text, padded to `max_len`, and whether it was truncated.
    pub fn encode(&self, text: &str) -> Result<(Vec<u32>, bool)> {
        let err = |e: tokenizers::Error| Error::Tokenizer {
            origin: self.origin.clone(),
            reason: e.to_string(),
        };
        let (mut ids, truncated) = match self.style {
            TextStyle::Bert => {
                let enc = self.tokenizer.encode(text, true).map_err(err)?;
                let mut ids = enc.get_ids().to_vec();
                let truncated = ids.len() > self.max_len;
                if truncated {
                    // Keep [CLS] and the first tokens, end with [SEP] as HF truncation does.
                    let sep = *ids.last().unwrap_or(&self.pad_id);
                    ids.truncate(self.max_len - 1);
                    ids.push(sep);
                }
                (ids, truncated)
            }
            TextStyle::Gemma => {
                let lower = text.to_lowercase();
                let enc = self.tokenizer.encode(lower.as_str(), false).map_err(err)?;
                let mut ids = enc.get_ids().to_vec();
                let truncated = ids.len() + 1 > self.max_len;
                ids.truncate(self.max_len - 1);
                if let Some(eos) = self.eos_id {
                    ids.push(eos);
                }
                (ids, truncated)
            }
        };
        ids.resize(self.max_len, self.pad_id);
        Ok((ids, truncated))
    }

    /// Tokenises a batch. Empty strings are allowed (they become special tokens only);
    /// an empty batch is an error.
    pub fn encode_batch(&self, texts: &[&str], device: &Device) -> Result<TokenizedBatch> {
        if texts.is_empty() {
            return Err(Error::Text("empty list of texts".into()));
        }
        let mut ids = Vec::with_capacity(texts.len());
        let mut truncated = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            let (v, cut) = self.encode(t)?;
            if cut {
                truncated.push(i);
            }
            ids.push(v);
        }
        let n = ids.len();
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let mask: Vec<u32> = self.mask_of(&ids).into_iter().flatten().collect();
        Ok(TokenizedBatch {
            input_ids: Tensor::from_vec(flat, (n, self.max_len), device)?,
            attention_mask: Tensor::from_vec(mask, (n, self.max_len), device)?,
            truncated,
            ids,
        })
    }

    fn mask_of(&self, ids: &[Vec<u32>]) -> Vec<Vec<u32>> {
        ids.iter()
            .map(|row| {
                // Real tokens are everything up to the last non-pad id.
                let len = row
                    .iter()
                    .rposition(|&t| t != self.pad_id)
                    .map_or(0, |p| p + 1);
                (0..row.len()).map(|i| u32::from(i < len)).collect()
            })
            .collect()
    }
}

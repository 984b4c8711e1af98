//! PyTorch `.pth` (zip) to `.safetensors` conversion, for any state dict.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::DType;

use super::{matches_pattern, open_pth, pth_top_level_keys, save_safetensors};
use crate::error::{Error, Result};

/// The dtype of the converted floating-point tensors (integer tensors are always kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetDtype {
    /// As stored.
    #[default]
    Keep,
    F32,
    F16,
    Bf16,
}

impl std::str::FromStr for TargetDtype {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "keep" => Ok(Self::Keep),
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(Error::InvalidArgument(format!(
                "unknown dtype `{other}` (use keep, f32, f16 or bf16)"
            ))),
        }
    }
}

/// What to convert.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// The nested state dict to take (`model`, `learnable`, `state_dict`, ...); `None`
    /// detects it: the first of those that holds tensors, else the top level.
    pub key: Option<String>,
    pub dtype: TargetDtype,
    /// Tensors whose names match any pattern are left out (substring, or a prefix when the
    /// pattern ends with `*`).
    pub skip: Vec<String>,
    /// Write the readable tensors when some cannot be read (a dtype candle has no type
    /// for, such as int8 or bool, or a corrupt view); they are listed in
    /// [`ConvertReport::unsupported`]. When `false` (the default) such a tensor that `skip`
    /// does not leave out fails the conversion, and the error names every one with why.
    pub allow_unsupported: bool,
}

/// What a conversion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertReport {
    /// The nested key that was read (`None`: the top-level state dict).
    pub key: Option<String>,
    pub written: usize,
    /// Tensors left out by [`ConvertOptions::skip`], readable or not.
    pub skipped: Vec<String>,
    /// Tensors that could not be read and were not skipped, `(name, reason)` (only with
    /// [`ConvertOptions::allow_unsupported`]). Every tensor of the state dict is written,
    /// skipped, or named here.
    pub unsupported: Vec<(String, String)>,
    pub output: PathBuf,
}

/// The tensors of a `.pth` state dict, as [`list_pth`] finds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PthListing {
    /// The nested key that was read (`None`: the top-level state dict).
    pub key: Option<String>,
    /// The readable tensors `(name, shape, dtype)`, sorted by name.
    pub tensors: Vec<(String, Vec<usize>, DType)>,
    /// The tensors that cannot be read, `(name, reason)`, sorted by name.
    pub unsupported: Vec<(String, String)>,
}

/// The nested key [`convert_pth`] would read when none is given.
pub fn detect_key(input: &Path) -> Result<Option<String>> {
    // The keys come in the order of preference.
    Ok(pth_top_level_keys(input)?.into_iter().next())
}

/// The tensors of a `.pth` under `key` (or the detected key), readable or not.
pub fn list_pth(input: &Path, key: Option<&str>) -> Result<PthListing> {
    let key = match key {
        Some(k) => Some(k.to_string()),
        None => detect_key(input)?,
    };
    let src = open_pth(input, key.as_deref())?;
    let super::TensorSource::Pth(p) = &src else {
        return Err(Error::InvalidArgument("not a .pth source".into()));
    };
    // The reader's maps are sorted by name.
    let tensors = p
        .tensor_infos()
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone(), v.dtype))
        .collect();
    Ok(PthListing {
        key,
        tensors,
        unsupported: p.unsupported().to_vec(),
    })
}

/// Converts a PyTorch zip checkpoint to one safetensors file, written atomically. The
/// metadata records the source file name and the key.
pub fn convert_pth(input: &Path, output: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    if input == output {
        return Err(Error::InvalidArgument(
            "input and output are the same file".into(),
        ));
    }
    let key = match &opts.key {
        Some(k) => Some(k.clone()),
        None => detect_key(input)?,
    };
    let src = open_pth(input, key.as_deref())?;
    let skip = |name: &str| opts.skip.iter().any(|p| matches_pattern(name, p));
    let mut skipped = Vec::new();
    let mut unsupported = Vec::new();
    for (name, reason) in src.unsupported() {
        if skip(&name) {
            skipped.push(name);
        } else {
            unsupported.push((name, reason));
        }
    }
    if !unsupported.is_empty() && !opts.allow_unsupported {
        let list: Vec<String> = unsupported
            .iter()
            .map(|(name, reason)| format!("`{name}`: {reason}"))
            .collect();
        return Err(Error::Checkpoint {
            path: input.to_path_buf(),
            reason: format!(
                "{} tensor(s) cannot be converted: {}; skip them, or allow unsupported \
                 tensors (`--allow-unsupported`) to write the others",
                unsupported.len(),
                list.join("; ")
            ),
        });
    }
    let mut tensors = BTreeMap::new();
    for name in src.shapes().into_keys() {
        if skip(&name) {
            skipped.push(name);
            continue;
        }
        let t = src
            .load(&name)
            .map_err(|e| Error::Checkpoint {
                path: input.to_path_buf(),
                reason: e.to_string(),
            })?
            .ok_or_else(|| Error::Checkpoint {
                path: input.to_path_buf(),
                reason: format!("tensor `{name}` is listed but cannot be read"),
            })?;
        let t = if t.dtype().is_float() {
            match opts.dtype {
                TargetDtype::Keep => t,
                TargetDtype::F32 => t.to_dtype(DType::F32)?,
                TargetDtype::F16 => t.to_dtype(DType::F16)?,
                TargetDtype::Bf16 => t.to_dtype(DType::BF16)?,
            }
        } else {
            t
        };
        tensors.insert(name, t);
    }
    if tensors.is_empty() {
        return Err(Error::Checkpoint {
            path: input.to_path_buf(),
            reason: if unsupported.is_empty() {
                "no tensors left to write".into()
            } else {
                format!(
                    "no tensors left to write ({} cannot be read)",
                    unsupported.len()
                )
            },
        });
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    if let Some(name) = input.file_name() {
        meta.insert("source".to_string(), name.to_string_lossy().to_string());
    }
    if let Some(k) = &key {
        meta.insert("source_key".to_string(), k.clone());
    }
    save_safetensors(&tensors, Some(meta), output)?;
    skipped.sort();
    Ok(ConvertReport {
        key,
        written: tensors.len(),
        skipped,
        unsupported,
        output: output.to_path_buf(),
    })
}

//! Presets for every published checkpoint, and [`load`], which opens a model by preset
//! name or local path.

use std::path::{Path, PathBuf};

use crate::checkpoint::discover;
use crate::error::{Error, Result};
use crate::models::brivl::{self, BrivlEncoder};
use crate::models::cnclip::{self, ChineseClipEncoder};
use crate::models::r2d2::{self, R2d2Encoder};
use crate::models::siglip2::{self, SiglipEncoder};
use crate::models::{DualEncoder, Family, LoadOptions};

/// A published checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preset {
    /// The name users pass to [`load`].
    pub name: String,
    pub family: Family,
    /// The Hugging Face repository it is downloaded from.
    pub repo: String,
}

/// Every preset the crate knows.
pub fn presets() -> Vec<Preset> {
    let mut out: Vec<Preset> = siglip2::PRESETS
        .iter()
        .map(|n| Preset {
            name: n.to_string(),
            family: if n.ends_with("naflex") {
                Family::Siglip2Naflex
            } else {
                Family::Siglip
            },
            repo: format!("google/{n}"),
        })
        .collect();
    out.extend(brivl::PRESETS.iter().map(|p| Preset {
        name: p.name.to_string(),
        family: Family::Brivl,
        // Empty when there is no Hub mirror (see `brivl::PRESETS` for where it comes from).
        repo: p.hub.map(|(repo, _)| repo.to_string()).unwrap_or_default(),
    }));
    // R2D2 / PRD2: `repo` is the Google Drive URL (the files must be fetched by hand).
    out.extend(r2d2::PRESETS.iter().map(|p| Preset {
        name: p.name.to_string(),
        family: p.family,
        repo: p.url.to_string(),
    }));
    out.extend(cnclip::PRESETS.iter().map(|p| Preset {
        name: p.name.to_string(),
        family: Family::ChineseClip,
        repo: p.repo.to_string(),
    }));
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Finds a preset by name.
pub fn preset(name: &str) -> Result<Preset> {
    presets()
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| Error::UnknownPreset {
            name: name.to_string(),
            known: presets()
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Opens a model from a preset name (downloaded through the Hub cache) or a local
/// directory or checkpoint file.
pub fn load(spec: &str, opts: &LoadOptions) -> Result<Box<dyn DualEncoder>> {
    let model = load_untuned(spec, opts)?;
    after_load(opts);
    Ok(model)
}

/// Applies [`crate::allocator::tune_allocator`] when `opts` ask for it and the model is
/// on the CPU.
fn after_load(opts: &LoadOptions) {
    if opts.tune_allocator && opts.device.is_cpu() {
        crate::allocator::tune_allocator();
    }
}

fn load_untuned(spec: &str, opts: &LoadOptions) -> Result<Box<dyn DualEncoder>> {
    let path = Path::new(spec);
    if path.exists() {
        return load_path_untuned(path, opts);
    }
    let p = match preset(spec) {
        Ok(p) => p,
        Err(_) if looks_like_path(spec) => {
            return Err(Error::io(
                format!("opening model {spec}"),
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ))
        }
        Err(e) => return Err(e),
    };
    if p.family == Family::Brivl {
        // The weights (a .pth) and the tokenizer live in different repositories.
        return Ok(Box::new(BrivlEncoder::from_preset(&p.name, opts)?));
    }
    if p.family == Family::ChineseClip {
        // The RN50's checkpoint and vocabulary live in different repositories.
        return Ok(Box::new(ChineseClipEncoder::from_preset(&p.name, opts)?));
    }
    if matches!(p.family, Family::R2d2 | Family::Prd2) {
        return load_path_untuned(&r2d2::locate_preset(&p.name)?, opts);
    }
    let dir = download_preset(&p)?;
    load_path_untuned(&dir, opts)
}

/// Opens a model from a local directory, or a checkpoint file of a family that can be
/// recognised by its tensor names (BriVL: a `.pth` with `learnable`, or a `.safetensors`
/// with `imgencoder.*` tensors; R2D2 / PRD2: `.pth` with `model`, or `.safetensors` with
/// `visual_encoder.*` tensors, or a directory holding one); see
/// [`discover::identify`].
pub fn load_path(path: &Path, opts: &LoadOptions) -> Result<Box<dyn DualEncoder>> {
    let model = load_path_untuned(path, opts)?;
    after_load(opts);
    Ok(model)
}

fn load_path_untuned(path: &Path, opts: &LoadOptions) -> Result<Box<dyn DualEncoder>> {
    Ok(match discover::identify(path)? {
        Some(Family::Brivl) => Box::new(BrivlEncoder::from_path(path, opts)?),
        Some(Family::R2d2 | Family::Prd2) => Box::new(R2d2Encoder::from_path(path, opts)?),
        Some(Family::Siglip | Family::Siglip2Naflex) => {
            Box::new(SiglipEncoder::from_dir(path, opts)?)
        }
        Some(Family::ChineseClip) => Box::new(ChineseClipEncoder::from_path(path, opts)?),
        None => return Err(unrecognised(path)),
    })
}

/// Why a local path that [`discover::identify`] did not recognise cannot be loaded: the
/// checkpoint's own read error (truncated, corrupt), or what it holds instead.
fn unrecognised(path: &Path) -> Error {
    if path.is_file() {
        if !discover::is_safetensors(path) && !discover::is_pth(path) {
            return Error::Checkpoint {
                path: path.to_path_buf(),
                reason: format!(
                    "unknown checkpoint extension (expected one of {})",
                    discover::CHECKPOINT_EXTENSIONS.join(", ")
                ),
            };
        }
        return match crate::checkpoint::TensorSource::open(path, None) {
            Err(e) => e,
            Ok(src) => {
                let names: Vec<String> = src.shapes().into_keys().take(3).collect();
                Error::WrongFamily {
                    path: path.to_path_buf(),
                    expected: "a BriVL, R2D2/PRD2, SigLIP or Chinese-CLIP checkpoint".into(),
                    found: format!("tensors of no known family ({}, ...)", names.join(", ")),
                }
            }
        };
    }
    Error::Config(format!(
        "{} is a directory with no config.json and no recognisable checkpoint",
        path.display()
    ))
}

/// Whether `spec` reads as a file-system path rather than a preset name.
fn looks_like_path(spec: &str) -> bool {
    spec.contains('/')
        || spec.contains(std::path::MAIN_SEPARATOR)
        || spec.starts_with('.')
        || spec.starts_with('~')
        || Path::new(spec)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| discover::CHECKPOINT_EXTENSIONS.contains(&e))
}

/// Downloads (or finds in the cache) the files of a preset and returns the directory
/// that holds them.
#[cfg(feature = "hub")]
pub fn download_preset(p: &Preset) -> Result<PathBuf> {
    use crate::checkpoint::hub;
    match p.family {
        Family::Siglip | Family::Siglip2Naflex => {
            let config = hub::fetch(&p.repo, "config.json", true)?;
            if siglip2::SiglipConfig::from_json_file(&config).is_err() {
                return Err(Error::Config(format!(
                    "{}: config.json is not a SigLIP config",
                    p.repo
                )));
            }
            hub::fetch(&p.repo, "tokenizer.json", true)?;
            hub::fetch_optional(&p.repo, "preprocessor_config.json", false)?;
            if hub::fetch_optional(&p.repo, "model.safetensors", true)?.is_none() {
                let index = hub::fetch(&p.repo, "model.safetensors.index.json", false)?;
                for shard in discover::safetensors_files(index.parent().unwrap_or(Path::new(".")))?
                {
                    let name = shard
                        .file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default();
                    hub::fetch(&p.repo, &name, true)?;
                }
            }
            Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
        }
        Family::ChineseClip if p.name == cnclip::RN50_PRESET => {
            let (checkpoint, _vocab) = cnclip::download_rn50()?;
            Ok(checkpoint
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default())
        }
        Family::ChineseClip => cnclip::download_folder(&p.repo),
        other => Err(Error::Config(format!(
            "no download recipe for the {other} family"
        ))),
    }
}

/// Without the `hub` feature presets cannot be downloaded.
#[cfg(not(feature = "hub"))]
pub fn download_preset(p: &Preset) -> Result<PathBuf> {
    Err(Error::Download {
        repo: p.repo.clone(),
        file: String::new(),
        reason: "built without the `hub` feature; pass a local directory instead".into(),
    })
}

//! Checkpoint discovery: which model family a file or directory holds, and where its
//! weights, configuration and hand-downloaded files are.
//!
//! * [`family_of_keys`] recognises a family from tensor names, and [`describe_keys`] says
//!   what a foreign checkpoint looks like for an [`Error::WrongFamily`].
//! * [`open_checkpoint`] opens a `.safetensors` or `.pth` file as the family a [`Layout`]
//!   describes (BriVL: [`BRIVL`], R2D2 / PRD2: [`R2D2`]), [`sniff`] only asks whether it is
//!   one.
//! * [`checkpoint_candidates`], [`only_checkpoint`], [`first_checkpoint`] and
//!   [`safetensors_files`] find the weights of a model directory; [`read_model_type`] and
//!   [`brivl_config_in_dir`] its configuration.
//! * [`identify`] puts these together for [`crate::registry::load_path`].
//! * [`weights_dir`] and [`locate_in_weights_dir`] find checkpoints that must be downloaded
//!   by hand.

use std::path::{Path, PathBuf};

use super::{open_pth, open_safetensors, pth_top_level_keys, TensorSource};
use crate::error::{Error, Result};

/// The supported model families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// SigLIP / SigLIP 2 at a fixed resolution (HF `SiglipModel`).
    Siglip,
    /// SigLIP 2 NaFlex (HF `Siglip2Model`).
    Siglip2Naflex,
    /// BriVL (WenLan 1.0).
    Brivl,
    /// R2D2 (dual encoder plus cross-encoder re-ranking).
    R2d2,
    /// PRD2 (R2D2's dual encoder without joint layers).
    Prd2,
    /// Chinese-CLIP (HF `ChineseCLIPModel`).
    ChineseClip,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Siglip => "SigLIP (fixed resolution)",
            Family::Siglip2Naflex => "SigLIP 2 NaFlex",
            Family::Brivl => "BriVL",
            Family::R2d2 => "R2D2",
            Family::Prd2 => "PRD2",
            Family::ChineseClip => "Chinese-CLIP",
        })
    }
}

/// Every extension a checkpoint file may have.
pub const CHECKPOINT_EXTENSIONS: &[&str] = &["safetensors", "pth", "pt", "bin", "ckpt"];

/// Whether `path` names a PyTorch zip checkpoint (`.pth`, `.pt`, `.bin`, `.ckpt`).
pub fn is_pth(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("pth" | "pt" | "bin" | "ckpt")
    )
}

/// Whether `path` names a safetensors file.
pub fn is_safetensors(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("safetensors")
}

/// The family that checkpoint tensor names belong to: R2D2 / PRD2 (`visual_encoder.*`,
/// `text_encoder.*` and `vision_proj.*`, with `text_joint_layer.*` for R2D2), BriVL
/// (`imgencoder.backbone.*` / `textencoder.backbone.*`) or a cn_clip Chinese-CLIP
/// (`module.visual.*`, `module.bert.*`, `module.text_projection`); `None` for anything else.
pub fn family_of_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Option<Family> {
    let (mut vision, mut text, mut proj, mut joint, mut brivl) =
        (false, false, false, false, false);
    let keys: Vec<&str> = keys.into_iter().collect();
    if is_cn_clip_keys(keys.iter().copied()) {
        return Some(Family::ChineseClip);
    }
    for k in keys {
        vision |= k.starts_with("visual_encoder.embeddings.");
        text |= k.starts_with("text_encoder.embeddings.");
        proj |= k.starts_with("vision_proj.");
        joint |= k.starts_with("text_joint_layer.encoder.");
        brivl |= k.starts_with("imgencoder.backbone.") || k.starts_with("textencoder.backbone.");
    }
    match (vision && text && proj, joint) {
        (true, true) => Some(Family::R2d2),
        (true, false) => Some(Family::Prd2),
        _ if brivl => Some(Family::Brivl),
        _ => None,
    }
}

/// Whether `keys` are a cn_clip `CLIP` state dict (with or without `module.`).
pub fn is_cn_clip_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> bool {
    let (mut visual, mut bert, mut proj) = (false, false, false);
    for k in keys {
        let k = k.strip_prefix("module.").unwrap_or(k);
        visual |= k.starts_with("visual.");
        bert |= k.starts_with("bert.embeddings.");
        proj |= k == "text_projection";
    }
    visual && bert && proj
}

/// What a set of tensor names held in `container` (e.g. `"a safetensors file"`) looks
/// like, for [`Error::WrongFamily`]: the count, the top-level prefixes and a guess of the
/// family.
pub fn describe_keys<'a>(keys: impl IntoIterator<Item = &'a str>, container: &str) -> String {
    let keys: Vec<&str> = keys.into_iter().collect();
    let mut prefixes: Vec<&str> = keys
        .iter()
        .map(|k| k.split('.').next().unwrap_or(k))
        .collect();
    prefixes.sort_unstable();
    prefixes.dedup();
    let has = |p: &str| prefixes.contains(&p);
    let guess = match family_of_keys(keys.iter().copied()) {
        Some(f) => format!(" (looks like {f})"),
        None if has("visual_encoder") && has("text_encoder") => " (looks like R2D2 / PRD2)".into(),
        None if has("imgencoder") || has("textencoder") => " (looks like BriVL)".into(),
        None if has("vision_model") && has("text_model") => " (looks like SigLIP / CLIP)".into(),
        None => String::new(),
    };
    let shown: Vec<&str> = prefixes.iter().take(12).copied().collect();
    format!(
        "{container} with {} tensors under {}{}{guess}",
        keys.len(),
        shown.join(", "),
        if prefixes.len() > shown.len() {
            ", ..."
        } else {
            ""
        }
    )
}

/// How the checkpoints of a family are stored and recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The families whose tensors are accepted.
    pub families: &'static [Family],
    /// The key of the nested state dict in a `.pth` (a flat state dict is accepted too).
    pub pth_key: &'static str,
    /// The extensions of the files searched in a model directory.
    pub extensions: &'static [&'static str],
    /// What is expected, as [`Error::WrongFamily`] says it.
    pub expected: &'static str,
}

/// BriVL: `{'learnable': state_dict}` in a `.pth`, or a converted `.safetensors`.
pub const BRIVL: Layout = Layout {
    families: &[Family::Brivl],
    pth_key: "learnable",
    extensions: CHECKPOINT_EXTENSIONS,
    expected: "BriVL (tensors imgencoder.* / textencoder.*, in a .pth under 'learnable')",
};

/// R2D2 and PRD2: `{'model': state_dict, ...}` in a `.pth`, or a converted `.safetensors`.
pub const R2D2: Layout = Layout {
    families: &[Family::R2d2, Family::Prd2],
    pth_key: "model",
    extensions: &["safetensors", "pth"],
    expected: "R2D2 or PRD2 (a 'model' state dict with visual_encoder.*, text_encoder.*, \
               vision_proj.*)",
};

/// Chinese-CLIP as cn_clip releases it: `{'state_dict': {'module.visual.…', …}, …}` in a
/// `.pt`.
pub const CN_CLIP: Layout = Layout {
    families: &[Family::ChineseClip],
    pth_key: "state_dict",
    extensions: &["pt", "pth"],
    expected: "Chinese-CLIP as cn_clip saves it (a 'state_dict' with module.visual.*, \
               module.bert.*, module.text_projection)",
};

/// Opens a checkpoint of the family `layout` describes: a `.safetensors` file, or a `.pth`
/// with the state dict under [`Layout::pth_key`] or at the top level. Anything else is
/// [`Error::WrongFamily`] saying what the file holds; a file that is not a readable
/// checkpoint is [`Error::Checkpoint`].
pub fn open_checkpoint(path: &Path, layout: &Layout) -> Result<(TensorSource, Family)> {
    let accept = |source: TensorSource, container: &str| {
        let shapes = source.shapes();
        match family_of_keys(shapes.keys().map(String::as_str)) {
            Some(f) if layout.families.contains(&f) => Ok((source, f)),
            _ => Err(wrong_family(path, layout, &shapes, container)),
        }
    };
    if is_safetensors(path) {
        return accept(
            open_safetensors(&[path.to_path_buf()])?,
            "a safetensors file",
        );
    }
    let key = layout.pth_key;
    match open_pth(path, Some(key)) {
        Ok(source) => accept(source, &format!("a .pth whose '{key}' dict")),
        Err(first @ Error::Checkpoint { .. }) => {
            // Not under the family's key: another family's nesting, or a flat state dict.
            if let Some(k) = pth_top_level_keys(path)?.first() {
                let shapes = open_pth(path, Some(k))?.shapes();
                let container = format!("a .pth whose '{k}' dict");
                return Err(wrong_family(path, layout, &shapes, &container));
            }
            match open_pth(path, None) {
                Ok(source) => accept(source, "a .pth state dict"),
                // Not a readable checkpoint at all: the first error says why.
                Err(_) => Err(first),
            }
        }
        Err(e) => Err(e),
    }
}

fn wrong_family(
    path: &Path,
    layout: &Layout,
    shapes: &std::collections::BTreeMap<String, Vec<usize>>,
    container: &str,
) -> Error {
    Error::WrongFamily {
        path: path.to_path_buf(),
        expected: layout.expected.into(),
        found: describe_keys(shapes.keys().map(String::as_str), container),
    }
}

/// The family of a checkpoint file if it is one of `layout`'s; `Ok(None)` for other
/// checkpoints and for files that are not checkpoints.
pub fn sniff(path: &Path, layout: &Layout) -> Result<Option<Family>> {
    match open_checkpoint(path, layout) {
        Ok((_, f)) => Ok(Some(f)),
        Err(Error::WrongFamily { .. }) | Err(Error::Checkpoint { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The checkpoint files of a directory with one of `extensions`: `model.safetensors`
/// first, then the others by name.
pub fn checkpoint_candidates(dir: &Path, extensions: &[&str]) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| extensions.contains(&e))
        })
        .collect();
    files.sort_by_key(|p| {
        (
            p.file_name() != Some("model.safetensors".as_ref()),
            p.clone(),
        )
    });
    Ok(files)
}

/// The checkpoint of a model directory: `model.safetensors`, else the only file with one
/// of `extensions`; `Ok(None)` when there is none, an error when there are several.
pub fn only_checkpoint(dir: &Path, extensions: &[&str]) -> Result<Option<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(Some(single));
    }
    let mut found = checkpoint_candidates(dir, extensions)?;
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: format!(
                "several checkpoint files ({}); keep one or name it model.safetensors",
                found
                    .iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// The first checkpoint of a directory (in [`checkpoint_candidates`] order) that opens as
/// `layout`'s family.
pub fn first_checkpoint(dir: &Path, layout: &Layout) -> Result<PathBuf> {
    checkpoint_candidates(dir, layout.extensions)?
        .into_iter()
        .find(|p| open_checkpoint(p, layout).is_ok())
        .ok_or_else(|| Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: format!(
                "no checkpoint of the expected family in the directory (expected {})",
                layout.expected
            ),
        })
}

/// The safetensors weight files of a Hugging Face model directory: `model.safetensors`, or
/// the shards that `model.safetensors.index.json` lists.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(&index)?;
        let mut files: Vec<String> = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::parse(index.display().to_string(), "no weight_map"))?
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    Err(Error::Checkpoint {
        path: dir.to_path_buf(),
        reason: "no model.safetensors or model.safetensors.index.json in the directory".into(),
    })
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    serde_json::from_str(&s).map_err(|e| Error::parse(path.display().to_string(), e))
}

/// The `model_type` of a `config.json` (empty when it has none).
pub fn read_model_type(path: &Path) -> Result<String> {
    Ok(read_json(path)?
        .get("model_type")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_string())
}

/// The BriVL config file of a directory: `config.yaml` / `config.yml`, or a `config.json`
/// that mentions BriVL's keys (a BERT or SigLIP `config.json` is not one).
pub fn brivl_config_in_dir(dir: &Path) -> Option<PathBuf> {
    for name in ["config.yaml", "config.yml"] {
        let p = dir.join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).ok()?;
    text.contains("IMG_FEATURE_DIM").then_some(p)
}

/// Whether `path` is a BriVL checkpoint file, or a directory holding one (or a BriVL
/// config).
pub fn is_brivl_path(path: &Path) -> bool {
    if path.is_file() {
        return open_checkpoint(path, &BRIVL).is_ok();
    }
    if path.is_dir() {
        return brivl_config_in_dir(path).is_some() || first_checkpoint(path, &BRIVL).is_ok();
    }
    false
}

/// R2D2 or PRD2 if `path` is such a checkpoint file, or a directory holding one (with a
/// `config.json` of model_type `r2d2` / `prd2`, or none); `Ok(None)` for anything else.
pub fn r2d2_family_of_path(path: &Path) -> Result<Option<Family>> {
    if path.is_dir() {
        let cfg = path.join("config.json");
        if cfg.exists() {
            return Ok(match read_model_type(&cfg)?.as_str() {
                "r2d2" => Some(Family::R2d2),
                "prd2" => Some(Family::Prd2),
                _ => None,
            });
        }
        return match only_checkpoint(path, R2D2.extensions) {
            Ok(Some(f)) => sniff(&f, &R2D2),
            _ => Ok(None),
        };
    }
    if path.is_file() {
        return sniff(path, &R2D2);
    }
    Ok(None)
}

/// The family a local path holds, tried in this order: BriVL ([`is_brivl_path`]), R2D2 /
/// PRD2 ([`r2d2_family_of_path`]), a cn_clip checkpoint (or a directory holding one and no
/// `config.json`), then a directory whose `config.json` has model_type
/// `siglip` or `siglip2` (any other model_type is [`Error::WrongFamily`]). `Ok(None)`: none
/// of these.
pub fn identify(path: &Path) -> Result<Option<Family>> {
    if is_brivl_path(path) {
        return Ok(Some(Family::Brivl));
    }
    if let Some(f) = r2d2_family_of_path(path)? {
        return Ok(Some(f));
    }
    let config = path.join("config.json");
    if !config.exists() {
        let file = if path.is_dir() {
            only_checkpoint(path, CN_CLIP.extensions).ok().flatten()
        } else {
            Some(path.to_path_buf())
        };
        if let Some(f) = file.filter(|f| is_pth(f)) {
            if sniff(&f, &CN_CLIP)?.is_some() {
                return Ok(Some(Family::ChineseClip));
            }
        }
    }
    if path.is_dir() && config.exists() {
        return match read_model_type(&config)?.as_str() {
            "siglip" => Ok(Some(Family::Siglip)),
            "siglip2" => Ok(Some(Family::Siglip2Naflex)),
            "chinese_clip" => Ok(Some(Family::ChineseClip)),
            other => Err(Error::WrongFamily {
                found: format!("model_type `{other}`"),
                path: config,
                expected: "a supported model_type (siglip, siglip2, chinese_clip)".into(),
            }),
        };
    }
    Ok(None)
}

/// The directory searched for hand-downloaded checkpoints: `$TUWEN_WEIGHTS_DIR`, else
/// `$XDG_CACHE_HOME/tuwen`, else `~/.cache/tuwen`.
pub fn weights_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("TUWEN_WEIGHTS_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("tuwen"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("tuwen"))
}

/// Finds the hand-downloaded checkpoint `name` in [`weights_dir`]: `<name>.safetensors`,
/// `<name>.pth`, or `original_file` (the authors' file name). When there is none, an
/// [`Error::Download`] says that `description` is published at `url` only and where to put
/// the file.
pub fn locate_in_weights_dir(
    name: &str,
    original_file: Option<&str>,
    description: &str,
    url: &str,
) -> Result<PathBuf> {
    let dir = weights_dir();
    if let Some(dir) = &dir {
        let mut names = vec![format!("{name}.safetensors"), format!("{name}.pth")];
        names.extend(original_file.map(str::to_string));
        for n in names {
            let f = dir.join(n);
            if f.is_file() {
                return Ok(f);
            }
        }
    }
    let target = dir
        .map(|d| d.join(format!("{name}.pth")).display().to_string())
        .unwrap_or_else(|| format!("$TUWEN_WEIGHTS_DIR/{name}.pth"));
    Err(Error::Download {
        repo: url.into(),
        file: format!("{name}.pth"),
        reason: format!(
            "{description} is published on Google Drive only and cannot be downloaded \
             automatically: fetch it manually from {url} and either pass the file's path \
             instead of the preset name, or save it as {target}"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_from_keys() {
        // R2D2 and PRD2: see `models::r2d2`'s tests.
        assert_eq!(
            family_of_keys(["imgencoder.backbone.x", "textencoder.learnable.y"]),
            Some(Family::Brivl)
        );
        assert_eq!(family_of_keys(["vision_model.x", "text_model.y"]), None);
    }

    #[test]
    fn descriptions_guess_the_family() {
        let d = describe_keys(["vision_model.a", "text_model.b"], "a safetensors file");
        assert_eq!(
            d,
            "a safetensors file with 2 tensors under text_model, vision_model (looks like \
             SigLIP / CLIP)"
        );
        let d = describe_keys(["imgencoder.backbone.a"], "a .pth whose 'learnable' dict");
        assert!(d.ends_with("(looks like BriVL)"), "{d}");
        let keys: Vec<String> = (0..20).map(|i| format!("p{i:02}.w")).collect();
        let d = describe_keys(keys.iter().map(String::as_str), "x");
        assert!(d.ends_with("p11, ..."), "{d}");
    }

    #[test]
    fn extensions() {
        assert!(is_pth(Path::new("a/b.pth")) && is_pth(Path::new("c.ckpt")));
        assert!(!is_pth(Path::new("model.safetensors")));
        assert!(is_safetensors(Path::new("model.safetensors")));
    }
}

//! Downloads from the Hugging Face Hub through `hf-hub`, with its cache and progress bars.
//!
//! `HF_ENDPOINT` selects a mirror, `HF_HOME` the cache, and `HF_HUB_OFFLINE=1` uses only
//! what is already cached.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// Whether `HF_HUB_OFFLINE` asks for cache-only operation.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
        .unwrap_or(false)
}

/// Fetches `file` from the model repository `repo` (`owner/name`), using the cache when it
/// holds the file, and returns its local path. Shows a progress bar when `progress` is set
/// and standard error is a terminal.
pub fn fetch(repo: &str, file: &str, progress: bool) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    if let Some(p) = cache.model(repo.to_string()).get(file) {
        return Ok(p);
    }
    if offline() {
        return Err(Error::Download {
            repo: repo.into(),
            file: file.into(),
            reason: "HF_HUB_OFFLINE is set and the file is not in the cache".into(),
        });
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(progress && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .build()
        .map_err(|e| Error::Download {
            repo: repo.into(),
            file: file.into(),
            reason: e.to_string(),
        })?;
    api.model(repo.to_string())
        .get(file)
        .map_err(|e| Error::Download {
            repo: repo.into(),
            file: file.into(),
            reason: e.to_string(),
        })
}

/// Fetches a file if the repository has it; `Ok(None)` when the server says it is absent.
pub fn fetch_optional(repo: &str, file: &str, progress: bool) -> Result<Option<PathBuf>> {
    match fetch(repo, file, progress) {
        Ok(p) => Ok(Some(p)),
        Err(Error::Download { reason, .. })
            if reason.contains("404") || reason.contains("not in the cache") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

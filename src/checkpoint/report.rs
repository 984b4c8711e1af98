//! Reporting what a [`LoadReport`] found: warnings for the command-line tools and the
//! strict check of [`crate::LoadOptions::strict`].

use std::path::PathBuf;

use super::LoadReport;
use crate::error::{Error, Result};

/// How many key names a message lists before it says "and N more".
const LISTED: usize = 8;

fn list(keys: &[String]) -> String {
    let mut s = keys
        .iter()
        .take(LISTED)
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > LISTED {
        s.push_str(&format!(" and {} more", keys.len() - LISTED));
    }
    s
}

impl LoadReport {
    /// A warning naming the checkpoint keys the model did not use (`None` when it used
    /// them all): a config with fewer layers than the checkpoint, or a checkpoint of
    /// another variant, shows up here.
    pub fn warning(&self) -> Option<String> {
        (!self.unexpected.is_empty()).then(|| {
            format!(
                "{} checkpoint tensor(s) were not used by the model: {} (a config that does \
                 not match the checkpoint? --strict makes this an error)",
                self.unexpected.len(),
                list(&self.unexpected)
            )
        })
    }

    /// A note naming the keys that were left unused on purpose (optimiser state,
    /// `position_ids`, ...), `None` when there are none.
    pub fn note(&self) -> Option<String> {
        (!self.ignored.is_empty()).then(|| {
            format!(
                "{} checkpoint tensor(s) are not part of the inference model and were skipped: {}",
                self.ignored.len(),
                list(&self.ignored)
            )
        })
    }

    /// An [`Error::Checkpoint`] when any key was unused (the strict check).
    pub fn check_strict(&self, source: &str) -> Result<()> {
        match self.unexpected.is_empty() {
            true => Ok(()),
            false => Err(Error::Checkpoint {
                path: PathBuf::from(source),
                reason: format!(
                    "strict loading: {} tensor(s) are not used by the model: {}",
                    self.unexpected.len(),
                    list(&self.unexpected)
                ),
            }),
        }
    }
}

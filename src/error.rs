//! Typed errors for every fallible operation in the crate.

use std::path::PathBuf;

/// The crate's error type.
///
/// Every variant names the thing that went wrong (a tensor key, a file, a preset), so that a
/// message is enough to find the problem without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor the model needs is absent from the checkpoint.
    #[error("checkpoint {source_name}: missing tensor `{key}` (expected shape {expected:?})")]
    MissingTensor {
        source_name: String,
        key: String,
        expected: Vec<usize>,
    },

    /// A tensor is present but has the wrong shape.
    #[error("checkpoint {source_name}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        source_name: String,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// The checkpoint is for a different model family than the one asked for.
    #[error("checkpoint {path}: expected a {expected} checkpoint, found {found}")]
    WrongFamily {
        path: PathBuf,
        expected: String,
        found: String,
    },

    /// A checkpoint file could not be parsed (truncated, corrupt, or an unknown format).
    #[error("cannot read checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    /// A preset name that the registry does not know.
    #[error("unknown model preset `{name}` (and no file or directory of that name exists); known presets: {known}")]
    UnknownPreset { name: String, known: String },

    /// A configuration that cannot be used as given.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// An image that cannot be decoded or used.
    #[error("image {origin}: {reason}")]
    Image { origin: String, reason: String },

    /// Bounding boxes that are NaN, inverted or outside the image.
    #[error("invalid box {index} {value:?} for image {origin}: {reason}")]
    InvalidBox {
        origin: String,
        index: usize,
        value: [f32; 4],
        reason: String,
    },

    /// A text input that cannot be used (empty batch, empty string where one is not allowed).
    #[error("text input: {0}")]
    Text(String),

    /// Tokenizer loading or encoding failed.
    #[error("tokenizer {origin}: {reason}")]
    Tokenizer { origin: String, reason: String },

    /// An argument that is out of range or inconsistent with another one.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Downloading from the Hugging Face Hub failed.
    #[error("download of {repo}/{file} failed: {reason}")]
    Download {
        repo: String,
        file: String,
        reason: String,
    },

    /// A file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// JSON, YAML or TOML that cannot be parsed.
    #[error("cannot parse {origin}: {reason}")]
    Parse { origin: String, reason: String },

    /// Training stopped because too many steps in a row had non-finite values; the
    /// weights are those after the last good step.
    #[error(
        "training diverged: stopped at step {step} after {skipped} consecutive steps skipped \
         because of non-finite values (last: {reason}); the weights are those after the last \
         good step"
    )]
    Diverged {
        step: u64,
        skipped: u64,
        reason: String,
    },
    /// Some trainable tensors received no gradient (a frozen path, or an op without a
    /// backward pass); the message lists them.
    #[error("gradient coverage incomplete: {0}")]
    IncompleteGradients(String),
    /// Saved training state (a checkpoint, optimiser moments, an objective's extra
    /// tensors) that does not match this run: another seed, other trained parameters,
    /// other shapes.
    #[error("training state does not match this run: {0}")]
    StateMismatch(String),
    /// A data-parallel collective failed: a rank failed or left, ranks disagree on a shape,
    /// or the transport (NCCL) reported an error.
    #[error("collective: {0}")]
    Collective(String),
    /// A lock was poisoned by a thread that panicked while holding it.
    #[error("{0} lock poisoned (a thread panicked while holding it)")]
    LockPoisoned(&'static str),
    /// A value could not be serialised (a config, checkpoint metadata, a log record).
    #[error("cannot serialise {what}: {reason}")]
    Serialize { what: String, reason: String },
    /// Training cannot go on for another reason (an internal invariant of the engine).
    #[error("training: {0}")]
    Training(String),

    /// A model produced NaN or infinite values for an input (the message names it).
    #[error("non-finite output: {0}")]
    NonFinite(String),

    /// A training or evaluation data set that cannot be used (a malformed manifest line,
    /// an empty manifest, a batch that cannot be filled).
    #[error("data {origin}{}: {reason}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Data {
        origin: String,
        line: Option<usize>,
        reason: String,
    },

    /// A checkpoint of a data-parallel run resumed with another number of ranks: every
    /// rank's data position is stored for its rank, so the world size must match.
    #[error(
        "checkpoint {path}: written by a run of {saved} rank(s), resumed with {current}; \
         resume with {saved} rank(s) (data positions are stored per rank)"
    )]
    WorldSizeMismatch {
        path: PathBuf,
        saved: usize,
        current: usize,
    },

    /// An error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with a description of what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A parse error for the named input.
    pub fn parse(origin: impl Into<String>, reason: impl ToString) -> Self {
        Error::Parse {
            origin: origin.into(),
            reason: reason.to_string(),
        }
    }
}

//! # tuwen
//!
//! Chinese and multilingual vision–language dual encoders on
//! [candle](https://github.com/huggingface/candle): **BriVL**, **R2D2** / **PRD2** and
//! **SigLIP 2** (fixed resolution and NaFlex).
//!
//! * [`models`] holds one file per model family: serde configurations with presets for
//!   every published checkpoint, the whole forward pass, and the encoder that implements
//!   the [`DualEncoder`] trait and loads it.
//! * [`nn`] holds the blocks the models share, each written once and differentiable where
//!   it can train.
//! * [`preprocess`] decodes images, resamples like PIL and torch, turns images into pixel
//!   tensors ([`preprocess::ImageProcessor`] for every fixed-size model, the NaFlex
//!   processor for SigLIP 2 NaFlex), prepares BriVL's region boxes, and tokenises text.
//! * [`eval`] runs image–text retrieval with Recall@K and cross-encoder re-ranking.
//! * [`checkpoint`] reads safetensors and PyTorch `.pth` files in pure Rust, checks every
//!   tensor's presence and shape, writes atomically, and downloads presets from the Hub;
//!   [`checkpoint::discover`] tells which family a file or directory holds and finds its
//!   weights and configuration.
//! * [`registry`] lists the presets and opens a model by preset name or path ([`load`]).
//! * [`train`] is the model-agnostic training engine: AdamW with parameter groups and
//!   freezing, schedules, gradient accumulation and clipping, EMA updates, crash-safe
//!   checkpoints with exact resume, and a deterministic parallel data loader.
//!
//! ```no_run
//! use tuwen::{load, DualEncoder, ImageInput, LoadOptions};
//!
//! # fn main() -> tuwen::Result<()> {
//! let model = load("siglip2-base-patch16-224", &LoadOptions::default())?;
//! let probs = model.classify(&[ImageInput::path("cat.jpg")], &["猫", "狗"], "一张{}的照片。")?;
//! println!("{probs}");
//! # Ok(()) }
//! ```

pub mod allocator;
pub mod checkpoint;
pub mod error;
pub mod eval;
pub mod models;
pub mod nn;
pub mod preprocess;
pub mod registry;
pub mod threads;
pub mod train;

pub use allocator::tune_allocator;
pub use error::{Error, Result};
pub use models::{DualEncoder, Family, LoadOptions, Scoring};
pub use preprocess::ImageInput;
pub use registry::load;

//! The data pipeline: manifests, the image pipeline and its augmentation, the
//! deterministic loader, WebDataset shards, and synthetic data for tests and benchmarks.
//!
//! * [`manifest`]: JSONL and CSV manifests of (image, captions, boxes, id).
//! * [`pipeline`]: a sample's image to a normalised tensor ([`ImagePipeline`]), with
//!   optional augmentation ([`augment`]).
//! * [`loader`]: the seeded, resumable, parallel [`DataLoader`] and its [`Batch`].
//! * [`webdataset`]: tar shards, written and streamed.
//! * [`synthetic`]: generated datasets with a known answer.

pub mod augment;
pub mod loader;
pub mod manifest;
pub mod pipeline;
pub mod synthetic;
pub mod webdataset;

pub use crate::preprocess::ResizeKind;
pub use loader::{
    Batch, BatchSource, DataConfig, DataLoader, DataPosition, ShardCursor, SkippedSample,
};
pub use manifest::{Manifest, Sample};
pub use pipeline::{ImagePipeline, IMAGENET_MEAN, IMAGENET_STD};

//! Image and text preprocessing.
//!
//! * [`image`]: image inputs and decoding with limits, PIL-parity and torch-parity
//!   resampling ([`image::resize_pil`], [`image::resize_bilinear_no_antialias`],
//!   [`image::resize_bilinear_antialias`], [`image::aa_bilinear_weights`]).
//! * [`processor`]: [`ImageProcessor`], the one fixed-size image processor (resize with a
//!   [`ResizeKind`], normalise with the shared constants [`IMAGENET_MEAN`], [`CLIP_MEAN`],
//!   [`SIGLIP_MEAN`] and their stds), and SigLIP 2's [`NaFlexProcessor`].
//! * [`boxes`]: BriVL's region boxes (JSON files, validation and scaling, grids, padding).
//! * [`text`]: tokenisation with each family's padding and truncation rules.

pub mod boxes;
pub mod image;
pub mod processor;
pub mod text;

pub use self::image::{ImageInput, ImageSource, Resample};
pub use self::processor::{
    read_max_num_patches, ImageProcessor, NaFlexBatch, NaFlexProcessor, ResizeKind, CLIP_MEAN,
    CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, MAX_NUM_PATCHES, SIGLIP_MEAN, SIGLIP_STD,
};
pub use self::text::{TextProcessor, TextStyle, TokenizedBatch};

//! Image and text preprocessing.

pub mod image;
pub mod text;

pub use self::image::{
    FixedProcessor, ImageInput, ImageSource, NaFlexBatch, NaFlexProcessor, Resample,
};
pub use self::text::{TextProcessor, TextStyle, TokenizedBatch};

//! Building blocks shared by every model, written once.
//!
//! Every op here is differentiable where it can take part in training: see [`ops`] for how
//! the fused inference kernels are combined with composed, differentiable versions. The CPU
//! kernels themselves (`f32` fast paths, with their backward passes) live in `kernels`,
//! which is internal to the crate.

pub mod attention;
pub mod batch_norm;
pub mod bert;
pub mod conv;
pub mod efficientnet;
pub mod grid_sample;
pub(crate) mod kernels;
pub mod linear;
pub mod ops;
pub mod resnet;
pub mod transformer;
pub mod vit;

#[cfg(test)]
pub(crate) mod test_util;

pub use attention::{scaled_dot_product_attention, AttentionNames, MultiHeadAttention};
pub use bert::{Bert, BertConfig};
pub use linear::Linear;
pub use ops::{Activation, LayerNorm};
pub use transformer::{LayerDims, Mlp, PostNormLayer, PreNormEncoder, PreNormLayer};
pub use vit::{ClipVisionConfig, ClipVisionTransformer};

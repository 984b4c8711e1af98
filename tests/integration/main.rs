//! Integration tests: parity with the reference implementations, preprocessing, loading,
//! bad inputs. One test binary keeps link time low.

mod architecture;
mod brivl;
mod brivl_train;
mod cnclip;
mod cnclip_original;
mod cnclip_rn50;
mod cnclip_train;
mod common;
mod eval;
mod examples;
mod fuzz;
#[cfg(feature = "hub")]
mod hub;
mod pth_reader;
mod r2d2;
mod r2d2_train;
mod reliability;
mod siglip2;
mod siglip_train;
mod train;
mod webdataset;

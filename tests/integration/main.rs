//! Integration tests: parity with the reference implementations, preprocessing, loading,
//! bad inputs. One test binary keeps link time low.

mod common;
#[cfg(feature = "hub")]
mod hub;
mod siglip2;
mod train;
mod examples;

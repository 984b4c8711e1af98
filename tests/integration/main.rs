//! Integration tests: parity with the reference implementations, preprocessing, loading,
//! bad inputs. One test binary keeps link time low.

mod common;
mod r2d2;

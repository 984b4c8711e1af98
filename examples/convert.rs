//! Converts a PyTorch `.pth` checkpoint (zip format) to `.safetensors`.
//!
//! ```sh
//! cargo run --release --example convert -- --input BriVL-1.0-5500w.pth \
//!     --output brivl-1.0.safetensors --skip '_mom.' --dtype keep
//! cargo run --release --example convert -- --input model.pth --list
//! ```
//!
//! The nested state dict (`model`, `learnable`, `state_dict`) is found automatically unless
//! `--key` names it. The output is written atomically.
//!
//! A tensor that cannot be read (a dtype candle has no type for, such as int8 or bool, or a
//! view beyond its storage) fails the conversion, naming every such tensor and why, unless
//! `--skip` leaves it out or `--allow-unsupported` writes the others.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tuwen::checkpoint::convert::{convert_pth, list_pth, ConvertOptions, TargetDtype};

#[derive(Parser, Debug)]
#[command(about = "Convert a PyTorch .pth checkpoint to .safetensors")]
struct Args {
    /// The .pth (torch zip) checkpoint.
    #[arg(long)]
    input: PathBuf,
    /// The .safetensors file to write (required unless --list).
    #[arg(long)]
    output: Option<PathBuf>,
    /// The nested state dict to convert (default: detect 'model', 'learnable', 'state_dict').
    #[arg(long)]
    key: Option<String>,
    /// keep, f32, f16 or bf16 (floating-point tensors only).
    #[arg(long, default_value = "keep")]
    dtype: String,
    /// Leave out tensors whose names contain this (a prefix when it ends with '*'); repeatable.
    #[arg(long)]
    skip: Vec<String>,
    /// List the tensors (and those that cannot be read, with why) and exit.
    #[arg(long)]
    list: bool,
    /// Write the readable tensors even when some cannot be read; they are listed.
    #[arg(long)]
    allow_unsupported: bool,
}

fn run(args: Args) -> tuwen::Result<()> {
    if args.list {
        let listing = list_pth(&args.input, args.key.as_deref())?;
        println!("key: {}", listing.key.as_deref().unwrap_or("(top level)"));
        for (name, shape, dtype) in &listing.tensors {
            println!("{name}\t{shape:?}\t{dtype:?}");
        }
        for (name, reason) in &listing.unsupported {
            println!("{name}\tunsupported: {reason}");
        }
        println!(
            "{} tensors, {} unsupported",
            listing.tensors.len(),
            listing.unsupported.len()
        );
        return Ok(());
    }
    let output = args.output.ok_or_else(|| {
        tuwen::Error::InvalidArgument("--output is required (or pass --list)".into())
    })?;
    let opts = ConvertOptions {
        key: args.key,
        dtype: args.dtype.parse::<TargetDtype>()?,
        skip: args.skip,
        allow_unsupported: args.allow_unsupported,
    };
    let report = convert_pth(&args.input, &output, &opts)?;
    for (name, reason) in &report.unsupported {
        println!("not written: {name}: {reason}");
    }
    println!(
        "wrote {} tensors from {} (key {}) to {}; skipped {}; unsupported {}",
        report.written,
        args.input.display(),
        report.key.as_deref().unwrap_or("(top level)"),
        report.output.display(),
        report.skipped.len(),
        report.unsupported.len()
    );
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in `main`: no other thread exists yet and no candle op has run.
    unsafe { tuwen::threads::candle_ops_on_calling_thread() };
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

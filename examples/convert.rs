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

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tuwen::checkpoint::convert::{convert_pth, detect_key, list_pth, ConvertOptions, TargetDtype};

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
    /// List the tensors and exit.
    #[arg(long)]
    list: bool,
}

fn run(args: Args) -> tuwen::Result<()> {
    if args.list {
        let key = match &args.key {
            Some(k) => Some(k.clone()),
            None => detect_key(&args.input)?,
        };
        let tensors = list_pth(&args.input, key.as_deref())?;
        println!("key: {}", key.as_deref().unwrap_or("(top level)"));
        for (name, shape, dtype) in &tensors {
            println!("{name}\t{shape:?}\t{dtype:?}");
        }
        println!("{} tensors", tensors.len());
        return Ok(());
    }
    let output = args.output.ok_or_else(|| {
        tuwen::Error::InvalidArgument("--output is required (or pass --list)".into())
    })?;
    let opts = ConvertOptions {
        key: args.key,
        dtype: args.dtype.parse::<TargetDtype>()?,
        skip: args.skip,
    };
    let report = convert_pth(&args.input, &output, &opts)?;
    println!(
        "wrote {} tensors from {} (key {}) to {}; skipped {}",
        report.written,
        args.input.display(),
        report.key.as_deref().unwrap_or("(top level)"),
        report.output.display(),
        report.skipped.len()
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

//! `nixfmt-check [--check] PATH...`: formats Nix files with the alejandra library.
//!
//! Directories are walked recursively for `*.nix` files (skipping `.git`, `target` and
//! `result*`). Without `--check` files are rewritten in place. With `--check` nothing is
//! written: unformatted files are listed and the exit code is 1. Parse errors exit 2.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use alejandra::format::{Status, in_memory};

fn main() -> ExitCode {
    let mut check = false;
    let mut roots = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" | "-c" => check = true,
            "--help" | "-h" => {
                println!("usage: nixfmt-check [--check] PATH...");
                return ExitCode::SUCCESS;
            }
            _ => roots.push(PathBuf::from(arg)),
        }
    }
    if roots.is_empty() {
        roots.push(PathBuf::from("."));
    }

    let mut files = Vec::new();
    for root in &roots {
        if let Err(err) = collect(root, &mut files) {
            eprintln!("nixfmt-check: {}: {err}", root.display());
            return ExitCode::from(2);
        }
    }
    files.sort();

    let mut unformatted = 0usize;
    let mut failed = 0usize;
    for file in &files {
        match format_one(file, check) {
            Ok(false) => {}
            Ok(true) => {
                unformatted += 1;
                if check {
                    println!("unformatted: {}", file.display());
                } else {
                    println!("formatted: {}", file.display());
                }
            }
            Err(err) => {
                failed += 1;
                eprintln!("error: {}: {err}", file.display());
            }
        }
    }

    if failed > 0 {
        ExitCode::from(2)
    } else if check && unformatted > 0 {
        eprintln!("nixfmt-check: {unformatted} of {} file(s) need formatting", files.len());
        ExitCode::from(1)
    } else {
        eprintln!("nixfmt-check: {} file(s) checked", files.len());
        ExitCode::SUCCESS
    }
}

/// Formats one file; returns whether its text changed (or would change, with `check`).
fn format_one(file: &Path, check: bool) -> Result<bool, String> {
    let before = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
    let (status, after) = in_memory(file.display().to_string(), before);
    match status {
        Status::Error(err) => Err(err),
        Status::Changed(false) => Ok(false),
        Status::Changed(true) => {
            if !check {
                std::fs::write(file, after).map_err(|e| e.to_string())?;
            }
            Ok(true)
        }
    }
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let p = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if entry.file_type()?.is_dir() {
            if name == ".git" || name == "target" || name.starts_with("result") {
                continue;
            }
            collect(&p, out)?;
        } else if name.ends_with(".nix") {
            out.push(p);
        }
    }
    Ok(())
}

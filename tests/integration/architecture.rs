//! The layering of ARCHITECTURE.md, checked against the code: no module of `src/` names a
//! module of a higher layer.

use std::path::{Path, PathBuf};

use crate::common::repo_dir;

/// The layer of a top-level module of the crate (`crate::<name>`); `None` for the crate
/// root.
fn layer(top: &str) -> Option<u8> {
    Some(match top {
        "error" | "allocator" | "threads" => 0,
        "nn" => 1,
        "preprocess" | "checkpoint" => 2,
        "models" => 3,
        "eval" | "registry" => 4,
        "train" => 5,
        _ => return None,
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules a line of code names through `crate::`.
fn named_modules(line: &str) -> Vec<String> {
    line.match_indices("crate::")
        .map(|(i, _)| {
            line[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn no_module_imports_a_higher_layer() {
    let src = repo_dir().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "found only {} source files", files.len());
    let mut bad = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let Some(own) = layer(&top) else {
            continue; // lib.rs re-exports every layer
        };
        let text = std::fs::read_to_string(f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (n, line) in lines.iter().enumerate() {
            let code = line.trim_start();
            if code.starts_with("#[cfg(test)]")
                && lines
                    .get(n + 1)
                    .is_some_and(|l| l.trim_start().starts_with("mod tests"))
            {
                break; // unit tests may build fixtures with any layer
            }
            if code.starts_with("//") {
                continue; // docs may point anywhere
            }
            for m in named_modules(code) {
                if let Some(l) = layer(&m) {
                    if l > own {
                        bad.push(format!(
                            "src/{}:{}: {top} names crate::{m}",
                            rel.display(),
                            n + 1
                        ));
                    }
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports of a higher layer:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_layer_check_sees_an_upward_import() {
    assert_eq!(named_modules("use crate::train::Patterns;"), ["train"]);
    assert!(layer("train") > layer("checkpoint"));
    assert_eq!(layer("lib"), None);
}

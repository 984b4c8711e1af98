//! Parameter-name patterns for freezing and parameter groups.
//!
//! A pattern is one of:
//! * a **glob** when it contains `*`: the whole name must match, and `*` matches any run of
//!   characters, dots included (`imgencoder.backbone.blocks.3.*`, `*bias`, `*.bn*`);
//! * a **substring** rule otherwise (`norm` matches `encoder.layer.0.norm1.weight`).
//!
//! Braces expand before matching: `{3..6}` is the integers 3 to 6 and `{q,k,v}` lists
//! alternatives, so `textencoder.backbone.bert.encoder.layer.{8..11}.*` names four layers.
//! Matching is case-sensitive. No regular expressions are involved.

use crate::error::{Error, Result};

/// A compiled list of patterns; a name matches the set when it matches any pattern.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns {
    sources: Vec<String>,
    expanded: Vec<String>,
}

impl Patterns {
    /// Compiles `patterns`, expanding braces; fails on an unbalanced or empty brace group.
    pub fn new<S: AsRef<str>>(patterns: impl IntoIterator<Item = S>) -> Result<Self> {
        let mut sources = Vec::new();
        let mut expanded = Vec::new();
        for p in patterns {
            let p = p.as_ref();
            if p.is_empty() {
                return Err(Error::Config("empty parameter-name pattern".into()));
            }
            expanded.extend(
                expand_braces(p).map_err(|e| Error::Config(format!("pattern `{p}`: {e}")))?,
            );
            sources.push(p.to_string());
        }
        Ok(Self { sources, expanded })
    }

    /// Whether `name` matches any pattern.
    pub fn matches(&self, name: &str) -> bool {
        self.expanded.iter().any(|p| matches_one(p, name))
    }

    /// The first source pattern that matches `name`.
    pub fn first_match(&self, name: &str) -> Option<&str> {
        self.sources.iter().find_map(|src| {
            // Each source is re-expanded: sets are small and this is only used for reports.
            expand_braces(src)
                .ok()
                .filter(|alts| alts.iter().any(|p| matches_one(p, name)))
                .map(|_| src.as_str())
        })
    }

    /// Whether the set has no pattern.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// The patterns as given.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }
}

/// Matches one brace-free pattern: a glob when it contains `*`, else a substring.
pub fn matches_one(pattern: &str, name: &str) -> bool {
    if pattern.contains('*') {
        glob_match(pattern.as_bytes(), name.as_bytes())
    } else {
        name.contains(pattern)
    }
}

/// Whole-string glob match where `*` matches any run of bytes (iterative, linear-ish).
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// The most strings one brace pattern may expand to.
pub const MAX_EXPANSION: usize = 10_000_000;

/// Expands brace groups, as shells and WebDataset do: `{a..b}` integer ranges (zero padding
/// kept when either end has a leading zero: `{000..002}`), and `{x,y,...}` alternatives,
/// which may hold groups of their own (`a{1,{2..3}}b`). A group must be a range or hold a
/// top-level comma (`{abc}` is an error), and a pattern expands to at most
/// [`MAX_EXPANSION`] strings. The error says what is wrong, without the pattern.
pub fn expand_braces(p: &str) -> std::result::Result<Vec<String>, String> {
    let Some(open) = p.find('{') else {
        if p.contains('}') {
            return Err("`}` without `{`".into());
        }
        return Ok(vec![p.to_string()]);
    };
    if p[..open].contains('}') {
        return Err("`}` without `{`".into());
    }
    // The matching close brace.
    let mut depth = 0usize;
    let mut close = None;
    for (i, c) in p[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(open + i);
                    break;
                }
            }
            _ => {}
        }
    }
    let close = close.ok_or("unclosed `{`")?;
    let (head, body, tail) = (&p[..open], &p[open + 1..close], &p[close + 1..]);
    let alternatives: Vec<String> = match body.split_once("..") {
        Some((a, b)) if !body.contains(',') && !body.contains('{') => {
            let parse = |s: &str| -> std::result::Result<u64, String> {
                if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                    return Err(format!("range bound `{s}` is not a number"));
                }
                s.parse::<u64>()
                    .map_err(|e| format!("range bound `{s}`: {e}"))
            };
            let (lo, hi) = (parse(a)?, parse(b)?);
            if lo > hi {
                return Err(format!("range {{{body}}} runs backwards"));
            }
            if hi - lo >= MAX_EXPANSION as u64 {
                return Err(format!("range {{{body}}} is too large"));
            }
            let padded = (a.len() > 1 && a.starts_with('0')) || (b.len() > 1 && b.starts_with('0'));
            let width = if padded { a.len().max(b.len()) } else { 0 };
            (lo..=hi).map(|i| format!("{i:0width$}")).collect()
        }
        _ => {
            let parts = split_top_level(body);
            if parts.len() < 2 {
                return Err(format!(
                    "`{{{body}}}` is neither a range `{{a..b}}` nor a list `{{a,b}}`"
                ));
            }
            let mut out = Vec::new();
            for part in parts {
                out.extend(expand_braces(&part)?);
                if out.len() > MAX_EXPANSION {
                    return Err("the pattern expands to too many strings".into());
                }
            }
            out
        }
    };
    let rest = expand_braces(tail)?;
    if alternatives.len().saturating_mul(rest.len()) > MAX_EXPANSION {
        return Err("the pattern expands to too many strings".into());
    }
    let mut out = Vec::with_capacity(alternatives.len() * rest.len());
    for a in &alternatives {
        for r in &rest {
            out.push(format!("{head}{a}{r}"));
        }
    }
    Ok(out)
}

fn split_top_level(body: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut cur = String::new();
    for c in body.chars() {
        match c {
            '{' => {
                depth += 1;
                cur.push(c)
            }
            '}' => {
                depth = depth.saturating_sub(1);
                cur.push(c)
            }
            ',' if depth == 0 => parts.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    parts.push(cur);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_and_substring() {
        assert!(matches_one(
            "imgencoder.backbone.blocks.3.*",
            "imgencoder.backbone.blocks.3.0.conv_dw.weight"
        ));
        assert!(!matches_one(
            "imgencoder.backbone.blocks.3.*",
            "imgencoder.backbone.blocks.30.0.conv_dw.weight"
        ));
        assert!(!matches_one(
            "imgencoder.backbone.blocks.3.*",
            "x.imgencoder.backbone.blocks.3.0.w"
        ));
        assert!(matches_one(
            "*bias",
            "encoder.layer.0.attention.output.dense.bias"
        ));
        assert!(matches_one("*bias", "logit_bias"));
        assert!(!matches_one("*bias", "bias.weight"));
        assert!(matches_one("*.bn*", "blocks.0.0.bn1.weight"));
        assert!(matches_one("norm", "layers.0.norm1.weight"));
        assert!(!matches_one("norm", "layers.0.Norm1.weight"));
        assert!(matches_one("a*b*c", "aXXbYYc"));
        assert!(!matches_one("a*b*c", "aXXbYYcd"));
        assert!(matches_one("*", "anything"));
    }

    #[test]
    fn braces() {
        let p = Patterns::new(["textencoder.backbone.bert.encoder.layer.{8..11}.*"]).unwrap();
        for l in 8..=11 {
            assert!(p.matches(&format!(
                "textencoder.backbone.bert.encoder.layer.{l}.output.dense.weight"
            )));
        }
        assert!(!p.matches("textencoder.backbone.bert.encoder.layer.7.output.dense.weight"));
        assert!(!p.matches("textencoder.backbone.bert.encoder.layer.1.output.dense.weight"));
        let q = Patterns::new(["{img,text}encoder.learnable.*"]).unwrap();
        assert!(q.matches("imgencoder.learnable.imgFC.fc1.weight"));
        assert!(q.matches("textencoder.learnable.textFC.fc1.weight"));
        assert_eq!(
            q.first_match("textencoder.learnable.x"),
            Some("{img,text}encoder.learnable.*")
        );
        assert_eq!(
            expand_braces("a{1,{2..3}}b").unwrap(),
            vec!["a1b", "a2b", "a3b"]
        );
        assert!(Patterns::new(["a{1..x}"]).is_err());
        assert!(Patterns::new(["a{3..1}"]).is_err());
        assert!(Patterns::new(["a{1,2"]).is_err());
        assert!(Patterns::new(["a}"]).is_err());
        assert!(Patterns::new([""]).is_err());
    }
}

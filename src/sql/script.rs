//! Splitting a SQL script into statements, and the one clause DataFusion's
//! parser lacks: Flink's `WATERMARK FOR col AS col - INTERVAL '10' SECOND`.

use std::time::Duration;

use crate::duration::parse_duration;
use crate::error::{BrookError, Result};

/// An event-time watermark declared on a source: `column`'s max minus `delay`.
#[derive(Debug, Clone, PartialEq)]
pub struct WatermarkSpec {
    pub column: String,
    pub delay: Duration,
}

/// Byte ranges of the SQL text that are code, not quotes or comments.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Lex {
    Code,
    Single,
    Double,
    LineComment,
    BlockComment,
}

/// Walks `text` calling `f(byte_index, char, paren_depth)` for each char outside quotes and comments.
fn scan_code(text: &str, mut f: impl FnMut(usize, char, i32) -> bool) {
    let mut state = Lex::Code;
    let mut depth = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let next = chars.peek().map(|(_, n)| *n);
        state = match (state, c) {
            (Lex::Code, '\'') => Lex::Single,
            (Lex::Code, '"') => Lex::Double,
            (Lex::Code, '-') if next == Some('-') => Lex::LineComment,
            (Lex::Code, '/') if next == Some('*') => Lex::BlockComment,
            (Lex::Code, _) => {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                if !f(i, c, depth) {
                    return;
                }
                Lex::Code
            }
            (Lex::Single, '\'') => Lex::Code,
            (Lex::Double, '"') => Lex::Code,
            (Lex::LineComment, '\n') => Lex::Code,
            (Lex::BlockComment, '*') if next == Some('/') => {
                chars.next();
                Lex::Code
            }
            (s, _) => s,
        };
    }
}

/// The statements of a script, split at top-level semicolons, blank ones dropped.
pub fn split_statements(script: &str) -> Vec<String> {
    let mut cuts = vec![];
    scan_code(script, |i, c, _| {
        if c == ';' {
            cuts.push(i);
        }
        true
    });
    let mut out = vec![];
    let mut start = 0;
    for cut in cuts.into_iter().chain(std::iter::once(script.len())) {
        let stmt = script[start..cut].trim();
        if !only_comments(stmt) {
            out.push(stmt.to_string());
        }
        start = (cut + 1).min(script.len());
    }
    out
}

/// The runs of letters of `text` outside quotes and comments, upper-cased.
pub fn code_words(text: &str) -> impl Iterator<Item = String> {
    let mut words = vec![];
    let mut word = String::new();
    scan_code(text, |_, c, _| {
        if c.is_ascii_alphabetic() {
            word.push(c.to_ascii_uppercase());
        } else if !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
        true
    });
    words.extend((!word.is_empty()).then_some(word));
    words.into_iter()
}

fn only_comments(stmt: &str) -> bool {
    let mut code = false;
    scan_code(stmt, |_, c, _| {
        code = !c.is_whitespace();
        !code
    });
    !code
}

/// Removes a `WATERMARK FOR ...` clause from a CREATE statement, returning the
/// statement DataFusion can parse and the watermark it declared.
pub fn extract_watermark(stmt: &str) -> Result<(String, Option<WatermarkSpec>)> {
    let upper = stmt.to_ascii_uppercase();
    let mut found: Option<(usize, i32)> = None;
    scan_code(stmt, |i, c, depth| {
        if c.is_ascii_alphabetic()
            && upper[i..].starts_with("WATERMARK")
            && (i == 0 || !is_word(stmt.as_bytes()[i - 1]))
            && upper[i + 9..].trim_start().starts_with("FOR")
        {
            found = Some((i, depth));
            return false;
        }
        true
    });
    let Some((start, depth)) = found else {
        return Ok((stmt.to_string(), None));
    };
    let mut end = stmt.len();
    scan_code(stmt, |i, c, d| {
        if i > start && ((c == ',' && d == depth) || (c == ')' && d < depth)) {
            end = i;
            return false;
        }
        true
    });
    let clause = stmt[start..end].trim();
    let spec = parse_watermark_clause(clause)?;
    // Drop the clause with the comma that separated it from the column before it.
    let before = stmt[..start].trim_end();
    let before = before.strip_suffix(',').unwrap_or(before);
    Ok((format!("{before} {}", &stmt[end..]), Some(spec)))
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn parse_watermark_clause(clause: &str) -> Result<WatermarkSpec> {
    let bad = |why: &str| {
        BrookError::sql(format!(
            "cannot read '{clause}': {why}; write WATERMARK FOR <column> AS <column> - INTERVAL '10' SECOND"
        ))
    };
    let words: Vec<&str> = clause.split_whitespace().collect();
    if words.len() < 5 || !words[3].eq_ignore_ascii_case("AS") {
        return Err(bad("expected WATERMARK FOR <column> AS <expression>"));
    }
    let column = unquote_ident(words[2]);
    let expr = words[4..].join(" ");
    let (base, rest) = match expr.split_once('-') {
        Some((base, rest)) => (base.trim(), Some(rest.trim())),
        None => (expr.trim(), None),
    };
    // A column name, maybe quoted: anything else is an expression of its own.
    let plain = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '"')
    };
    if !plain(base) {
        return Err(bad(&format!(
            "a watermark is its column, or its column minus a constant delay \
             (<column> - INTERVAL '10' SECOND); '{expr}' is neither"
        )));
    }
    if unquote_ident(base) != column {
        return Err(bad(&format!(
            "the expression is over '{}', not over the watermark column '{column}'",
            unquote_ident(base)
        )));
    }
    let delay = match rest {
        None => Duration::ZERO,
        Some(interval) => duration_literal(interval)?,
    };
    Ok(WatermarkSpec { column, delay })
}

fn unquote_ident(s: &str) -> String {
    s.trim().trim_matches('"').to_string()
}

/// A duration written as `INTERVAL '10' SECOND`, `INTERVAL '10 seconds'` or `'10 seconds'`.
pub fn duration_literal(text: &str) -> Result<Duration> {
    let t = text.trim();
    let t = match t.get(..8) {
        Some(head) if head.eq_ignore_ascii_case("INTERVAL") => &t[8..],
        _ => t,
    };
    let words: Vec<&str> = t
        .split(|c: char| c == '\'' || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    parse_duration(&words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_outside_quotes_and_comments() {
        let s = "SELECT 'a;b'; -- c;d\nSELECT 2 /* ; */;\n-- only a comment;";
        assert_eq!(
            split_statements(s),
            vec!["SELECT 'a;b'", "-- c;d\nSELECT 2 /* ; */"]
        );
    }

    #[test]
    fn extracts_flink_watermark() {
        let sql = "CREATE UNBOUNDED EXTERNAL TABLE o (time TIMESTAMP, x INT, \
                   WATERMARK FOR time AS time - INTERVAL '10' SECOND) STORED AS CSV LOCATION 'd'";
        let (rest, wm) = extract_watermark(sql).unwrap();
        assert_eq!(
            wm,
            Some(WatermarkSpec {
                column: "time".into(),
                delay: Duration::from_secs(10)
            })
        );
        assert!(!rest.contains("WATERMARK"), "{rest}");
        assert!(rest.contains("x INT )"), "{rest}");
    }

    #[test]
    fn watermark_forms() {
        let (_, wm) =
            extract_watermark("(t TIMESTAMP, watermark for t as t - interval '1 minute')").unwrap();
        assert_eq!(wm.unwrap().delay, Duration::from_secs(60));
        let (_, wm) = extract_watermark("(t TIMESTAMP, WATERMARK FOR t AS t)").unwrap();
        assert_eq!(wm.unwrap().delay, Duration::ZERO);
        assert!(
            extract_watermark("(t TIMESTAMP, WATERMARK FOR t AS u - INTERVAL '1' SECOND)").is_err()
        );
    }
}

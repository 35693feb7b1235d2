//! Table and sink options, looked up the way Spark users write them.
//!
//! `maxFilesPerTrigger`, `max_files_per_trigger` and `format.max_files_per_trigger`
//! name the same option: keys are compared lower-cased, without underscores and
//! without DataFusion's `format.` prefix.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use crate::duration::parse_duration;
use crate::error::{BrookError, Result};

/// [`parse_duration`], failing with the reason alone, for an option's error.
pub fn duration_or_why(text: &str) -> std::result::Result<Duration, String> {
    parse_duration(text).map_err(|e| match e {
        BrookError::Sql(why) => why,
        other => other.to_string(),
    })
}

/// Bytes in a size as Spark and DataFusion write one: `1048576`, `512k`,
/// `100MB`, `1.5g`, `512 MiB` (units are powers of 1024); `None` if `text` is
/// not one, or is less than a byte or more than a `u64` holds.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().ok()?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return None,
    };
    let bytes = number * (1u64 << shift) as f64;
    (bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// normalized key -> (key as written, value)
    entries: BTreeMap<String, (String, String)>,
}

fn normalize(key: &str) -> String {
    let key = key.strip_prefix("format.").unwrap_or(key);
    key.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Whether `key` is written for option `name` (in any of the forms it accepts).
pub fn same_key(key: &str, name: &str) -> bool {
    normalize(key) == normalize(name)
}

impl Options {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let key: String = key.into();
        let written = key.strip_prefix("format.").unwrap_or(&key).to_string();
        self.entries
            .insert(normalize(&key), (written, value.into()));
    }

    #[cfg(test)]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.set(key, value);
        self
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(&normalize(key)).map(|(_, v)| v.as_str())
    }

    pub fn get_or<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        self.get(key).unwrap_or(default)
    }

    /// Parses a count of at least 1, naming the option on failure.
    pub fn count<T: FromStr + PartialEq + From<u8>>(&self, key: &str) -> Result<Option<T>> {
        let count = self.parse(key, "a positive count")?;
        if count == Some(T::from(0)) {
            return Err(BrookError::option(key, "must be at least 1"));
        }
        Ok(count)
    }

    /// Parses an option's value, naming the option and the expected form on failure.
    pub fn parse<T: FromStr>(&self, key: &str, expected: &str) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                v.trim().parse().map(Some).map_err(|_| {
                    BrookError::option(key, format!("expected {expected}, found '{v}'"))
                })
            }
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if v == "true" => Ok(true),
            Some(v) if v == "false" => Ok(false),
            Some(v) => Err(BrookError::option(
                key,
                format!("expected 'true' or 'false', found '{v}'"),
            )),
        }
    }

    /// A size option ([`parse_size`]).
    pub fn size(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|text| {
                parse_size(text).ok_or_else(|| {
                    BrookError::option(
                        key,
                        format!(
                            "expected a size such as 1048576, 512k, 100m or 1g, found '{text}'"
                        ),
                    )
                })
            })
            .transpose()
    }

    /// A duration option ([`parse_duration`]: `'10 seconds'`, `'1 hour'`, `500ms`).
    pub fn duration(&self, key: &str) -> Result<Option<Duration>> {
        self.get(key)
            .map(|t| duration_or_why(t).map_err(|why| BrookError::option(key, why)))
            .transpose()
    }

    /// The options whose key starts with `prefix` (any case), keyed as written
    /// without it: `kafka.security.protocol` under `kafka.` is `security.protocol`.
    pub fn prefixed(&self, prefix: &str) -> BTreeMap<String, String> {
        self.entries
            .values()
            .filter_map(|(written, value)| {
                let head = written.get(..prefix.len())?;
                head.eq_ignore_ascii_case(prefix)
                    .then(|| (written[prefix.len()..].to_string(), value.clone()))
            })
            .collect()
    }

    /// Keys that none of `known` accepts: reported so that typos do not pass silently.
    pub fn unknown_keys(&self, known: &[&str]) -> Vec<String> {
        let known: Vec<String> = known.iter().map(|k| normalize(k)).collect();
        self.entries
            .iter()
            .filter(|(k, _)| !known.contains(k))
            .map(|(_, (written, _))| written.clone())
            .collect()
    }

    /// Like [`reject_unknown`](Self::reject_unknown), letting through any key under
    /// `prefix` (options passed on to a client library).
    pub fn reject_unknown_but(&self, known: &[&str], prefix: &str, what: &str) -> Result<()> {
        let unknown = self
            .unknown_keys(known)
            .into_iter()
            .find(|k| !k.to_ascii_lowercase().starts_with(prefix));
        match unknown {
            None => Ok(()),
            Some(key) => Err(BrookError::option(
                key,
                format!(
                    "unknown option for {what}; known options: {}, and {prefix}* for the client",
                    known.join(", ")
                ),
            )),
        }
    }

    pub fn reject_unknown(&self, known: &[&str], what: &str) -> Result<()> {
        match self.unknown_keys(known).first() {
            None => Ok(()),
            Some(key) => Err(BrookError::option(
                key.clone(),
                format!(
                    "unknown option for {what}; known options: {}",
                    known.join(", ")
                ),
            )),
        }
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Options {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut options = Options::new();
        for (k, v) in iter {
            options.set(k, v);
        }
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_key_agree() {
        let o = Options::new().with("format.max_files_per_trigger", "3");
        assert_eq!(o.get("maxFilesPerTrigger"), Some("3"));
        assert_eq!(
            o.parse::<usize>("max_files_per_trigger", "a count")
                .unwrap(),
            Some(3)
        );
    }

    #[test]
    fn bad_values_name_the_option() {
        let o = Options::new().with("maxFilesPerTrigger", "many");
        let err = o
            .parse::<usize>("maxFilesPerTrigger", "a count")
            .unwrap_err();
        assert!(err.to_string().contains("maxFilesPerTrigger"), "{err}");
        assert!(o.reject_unknown(&["mode"], "CSV").is_err());
    }
}

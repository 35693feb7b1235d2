//! Parse modes and the accounting of rejected records.

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{BrookError, Result};

/// Spark's default name for the column that receives unparseable records.
pub const DEFAULT_CORRUPT_COLUMN: &str = "_corrupt_record";

/// What happens to a record that does not fit the declared schema (Spark's `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ParseMode {
    /// Keep the record with the unparseable fields set to null (and the raw
    /// text in the corrupt-record column when the schema declares one).
    #[default]
    Permissive,
    DropMalformed,
    FailFast,
}

impl FromStr for ParseMode {
    type Err = BrookError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_uppercase().as_str() {
            "PERMISSIVE" => Ok(Self::Permissive),
            "DROPMALFORMED" => Ok(Self::DropMalformed),
            "FAILFAST" => Ok(Self::FailFast),
            _ => Err(BrookError::option(
                "mode",
                format!("expected PERMISSIVE, DROPMALFORMED or FAILFAST, found '{s}'"),
            )),
        }
    }
}

/// One rejected record, kept as a sample for logs and progress reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MalformedRecord {
    pub file: String,
    pub line: u64,
    pub reason: String,
    pub text: String,
}

/// How many samples a batch keeps: enough to diagnose, bounded for huge bad files.
const MAX_SAMPLES: usize = 5;

/// Rejected records of one batch: counted by reason, with the first few kept whole.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MalformedStats {
    pub count: u64,
    pub by_reason: BTreeMap<String, u64>,
    pub samples: Vec<MalformedRecord>,
}

impl MalformedStats {
    pub fn record(&mut self, record: MalformedRecord, category: &str) {
        self.count += 1;
        *self.by_reason.entry(category.to_string()).or_default() += 1;
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(record);
        }
    }

    /// Logs one line for what one decode rejected: how many records and the
    /// first of them. A source calls this once per file (or partition range),
    /// so queries sharing a decoded file do not each log its bad lines.
    pub fn log(&self) {
        let Some(first) = self.samples.first() else {
            return;
        };
        tracing::warn!(
            file = %first.file,
            line = first.line,
            "{} malformed record(s), the first: {}: {}",
            self.count,
            first.reason,
            first.text
        );
    }

    pub fn merge(&mut self, other: MalformedStats) {
        self.count += other.count;
        for (reason, n) in other.by_reason {
            *self.by_reason.entry(reason).or_default() += n;
        }
        let room = MAX_SAMPLES.saturating_sub(self.samples.len());
        self.samples.extend(other.samples.into_iter().take(room));
    }
}

/// Shortens a record's text for samples and error messages.
pub(crate) fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end_matches(['\r', '\n']);
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

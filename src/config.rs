//! How queries run, as every layer sees it: output modes, triggers and the
//! cores to use. Kept at the bottom so that sources, sinks and the catalog
//! need not import the executor for them.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::duration::parse_duration;
use crate::error::{BrookError, Result};

/// Which rows of the result each batch delivers to the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OutputMode {
    /// Only new rows: for aggregations, the windows the watermark closed, once each.
    Append,
    /// The groups this batch changed.
    Update,
    /// The whole result, every batch.
    Complete,
}

impl FromStr for OutputMode {
    type Err = BrookError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "append" => Ok(Self::Append),
            "update" => Ok(Self::Update),
            "complete" => Ok(Self::Complete),
            _ => Err(BrookError::option(
                "outputMode",
                format!("expected append, update or complete, found '{s}'"),
            )),
        }
    }
}

impl fmt::Display for OutputMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Append => "append",
            Self::Update => "update",
            Self::Complete => "complete",
        })
    }
}

/// How a query reading several sources with watermarks picks its own (Spark's
/// `spark.sql.streaming.multipleWatermarkPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WatermarkPolicy {
    /// The slowest source's: no row of any source is dropped as late that the
    /// source's own watermark would keep.
    #[default]
    Min,
    /// The fastest source's: results come sooner, and the slower sources' rows
    /// behind it are dropped as late.
    Max,
}

impl FromStr for WatermarkPolicy {
    type Err = BrookError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "min" => Ok(Self::Min),
            "max" => Ok(Self::Max),
            _ => Err(BrookError::option(
                "multipleWatermarkPolicy",
                format!("expected min or max, found '{s}'"),
            )),
        }
    }
}

/// When batches run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A batch every interval (zero: as soon as the previous one ends and data is there).
    ProcessingTime(Duration),
    /// One batch, then stop.
    Once,
    /// Everything available at start, in as many batches as the source limits
    /// allow, then stop.
    AvailableNow,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ProcessingTime(d) => write!(f, "processing-time {d:?}"),
            Self::Once => f.write_str("once"),
            Self::AvailableNow => f.write_str("available-now"),
        }
    }
}

impl Default for Trigger {
    fn default() -> Self {
        Self::ProcessingTime(Duration::ZERO)
    }
}

impl FromStr for Trigger {
    type Err = BrookError;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.replace(['-', '_', ' '], "").as_str() {
            "once" => return Ok(Self::Once),
            "availablenow" => return Ok(Self::AvailableNow),
            _ => {}
        }
        let interval = t.strip_prefix("processingtime:").unwrap_or(&t);
        parse_duration(interval).map(Self::ProcessingTime).map_err(|e| {
            let why = match e {
                BrookError::Sql(why) => why,
                other => other.to_string(),
            };
            BrookError::option(
                "trigger",
                format!("expected an interval such as '1 second' or '500ms', 'once' or 'available-now', found '{s}' ({why})"),
            )
        })
    }
}

/// The cores to use; asked once, as each asking reads the cgroup's CPU quota files.
pub fn partitions() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

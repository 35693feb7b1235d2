//! How much memory queries may take: DataFusion's memory pool, sized by the
//! user (`--memory-limit 2GB`) or by default at half the machine's memory.

use std::sync::Arc;

use datafusion::execution::memory_pool::{GreedyMemoryPool, MemoryPool, TrackConsumersPool};

use crate::error::{BrookError, Result};

/// The share of the machine's (or the container's) memory queries may take by default.
const DEFAULT_SHARE: f64 = 0.5;

/// The consumers an out-of-memory error names, largest first.
const NAMED_CONSUMERS: usize = 5;

/// A pool that refuses reservations past `limit` bytes; its errors name the
/// operators holding the most memory, as DataFusion's own limited pools do.
pub fn pool(limit: usize) -> Arc<dyn MemoryPool> {
    Arc::new(TrackConsumersPool::new(
        GreedyMemoryPool::new(limit),
        std::num::NonZeroUsize::new(NAMED_CONSUMERS).unwrap_or(std::num::NonZeroUsize::MIN),
    ))
}

/// Half the memory of the machine, or of the container when its cgroup has less.
pub fn default_limit() -> usize {
    let total = physical_memory()
        .into_iter()
        .chain(cgroup_limit())
        .min()
        .unwrap_or(u64::MAX);
    usize::try_from((total as f64 * DEFAULT_SHARE) as u64).unwrap_or(usize::MAX)
}

#[cfg(unix)]
fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf reads system constants only.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let pages = u64::try_from(pages).ok()?;
    let page_size = u64::try_from(page_size).ok()?;
    pages.checked_mul(page_size).filter(|&b| b > 0)
}

#[cfg(not(unix))]
fn physical_memory() -> Option<u64> {
    None
}

/// The memory limit of the cgroup the process runs in (v2, else v1), if any.
fn cgroup_limit() -> Option<u64> {
    [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|path| std::fs::read_to_string(path).ok())
    // "max" (v2) and a page-rounded i64::MAX (v1) mean no limit.
    .filter_map(|text| text.trim().parse::<u64>().ok())
    .find(|&limit| limit > 0 && limit < (1 << 62))
}

/// Parses a size such as `64MB`, `1.5GB`, `512MiB`, `2g` or `1048576` (bytes).
/// Units are powers of 1024, as DataFusion's `datafusion.runtime.memory_limit` reads them.
pub fn parse_size(text: &str) -> Result<usize> {
    crate::options::parse_size(text)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .ok_or_else(|| {
            BrookError::option(
                "--memory-limit",
                format!("expected a size such as '512MB' or '4GB', found '{text}'"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_written() {
        assert_eq!(parse_size("64MB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "MB", "-1GB", "1 parsec", "0"] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
    }

    #[test]
    fn the_default_is_a_share_of_real_memory() {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let total_kb: usize = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|l| l.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        let limit = default_limit();
        assert!(limit > 0 && limit <= total_kb * 1024 / 2, "{limit}");
    }
}

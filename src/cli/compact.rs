//! `brook compact`: merges a file sink's small part files (see `sink::compact`),
//! or runs OPTIMIZE on a Delta table (`sink::delta::compact`).

use datafusion::execution::runtime_env::RuntimeEnv;

use crate::error::{BrookError, Result};
use crate::sink::compact::{TableKind, compact, table_kind};
use crate::source::location::Location;

/// Compacts the brook file sink output in `table_dir` and prints what it did.
pub(crate) async fn compact_table(table_dir: &str, target_file_size: u64) -> Result<()> {
    let location = Location::resolve(table_dir, &RuntimeEnv::default())?;
    let not_a_sink = |why: &str| {
        BrookError::option(
            "TABLE_DIR",
            format!(
                "{table_dir} is not a brook file sink directory ({why}); `brook compact` \
                 compacts the output of PARQUET, CSV or JSON sink tables, and Delta tables"
            ),
        )
    };
    if location.local_dir.as_ref().is_some_and(|dir| !dir.is_dir()) {
        return Err(not_a_sink("no such directory"));
    }
    match table_kind(&location).await? {
        TableKind::BrookSink => {}
        TableKind::Delta => {
            let report = crate::sink::delta::compact(&location, Some(target_file_size)).await?;
            println!("compacted Delta table {table_dir}: {report}");
            return Ok(());
        }
        TableKind::Other => return Err(not_a_sink("it has no _brook_manifest")),
    }
    let report = compact(&location, target_file_size).await?;
    println!("compacted {table_dir}: {report}");
    Ok(())
}

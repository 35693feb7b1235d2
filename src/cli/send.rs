//! `brook send`: replays an orders file into a directory in chunks, as the
//! book's `splitAndSend.sh` does, each chunk appearing atomically by rename.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{BrookError, Result};

pub struct SendOptions {
    pub input: PathBuf,
    pub to: PathBuf,
    pub lines_per_file: usize,
    pub interval: Duration,
}

/// Writes chunk files `orders-00000.csv`, ... into `to`; returns how many.
pub async fn send_files(options: &SendOptions) -> Result<usize> {
    if options.lines_per_file == 0 {
        return Err(BrookError::option("--lines-per-file", "must be at least 1"));
    }
    std::fs::create_dir_all(&options.to).map_err(|e| BrookError::io(&options.to, e))?;
    let file =
        std::fs::File::open(&options.input).map_err(|e| BrookError::io(&options.input, e))?;
    let mut lines = std::io::BufReader::new(file).lines();
    let mut sent = 0;
    loop {
        let mut chunk = String::new();
        let mut n = 0;
        while n < options.lines_per_file {
            match lines.next() {
                Some(line) => {
                    chunk.push_str(&line.map_err(|e| BrookError::io(&options.input, e))?);
                    chunk.push('\n');
                    n += 1;
                }
                None => break,
            }
        }
        if n == 0 {
            return Ok(sent);
        }
        if sent > 0 && !options.interval.is_zero() {
            tokio::time::sleep(options.interval).await;
        }
        let name = format!("orders-{sent:05}.csv");
        write_atomically(&options.to, &name, chunk.as_bytes())?;
        eprintln!("sent {} ({n} lines)", options.to.join(&name).display());
        sent += 1;
    }
}

/// Writes `name` under `dir` so that a watching source never sees it half-written.
pub fn write_atomically(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, data).map_err(|e| BrookError::io(&tmp, e))?;
    let dest = dir.join(name);
    std::fs::rename(&tmp, &dest).map_err(|e| BrookError::io(&dest, e))
}

//! Output operations: `print`, `save_as_text_files`, `foreach_rdd`.

use std::path::PathBuf;
use std::sync::Arc;

use super::{DStream, Data};
use crate::error::{BrookError, Result};
use crate::source::location::write_atomically;

/// A value as Spark (Scala) prints it: `(BUYS,List(5074))`, `Some(3)`, `5.0`
/// (large and small floats keep Rust's notation, not Scala's `1.0E7`).
pub trait SparkString {
    fn spark_string(&self) -> String;
}

macro_rules! spark_display {
    ($($t:ty),*) => {$(
        impl SparkString for $t {
            fn spark_string(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
spark_display!(
    i8, i16, i32, i64, u8, u16, u32, u64, usize, f32, f64, bool, char, String, &str
);

impl<A: SparkString, B: SparkString> SparkString for (A, B) {
    fn spark_string(&self) -> String {
        format!("({},{})", self.0.spark_string(), self.1.spark_string())
    }
}

impl<A: SparkString, B: SparkString, C: SparkString> SparkString for (A, B, C) {
    fn spark_string(&self) -> String {
        format!(
            "({},{},{})",
            self.0.spark_string(),
            self.1.spark_string(),
            self.2.spark_string()
        )
    }
}

impl<T: SparkString> SparkString for Vec<T> {
    fn spark_string(&self) -> String {
        let items: Vec<String> = self.iter().map(SparkString::spark_string).collect();
        format!("List({})", items.join(", "))
    }
}

impl<T: SparkString> SparkString for Option<T> {
    fn spark_string(&self) -> String {
        match self {
            Some(v) => format!("Some({})", v.spark_string()),
            None => "None".into(),
        }
    }
}

impl<T: Data> DStream<T> {
    /// Spark's `foreachRDD`: `f` gets each batch's rows and its time in ms.
    pub fn foreach_rdd(&self, f: impl Fn(&[T], i64) -> Result<()> + Send + Sync + 'static) {
        let stream = self.clone();
        self.ctx
            .register_output(Arc::new(move |env| match stream.rdd(env)? {
                Some(rdd) => f(&rdd, env.time_ms).map(|()| rdd.len() as u64),
                None => Ok(0),
            }));
    }
}

impl<T: Data + SparkString> DStream<T> {
    /// Spark's `print(num)`: the batch time, then its first `num` rows.
    pub fn print(&self, num: usize) {
        self.foreach_rdd(move |rows, time| {
            let mut text = format!(
                "-------------------------------------------\nTime: {time} ms\n\
                 -------------------------------------------\n"
            );
            for row in rows.iter().take(num) {
                text.push_str(&row.spark_string());
                text.push('\n');
            }
            if rows.len() > num {
                text.push_str("...\n");
            }
            println!("{text}");
            Ok(())
        });
    }

    /// Spark's `saveAsTextFiles(prefix, suffix)`: each batch into the directory
    /// `<prefix>-<time ms>[.<suffix>]`, as `part-00000` (one row per line) and an
    /// empty `_SUCCESS`, each written whole (temporary name, then rename). A
    /// batch run again after a crash has the same time and replaces its files.
    pub fn save_as_text_files(&self, prefix: &str, suffix: &str) {
        let prefix = prefix.to_string();
        let suffix = suffix.to_string();
        self.foreach_rdd(move |rows, time| {
            let name = if suffix.is_empty() {
                format!("{prefix}-{time}")
            } else {
                format!("{prefix}-{time}.{suffix}")
            };
            let dir = PathBuf::from(name);
            std::fs::create_dir_all(&dir).map_err(|e| BrookError::Sink {
                sink: format!("saveAsTextFiles {}", dir.display()),
                message: format!("cannot create the directory: {e}"),
            })?;
            let mut text = String::new();
            for row in rows {
                text.push_str(&row.spark_string());
                text.push('\n');
            }
            write_atomically(&dir, "part-00000", text.as_bytes())?;
            write_atomically(&dir, "_SUCCESS", b"")
        });
    }
}

//! Spark's session windows: `session_window(time, '5 minutes')`, or with a gap
//! worked out per row (`session_window(time, CASE ... THEN INTERVAL '10 seconds'
//! ELSE INTERVAL '1 minute' END)`).
//!
//! As `window(...)`, the call is rewritten to a column, `session_window` (a
//! struct of `start` and `end`), so `SELECT session_window.start ... GROUP BY
//! session_window(time, ...)` plans as in Spark. Each row's column holds
//! `[time, time + gap)`; the stateful operator then merges the overlapping
//! ones of a key into sessions.

use std::ops::ControlFlow;
use std::time::Duration;

use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, FunctionArguments, Query, Value, visit_expressions,
};

use super::script::duration_literal;
use super::window::{WINDOW_COLUMN, rewrite_calls, time_call};
use crate::error::{BrookError, Result};

/// The column name the rewritten `session_window(...)` call refers to.
pub const SESSION_COLUMN: &str = "session_window";

#[derive(Debug, Clone, PartialEq)]
pub struct SessionSpec {
    pub time_column: String,
    pub gap: Gap,
}

/// How long a session stays open after a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Gap {
    /// A duration string, `'5 minutes'`.
    Fixed(Duration),
    /// An expression over the row's columns (an INTERVAL), as written.
    PerRow(String),
}

impl SessionSpec {
    /// The spec as a checkpoint's fingerprint names it.
    pub fn describe(&self) -> String {
        let gap = match &self.gap {
            Gap::Fixed(d) => format!("{d:?}"),
            Gap::PerRow(sql) => sql.clone(),
        };
        format!("session_window({}, {gap})", self.time_column)
    }
}

/// Replaces every `session_window(...)` call in `query` by the
/// `session_window` column and returns the one session window it declared.
pub fn rewrite_sessions(query: &mut Query) -> Result<Option<SessionSpec>> {
    let mut specs = rewrite_calls(query, SESSION_COLUMN, session_spec)?;
    if specs.len() > 1 {
        return Err(BrookError::sql(
            "a query may use only one session_window(...) specification",
        ));
    }
    let calls_window = visit_expressions(query, |expr| match expr {
        SqlExpr::Function(f) if f.name.to_string().eq_ignore_ascii_case(WINDOW_COLUMN) => {
            ControlFlow::Break(())
        }
        _ => ControlFlow::Continue(()),
    });
    if calls_window.is_break() && !specs.is_empty() {
        return Err(BrookError::sql(
            "session_window(...) and window(...) cannot be used in one query: a row would \
             belong to a session and to windows at once; group by one of them",
        ));
    }
    Ok(specs.pop())
}

fn session_spec(args: &FunctionArguments) -> Result<SessionSpec> {
    let usage = "session_window(time_column, 'gap duration' or an INTERVAL expression)";
    let (time_column, args) = time_call(SESSION_COLUMN, args, 2..=2, usage)?;
    let gap = args[1];
    let gap = match gap {
        SqlExpr::Value(v) if matches!(v.value, Value::SingleQuotedString(_)) => {
            let d = duration_literal(&gap.to_string())?;
            if d.is_zero() {
                return Err(BrookError::sql("session_window gap must be positive"));
            }
            Gap::Fixed(d)
        }
        other => Gap::PerRow(other.to_string()),
    };
    Ok(SessionSpec { time_column, gap })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn parse(sql: &str) -> Query {
        *Parser::new(&GenericDialect {})
            .try_with_sql(sql)
            .unwrap()
            .parse_query()
            .unwrap()
    }

    #[test]
    fn rewrites_session_window_calls() {
        let mut q = parse(
            "SELECT session_window.start, count(*) FROM o \
             GROUP BY session_window(t, '5 minutes'), k",
        );
        let spec = rewrite_sessions(&mut q).unwrap().unwrap();
        assert_eq!(spec.gap, Gap::Fixed(Duration::from_secs(300)));
        assert_eq!(spec.time_column, "t");
        assert!(q.to_string().ends_with("GROUP BY session_window, k"), "{q}");
    }

    #[test]
    fn keeps_a_per_row_gap_as_written() {
        let mut q = parse(
            "SELECT count(*) FROM o GROUP BY session_window(t, CASE WHEN s = 'A' \
             THEN INTERVAL '10 seconds' ELSE INTERVAL '1 minute' END)",
        );
        let spec = rewrite_sessions(&mut q).unwrap().unwrap();
        assert!(matches!(spec.gap, Gap::PerRow(ref g) if g.starts_with("CASE")));
    }
}

//! A bound on how deeply a statement nests. Parsing builds a chain such as
//! `amount + 1 + 1 + ...` in a loop, but everything after it (cloning,
//! planning, DataFusion's optimizer and physical planner, evaluation) walks
//! the expression a level at a time on the stack: a few thousand levels
//! overflowed a thread's stack and aborted the process. Statements nested
//! deeper are refused before anything walks them.

use std::collections::VecDeque;
use std::ops::ControlFlow;

use datafusion::error::DataFusionError;
use datafusion::sql::parser::{CopyToSource, DFParser, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{Expr, Query, Visit, Visitor};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use super::script::code_words;
use crate::error::{BrookError, Result};

/// The deepest expression a statement may hold. Planning and running an
/// expression of 1,000 levels used 2 MB of stack (a Tokio worker thread's)
/// in a debug build; this leaves room for expressions that cost more a level.
pub const MAX_EXPRESSION_DEPTH: usize = 500;

/// The most set operations (`UNION`, `EXCEPT`, `INTERSECT`) one statement may
/// chain: each nests the whole query before it, and 200 overflowed 2 MB in a
/// debug build. Fifty is also how deep DataFusion's parser lets SQL nest.
pub const MAX_SET_OPERATIONS: usize = 50;

/// Parses a script's statement as DataFusion does, refusing one nested deeper
/// than brook can plan.
pub fn parse_statements(text: &str) -> Result<VecDeque<DFStatement>> {
    check_set_operations(text)?;
    // The parser's error as it reads, not as DataFusion debug-prints it.
    let statements =
        DFParser::parse_sql_with_dialect(text, &GenericDialect {}).map_err(|e| match e {
            DataFusionError::SQL(parse, _) => BrookError::sql(parse.to_string()),
            other => other.into(),
        })?;
    let deep = statements
        .iter()
        .find_map(|s| check_depth(|d| walk(s, d)).err());
    match deep {
        None => Ok(statements),
        Some(e) => Err(give_up(statements, e)),
    }
}

/// Parses a query (a `SELECT`), refusing one nested deeper than brook can plan.
pub fn parse_query(text: &str) -> Result<Query> {
    check_set_operations(text)?;
    let query = Parser::new(&GenericDialect {})
        .try_with_sql(text)
        .and_then(|mut p| p.parse_query())
        .map_err(|e| BrookError::sql(e.to_string()))?;
    match check_depth(|d| query.visit(d)) {
        Ok(()) => Ok(*query),
        Err(e) => Err(give_up(query, e)),
    }
}

/// Dropping a statement nested too deep would walk it a level at a time, as
/// deep as it goes, and overflow the stack: it is left for the process's end.
fn give_up<T>(too_deep: T, e: BrookError) -> BrookError {
    std::mem::forget(too_deep);
    e
}

/// Refuses a statement text chaining more set operations than
/// [`MAX_SET_OPERATIONS`], before it is parsed: visiting them is not bounded
/// by the check on expressions.
fn check_set_operations(text: &str) -> Result<()> {
    let chained = code_words(text)
        .filter(|w| ["UNION", "EXCEPT", "INTERSECT", "MINUS"].contains(&w.as_str()))
        .count();
    if chained > MAX_SET_OPERATIONS {
        return Err(BrookError::sql(format!(
            "{chained} set operations (UNION, EXCEPT, INTERSECT) in one statement; brook takes \
             at most {MAX_SET_OPERATIONS}"
        )));
    }
    Ok(())
}

/// Refuses a statement whose expressions nest deeper than [`MAX_EXPRESSION_DEPTH`].
/// The walk stops at that depth, so the check itself stays within the stack.
fn check_depth(walk: impl FnOnce(&mut Depth) -> ControlFlow<()>) -> Result<()> {
    if walk(&mut Depth::default()).is_continue() {
        return Ok(());
    }
    Err(BrookError::sql(format!(
        "an expression nests more than {MAX_EXPRESSION_DEPTH} levels deep (a chain such as \
         `a + b + c ...` or `x = 1 OR x = 2 OR ...` nests a level per operator); write long \
         OR chains as `x IN (1, 2, ...)`, or split the expression into several columns or \
         queries"
    )))
}

fn walk(statement: &DFStatement, depth: &mut Depth) -> ControlFlow<()> {
    match statement {
        DFStatement::Statement(s) => s.visit(depth),
        DFStatement::CreateExternalTable(t) => {
            t.columns.visit(depth)?;
            t.order_exprs.visit(depth)?;
            t.constraints.visit(depth)
        }
        DFStatement::CopyTo(c) => match &c.source {
            CopyToSource::Query(q) => q.visit(depth),
            CopyToSource::Relation(_) => ControlFlow::Continue(()),
        },
        DFStatement::Explain(e) => walk(&e.statement, depth),
        DFStatement::Reset(_) => ControlFlow::Continue(()),
    }
}

#[derive(Default)]
struct Depth {
    current: usize,
}

impl Visitor for Depth {
    type Break = ();

    fn pre_visit_expr(&mut self, _: &Expr) -> ControlFlow<()> {
        self.current += 1;
        if self.current > MAX_EXPRESSION_DEPTH {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, _: &Expr) -> ControlFlow<()> {
        self.current -= 1;
        ControlFlow::Continue(())
    }
}

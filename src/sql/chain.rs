//! A deduplication, or a join of two streams, feeding an aggregation, split
//! into the two queries that run as chained stateful stages: the first
//! deduplicates the stream (or joins the two), the second aggregates the rows
//! the first emits, in the same batch.
//!
//! The split is made on the SQL rather than on the plan: the second query then
//! reads the first's rows as it would read a source, so `window(time, ...)`
//! over a column of the deduplicated (or joined) rows plans as over a source's.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    BinaryOperator, Cte, Expr, GroupByExpr, Ident, Query, Select, SelectItem, SetExpr, TableAlias,
    TableFactor, TableWithJoins, Value, Visit, visit_expressions, visit_expressions_mut,
    visit_relations,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::error::{BrookError, Result};

/// The name the second query reads the first's rows by (errors name it).
pub const DEDUPLICATED: &str = "deduplicated subquery";

/// The two stages of a query whose deduplication (or join) feeds an aggregation.
pub struct Chain {
    /// The deduplication, over the stream, or the join of two.
    pub first: Query,
    /// The aggregation, over [`DEDUPLICATED`] or [`JOINED`].
    pub rest: Query,
}

/// Aggregate functions the stateful operator runs; a query calling one (or
/// with a GROUP BY) aggregates.
const AGGREGATES: [&str; 6] = ["count", "sum", "min", "max", "avg", "mean"];

/// Splits `query` when it aggregates (GROUP BY, or aggregate functions) a
/// derived table (or common table expression) over a stream that
/// deduplicates: a `SELECT DISTINCT [ON]`, or
/// the `ROW_NUMBER() OVER (PARTITION BY ...) = 1` idiom, its `rn = 1` in the
/// derived table or in the aggregating query's WHERE.
pub fn split_deduplication(
    query: &Query,
    is_stream: &dyn Fn(&str) -> bool,
) -> Result<Option<Chain>> {
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Ok(None);
    };
    if !aggregates(select) {
        return Ok(None);
    }
    let ctes: Vec<&Cte> = query.with.iter().flat_map(|w| &w.cte_tables).collect();
    // Each derived table (or common table expression) over the stream: where
    // it is, its query and alias, and which CTE it is.
    let mut derived = vec![];
    for (t, table) in select.from.iter().enumerate() {
        let relations =
            std::iter::once(&table.relation).chain(table.joins.iter().map(|j| &j.relation));
        for (r, relation) in relations.enumerate() {
            match relation {
                TableFactor::Derived {
                    subquery, alias, ..
                } if reads_stream(subquery, is_stream) => {
                    derived.push((t, r, subquery.as_ref().clone(), alias.clone(), None));
                }
                TableFactor::Table { name, alias, .. } => {
                    let named = ctes.iter().position(|cte| {
                        name.0.len() == 1
                            && name.0[0]
                                .as_ident()
                                .is_some_and(|id| same(id, &cte.alias.name))
                    });
                    if let Some(i) = named
                        && reads_stream(&ctes[i].query, is_stream)
                    {
                        let cte = &ctes[i].alias;
                        let mut alias = alias.clone().unwrap_or_else(|| cte.clone());
                        if alias.columns.is_empty() {
                            alias.columns = cte.columns.clone();
                        }
                        derived.push((t, r, ctes[i].query.as_ref().clone(), Some(alias), Some(i)));
                    }
                }
                _ => {}
            }
        }
    }
    if derived.len() != 1 {
        return Ok(None);
    }
    let (t, r, subquery, alias, cte) = derived.remove(0);
    let mut rest = query.clone();
    // The second stage reads the first's rows instead: the CTE, over the
    // stream, would not plan there.
    if let (Some(i), Some(with)) = (cte, &mut rest.with) {
        with.cte_tables.remove(i);
        if with.cte_tables.is_empty() {
            rest.with = None;
        }
    }
    let SetExpr::Select(outer) = rest.body.as_mut() else {
        return Ok(None);
    };
    let first = match row_number_alias(&subquery) {
        Some(rn) => {
            let mut conjuncts = vec![];
            if let Some(selection) = outer.selection.take() {
                split_conjuncts(selection, &mut conjuncts);
            }
            let (keep, rest_where): (Vec<_>, Vec<_>) =
                conjuncts.into_iter().partition(|c| is_first_row(c, &rn));
            outer.selection = rest_where.into_iter().reduce(|a, b| Expr::BinaryOp {
                left: Box::new(a),
                op: BinaryOperator::And,
                right: Box::new(b),
            });
            let Some(filter) = keep.into_iter().reduce(|a, b| Expr::BinaryOp {
                left: Box::new(a),
                op: BinaryOperator::And,
                right: Box::new(b),
            }) else {
                return Ok(None);
            };
            kept_where(subquery, alias.clone(), filter)?
        }
        None if deduplicates(&subquery) => subquery,
        None => return Ok(None),
    };
    let table = &mut outer.from[t];
    let relation = match r {
        0 => &mut table.relation,
        j => &mut table.joins[j - 1].relation,
    };
    *relation = stage_table(DEDUPLICATED, alias)?;
    Ok(Some(Chain { first, rest }))
}

/// Whether two identifiers name the same table, as DataFusion compares them
/// (an unquoted one in lower case).
fn same(a: &Ident, b: &Ident) -> bool {
    normal(a) == normal(b)
}

pub(crate) fn aggregates(select: &Select) -> bool {
    let grouped = match &select.group_by {
        GroupByExpr::All(_) => true,
        GroupByExpr::Expressions(exprs, _) => !exprs.is_empty(),
    };
    grouped || calls_aggregate(&select.projection) || calls_aggregate(&select.having)
}

fn calls_aggregate<V: Visit>(v: &V) -> bool {
    visit_expressions(v, |e| match e {
        Expr::Function(f)
            if f.over.is_none()
                && AGGREGATES
                    .iter()
                    .any(|a| f.name.to_string().eq_ignore_ascii_case(a)) =>
        {
            ControlFlow::Break(())
        }
        _ => ControlFlow::Continue(()),
    })
    .is_break()
}

pub(crate) fn reads_stream(query: &Query, is_stream: &dyn Fn(&str) -> bool) -> bool {
    visit_relations(query, |name| {
        let table = name
            .0
            .last()
            .and_then(|part| part.as_ident())
            .map(|id| match id.quote_style {
                Some(_) => id.value.clone(),
                None => id.value.to_lowercase(),
            });
        match table {
            Some(t) if is_stream(&t) => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        }
    })
    .is_break()
}

/// Whether `query` is a `SELECT DISTINCT [ON]` without GROUP BY, or keeps the
/// first row per key of a derived table by its ROW_NUMBER.
fn deduplicates(query: &Query) -> bool {
    let SetExpr::Select(select) = query.body.as_ref() else {
        return false;
    };
    if select.distinct.is_some() {
        return !aggregates(select);
    }
    let Some(selection) = &select.selection else {
        return false;
    };
    let mut conjuncts = vec![];
    split_conjuncts(selection.clone(), &mut conjuncts);
    select.from.iter().any(|t| {
        let relations = std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation));
        relations.into_iter().any(|r| match r {
            TableFactor::Derived { subquery, .. } => row_number_alias(subquery)
                .is_some_and(|rn| conjuncts.iter().any(|c| is_first_row(c, &rn))),
            _ => false,
        })
    })
}

/// The alias of the `ROW_NUMBER() OVER (...)` that `query` selects, if it does.
fn row_number_alias(query: &Query) -> Option<String> {
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    select.projection.iter().find_map(|item| match item {
        SelectItem::ExprWithAlias {
            expr: Expr::Function(f),
            alias,
        } if f.over.is_some() && f.name.to_string().eq_ignore_ascii_case("row_number") => {
            Some(alias.value.to_lowercase())
        }
        _ => None,
    })
}

fn split_conjuncts(e: Expr, out: &mut Vec<Expr>) {
    match e {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            split_conjuncts(*left, out);
            split_conjuncts(*right, out);
        }
        Expr::Nested(inner) => split_conjuncts(*inner, out),
        other => out.push(other),
    }
}

/// Whether `e` keeps the first row by the row number `rn`: `rn = 1`,
/// `rn <= 1` or `rn < 2`.
fn is_first_row(e: &Expr, rn: &str) -> bool {
    let Expr::BinaryOp { left, op, right } = e else {
        return false;
    };
    let names_rn = match left.as_ref() {
        Expr::Identifier(id) => id.value.eq_ignore_ascii_case(rn),
        Expr::CompoundIdentifier(ids) => ids
            .last()
            .is_some_and(|id| id.value.eq_ignore_ascii_case(rn)),
        _ => false,
    };
    let number = match right.as_ref() {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse::<i64>().ok(),
            _ => None,
        },
        _ => None,
    };
    names_rn
        && matches!(
            (op, number),
            (BinaryOperator::Eq | BinaryOperator::LtEq, Some(1)) | (BinaryOperator::Lt, Some(2))
        )
}

fn parse(sql: &str) -> Result<Query> {
    let query = Parser::new(&GenericDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_query())
        .map_err(|e| BrookError::internal(format!("parsing '{sql}': {e}")))?;
    Ok(*query)
}

/// `SELECT * FROM (<subquery>) AS <alias> WHERE <filter>`.
fn kept_where(subquery: Query, alias: Option<TableAlias>, filter: Expr) -> Result<Query> {
    let mut query = parse("SELECT * FROM (SELECT 1)")?;
    if let SetExpr::Select(select) = query.body.as_mut()
        && let Some(TableFactor::Derived {
            subquery: s,
            alias: a,
            ..
        }) = select.from.first_mut().map(|t| &mut t.relation)
    {
        **s = subquery;
        *a = alias;
        select.selection = Some(filter);
        return Ok(query);
    }
    Err(BrookError::internal("the first rows' query lost its shape"))
}

/// The table `name` ([`DEDUPLICATED`], [`JOINED`]), under `alias` if the
/// derived table had one.
fn stage_table(name: &str, alias: Option<TableAlias>) -> Result<TableFactor> {
    let query = parse(&format!("SELECT * FROM \"{name}\""))?;
    if let SetExpr::Select(select) = *query.body
        && let Some(mut table) = select.from.into_iter().next()
        && let TableFactor::Table { alias: a, .. } = &mut table.relation
    {
        *a = alias;
        return Ok(table.relation);
    }
    Err(BrookError::internal("a stage's table lost its shape"))
}

/// The name an aggregation over a join of two streams reads the join's rows by.
pub const JOINED: &str = "joined streams";

/// A column of the rows a join emits, as DataFusion names it (`table`, the
/// alias or table it comes from, and `name`), and the name the aggregating
/// stage reads it by: its own, or `table.name` when another table has a column
/// so named.
pub struct JoinedColumn {
    pub table: String,
    pub name: String,
    pub renamed: String,
}

/// `SELECT * FROM <from> WHERE <where>` of `query` when it aggregates (or is a
/// `SELECT DISTINCT`) over several tables, one of them a stream: the rows the
/// join under the aggregation emits, if it is a join of two streams.
pub fn join_below_aggregate(query: &Query, is_stream: &dyn Fn(&str) -> bool) -> Option<Query> {
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    let tables: usize = select.from.iter().map(|t| 1 + t.joins.len()).sum();
    if !(aggregates(select) || select.distinct.is_some()) || tables < 2 {
        return None;
    }
    if !reads_stream(query, is_stream) {
        return None;
    }
    let mut joined = parse("SELECT * FROM (SELECT 1)").ok()?;
    joined.with = query.with.clone();
    if let SetExpr::Select(s) = joined.body.as_mut() {
        s.from = select.from.clone();
        s.selection = select.selection.clone();
    }
    Some(joined)
}

/// Whether `query` aggregates (GROUP BY, or SELECT DISTINCT) over a join of
/// two streams anywhere but in its own SELECT over the join's FROM, the one
/// place [`split_join`] runs it: in a subquery, or over a subquery holding
/// the join.
pub fn aggregates_nested_stream_join(query: &Query, is_stream: &dyn Fn(&str) -> bool) -> bool {
    let stream_ctes = stream_ctes(query, is_stream);
    let reads = |relation: &TableFactor| match relation {
        TableFactor::Table { name, .. } => match &name.0[..] {
            [part] => part
                .as_ident()
                .map(normal)
                .is_some_and(|n| is_stream(&n) || stream_ctes.contains(&n)),
            _ => false,
        },
        TableFactor::Derived { subquery, .. } => reads_stream(subquery, is_stream),
        _ => false,
    };
    let joins_streams = |select: &Select| relations(select).filter(|r| reads(r)).count() > 1;
    // Every SELECT, with whether it is the query's own.
    let mut bodies: Vec<(&SetExpr, bool)> = vec![(query.body.as_ref(), true)];
    bodies.extend(
        query
            .with
            .iter()
            .flat_map(|w| &w.cte_tables)
            .map(|cte| (cte.query.body.as_ref(), false)),
    );
    let mut selects = vec![];
    while let Some((body, top)) = bodies.pop() {
        selects.extend(selects_of(body).into_iter().map(|s| (s, top)));
        bodies.extend(
            selects_of(body)
                .into_iter()
                .flat_map(derived)
                .map(|b| (b, false)),
        );
    }
    selects.iter().any(|&(select, top)| {
        if !(aggregates(select) || select.distinct.is_some()) {
            return false;
        }
        if !top && joins_streams(select) {
            return true;
        }
        // A join of two streams in a subquery below the aggregation.
        let mut below: Vec<&SetExpr> = derived(select).collect();
        while let Some(body) = below.pop() {
            for s in selects_of(body) {
                if joins_streams(s) {
                    return true;
                }
                below.extend(derived(s));
            }
        }
        false
    })
}

/// The names of `query`'s common table expressions that read a stream.
pub fn stream_ctes(query: &Query, is_stream: &dyn Fn(&str) -> bool) -> Vec<String> {
    query
        .with
        .iter()
        .flat_map(|w| &w.cte_tables)
        .filter(|cte| reads_stream(&cte.query, is_stream))
        .map(|cte| normal(&cte.alias.name))
        .collect()
}

/// The tables (and derived tables) a SELECT's FROM names itself.
fn relations(select: &Select) -> impl Iterator<Item = &TableFactor> {
    select
        .from
        .iter()
        .flat_map(|t| std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)))
}

/// [`relations`], to change.
pub fn relations_mut(select: &mut Select) -> impl Iterator<Item = &mut TableFactor> {
    select.from.iter_mut().flat_map(|t| {
        std::iter::once(&mut t.relation).chain(t.joins.iter_mut().map(|j| &mut j.relation))
    })
}

/// The bodies of the derived tables in a SELECT's FROM.
fn derived(select: &Select) -> impl Iterator<Item = &SetExpr> {
    relations(select).filter_map(|r| match r {
        TableFactor::Derived { subquery, .. } => Some(subquery.body.as_ref()),
        _ => None,
    })
}

/// The SELECTs a query body is made of (those of each side of a UNION).
fn selects_of(body: &SetExpr) -> Vec<&Select> {
    match body {
        SetExpr::Select(select) => vec![select],
        SetExpr::Query(q) => selects_of(&q.body),
        SetExpr::SetOperation { left, right, .. } => {
            let mut all = selects_of(left);
            all.extend(selects_of(right));
            all
        }
        _ => vec![],
    }
}

/// Splits `query`, whose FROM and WHERE make a join of two streams emitting
/// `columns`, into the join (its columns renamed as `columns` say) and the
/// rest over [`JOINED`], each reference to a column of the join renamed.
pub fn split_join(query: &Query, columns: &[JoinedColumn]) -> Result<Chain> {
    let Some(mut first) = join_below_aggregate(query, &|_| true) else {
        return Err(BrookError::internal(
            "the join under an aggregation lost its shape",
        ));
    };
    let quoted = |s: &str| Ident::with_quote('"', s);
    if let SetExpr::Select(s) = first.body.as_mut() {
        s.projection = columns
            .iter()
            .map(|c| SelectItem::ExprWithAlias {
                expr: Expr::CompoundIdentifier(vec![quoted(&c.table), quoted(&c.name)]),
                alias: quoted(&c.renamed),
            })
            .collect();
    }
    let mut rest = query.clone();
    rest.with = None;
    let find = |table: Option<&Ident>, name: &Ident| {
        let found: Vec<&JoinedColumn> = columns
            .iter()
            .filter(|c| normal(name) == c.name && table.is_none_or(|t| normal(t) == c.table))
            .collect();
        match found[..] {
            [one] => Some(one.renamed.clone()),
            _ => None,
        }
    };
    let rename = |e: &mut Expr| {
        let renamed = match e {
            Expr::CompoundIdentifier(ids) if ids.len() >= 2 => {
                find(ids.get(ids.len() - 2), &ids[ids.len() - 1])
            }
            Expr::Identifier(id) => find(None, id).filter(|r| *r != normal(id)),
            _ => None,
        };
        if let Some(r) = renamed {
            *e = Expr::Identifier(quoted(&r));
        }
    };
    let SetExpr::Select(select) = rest.body.as_mut() else {
        return Err(BrookError::internal(
            "the aggregation over a join lost its shape",
        ));
    };
    // The output keeps the names the query gives it over the join itself.
    for item in &mut select.projection {
        if let SelectItem::UnnamedExpr(e) = item {
            let before = e.clone();
            let _ = visit_expressions_mut(e, |e| {
                rename(e);
                ControlFlow::<()>::Continue(())
            });
            if *e != before {
                let alias = match &before {
                    Expr::CompoundIdentifier(ids) if !ids.is_empty() => ids[ids.len() - 1].clone(),
                    other => quoted(&other.to_string()),
                };
                *item = SelectItem::ExprWithAlias {
                    expr: e.clone(),
                    alias,
                };
            }
        }
    }
    select.selection = None;
    select.from = vec![TableWithJoins {
        relation: stage_table(JOINED, None)?,
        joins: vec![],
    }];
    let _ = visit_expressions_mut(&mut rest, |e| {
        rename(e);
        ControlFlow::<()>::Continue(())
    });
    Ok(Chain { first, rest })
}

/// An identifier as DataFusion normalizes it (an unquoted one in lower case).
pub(crate) fn normal(id: &Ident) -> String {
    match id.quote_style {
        Some(_) => id.value.clone(),
        None => id.value.to_lowercase(),
    }
}

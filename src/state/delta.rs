//! State changes: the rows a batch added, changed or removed, keyed by their group.
//!
//! Rewriting a large state every batch makes the commit slow and the disk busy,
//! so a batch writes only its changes, and a full snapshot is written now and
//! then (Spark's delta files and snapshots). Loading replays the changes made
//! since the snapshot over it, newest first, so that a group's last change wins.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::compute::{filter_record_batch, not};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};

use crate::error::Result;

/// Marks a change row whose group was removed from the state.
const DELETED_COLUMN: &str = "__deleted";

/// The columns of a change file: the state's, and whether the group was removed.
pub fn schema(state: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Arc<Field>> = state.fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new(
        DELETED_COLUMN,
        DataType::Boolean,
        false,
    )));
    Arc::new(Schema::new_with_metadata(fields, state.metadata().clone()))
}

/// A batch's changes, in the change schema `schema` ([`schema`]): `upserts`
/// are the new rows of groups that changed, `deletes` the last rows of groups
/// that left the state.
pub fn changes(
    schema: &SchemaRef,
    upserts: &[RecordBatch],
    deletes: &[RecordBatch],
) -> Result<Vec<RecordBatch>> {
    let marked = |batches: &[RecordBatch], deleted: bool| {
        batches
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| {
                let mut columns = b.columns().to_vec();
                let flag: ArrayRef = Arc::new(BooleanArray::from(vec![deleted; b.num_rows()]));
                columns.push(flag);
                Ok(RecordBatch::try_new(schema.clone(), columns)?)
            })
            .collect::<Result<Vec<_>>>()
    };
    let mut out = marked(upserts, false)?;
    out.extend(marked(deletes, true)?);
    Ok(out)
}

/// The state after replaying `deltas` (oldest first) over `snapshot`, whose
/// first `keys` columns identify a group.
pub fn apply(
    snapshot: Vec<RecordBatch>,
    deltas: &[Vec<RecordBatch>],
    keys: usize,
    state: &SchemaRef,
) -> Result<Vec<RecordBatch>> {
    if deltas.iter().all(|d| d.is_empty()) {
        return Ok(snapshot);
    }
    let group_keys = GroupKeys::new(state, keys)?;
    let last = state.fields().len();
    let mut seen = HashSet::new();
    let mut newest_first = vec![];
    for delta in deltas.iter().rev() {
        for b in delta {
            let deleted = b.column(last).as_boolean();
            let first_sighting: BooleanArray = group_keys
                .of(b)?
                .into_iter()
                .map(|k| Some(seen.insert(k)))
                .collect();
            let live = datafusion::arrow::compute::and(&first_sighting, &not(deleted)?)?;
            let rows = filter_record_batch(b, &live)?;
            newest_first.push(rows.project(&(0..last).collect::<Vec<_>>())?);
        }
    }
    let mut out = Vec::with_capacity(snapshot.len() + newest_first.len());
    for b in snapshot {
        let untouched: BooleanArray = group_keys
            .of(&b)?
            .iter()
            .map(|k| Some(!seen.contains(k)))
            .collect();
        out.push(filter_record_batch(&b, &untouched)?);
    }
    out.extend(newest_first.into_iter().rev());
    Ok(out.into_iter().filter(|b| b.num_rows() > 0).collect())
}

/// Each row's group as bytes that compare equal exactly when the groups do.
struct GroupKeys {
    converter: Option<RowConverter>,
    keys: usize,
}

impl GroupKeys {
    fn new(state: &SchemaRef, keys: usize) -> Result<Self> {
        // Without GROUP BY there is one group, and every row belongs to it.
        let converter = if keys == 0 {
            None
        } else {
            let fields = state.fields()[..keys]
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect();
            Some(RowConverter::new(fields)?)
        };
        Ok(Self { converter, keys })
    }

    fn of(&self, batch: &RecordBatch) -> Result<Vec<Vec<u8>>> {
        let Some(converter) = &self.converter else {
            return Ok(vec![vec![]; batch.num_rows()]);
        };
        let rows = converter.convert_columns(&batch.columns()[..self.keys])?;
        Ok(rows.iter().map(|r| r.as_ref().to_vec()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, Int64Array, StringArray};

    fn state_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, true),
            Field::new("sum", DataType::Int64, true),
        ]))
    }

    fn rows(keys: &[Option<&str>], sums: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            state_schema(),
            vec![
                Arc::new(StringArray::from(keys.to_vec())),
                Arc::new(Int64Array::from(sums.to_vec())),
            ],
        )
        .unwrap()
    }

    fn sorted(batches: &[RecordBatch]) -> Vec<(Option<String>, i64)> {
        let mut out = vec![];
        for b in batches {
            let k = b.column(0).as_string::<i32>();
            let s = b
                .column(1)
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
            for i in 0..b.num_rows() {
                out.push((k.is_valid(i).then(|| k.value(i).to_string()), s.value(i)));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn the_last_change_of_a_group_wins_and_removed_groups_stay_removed() {
        let schema = state_schema();
        let snapshot = vec![rows(&[Some("a"), Some("b"), None], &[1, 2, 3])];
        let first = changes(
            &super::schema(&schema),
            &[rows(&[Some("a"), Some("c")], &[10, 30])],
            &[rows(&[Some("b")], &[2])],
        )
        .unwrap();
        let second = changes(
            &super::schema(&schema),
            &[rows(&[Some("b"), None], &[20, 33])],
            &[rows(&[Some("c")], &[30])],
        )
        .unwrap();
        let state = apply(snapshot, &[first, second], 1, &schema).unwrap();
        assert_eq!(
            sorted(&state),
            [(None, 33), (Some("a".into()), 10), (Some("b".into()), 20),]
        );
    }

    #[test]
    fn without_group_keys_the_newest_row_is_the_state() {
        let schema = state_schema();
        let snapshot = vec![rows(&[Some("x")], &[1])];
        let deltas = [
            changes(&super::schema(&schema), &[rows(&[Some("x")], &[2])], &[]).unwrap(),
            changes(&super::schema(&schema), &[rows(&[Some("x")], &[3])], &[]).unwrap(),
        ];
        let state = apply(snapshot, &deltas, 0, &schema).unwrap();
        assert_eq!(sorted(&state), [(Some("x".into()), 3)]);
    }
}

//! Any DataFusion aggregate kept as partial state between batches.
//!
//! A streaming aggregation keeps, per group, each aggregate's partial state
//! (what its `Accumulator::state` returns, and its groups accumulator's) rather
//! than its value, so that later rows merge into it. DataFusion has no plan
//! that aggregates rows into state, or merges states into state, so three
//! wrappers around the user's aggregate `f` give the plans of
//! [`incremental`](super::incremental) those steps:
//!
//! * [`state_of`]: aggregates rows as `f` would, but its value is `f`'s state,
//! * [`merge_of`]: takes `f`'s state columns as arguments and merges them,
//!   its value again `f`'s state,
//! * [`value_of`]: a scalar function of the state columns giving `f`'s value.
//!
//! The state of an aggregate with one state field is that field; with several
//! it is a struct of them (children `s0`, `s1`, ...), which the plans unpack
//! into one column per field. Each wrapper hands DataFusion `f`'s own
//! accumulators (its groups accumulator where it has one), so that count and
//! sum keep DataFusion's fast paths.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, StructArray, new_empty_array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields, SchemaRef};
use datafusion::common::{DFSchema, Result, ScalarValue, internal_err, plan_err};
use datafusion::execution::context::ExecutionProps;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::utils::AggregateOrderSensitivity;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, EmitTo, Expr, GroupsAccumulator,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::physical_expr::GroupsAccumulatorAdapter;
use datafusion::physical_expr::aggregate::{AggregateFunctionExpr, LoweredAggregateBuilder};

/// The physical form of the aggregate `e` (already type-coerced) over rows of
/// `input`, named `name`: what makes `f`'s accumulators with its arguments,
/// ORDER BY, DISTINCT and null handling.
pub fn lower(e: &Expr, input: &DFSchema, name: &str) -> Result<Arc<AggregateFunctionExpr>> {
    let props = ExecutionProps::new();
    let planning = PhysicalPlanningContext::default();
    let lowered = LoweredAggregateBuilder::new(e, input, input.as_arrow(), &props, &planning)
        .with_name(name)
        .build()?;
    Ok(lowered.aggregate)
}

/// Whether `f`'s states merge: an empty accumulator's state merged into
/// another. DataFusion's built-in aggregates all merge; a user's may not.
pub fn check_mergeable(f: &AggregateFunctionExpr) -> Result<()> {
    let state = f
        .create_accumulator()?
        .state()?
        .iter()
        .map(ScalarValue::to_array)
        .collect::<Result<Vec<_>>>()?;
    let mut merged = f.create_accumulator()?;
    merged.merge_batch(&state)?;
    merged.evaluate()?;
    Ok(())
}

/// The state of one aggregate as a wrapper returns it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layout {
    /// `f`'s function name, for errors of its accumulators.
    function: String,
    /// `f`'s state fields, as `f` declares them.
    fields: Vec<FieldRef>,
    /// The field's type when there is one, else a struct of them all.
    output: DataType,
}

impl Layout {
    pub fn new(f: &AggregateFunctionExpr) -> Result<Self> {
        let fields = f.state_fields()?;
        let output = match fields.as_slice() {
            [one] => one.data_type().clone(),
            _ => DataType::Struct(Self::children(&fields)),
        };
        Ok(Self {
            function: f.fun().name().to_string(),
            fields,
            output,
        })
    }

    fn children(fields: &[FieldRef]) -> Fields {
        fields
            .iter()
            .enumerate()
            .map(|(i, f)| Field::new(Self::child(i), f.data_type().clone(), true))
            .collect()
    }

    /// The name of the struct child holding state field `i`.
    pub fn child(i: usize) -> String {
        format!("s{i}")
    }

    /// The number of state fields.
    pub fn field_count(&self) -> usize {
        self.fields.len()
    }

    /// `f`'s state fields named for an aggregate called `name`, unique within its plan.
    fn state_fields(&self, name: &str) -> Vec<FieldRef> {
        self.fields
            .iter()
            .enumerate()
            .map(|(i, f)| Arc::new(f.as_ref().clone().with_name(format!("{name}[s{i}]"))))
            .collect()
    }

    /// State arrays of `f`'s accumulators as the state fields declare them.
    /// Where they differ, by the names of nested fields (those of an ORDER BY
    /// name the columns' places in the rows of the plan the accumulator runs
    /// in, not those of the plan it was declared for) or their nullability,
    /// the fields are the same by place.
    fn conform(&self, mut arrays: Vec<ArrayRef>) -> Result<Vec<ArrayRef>> {
        if arrays.len() != self.fields.len() {
            // The function's own fault (a user's accumulator), not brook's.
            return plan_err!(
                "aggregate '{}' returned {} state arrays but declares {} state fields",
                self.function,
                arrays.len(),
                self.fields.len()
            );
        }
        for (a, f) in arrays.iter_mut().zip(&self.fields) {
            if a.data_type() != f.data_type() {
                *a = cast(a, f.data_type())?;
            }
        }
        Ok(arrays)
    }

    fn conform_scalars(&self, values: Vec<ScalarValue>) -> Result<Vec<ScalarValue>> {
        if values.len() == self.fields.len()
            && values
                .iter()
                .zip(&self.fields)
                .all(|(v, f)| v.data_type() == *f.data_type())
        {
            return Ok(values);
        }
        // Through arrays: a scalar's own cast matches a struct's fields by name only.
        let arrays = values
            .iter()
            .map(ScalarValue::to_array)
            .collect::<Result<Vec<_>>>()?;
        self.conform(arrays)?
            .iter()
            .map(|a| ScalarValue::try_from_array(a, 0))
            .collect()
    }

    /// State arrays as one array of the wrapper's type.
    fn pack(&self, arrays: Vec<ArrayRef>) -> Result<ArrayRef> {
        let arrays = self.conform(arrays)?;
        if let [one] = arrays.as_slice() {
            return Ok(one.clone());
        }
        let DataType::Struct(children) = &self.output else {
            return internal_err!("a state of several fields is not a struct");
        };
        Ok(Arc::new(StructArray::try_new(
            children.clone(),
            arrays,
            None,
        )?))
    }

    fn pack_scalars(&self, values: Vec<ScalarValue>) -> Result<ScalarValue> {
        let arrays = values
            .iter()
            .map(ScalarValue::to_array)
            .collect::<Result<Vec<_>>>()?;
        ScalarValue::try_from_array(&self.pack(arrays)?, 0)
    }
}

/// `f` aggregating rows into its state: called with `f`'s arguments, FILTER,
/// ORDER BY and DISTINCT, accumulates as `f` and returns its state.
pub fn state_of(f: &AggregateFunctionExpr, layout: &Layout) -> AggregateUDF {
    AggregateUDF::new_from_impl(StateOf {
        name: format!("state_of_{}", f.fun().name()),
        inner: Arc::new(f.fun().clone()),
        value: f.field(),
        layout: layout.clone(),
        signature: Signature::variadic_any(Volatility::Immutable),
    })
}

/// What a [`state_of`] wrapper is made of, for another process (a cluster's
/// scheduler and executors) to make it again: `f`'s name, the return field its
/// accumulators are made for, and its state fields.
#[derive(Debug, Clone)]
pub struct StateOfParts {
    pub function: String,
    pub value: FieldRef,
    pub fields: Vec<FieldRef>,
}

impl StateOfParts {
    /// The parts of `udaf` if it is a [`state_of`] wrapper.
    pub fn of(udaf: &AggregateUDF) -> Option<Self> {
        let s = udaf.inner().downcast_ref::<StateOf>()?;
        Some(Self {
            function: s.inner.name().to_string(),
            value: s.value.clone(),
            fields: s.layout.fields.clone(),
        })
    }

    /// The wrapper again, around `f` (found by [`function`](Self::function)).
    pub fn make(self, f: Arc<AggregateUDF>) -> AggregateUDF {
        let output = match self.fields.as_slice() {
            [one] => one.data_type().clone(),
            _ => DataType::Struct(Layout::children(&self.fields)),
        };
        AggregateUDF::new_from_impl(StateOf {
            name: format!("state_of_{}", f.name()),
            inner: f,
            value: self.value,
            layout: Layout {
                function: self.function,
                fields: self.fields,
                output,
            },
            signature: Signature::variadic_any(Volatility::Immutable),
        })
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct StateOf {
    name: String,
    inner: Arc<AggregateUDF>,
    /// `f`'s own return field, which its accumulators are made for.
    value: FieldRef,
    layout: Layout,
    signature: Signature,
}

impl StateOf {
    fn inner_args<'a>(&self, args: AccumulatorArgs<'a>) -> AccumulatorArgs<'a> {
        AccumulatorArgs {
            return_field: self.value.clone(),
            ..args
        }
    }
}

impl AggregateUDFImpl for StateOf {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(self.layout.output.clone())
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(StateAccumulator {
            inner: self.inner.accumulator(self.inner_args(args))?,
            layout: self.layout.clone(),
            merge: false,
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(self.layout.state_fields(args.name))
    }

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        // As `groups_accumulated`, for the aggregate as called.
        !args.is_distinct
            && self
                .inner
                .groups_accumulator_supported(self.inner_args(args))
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(StateGroups {
            inner: self
                .inner
                .create_groups_accumulator(self.inner_args(args))?,
            layout: self.layout.clone(),
            merge: false,
        }))
    }

    fn with_beneficial_ordering(
        self: Arc<Self>,
        beneficial_ordering: bool,
    ) -> Result<Option<Arc<dyn AggregateUDFImpl>>> {
        let Some(inner) = self
            .inner
            .as_ref()
            .clone()
            .with_beneficial_ordering(beneficial_ordering)?
        else {
            return Ok(None);
        };
        Ok(Some(Arc::new(StateOf {
            name: self.name.clone(),
            inner: Arc::new(inner),
            value: self.value.clone(),
            layout: self.layout.clone(),
            signature: self.signature.clone(),
        })))
    }

    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        self.inner.order_sensitivity()
    }

    fn supports_null_handling_clause(&self) -> bool {
        self.inner.supports_null_handling_clause()
    }
}

/// One aggregate of a query as planned, equal to itself only: the wrappers made
/// for it are the same function, those of another aggregate are not, and the
/// planned aggregate has no equality of its own worth more than that.
#[derive(Debug)]
struct Planned(Arc<AggregateFunctionExpr>);

impl PartialEq for Planned {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Planned {}

impl Hash for Planned {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.name().hash(state);
    }
}

impl std::ops::Deref for Planned {
    type Target = AggregateFunctionExpr;

    fn deref(&self) -> &AggregateFunctionExpr {
        &self.0
    }
}

/// Whether `f`'s states are merged by its groups accumulator. Not for DISTINCT:
/// some of DataFusion's groups accumulators (bit_xor's) ignore it, and would
/// read the distinct values kept as state as the aggregate's own value.
fn groups_accumulated(f: &AggregateFunctionExpr) -> bool {
    !f.is_distinct() && f.groups_accumulator_supported()
}

/// `f` merging states: called with `f`'s state columns, returns the merged state.
/// `input`: the rows `f` was planned over.
pub fn merge_of(f: &Arc<AggregateFunctionExpr>, layout: &Layout, input: SchemaRef) -> AggregateUDF {
    AggregateUDF::new_from_impl(MergeOf {
        name: format!("merge_of_{}", f.fun().name()),
        f: Planned(f.clone()),
        layout: layout.clone(),
        input,
        signature: Signature::variadic_any(Volatility::Immutable),
    })
}

/// What a [`merge_of`] wrapper is made of, to be sent to a cluster's executors.
pub struct MergeOfParts {
    pub f: Arc<AggregateFunctionExpr>,
    /// The rows `f` was planned over.
    pub input: SchemaRef,
}

impl MergeOfParts {
    /// The parts of `udaf` if it is a [`merge_of`] wrapper.
    pub fn of(udaf: &AggregateUDF) -> Option<Self> {
        let m = udaf.inner().downcast_ref::<MergeOf>()?;
        Some(Self {
            f: m.f.0.clone(),
            input: m.input.clone(),
        })
    }

    /// The wrapper again.
    pub fn make(self) -> Result<AggregateUDF> {
        let layout = Layout::new(&self.f)?;
        Ok(merge_of(&self.f, &layout, self.input))
    }
}

/// Made with the physical form of `f` over the aggregation's input rather than
/// its own arguments (`f`'s state columns): `f`'s accumulators read their
/// literal arguments (a percentile, a separator) and ORDER BY from it.
#[derive(Debug, PartialEq, Eq, Hash)]
struct MergeOf {
    name: String,
    f: Planned,
    layout: Layout,
    input: SchemaRef,
    signature: Signature,
}

impl AggregateUDFImpl for MergeOf {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(self.layout.output.clone())
    }

    fn accumulator(&self, _: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(StateAccumulator {
            inner: self.f.create_accumulator()?,
            layout: self.layout.clone(),
            merge: true,
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(self.layout.state_fields(args.name))
    }

    fn groups_accumulator_supported(&self, _: AccumulatorArgs) -> bool {
        groups_accumulated(&self.f)
    }

    fn create_groups_accumulator(&self, _: AccumulatorArgs) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(StateGroups {
            inner: self.f.create_groups_accumulator()?,
            layout: self.layout.clone(),
            merge: true,
        }))
    }

    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        AggregateOrderSensitivity::Insensitive
    }
}

/// `f`'s accumulator whose value is its state. `merge`: its input rows are
/// states to merge rather than `f`'s arguments.
#[derive(Debug)]
struct StateAccumulator {
    inner: Box<dyn Accumulator>,
    layout: Layout,
    merge: bool,
}

impl Accumulator for StateAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        match self.merge {
            true => self.inner.merge_batch(values),
            false => self.inner.update_batch(values),
        }
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let state = self.inner.state()?;
        self.layout.pack_scalars(state)
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let state = self.inner.state()?;
        self.layout.conform_scalars(state)
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.inner.merge_batch(states)
    }
}

/// `f`'s groups accumulator whose value is its state; `merge` as above.
struct StateGroups {
    inner: Box<dyn GroupsAccumulator>,
    layout: Layout,
    merge: bool,
}

impl GroupsAccumulator for StateGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        if !self.merge {
            return self
                .inner
                .update_batch(values, group_indices, opt_filter, total_num_groups);
        }
        if opt_filter.is_some() {
            return internal_err!("states are merged without a FILTER");
        }
        self.inner
            .merge_batch(values, group_indices, total_num_groups)
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let state = self.inner.state(emit_to)?;
        self.layout.pack(state)
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let state = self.inner.state(emit_to)?;
        self.layout.conform(state)
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.inner
            .merge_batch(values, group_indices, total_num_groups)
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        match (self.merge, opt_filter) {
            (false, _) => self
                .layout
                .conform(self.inner.convert_to_state(values, opt_filter)?),
            // Merging: each input row is a state already.
            (true, None) => Ok(values.to_vec()),
            (true, Some(_)) => internal_err!("states are merged without a FILTER"),
        }
    }

    fn size(&self) -> usize {
        self.inner.size()
    }
}

/// `f`'s value from its state columns, a row's value from the row's state.
pub fn value_of(f: &Arc<AggregateFunctionExpr>) -> ScalarUDF {
    ScalarUDF::new_from_impl(ValueOf {
        name: format!("value_of_{}", f.fun().name()),
        f: Planned(f.clone()),
        signature: Signature::variadic_any(Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct ValueOf {
    name: String,
    f: Planned,
    signature: Signature,
}

impl ScalarUDFImpl for ValueOf {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(self.f.field().data_type().clone())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        if rows == 0 {
            return Ok(ColumnarValue::Array(new_empty_array(
                self.f.field().data_type(),
            )));
        }
        let states = args
            .args
            .iter()
            .map(|a| a.to_array(rows))
            .collect::<Result<Vec<_>>>()?;
        // Each row is a group of its own.
        let mut groups: Box<dyn GroupsAccumulator> = if groups_accumulated(&self.f) {
            self.f.create_groups_accumulator()?
        } else {
            let f = self.f.clone();
            Box::new(GroupsAccumulatorAdapter::new(move || {
                f.create_accumulator()
            }))
        };
        let indices: Vec<usize> = (0..rows).collect();
        groups.merge_batch(&states, &indices, rows)?;
        Ok(ColumnarValue::Array(groups.evaluate(EmitTo::All)?))
    }
}

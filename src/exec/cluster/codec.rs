//! How brook's parts of a batch's plan cross to a cluster: the scan of a
//! batch's files ([`ScanTable`] in the logical plan the driver sends, [`ScanExec`]
//! in the stage plans the scheduler sends the executors), the merge into state
//! kept on the executors ([`StateMergeNode`], [`StateMergeExec`], with the
//! query's merge plan and its slots inside), and the aggregates that keep
//! partial state ([`StateOfParts`], [`MergeOfParts`]). Everything else is Ballista's:
//! these codecs wrap its own, which the scheduler and executors of `brook
//! scheduler` and `brook executor` and the driver all install.

use std::sync::{Arc, LazyLock};

use ballista_core::serde::{BallistaLogicalExtensionCodec, BallistaPhysicalExtensionCodec};
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::common::{DataFusionError, Result, TableReference};
use datafusion::execution::TaskContext;
use datafusion::functions_aggregate::all_default_aggregate_functions;
use datafusion::logical_expr::{AggregateUDF, Extension, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode, PhysicalGroupBy};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::prelude::SessionContext;
use datafusion_proto::bytes::{
    physical_plan_from_bytes_with_extension_codec, physical_plan_to_bytes_with_extension_codec,
};
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use serde::{Deserialize, Serialize};

use super::scan::{ScanExec, ScanSpec, ScanTable, external, schema_bytes};
use super::state::{StateMergeExec, StateMergeNode, StateSpec};
use crate::sql::partial::{MergeOfParts, StateOfParts};
use crate::sql::slot::{Slot, SlotExec};

/// Marks brook's payloads, so that Ballista's own are told apart from them.
const SCAN: &[u8] = b"brook-scan-v1\n";
const STATE_OF: &[u8] = b"brook-state-of-v1\n";
const MERGE_OF: &[u8] = b"brook-merge-of-v1\n";
const STATE_MERGE: &[u8] = b"brook-state-merge-v1\n";
const SLOT: &[u8] = b"brook-slot-v1\n";

#[derive(Serialize, Deserialize)]
struct EncodedSlot {
    /// The slot's schema.
    schema: Vec<u8>,
    projection: Option<Vec<usize>>,
    partitions: usize,
}

#[derive(Serialize, Deserialize)]
struct EncodedScan {
    spec: ScanSpec,
    projection: Option<Vec<usize>>,
}

#[derive(Serialize, Deserialize)]
struct EncodedStateOf {
    function: String,
    /// The value field, then the state fields, as a schema.
    fields: Vec<u8>,
}

fn failed(what: &str, e: impl std::fmt::Display) -> DataFusionError {
    DataFusionError::Internal(format!("brook's cluster codec: {what}: {e}"))
}

fn encode_json(prefix: &[u8], value: &impl Serialize, buf: &mut Vec<u8>) -> Result<()> {
    buf.extend_from_slice(prefix);
    serde_json::to_writer(buf, value).map_err(|e| failed("encoding", e))
}

fn decode_json<T: for<'a> Deserialize<'a>>(prefix: &[u8], buf: &[u8]) -> Option<Result<T>> {
    let body = buf.strip_prefix(prefix)?;
    Some(serde_json::from_slice(body).map_err(|e| failed("decoding", e)))
}

/// `text` and `bytes` after `prefix`, the text's length first.
fn encode_pair(prefix: &[u8], text: &[u8], bytes: &[u8], buf: &mut Vec<u8>) {
    buf.extend_from_slice(prefix);
    buf.extend_from_slice(&(text.len() as u64).to_le_bytes());
    buf.extend_from_slice(text);
    buf.extend_from_slice(bytes);
}

fn decode_pair<'a>(prefix: &[u8], buf: &'a [u8]) -> Option<Result<(&'a [u8], &'a [u8])>> {
    let body = buf.strip_prefix(prefix)?;
    let split = || {
        let (len, rest) = body.split_first_chunk::<8>()?;
        let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
        (len <= rest.len()).then(|| rest.split_at(len))
    };
    Some(split().ok_or_else(|| failed("decoding", "a truncated payload")))
}

fn encode_state_merge(spec: &str, merge: &[u8], buf: &mut Vec<u8>) {
    encode_pair(STATE_MERGE, spec.as_bytes(), merge, buf);
}

fn decode_state_merge(buf: &[u8]) -> Option<Result<(String, Vec<u8>)>> {
    let pair = decode_pair(STATE_MERGE, buf)?;
    Some(pair.and_then(|(spec, merge)| {
        let spec = String::from_utf8(spec.to_vec()).map_err(|e| failed("decoding", e))?;
        Ok((spec, merge.to_vec()))
    }))
}

/// A `merge_of` wrapper: `f` travels as a partial aggregation over no rows of
/// the input it was planned over, which DataFusion's own codec writes.
fn encode_merge_of(udaf: &AggregateUDF, buf: &mut Vec<u8>) -> Result<bool> {
    let Some(parts) = MergeOfParts::of(udaf) else {
        return Ok(false);
    };
    let input = parts.input.clone();
    let carrier = AggregateExec::try_new(
        AggregateMode::Partial,
        PhysicalGroupBy::new_single(vec![]),
        vec![parts.f],
        vec![None],
        Arc::new(EmptyExec::new(input.clone())),
        input,
    )?;
    let bytes = physical_plan_to_bytes_with_extension_codec(
        Arc::new(carrier),
        &BrookPhysicalCodec::default(),
    )?;
    encode_pair(MERGE_OF, &[], &bytes, buf);
    Ok(true)
}

/// DataFusion's own functions, which are all `f` can be on a cluster, made
/// once: a session registers hundreds, and each task decodes its merges.
static BUILT_INS: LazyLock<Arc<TaskContext>> = LazyLock::new(|| SessionContext::new().task_ctx());

fn decode_merge_of(buf: &[u8]) -> Option<Result<Arc<AggregateUDF>>> {
    let pair = decode_pair(MERGE_OF, buf)?;
    Some(pair.and_then(|(_, bytes)| {
        let carrier = physical_plan_from_bytes_with_extension_codec(
            bytes,
            &BUILT_INS,
            &BrookPhysicalCodec::default(),
        )?;
        let aggregate = carrier
            .downcast_ref::<AggregateExec>()
            .and_then(|a| a.aggr_expr().first().cloned())
            .ok_or_else(|| failed("decoding a merge", "no aggregate"))?;
        let parts = MergeOfParts {
            input: carrier
                .children()
                .first()
                .map(|c| c.schema())
                .ok_or_else(|| failed("decoding a merge", "no input"))?,
            f: aggregate,
        };
        Ok(Arc::new(parts.make()?))
    }))
}

fn encode_state_of(udaf: &AggregateUDF, buf: &mut Vec<u8>) -> Result<bool> {
    let Some(parts) = StateOfParts::of(udaf) else {
        return Ok(false);
    };
    let fields: Vec<_> = std::iter::once(parts.value).chain(parts.fields).collect();
    let encoded = EncodedStateOf {
        function: parts.function,
        fields: schema_bytes(&Schema::new(fields)),
    };
    encode_json(STATE_OF, &encoded, buf)?;
    Ok(true)
}

/// A `state_of` wrapper around one of DataFusion's aggregates: the functions
/// a cluster's processes know are DataFusion's, not those a driver registered.
fn decode_state_of(buf: &[u8]) -> Option<Result<Arc<AggregateUDF>>> {
    let decoded = decode_json::<EncodedStateOf>(STATE_OF, buf)?;
    Some(decoded.and_then(|e| {
        let schema = datafusion::arrow::ipc::convert::try_schema_from_flatbuffer_bytes(&e.fields)
            .map_err(|err| failed("decoding a state's fields", err))?;
        let mut fields = schema.fields().iter().cloned();
        let value = fields
            .next()
            .ok_or_else(|| failed("decoding a state's fields", "none"))?;
        let f = all_default_aggregate_functions()
            .into_iter()
            .find(|f| f.name() == e.function || f.aliases().contains(&e.function))
            .ok_or_else(|| {
                DataFusionError::Plan(format!(
                    "aggregate '{}' is not known on the cluster: its executors have \
                     DataFusion's built-in aggregates only",
                    e.function
                ))
            })?;
        let parts = StateOfParts {
            function: e.function,
            value,
            fields: fields.collect(),
        };
        Ok(Arc::new(parts.make(f)))
    }))
}

/// A `state_of` or `merge_of` wrapper if `buf` holds one, else what `other` makes of it.
fn decode_udaf(
    buf: &[u8],
    other: impl FnOnce() -> Result<Arc<AggregateUDF>>,
) -> Result<Arc<AggregateUDF>> {
    decode_state_of(buf)
        .or_else(|| decode_merge_of(buf))
        .unwrap_or_else(other)
}

/// `node` into `buf` if it is a `state_of` or `merge_of` wrapper, else as `other` encodes it.
fn encode_udaf(
    node: &AggregateUDF,
    buf: &mut Vec<u8>,
    other: impl FnOnce(&mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    if encode_state_of(node, buf)? || encode_merge_of(node, buf)? {
        return Ok(());
    }
    other(buf)
}

#[derive(Debug, Default)]
pub struct BrookLogicalCodec {
    ballista: BallistaLogicalExtensionCodec,
}

impl LogicalExtensionCodec for BrookLogicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[LogicalPlan],
        ctx: &TaskContext,
    ) -> Result<Extension> {
        match decode_state_merge(buf) {
            Some(decoded) => {
                let (spec, merge) = decoded?;
                let [input] = inputs else {
                    return Err(failed("decoding a state merge", "it has no input"));
                };
                let node = StateMergeNode {
                    spec,
                    merge,
                    input: input.clone(),
                };
                Ok(Extension {
                    node: Arc::new(node),
                })
            }
            None => self.ballista.try_decode(buf, inputs, ctx),
        }
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> Result<()> {
        match node.node.as_any().downcast_ref::<StateMergeNode>() {
            Some(merge) => {
                encode_state_merge(&merge.spec, &merge.merge, buf);
                Ok(())
            }
            None => self.ballista.try_encode(node, buf),
        }
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: SchemaRef,
        ctx: &TaskContext,
    ) -> Result<Arc<dyn TableProvider>> {
        match decode_json::<EncodedScan>(SCAN, buf) {
            Some(scan) => Ok(Arc::new(ScanTable::new(scan?.spec).map_err(external)?)),
            None => self
                .ballista
                .try_decode_table_provider(buf, table_ref, schema, ctx),
        }
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn TableProvider>,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        match node.downcast_ref::<ScanTable>() {
            Some(table) => {
                let scan = EncodedScan {
                    spec: table.spec.as_ref().clone(),
                    projection: None,
                };
                encode_json(SCAN, &scan, buf)
            }
            None => self
                .ballista
                .try_encode_table_provider(table_ref, node, buf),
        }
    }

    fn try_decode_file_format(
        &self,
        buf: &[u8],
        ctx: &TaskContext,
    ) -> Result<Arc<dyn datafusion::datasource::file_format::FileFormatFactory>> {
        self.ballista.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(
        &self,
        buf: &mut Vec<u8>,
        node: Arc<dyn datafusion::datasource::file_format::FileFormatFactory>,
    ) -> Result<()> {
        self.ballista.try_encode_file_format(buf, node)
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        decode_udaf(buf, || self.ballista.try_decode_udaf(name, buf))
    }

    fn try_encode_udaf(&self, node: &AggregateUDF, buf: &mut Vec<u8>) -> Result<()> {
        encode_udaf(node, buf, |buf| self.ballista.try_encode_udaf(node, buf))
    }
}

#[derive(Debug, Default)]
pub struct BrookPhysicalCodec {
    ballista: BallistaPhysicalExtensionCodec,
}

impl PhysicalExtensionCodec for BrookPhysicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if let Some(scan) = decode_json::<EncodedScan>(SCAN, buf) {
            let scan = scan?;
            let [parts] = inputs else {
                return Err(failed("decoding a scan", "it has no part numbers"));
            };
            return Ok(Arc::new(ScanExec::over(
                Arc::new(scan.spec),
                scan.projection,
                parts.clone(),
            )?));
        }
        if let Some(decoded) = decode_state_merge(buf) {
            let (spec, merge) = decoded?;
            let [input, parts] = inputs else {
                return Err(failed(
                    "decoding a state merge",
                    "it has not its two inputs",
                ));
            };
            let spec: StateSpec =
                serde_json::from_str(&spec).map_err(|e| failed("decoding a state merge", e))?;
            return Ok(Arc::new(StateMergeExec::new(
                Arc::new(spec),
                Arc::new(merge),
                input.clone(),
                parts.clone(),
            )));
        }
        if let Some(slot) = decode_json::<EncodedSlot>(SLOT, buf) {
            let slot = slot?;
            let schema =
                datafusion::arrow::ipc::convert::try_schema_from_flatbuffer_bytes(&slot.schema)
                    .map_err(|e| failed("decoding a slot's schema", e))?;
            return Ok(Arc::new(SlotExec::new(
                Slot::new(&schema),
                slot.projection,
                slot.partitions,
            )?));
        }
        self.ballista.try_decode(buf, inputs, ctx, proto_converter)
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        if let Some(exec) = node.downcast_ref::<ScanExec>() {
            let scan = EncodedScan {
                spec: exec.spec.as_ref().clone(),
                projection: exec.projection.clone(),
            };
            return encode_json(SCAN, &scan, buf);
        }
        if let Some(exec) = node.downcast_ref::<StateMergeExec>() {
            let spec = serde_json::to_string(exec.spec.as_ref())
                .map_err(|e| failed("encoding a state merge", e))?;
            encode_state_merge(&spec, &exec.merge, buf);
            return Ok(());
        }
        if let Some(exec) = node.downcast_ref::<SlotExec>() {
            let slot = EncodedSlot {
                schema: schema_bytes(exec.slot().schema()),
                projection: exec.projection().cloned(),
                partitions: exec.partitions(),
            };
            return encode_json(SLOT, &slot, buf);
        }
        self.ballista.try_encode(node, buf, proto_converter)
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        decode_udaf(buf, || self.ballista.try_decode_udaf(name, buf))
    }

    fn try_encode_udaf(&self, node: &AggregateUDF, buf: &mut Vec<u8>) -> Result<()> {
        encode_udaf(node, buf, |buf| self.ballista.try_encode_udaf(node, buf))
    }
}

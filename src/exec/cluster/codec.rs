//! How brook's parts of a batch's plan cross to a cluster: the scan of a
//! batch's files ([`ScanTable`] in the logical plan the driver sends, [`ScanExec`]
//! in the stage plans the scheduler sends the executors) and the aggregates
//! that keep partial state ([`StateOfParts`]). Everything else is Ballista's:
//! these codecs wrap its own, which the scheduler and executors of `brook
//! scheduler` and `brook executor` and the driver all install.

use std::sync::Arc;

use ballista_core::serde::{BallistaLogicalExtensionCodec, BallistaPhysicalExtensionCodec};
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::common::{DataFusionError, Result, TableReference};
use datafusion::execution::TaskContext;
use datafusion::functions_aggregate::all_default_aggregate_functions;
use datafusion::logical_expr::{AggregateUDF, Extension, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use serde::{Deserialize, Serialize};

use super::scan::{ScanExec, ScanSpec, ScanTable, external, schema_bytes};
use crate::sql::partial::StateOfParts;

/// Marks brook's payloads, so that Ballista's own are told apart from them.
const SCAN: &[u8] = b"brook-scan-v1\n";
const STATE_OF: &[u8] = b"brook-state-of-v1\n";

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

/// A `state_of` wrapper if `buf` holds one, else what `other` makes of it.
fn decode_udaf(
    buf: &[u8],
    other: impl FnOnce() -> Result<Arc<AggregateUDF>>,
) -> Result<Arc<AggregateUDF>> {
    decode_state_of(buf).unwrap_or_else(other)
}

/// `node` into `buf` if it is a `state_of` wrapper, else as `other` encodes it.
fn encode_udaf(
    node: &AggregateUDF,
    buf: &mut Vec<u8>,
    other: impl FnOnce(&mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    if encode_state_of(node, buf)? {
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
        self.ballista.try_decode(buf, inputs, ctx)
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> Result<()> {
        self.ballista.try_encode(node, buf)
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
        match decode_json::<EncodedScan>(SCAN, buf) {
            Some(scan) => {
                let scan = scan?;
                let [parts] = inputs else {
                    return Err(failed("decoding a scan", "it has no part numbers"));
                };
                Ok(Arc::new(ScanExec::over(
                    Arc::new(scan.spec),
                    scan.projection,
                    parts.clone(),
                )?))
            }
            None => self.ballista.try_decode(buf, inputs, ctx, proto_converter),
        }
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        match node.downcast_ref::<ScanExec>() {
            Some(exec) => {
                let scan = EncodedScan {
                    spec: exec.spec.as_ref().clone(),
                    projection: exec.projection.clone(),
                };
                encode_json(SCAN, &scan, buf)
            }
            None => self.ballista.try_encode(node, buf, proto_converter),
        }
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        decode_udaf(buf, || self.ballista.try_decode_udaf(name, buf))
    }

    fn try_encode_udaf(&self, node: &AggregateUDF, buf: &mut Vec<u8>) -> Result<()> {
        encode_udaf(node, buf, |buf| self.ballista.try_encode_udaf(node, buf))
    }
}

//! `brook scheduler` and `brook executor`: Apache Ballista's own scheduler and
//! executor, run from the brook binary with brook's plan codecs, so that a
//! cluster of brook processes runs the batches of `brook run --cluster` and
//! the DataFusion plans other Ballista clients (`SessionContext::remote`) send.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ballista_core::error::BallistaError;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::{SchedulerConfig, TaskDistributionPolicy};
use ballista_scheduler::scheduler_process::{create_scheduler, start_grpc_service_with_listener};
use clap::Args;
use datafusion::error::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};

use crate::cli::{StopSignals, note};
use crate::error::{BrookError, Result};
use crate::exec::cluster::codec::{BrookLogicalCodec, BrookPhysicalCodec};
use crate::exec::cluster::state::BrookQueryPlanner;

#[derive(Args)]
pub(crate) struct SchedulerArgs {
    /// Address to listen on (an IP); 0.0.0.0 serves other machines too.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Port of the scheduler's gRPC service and REST API (/api/executors, /api/jobs).
    #[arg(long, default_value_t = 50050)]
    port: u16,
    /// Name or address the executors reach this scheduler at (default: the --bind address).
    #[arg(long, value_name = "HOST")]
    external_host: Option<String>,
    /// Seconds without a heartbeat after which an executor counts as lost, and its
    /// tasks run again elsewhere; longer than the executors' --heartbeat-interval.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    executor_timeout: u64,
}

#[derive(Args)]
pub(crate) struct ExecutorArgs {
    /// The scheduler to register with, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    scheduler: String,
    /// Address to listen on (an IP); 0.0.0.0 serves other machines too.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Port that serves the results and shuffle data of this executor's tasks.
    #[arg(long, default_value_t = 50051)]
    port: u16,
    /// Port the scheduler sends tasks to (default: --port + 1).
    #[arg(long)]
    grpc_port: Option<u16>,
    /// Name or address the scheduler and the other executors reach this executor at
    /// (default: the address the scheduler sees it connect from).
    #[arg(long, value_name = "HOST")]
    external_host: Option<String>,
    /// Directory for the shuffle data of this executor's tasks (default: a temporary one).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Tasks this executor runs at once (default: the machine's cores).
    #[arg(long, value_name = "N")]
    slots: Option<usize>,
    /// Seconds between the heartbeats that tell the scheduler this executor is alive.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    heartbeat_interval: u64,
}

/// How Ballista spells a host in its `host:port` strings.
fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => ip.to_string(),
        IpAddr::V6(_) => format!("[{ip}]"),
    }
}

fn ballista_error(context: &str, e: BallistaError) -> BrookError {
    BrookError::Context {
        context: context.into(),
        source: Box::new(DataFusionError::External(Box::new(e)).into()),
    }
}

/// Runs Ballista's scheduler until Ctrl-C or SIGTERM.
pub(crate) async fn run_scheduler(args: SchedulerArgs) -> Result<()> {
    let mut signals = StopSignals::listen()?;
    // The scheduler tells executors to report task status to this host: a
    // wildcard address would send them nowhere.
    let external_host = match args.external_host {
        Some(name) => name,
        None if args.bind.is_unspecified() => {
            return Err(BrookError::option(
                "--external-host",
                format!(
                    "give the name or address executors reach this scheduler at when \
                     --bind is {}",
                    args.bind
                ),
            ));
        }
        None => host(args.bind),
    };
    if args.executor_timeout < 2 {
        return Err(BrookError::option(
            "--executor-timeout",
            "must be at least 2 seconds (and longer than the executors' --heartbeat-interval)",
        ));
    }
    let addr = SocketAddr::new(args.bind, args.port);
    // Bound here, not by Ballista, so that a taken port is a clear error at start.
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        BrookError::option(
            "--port",
            format!("cannot listen on {addr}: {e} (another scheduler there? give another --port)"),
        )
    })?;
    let config = SchedulerConfig {
        bind_host: host(args.bind),
        bind_port: args.port,
        external_host,
        // Ballista's advice for a cluster with a single scheduler: spread the
        // tasks over the executors rather than filling one first.
        task_distribution: TaskDistributionPolicy::RoundRobin,
        // Ballista's default of 180 s would stall a streaming query's batch
        // that long on an executor killed while running its tasks.
        executor_timeout_seconds: args.executor_timeout,
        expire_dead_executor_interval_seconds: (args.executor_timeout / 3).max(1),
        no_executors_grace_period_seconds: args.executor_timeout,
        override_logical_codec: Some(Arc::new(BrookLogicalCodec::default())),
        override_physical_codec: Some(Arc::new(BrookPhysicalCodec::default())),
        // Ballista's session, planning brook's merge into state kept on the executors.
        override_session_builder: Some(Arc::new(|config| {
            let state = ballista_core::utils::default_session_builder(config)?;
            Ok(SessionStateBuilder::new_from_existing(state)
                .with_query_planner(Arc::new(BrookQueryPlanner))
                .build())
        })),
        ..SchedulerConfig::default()
    };
    config
        .validate()
        .map_err(|e| ballista_error("scheduler configuration", e))?;
    let config = Arc::new(config);
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .map_err(|e| ballista_error("cannot start the scheduler", e))?;
    let scheduler = create_scheduler::<LogicalPlanNode, PhysicalPlanNode>(cluster, config)
        .await
        .map_err(|e| ballista_error("cannot start the scheduler", e))?;
    note(&format!(
        "brook scheduler listening on {addr} (executors: http://{addr}/api/executors, \
         jobs: http://{addr}/api/jobs)"
    ));
    tokio::select! {
        served = start_grpc_service_with_listener(listener, scheduler) => {
            served.map_err(|e| ballista_error("the scheduler stopped", e))
        }
        _ = signals.recv() => Ok(()),
    }
}

/// `HOST:PORT` of `--scheduler`.
fn scheduler_address(address: &str) -> Result<(String, u16)> {
    let bad = |why: &str| {
        BrookError::option(
            "--scheduler",
            format!("'{address}' {why}: give HOST:PORT, e.g. 127.0.0.1:50050"),
        )
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
    let port = port.parse().map_err(|_| bad("has no valid port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    let host = match host.parse::<IpAddr>() {
        Ok(ip) => self::host(ip),
        Err(_) => host.to_string(),
    };
    Ok((host, port))
}

/// Runs Ballista's executor, registered with `--scheduler`, until Ctrl-C or
/// SIGTERM (Ballista's executor handles both: it tells the scheduler it is
/// leaving and lets its running tasks finish).
pub(crate) async fn run_executor(args: ExecutorArgs) -> Result<()> {
    let mut signals = StopSignals::listen()?;
    let (scheduler_host, scheduler_port) = scheduler_address(&args.scheduler)?;
    let slots = match args.slots {
        Some(0) => return Err(BrookError::option("--slots", "must be at least 1")),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    if args.heartbeat_interval == 0 {
        return Err(BrookError::option(
            "--heartbeat-interval",
            "must be at least 1 second",
        ));
    }
    if args.port == 0 {
        return Err(BrookError::option(
            "--port",
            "give a port number: the executor tells the scheduler its port before it listens",
        ));
    }
    let grpc_port = match args.grpc_port {
        Some(0) => return Err(BrookError::option("--grpc-port", "give a port number")),
        Some(port) => port,
        None => args.port.checked_add(1).ok_or_else(|| {
            BrookError::option("--port", "leaves no port above it: give --grpc-port")
        })?,
    };
    if grpc_port == args.port {
        return Err(BrookError::option("--grpc-port", "must differ from --port"));
    }
    // Ballista finds a taken port only after registering with the scheduler,
    // and then just logs it: try both first for a clear error.
    for (option, port) in [("--port", args.port), ("--grpc-port", grpc_port)] {
        let addr = SocketAddr::new(args.bind, port);
        std::net::TcpListener::bind(addr)
            .map_err(|e| BrookError::option(option, format!("cannot listen on {addr}: {e}")))?;
    }
    let work_dir = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| BrookError::io(dir, e))?;
            let dir = dir.to_str().ok_or_else(|| {
                BrookError::option(
                    "--work-dir",
                    format!("{} is not valid UTF-8", dir.display()),
                )
            })?;
            Some(dir.to_string())
        }
        None => None,
    };
    let config = ExecutorProcessConfig {
        bind_host: host(args.bind),
        external_host: args.external_host,
        port: args.port,
        grpc_port,
        scheduler_host: scheduler_host.clone(),
        scheduler_port,
        vcores: slots,
        work_dir,
        executor_heartbeat_interval_seconds: args.heartbeat_interval,
        override_logical_codec: Some(Arc::new(BrookLogicalCodec::default())),
        override_physical_codec: Some(Arc::new(BrookPhysicalCodec::default())),
        ..ExecutorProcessConfig::default()
    };
    let signalled = tokio::spawn(async move { signals.recv().await });
    note(&format!(
        "brook executor on {} (results on port {}, tasks on {grpc_port}, {slots} task slot(s)), \
         scheduler {scheduler_host}:{scheduler_port}",
        args.bind, args.port
    ));
    match start_executor_process(Arc::new(config)).await {
        Ok(()) => {
            // Ballista also returns when one of its services ends (its log says
            // why), which is a failure unless a signal asked it to stop.
            match tokio::time::timeout(Duration::from_millis(500), signalled).await {
                Ok(_) => Ok(()),
                Err(_) => Err(BrookError::Cancelled(
                    "the executor stopped without a signal: one of its services ended \
                     (the log above says which)"
                        .into(),
                )),
            }
        }
        Err(BallistaError::GrpcConnectionError(why)) => Err(BrookError::option(
            "--scheduler",
            format!(
                "cannot reach the scheduler at {scheduler_host}:{scheduler_port} ({why}): \
                 is `brook scheduler` running there?"
            ),
        )),
        Err(e) => Err(ballista_error("the executor stopped", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_address_takes_host_and_port() {
        assert_eq!(
            scheduler_address("10.0.0.5:50050").unwrap(),
            ("10.0.0.5".to_string(), 50050)
        );
        assert_eq!(
            scheduler_address("[::1]:7").unwrap(),
            ("[::1]".to_string(), 7)
        );
        assert_eq!(
            scheduler_address("sched.local:50050").unwrap(),
            ("sched.local".to_string(), 50050)
        );
        let err = scheduler_address("sched.local").unwrap_err().to_string();
        assert!(
            err.contains("--scheduler") && err.contains("has no port"),
            "{err}"
        );
        let err = scheduler_address(":50050").unwrap_err().to_string();
        assert!(err.contains("has no host"), "{err}");
    }
}

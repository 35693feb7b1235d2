//! The `brook` command line: its arguments, and `main`, which runs one command.

use std::io::{IsTerminal, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::cluster::{ExecutorArgs, SchedulerArgs, run_executor, run_scheduler};
use crate::cli::compact::compact_table;
use crate::cli::demo::{DemoOptions, run_demo};
use crate::cli::send::{KafkaSendOptions, SendOptions, send_files, send_kafka};
use crate::cli::{ProgressFormat, RunOptions, run_file};
use crate::config::Trigger;
use crate::duration::parse_duration;
use crate::error::BrookError;
use crate::exec::cluster::MAX_STATE_PARTITIONS;
use crate::memory::parse_size;
use crate::orders::{FillConfig, FillGenerator, GeneratorConfig, OrderGenerator, TIME_FORMAT};
use crate::ui::{TOKEN_ENV, UiOptions};
use chrono::NaiveDateTime;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "brook",
    version,
    about = "Structured Streaming SQL over Arrow and DataFusion"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a streaming SQL file (sources, sinks, INSERT INTO ... SELECT).
    Run {
        /// The SQL script: source and sink tables, INSERT INTO <sink> SELECT ... statements.
        file: PathBuf,
        /// Trigger for every query: an interval ('1 second', '500ms'), 'once' or 'available-now'.
        #[arg(long, value_parser = parse_trigger)]
        trigger: Option<Trigger>,
        /// Print each batch's progress on standard error.
        #[arg(long, value_enum, default_value = "none")]
        progress: Progress,
        /// Keep each query's progress under DIR/<query name> (a directory or object-store
        /// URL); a later run with the same DIR resumes where this one stopped.
        #[arg(long, value_name = "DIR")]
        checkpoint: Option<String>,
        /// Serve the web UI (dashboard, monitor, JSON API) while the queries run.
        #[arg(long)]
        ui: bool,
        #[command(flatten)]
        ui_options: UiArgs,
        /// Memory the queries may take together, e.g. '4GB' (default: half the machine's).
        #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
        memory_limit: Option<usize>,
        /// Read each batch's input on the Ballista cluster whose scheduler is at
        /// df://HOST:PORT (`brook scheduler`), and run its plan and keep its aggregation's
        /// state there where the executors can.
        #[arg(long, value_name = "df://HOST:PORT")]
        cluster: Option<String>,
        /// With --cluster: the partitions a new checkpoint's aggregation state is cut
        /// into on the executors (as Spark's spark.sql.shuffle.partitions); a checkpoint
        /// keeps the count it was created with.
        #[arg(long, value_name = "N", requires = "cluster",
              value_parser = clap::value_parser!(u16).range(1..=MAX_STATE_PARTITIONS as i64))]
        state_partitions: Option<u16>,
    },
    /// The live order dashboard on generated orders (no setup needed).
    Demo {
        /// Directory to generate orders (DIR/orders) and their fills (DIR/fills) into
        /// (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Orders per second.
        #[arg(long, default_value_t = 2000)]
        rate: usize,
        /// Share of malformed lines.
        #[arg(long, default_value_t = 0.01)]
        malformed: f64,
        /// Stop after this long, e.g. '30s' (default: run until Ctrl-C).
        #[arg(long, value_parser = parse_duration_arg)]
        duration: Option<Duration>,
        /// Print each view below the last instead of redrawing the screen.
        #[arg(long)]
        no_clear: bool,
        /// Do not serve the web dashboard.
        #[arg(long)]
        no_ui: bool,
        #[command(flatten)]
        ui_options: UiArgs,
        /// Memory the queries may take together, e.g. '4GB' (default: half the machine's).
        #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
        memory_limit: Option<usize>,
    },
    /// Print generated orders, one CSV line each; with --fills, also write their fills.
    GenOrders {
        #[arg(long)]
        count: u64,
        /// Share of malformed lines, e.g. 0.01.
        #[arg(long, default_value_t = 0.0)]
        malformed: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Event time of the first order.
        #[arg(long, default_value = "2016-03-22 20:25:28")]
        start: String,
        /// Orders per second of event time.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 300)]
        clients: u32,
        #[arg(long, default_value_t = 200)]
        symbols: usize,
        /// Also write fills of the orders into FILE, in time order, one CSV line each:
        /// time,fill_id,order_id,quantity,price.
        #[arg(long, value_name = "FILE")]
        fills: Option<PathBuf>,
        /// Share of orders that get a fill (the others never do).
        #[arg(long, default_value_t = 0.8, requires = "fills")]
        filled: f64,
        /// Share of fills that come more than a minute after their order (61 s to 5 min).
        #[arg(long, default_value_t = 0.05, requires = "fills")]
        late_fills: f64,
    },
    /// Replay an orders file into a directory in chunks (the book's splitAndSend.sh),
    /// or into a Kafka topic a record per line (its streamOrders.sh).
    Send {
        #[arg(long)]
        input: PathBuf,
        /// Directory to write chunk files into.
        #[arg(long, required_unless_present = "kafka", conflicts_with = "kafka")]
        to: Option<PathBuf>,
        #[arg(long, default_value_t = 10_000)]
        lines_per_file: usize,
        #[arg(long, default_value = "3s", value_parser = parse_duration_arg)]
        interval: Duration,
        /// Kafka brokers (host:port,...) to send each line to as a record.
        #[arg(long)]
        kafka: Option<String>,
        #[arg(long, default_value = "orders")]
        topic: String,
        /// Records per second to Kafka (default: as fast as the broker takes them).
        #[arg(long)]
        rate: Option<u64>,
    },
    /// Merge the small part files a PARQUET, CSV or JSON sink wrote into TABLE_DIR into
    /// fewer, larger ones; safe while a query keeps writing there.
    Compact {
        /// The sink table's directory (or object-store URL).
        table_dir: String,
        /// The size merged files grow to, e.g. '128MB'.
        #[arg(long, value_name = "SIZE", value_parser = parse_file_size_arg,
              default_value_t = crate::sink::compact::DEFAULT_TARGET_FILE_SIZE)]
        target_file_size: u64,
    },
    /// Run an Apache Ballista scheduler: executors register with it, Ballista clients send it
    /// DataFusion plans (docs/scale-out.md).
    Scheduler(SchedulerArgs),
    /// Run an Apache Ballista executor that takes tasks from `brook scheduler`.
    Executor(ExecutorArgs),
}

#[derive(Args)]
struct UiArgs {
    /// Port of the web UI; the next free one is taken when it is busy, 0 picks any.
    #[arg(long, default_value_t = 4040)]
    ui_port: u16,
    /// Address to serve the web UI on ('localhost' or an IP); anything but loopback needs a token.
    #[arg(long, default_value = "127.0.0.1", value_parser = parse_bind)]
    ui_bind: IpAddr,
    /// Token the web UI's API requires (default: $BROOK_UI_TOKEN, if set). Other users see
    /// it in `ps`: prefer --ui-token-file or BROOK_UI_TOKEN.
    #[arg(long, conflicts_with = "ui_token_file")]
    ui_token: Option<String>,
    /// File holding the web UI's token (surrounding whitespace ignored).
    #[arg(long, value_name = "PATH")]
    ui_token_file: Option<PathBuf>,
}

impl UiArgs {
    fn options(self) -> UiOptions {
        let token = match &self.ui_token_file {
            Some(_) => None,
            None => self.ui_token.or_else(|| std::env::var(TOKEN_ENV).ok()),
        };
        UiOptions {
            bind: self.ui_bind,
            port: self.ui_port,
            token,
            token_file: self.ui_token_file,
            ..UiOptions::default()
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Progress {
    None,
    Json,
}

fn parse_trigger(s: &str) -> Result<Trigger, String> {
    s.parse().map_err(|e: BrookError| e.to_string())
}

fn parse_bind(s: &str) -> Result<IpAddr, String> {
    match s {
        "localhost" => Ok(IpAddr::from([127, 0, 0, 1])),
        _ => s
            .parse()
            .map_err(|e| format!("{e}: give 'localhost' or an IP address such as 0.0.0.0")),
    }
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| match e {
        BrookError::Sql(why) => why,
        other => other.to_string(),
    })
}

fn parse_size_arg(s: &str) -> Result<usize, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_file_size_arg(s: &str) -> Result<u64, String> {
    crate::options::parse_size(s)
        .ok_or_else(|| format!("expected a size such as 1048576, 512k, 100m or 1g, found '{s}'"))
}

/// Where `gen-orders` writes fills, and what share of orders get one and when.
struct FillsOut {
    path: PathBuf,
    config: FillConfig,
}

fn share(option: &str, value: f64) -> Result<f64, BrookError> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(BrookError::option(
            option,
            format!("{value} is not a share: give a number from 0 to 1"),
        ))
    }
}

fn gen_orders(
    count: u64,
    config: GeneratorConfig,
    start: &str,
    rate: u64,
    fills: Option<FillsOut>,
) -> Result<(), BrookError> {
    let start = NaiveDateTime::parse_from_str(start, TIME_FORMAT).map_err(|e| {
        BrookError::option("--start", format!("expected 'YYYY-MM-DD HH:MM:SS': {e}"))
    })?;
    if rate == 0 {
        return Err(BrookError::option("--rate", "must be at least 1"));
    }
    let mut fills = match fills {
        Some(FillsOut { path, config }) => {
            share("--filled", config.filled)?;
            share("--late-fills", config.late)?;
            let file = std::fs::File::create(&path).map_err(|e| BrookError::io(&path, e))?;
            Some((
                FillGenerator::new(config),
                std::io::BufWriter::new(file),
                path,
            ))
        }
        None => None,
    };
    let mut orders = OrderGenerator::new(config);
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    for i in 0..count {
        let time = i64::try_from(u128::from(i) * 1000 / u128::from(rate))
            .ok()
            .and_then(|ms| start.checked_add_signed(chrono::Duration::try_milliseconds(ms)?))
            .ok_or_else(|| {
                BrookError::option(
                    "--start",
                    format!("order {i} would fall past the last date the calendar has"),
                )
            })?;
        let (line, order) = orders.next_order(time);
        if writeln!(out, "{line}").is_err() {
            return Ok(()); // the reader went away (e.g. `| head`)
        }
        if let (Some((generator, file, path)), Some(order)) = (&mut fills, order) {
            generator.add(&order);
            write_lines(file, generator.due(time), path)?;
        }
    }
    if let Some((mut generator, mut file, path)) = fills {
        write_lines(&mut file, generator.rest(), &path)?;
        file.flush().map_err(|e| BrookError::io(&path, e))?;
    }
    out.flush().map_err(|e| BrookError::io("stdout", e))
}

fn write_lines(out: &mut impl Write, lines: Vec<String>, path: &Path) -> Result<(), BrookError> {
    for line in lines {
        writeln!(out, "{line}").map_err(|e| BrookError::io(path, e))?;
    }
    Ok(())
}

async fn main_inner(cli: Cli) -> Result<(), BrookError> {
    match cli.command {
        Command::Run {
            file,
            trigger,
            progress,
            checkpoint,
            ui,
            ui_options,
            memory_limit,
            cluster,
            state_partitions,
        } => {
            let progress = match progress {
                Progress::None => ProgressFormat::None,
                Progress::Json => ProgressFormat::Json,
            };
            let options = RunOptions {
                trigger,
                progress,
                checkpoint,
                ui: ui.then(|| ui_options.options()),
                memory_limit,
                cluster,
                state_partitions: state_partitions.map(usize::from),
            };
            run_file(&file, options).await
        }
        Command::Demo {
            dir,
            rate,
            malformed,
            duration,
            no_clear,
            no_ui,
            ui_options,
            memory_limit,
        } => {
            run_demo(DemoOptions {
                dir,
                rate,
                malformed,
                duration,
                clear: !no_clear,
                ui: (!no_ui).then(|| ui_options.options()),
                memory_limit,
            })
            .await
        }
        Command::GenOrders {
            count,
            malformed,
            seed,
            start,
            rate,
            clients,
            symbols,
            fills,
            filled,
            late_fills,
        } => gen_orders(
            count,
            GeneratorConfig {
                clients,
                symbols,
                malformed,
                seed,
            },
            &start,
            rate,
            fills.map(|path| FillsOut {
                path,
                config: FillConfig {
                    filled,
                    late: late_fills,
                    seed,
                },
            }),
        ),
        Command::Send {
            input,
            to,
            lines_per_file,
            interval,
            kafka,
            topic,
            rate,
        } => match (kafka, to) {
            (Some(servers), _) => send_kafka(&KafkaSendOptions {
                input,
                servers,
                topic,
                rate,
            })
            .await
            .map(|_| ()),
            (None, Some(to)) => send_files(&SendOptions {
                input,
                to,
                lines_per_file,
                interval,
            })
            .await
            .map(|_| ()),
            (None, None) => Err(BrookError::option(
                "--to",
                "give --to DIR or --kafka HOST:PORT",
            )),
        },
        Command::Compact {
            table_dir,
            target_file_size,
        } => compact_table(&table_dir, target_file_size).await,
        Command::Scheduler(args) => run_scheduler(args).await,
        Command::Executor(args) => run_executor(args).await,
    }
}

/// glibc hands freed memory at the top of a heap back to the OS once about
/// 2 MB of it is free, and faults it in again for the next decoded file:
/// a tenth of a run's CPU. Keeping up to 64 MB halves the page faults. Setting
/// the trim threshold stops glibc from raising its mmap threshold as buffers
/// are freed, which would leave every buffer over 128 KB to its own mmap; so
/// that threshold is set too. A thread's heap is also made writable only as
/// it grows, an mprotect call at a time: the threads that take Kafka records
/// in and turn them into rows made thousands of such calls a run, each holding
/// the process's memory map against the others' page faults (a seventh of a
/// Kafka run's CPU). With a 64 MB top pad a thread's heap is made writable
/// whole when it is created (committed, but not resident until touched).
///
/// glibc also gives each new thread a heap of its own, up to eight per core.
/// Files are decoded on the runtime's blocking threads and their rows freed on
/// its workers, so each of a dozen heaps grew to hold a few files at a time,
/// faulted in afresh. Two heaps per core serve them all: a quarter fewer page
/// faults and 10 MB less memory on the book's orders. (One per core made
/// Kafka runs, whose client threads allocate all the time, a sixth slower.)
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    let heaps = libc::c_int::try_from(2 * crate::config::partitions()).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt sets allocator parameters only; no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        libc::mallopt(libc::M_ARENA_MAX, heaps);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

pub fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    // The demo counts malformed lines in its view; warnings would scroll it away.
    // A failed query's error is printed once, by main, not also by the query's log.
    // delta-rs logs each commit that met another and was checked for conflicts;
    // the Delta sink retries or reports those itself.
    let default_level = match cli.command {
        Command::Demo { .. } => {
            "error,brook::exec::query=off,deltalake_core::kernel::transaction=off"
        }
        // A cluster process's log is its record of what it ran: Ballista logs
        // registrations, jobs and tasks at info.
        Command::Scheduler(_) | Command::Executor(_) => {
            "warn,ballista_scheduler=info,ballista_executor=info"
        }
        _ => "warn,brook::exec::query=off,deltalake_core::kernel::transaction=off",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(main_inner(cli)) {
        Ok(()) => 0,
        Err(e) => {
            // Standard error may be a pipe whose reader has gone.
            let _ = writeln!(std::io::stderr(), "error: {e}");
            1
        }
    };
    // The runtime's threads are left for the exit to end, not joined one by one.
    // A command that succeeded has waited for its queries and their writes; what
    // an error cuts short is crash-safe, as every file is renamed into place whole.
    std::process::exit(code)
}

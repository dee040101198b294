//! The `mes` binary: `serve`, `migrate`, `check-map`, `demo`, `export-timeseries`, benchmarks.

use clap::{Parser, Subcommand};
use mes::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "mes",
    version,
    about = "Manufacturing execution system: exact MQTT/Modbus ingest settled against inventory and cost"
)]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Print the nodes (live or not, last heartbeat, leases held) and who owns which
    /// work center, as the database sees it.
    Status {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the JSON document of `GET /api/v1/cluster` instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the MES server (migrates the database on start).
    Serve {
        /// TOML config file; without it the embedded defaults apply.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Only migrate the database.
    Migrate {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Cluster: the nodes sharing the database, their heartbeats and their leases.
    Cluster {
        #[command(subcommand)]
        action: ClusterCmd,
    },
    /// Validate a PLC register map.
    CheckMap {
        /// The map file.
        file: PathBuf,
    },
    /// Measure committed telemetry per second against the raw broker rate, in one run; or
    /// one scenario of the suite (docs/BENCHMARKS.md), written to target/bench/<scenario>.md
    /// and .json.
    Bench {
        /// ingest, surge, settlement, modbus, reservations, scale, http or node-red.
        scenario: Option<String>,
        /// Scenarios: length of a paced phase or measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// surge: stations of the line, each reporting once a second at its normal rate.
        #[arg(long, default_value_t = 300)]
        stations: usize,
        /// node-red: messages sent to the Node-RED flow.
        #[arg(long, default_value_t = 20_000)]
        peer_messages: u64,
        /// ingest: only the raw broker and the MES, without the contract floors (quicker,
        /// for profiling a change).
        #[arg(long)]
        no_floors: bool,
        /// ingest: every work center runs a released production order during the
        /// measurement, so each reading is counted and costed against it (default: no
        /// orders, as in the published runs before session 14).
        #[arg(long)]
        orders: bool,
        /// ingest: raw-broker and MES floods taken in turn this many times; the table shows
        /// the round whose ratio is the median (the machine's load moves single rounds).
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// ingest: the demo line this many times side by side (each copy its own four
        /// devices, work centers and buffers; the same work per message), so the MES has
        /// more devices, hence more broker sessions, to take the same flood over.
        #[arg(long, default_value_t = 1)]
        lines: usize,
        /// Messages per measurement.
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        /// Database URL (default: a fresh SQLite file under mes-data/).
        #[arg(long)]
        database: Option<String>,
        /// Instead: ingest with the time-series exporter on vs off in one run, and points/s
        /// exported (to a local `victoria-metrics` from PATH, at nice 19, unless --influx-url).
        #[arg(long)]
        exporter: bool,
        /// With --exporter: an InfluxDB 2 write API to export to (org and bucket `mes`,
        /// token from MES_INFLUX__TOKEN).
        #[arg(long)]
        influx_url: Option<String>,
    },
    /// Re-send the time series (telemetry, counts, state changes, per-minute OEE) of a time
    /// range from the database of record to the `[influx]` server: a backfill after an
    /// outage, or for a new bucket. Exits 1 if InfluxDB rejected any points.
    ExportTimeseries {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Start (inclusive): RFC 3339 time, ms since the epoch, or a duration ago (`90m`).
        #[arg(long)]
        from: String,
        /// End (exclusive): same forms as --from, or `now`.
        #[arg(long, default_value = "now")]
        to: String,
    },
    /// Measure the planner API (`GET /api/v1/work-centers`, `POST /api/v1/reservations`)
    /// against a trivial actix-web handler, both in child processes, in one run.
    BenchHttp {
        /// Requests in flight.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Length of each measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Internal: serve the trivial baseline on this port.
        #[arg(long, hide = true)]
        trivial_server: Option<u16>,
    },
    /// Aggregate committed telemetry per second with 1, 2, 3 … cluster nodes on one
    /// PostgreSQL database, next to the raw broker rate, and the failover time after a
    /// SIGKILL, in one run.
    BenchCluster {
        /// Node counts to measure, comma-separated.
        #[arg(long, default_value = "1,2,3", value_delimiter = ',')]
        nodes: Vec<usize>,
        #[arg(long, default_value_t = 30_000)]
        messages: u64,
        /// PostgreSQL admin URL (a fresh database per node count is created under it).
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
        database: String,
        /// An external broker (mqtt://host:port); default: the embedded broker.
        #[arg(long)]
        mqtt: Option<String>,
        /// Lease timeout of the nodes.
        #[arg(long, default_value = "3s")]
        lease: String,
    },
    /// Memory per work-center actor and per open-order actor: a child `mes serve` loaded
    /// with many of each, next to one with almost none.
    BenchScale {
        #[arg(long, default_value_t = 10_000)]
        work_centers: usize,
        #[arg(long, default_value_t = 100_000)]
        orders: usize,
    },
    /// Measure polling of many simulated Modbus TCP devices (loopback) against a raw
    /// tokio-modbus read loop, in one run.
    BenchModbus {
        /// Simulated devices.
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Poll period per device.
        #[arg(long, default_value_t = 200)]
        poll_ms: u64,
        /// Length of each measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// The main job on embedded defaults: the MES, its embedded broker and SQLite, and
    /// the line simulator playing the demo plant (MQTT and Modbus devices) under a promo
    /// surge; prints the dashboard URL, a live summary and a reconciliation at the end.
    Demo {
        /// Simulated time the line runs, e.g. 2h, 90m.
        #[arg(long, default_value = "2h")]
        duration: String,
        /// Simulated seconds per real second, or `max`.
        #[arg(long, default_value = "120")]
        speed: String,
        /// Simulator scenario: steady, promo-surge, breakdowns, faults, or a file.
        #[arg(long, default_value = "promo-surge")]
        scenario: String,
        /// Seed of the line's randomness.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Keep serving the dashboard after the run until Ctrl-C.
        #[arg(long)]
        keep: bool,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn init_logging(cfg: Option<&Config>, json: bool) {
    use tracing_subscriber::EnvFilter;
    let base = cfg.map(|c| c.log.filter.clone()).unwrap_or_else(|| "info".into());
    let filter = std::env::var("RUST_LOG").unwrap_or(format!(
        "{base},rumqttd=warn,rumqttd::server::broker=off,rumqttd::router::routing=off,sqlx=warn,actix_server=warn"
    ));
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = json || cfg.is_some_and(|c| c.log.json);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn runtime() -> std::io::Result<actix_rt::SystemRunner> {
    Ok(actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime builds")
    }))
}

use mes::free_port;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Serve { config } => {
            let cfg = Config::load(config.as_deref())?;
            init_logging(Some(&cfg), cli.log_json);
            runtime()?.block_on(mes::app::run(cfg, mes::app::signal(), |h| {
                println!("MES listening on http://{}/ (dashboard), API at http://{}/api/v1", h.http_addr, h.http_addr);
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Migrate { config } => {
            let cfg = Config::load(config.as_deref())?;
            init_logging(Some(&cfg), cli.log_json);
            runtime()?.block_on(async {
                mes::app::prepare(&cfg).await?;
                println!("database migrated and master data loaded");
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cluster { action: ClusterCmd::Status { config, json } } => {
            let cfg = Config::load(config.as_deref())?;
            init_logging(Some(&cfg), cli.log_json);
            let doc = runtime()?.block_on(async {
                let store = mes::db::Store::connect(&cfg.database.url, 2).await?;
                let (now, nodes, leases) = store.cluster_status().await?;
                let this = cfg.cluster.as_ref().map(|c| c.node_id.as_str());
                anyhow::Ok(mes::http::api::cluster_json(this, now, &nodes, &leases))
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("{:<16} {:<22} {:<5} {:>14} {:>7}", "NODE", "HTTP", "LIVE", "HEARTBEAT AGO", "LEASES");
            for n in doc["nodes"].as_array().into_iter().flatten() {
                println!(
                    "{:<16} {:<22} {:<5} {:>12}ms {:>7}",
                    n["node_id"].as_str().unwrap_or("?"),
                    n["http_addr"].as_str().unwrap_or("?"),
                    if n["live"].as_bool() == Some(true) { "yes" } else { "no" },
                    n["heartbeat_age_ms"].as_i64().unwrap_or(0),
                    n["leases"].as_u64().unwrap_or(0),
                );
            }
            let leases = doc["leases"].as_array().map(Vec::as_slice).unwrap_or_default();
            let free: Vec<&str> = leases
                .iter()
                .filter(|l| l["live"].as_bool() != Some(true))
                .filter_map(|l| l["work_center"].as_str())
                .collect();
            println!(
                "{} work centers, {} without a live owner{}",
                leases.len(),
                free.len(),
                if free.is_empty() { String::new() } else { format!(": {}", free.join(", ")) }
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::CheckMap { file } => match mes_plc_maps::check_file(&file) {
            Ok(summary) => {
                println!("{summary}");
                Ok(ExitCode::SUCCESS)
            }
            Err(errors) => {
                eprintln!("{errors}");
                Ok(ExitCode::from(1))
            }
        },
        Cmd::Bench {
            scenario: Some(scenario),
            messages,
            database,
            seconds,
            stations,
            peer_messages,
            no_floors,
            orders,
            rounds,
            lines,
            ..
        } => {
            // Progress lines on stderr stay readable: the in-process MES logs warnings only.
            let mut quiet = Config::load(None)?;
            quiet.log.filter = "warn".into();
            init_logging(Some(&quiet), cli.log_json);
            let o = mes::bench_suite::Options {
                messages,
                database,
                seconds,
                stations,
                peer_messages,
                floors: !no_floors,
                orders,
                rounds,
                lines,
            };
            runtime()?.block_on(mes::bench_suite::run(&scenario, o))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench { scenario: None, messages, database, exporter, influx_url, .. } => {
            let mut cfg = Config::load(None)?;
            let broker_port = free_port()?;
            let http_port = free_port()?;
            cfg.http.listen = format!("127.0.0.1:{http_port}");
            cfg.mqtt.url = format!("mqtt://127.0.0.1:{broker_port}");
            cfg.mqtt.embedded_broker = Some(format!("127.0.0.1:{broker_port}"));
            cfg.mqtt.client_id = "mes-bench".into();
            cfg.database.url = match database {
                Some(url) => url,
                None => {
                    let path = "mes-data/bench.db";
                    for suffix in ["", "-wal", "-shm"] {
                        let _ = std::fs::remove_file(format!("{path}{suffix}"));
                    }
                    format!("sqlite://{path}")
                }
            };
            // The demo line with every device on MQTT.
            std::fs::create_dir_all("mes-data")?;
            let plant_path = std::path::PathBuf::from("mes-data/bench-plant.toml");
            std::fs::write(&plant_path, mes::plant::MQTT_LINE)?;
            cfg.plant.file = Some(plant_path.clone());
            init_logging(Some(&cfg), cli.log_json);
            let plant = mes::plant::Plant::load(Some(&plant_path))?;
            let devices: Vec<String> = plant.work_centers.iter().map(|w| w.device_id()).collect();
            let broker = format!("127.0.0.1:{broker_port}");
            let prefix = cfg.mqtt.topic_prefix.clone();
            if exporter {
                let (vm, url) = match influx_url {
                    Some(url) => (None, url),
                    None => {
                        let vm = mes::influx::bench::LocalVm::start(
                            std::path::Path::new("mes-data/bench-vm"),
                            free_port()?,
                        )?;
                        let url = vm.url.clone();
                        (Some(vm), url)
                    }
                };
                let token = std::env::var("MES_INFLUX__TOKEN").unwrap_or_else(|_| "bench".into());
                let influx: mes::config::InfluxConfig =
                    toml::from_str(&format!("url = {url:?}\norg = \"mes\"\nbucket = \"mes\"\ntoken = {token:?}\n"))?;
                let settings = mes::influx::Settings::from_config(&influx).map_err(anyhow::Error::msg)?;
                cfg.influx = Some(influx);
                cfg.validate()?;
                runtime()?.block_on(mes::app::run_with(cfg, move |handle| async move {
                    mes::influx::bench::run(&handle, &settings, &broker, &prefix, devices, messages, 5).await
                }))?;
                drop(vm);
                return Ok(ExitCode::SUCCESS);
            }
            runtime()?.block_on(mes::app::run_with(cfg, move |handle| async move {
                mes::bench::run(&handle, &broker, &prefix, devices, messages).await
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::ExportTimeseries { config, from, to } => {
            let cfg = Config::load(config.as_deref())?;
            init_logging(Some(&cfg), cli.log_json);
            let influx = cfg.influx.as_ref().ok_or_else(|| {
                anyhow::anyhow!("export-timeseries needs an [influx] section (url, org, bucket, token) in the config")
            })?;
            let settings = mes::influx::Settings::from_config(influx).map_err(anyhow::Error::msg)?;
            let now = mes::now_ms();
            let from = mes::influx::backfill::parse_time(&from, now).map_err(|e| anyhow::anyhow!("--from: {e}"))?;
            let to = mes::influx::backfill::parse_time(&to, now).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
            let started = std::time::Instant::now();
            let report = runtime()?.block_on(async {
                let store = mes::db::Store::connect(&cfg.database.url, cfg.database.max_connections).await?;
                store.migrate().await?;
                mes::influx::backfill::run(&settings, &store, from, to).await.map_err(anyhow::Error::msg)
            })?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "re-sent {} points ({} readings, {} state changes, {} minutes) in {} requests, {secs:.2} s ({:.0} points/s); {} rejected",
                report.points,
                report.readings,
                report.state_changes,
                report.minutes,
                report.requests,
                report.points as f64 / secs.max(1e-9),
                report.rejected
            );
            Ok(if report.rejected > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        Cmd::BenchHttp { concurrency, seconds, trivial_server } => {
            if let Some(port) = trivial_server {
                actix_rt::System::new().block_on(mes::bench_http::trivial_server(port))?;
                return Ok(ExitCode::SUCCESS);
            }
            init_logging(None, cli.log_json);
            let md = runtime()?.block_on(mes::bench_http::run(concurrency.clamp(1, 1024), seconds.clamp(1, 600)))?;
            println!("{md}");
            println!("written to target/bench/http.md and target/bench/http.json");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::BenchCluster { nodes, messages, database, mqtt, lease } => {
            init_logging(None, cli.log_json);
            let lease_ms = mes::config::parse_duration(&lease)
                .ok_or_else(|| anyhow::anyhow!("--lease `{lease}` is not a duration like 3s"))?
                .as_millis() as u64;
            let nodes: Vec<usize> = nodes.into_iter().map(|n| n.min(16)).collect();
            let opts = mes::bench_cluster::Options { nodes, messages: messages.max(1), database, mqtt, lease_ms };
            let md = runtime()?.block_on(mes::bench_cluster::run(opts))?;
            println!("{md}");
            println!("written to target/bench/cluster.md and target/bench/cluster.json");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::BenchScale { work_centers, orders } => {
            init_logging(None, cli.log_json);
            let md = runtime()?
                .block_on(mes::bench_scale::run(work_centers.clamp(11, 100_000), orders.clamp(1, 1_000_000)))?;
            println!("{md}");
            println!("written to target/bench/scale.md and target/bench/scale.json");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::BenchModbus { devices, poll_ms, seconds } => {
            let mut cfg = Config::load(None)?;
            let broker_port = free_port()?;
            cfg.http.listen = format!("127.0.0.1:{}", free_port()?);
            cfg.mqtt.url = format!("mqtt://127.0.0.1:{broker_port}");
            cfg.mqtt.embedded_broker = Some(format!("127.0.0.1:{broker_port}"));
            cfg.mqtt.client_id = "mes-bench-modbus".into();
            std::fs::create_dir_all("mes-data")?;
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("mes-data/bench-modbus.db{suffix}"));
            }
            cfg.database.url = "sqlite://mes-data/bench-modbus.db".into();
            init_logging(Some(&cfg), cli.log_json);
            runtime()?.block_on(async move {
                let (addrs, servers) = mes::bench_modbus::start_devices(devices).await?;
                let plant_path = PathBuf::from("mes-data/bench-modbus-plant.toml");
                std::fs::write(&plant_path, mes::bench_modbus::plant(&addrs, poll_ms))?;
                cfg.plant.file = Some(plant_path);
                let r = mes::app::run_with(cfg, move |handle| async move {
                    mes::bench_modbus::run(&handle, &addrs, poll_ms, seconds).await
                })
                .await;
                for s in servers {
                    s.abort();
                }
                r
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo { duration, speed, scenario, seed, keep, config } => {
            let sim_ms = line_sim::parse_duration_ms(&duration).map_err(|e| anyhow::anyhow!("--duration: {e}"))?;
            let speed: line_sim::Speed = speed.parse().map_err(|e| anyhow::anyhow!("--speed: {e}"))?;
            let mut cfg = Config::load(config.as_deref())?;
            if config.is_none() {
                // A fresh database per demo, so the reconciliation covers this run only.
                std::fs::create_dir_all("mes-data")?;
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("mes-data/demo.db{suffix}"));
                }
                cfg.database.url = "sqlite://mes-data/demo.db".into();
            }
            // The simulator reads the same plant file the MES uses.
            let plant_path = match &cfg.plant.file {
                Some(p) => p.clone(),
                None => {
                    std::fs::create_dir_all("mes-data")?;
                    let p = PathBuf::from("mes-data/demo-plant.toml");
                    std::fs::write(&p, mes::plant::DEMO_PLANT)?;
                    cfg.plant.file = Some(p.clone());
                    p
                }
            };
            init_logging(Some(&cfg), cli.log_json);
            let prefix = cfg.mqtt.topic_prefix.clone();
            // The simulator reserves promo demand over HTTP as a planner: with tokens
            // configured it needs a planner's (or admin's) token in plain text.
            let tokens = &cfg.auth.tokens;
            let planner_token =
                tokens.iter().filter(|t| t.role >= mes::config::Role::Planner).find_map(|t| t.token.clone());
            let reserve = tokens.is_empty() || planner_token.is_some();
            if !reserve {
                eprintln!(
                    "note: no planner token in plain text in the config; the promo demand is not reserved at the MES"
                );
            }
            let ok = runtime()?.block_on(mes::app::run_with(cfg, move |handle| async move {
                println!("Dashboard: http://{}/   (metrics: http://{}/metrics)", handle.http_addr, handle.http_addr);
                println!("Running the demo line: scenario {scenario}, {duration} simulated at speed {speed}, seed {seed}. Ctrl-C ends the run early.");
                let summary = mes::demo::live_summary(handle.clone());
                let opts = line_sim::Options {
                    plant: plant_path,
                    mqtt: handle.mqtt_url.clone(),
                    scenario,
                    seed,
                    speed,
                    duration: Some(sim_ms),
                    truth: Some(PathBuf::from("mes-data/demo-truth.json")),
                    topic_prefix: prefix,
                    handle_signals: true,
                    mes_http: reserve.then(|| format!("http://{}", handle.http_addr)),
                    mes_token: planner_token,
                    start_stopped: false,
                };
                let truth = line_sim::run(opts).await;
                summary.abort();
                let ok = match truth {
                    Ok(truth) => {
                        mes::demo::drain(&handle, &truth, Duration::from_secs(60)).await;
                        mes::demo::reconcile(&handle, &truth).await?
                    }
                    Err(e) => {
                        eprintln!("the line simulator failed: {e:#}");
                        false
                    }
                };
                if keep {
                    println!("Serving the dashboard at http://{}/ until Ctrl-C.", handle.http_addr);
                    mes::app::signal().await;
                }
                anyhow::Ok(ok)
            }))?;
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}

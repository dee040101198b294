//! The `line-sim` command line; the simulator itself is the library (`line_sim::run`).

use clap::Parser;
use line_sim::{parse_duration_ms, Options, Speed};
use std::path::PathBuf;

/// Line simulator: plays the devices of a plant file over MQTT and writes the truth.
#[derive(Debug, Parser)]
#[command(name = "line-sim", version, about, long_about = None)]
struct Cli {
    /// Plant file (materials, BOMs, buffers, work centers)
    #[arg(long, value_name = "FILE")]
    plant: PathBuf,
    /// MQTT broker, e.g. mqtt://127.0.0.1:1883
    #[arg(long, value_name = "URL")]
    mqtt: String,
    /// Scenario: steady, promo-surge, breakdowns, faults, or a path to a scenario file
    #[arg(long, value_name = "NAME", default_value = "steady")]
    scenario: String,
    /// Seed of the random numbers: the same plant, scenario and seed replay the same run
    #[arg(long, value_name = "N", default_value_t = 42)]
    seed: u64,
    /// Simulated seconds per real second, or `max` for as fast as possible
    #[arg(long, value_name = "X", default_value = "1")]
    speed: Speed,
    /// Simulated run length, e.g. 600s, 90m, 8h [default: the scenario's]
    #[arg(long, value_name = "D", value_parser = parse_duration_ms)]
    duration: Option<u64>,
    /// Write the truth (what really happened) to this JSON file at the end
    #[arg(long, value_name = "FILE")]
    truth: Option<PathBuf>,
    /// MQTT topic prefix
    #[arg(long, value_name = "P", default_value = "mes")]
    topic_prefix: String,
    /// The MES's HTTP base URL, e.g. http://127.0.0.1:8080: the scenario's promo demand
    /// becomes reservations of finished goods there
    #[arg(long, value_name = "URL")]
    mes_http: Option<String>,
    /// Bearer token for --mes-http [default: $LINE_SIM_MES_TOKEN]
    #[arg(long, value_name = "TOKEN")]
    mes_token: Option<String>,
    /// Every station starts stopped until a `start` command reaches it
    #[arg(long)]
    start_stopped: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("line-sim: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let opts = Options {
        plant: cli.plant,
        mqtt: cli.mqtt,
        scenario: cli.scenario,
        seed: cli.seed,
        speed: cli.speed,
        duration: cli.duration,
        truth: cli.truth,
        topic_prefix: cli.topic_prefix,
        handle_signals: true,
        mes_http: cli.mes_http,
        mes_token: cli.mes_token.or_else(|| std::env::var("LINE_SIM_MES_TOKEN").ok().filter(|t| !t.is_empty())),
        start_stopped: cli.start_stopped,
    };
    match rt.block_on(line_sim::run(opts)) {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("line-sim: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

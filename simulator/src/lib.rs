//! `line-sim`: plays a plant's devices against the MES and writes what really happened.
//!
//! The line model ([`model`]) is pure and deterministic; [`run`] wires it to the clock,
//! the MQTT broker ([`mqtt`]), the Modbus servers ([`modbus`]) and the truth ([`truth`]).
//! The `line-sim` binary is a thin CLI over [`run`]; `mes demo` runs it in-process.

mod modbus;
mod model;
mod mqtt;
mod plant;
mod reserve;
mod rng;
mod scenario;
mod truth;
mod units;

use anyhow::Context;
use model::{Command, Line};
use plant::Plant;
use scenario::Scenario;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use truth::Ledger;
pub use truth::{DemandTruth, FaultTruth, MesDemandTruth, Truth};
pub use units::{parse_duration_ms, Speed};

/// Longest wait at the end for the broker's acknowledgements.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for the MES to read a Modbus device before the run starts or ends.
const MODBUS_WAIT: Duration = Duration::from_secs(20);
/// Longest wait for the MES to read a Modbus device during the run (before a restart).
const MODBUS_STEP_WAIT: Duration = Duration::from_secs(10);
/// Longest wait at the end for the MES to answer the promo reservations.
const RESERVE_WAIT: Duration = Duration::from_secs(30);
/// Real time between progress lines.
const PROGRESS_EVERY: Duration = Duration::from_secs(3);

fn clock_label(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// One simulator run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Plant file (materials, BOMs, buffers, work centers).
    pub plant: PathBuf,
    /// MQTT broker, e.g. `mqtt://127.0.0.1:1883`.
    pub mqtt: String,
    /// Scenario name (`steady`, `promo-surge`, `breakdowns`, `faults`) or a file path.
    pub scenario: String,
    pub seed: u64,
    pub speed: Speed,
    /// Simulated run length in ms; `None`: the scenario's.
    pub duration: Option<u64>,
    /// Where to write the truth JSON at the end.
    pub truth: Option<PathBuf>,
    pub topic_prefix: String,
    /// End the run early on Ctrl-C/SIGTERM (the binary does; an embedding program may not).
    pub handle_signals: bool,
    /// The MES's HTTP base URL (e.g. `http://127.0.0.1:8080`): promo demand becomes
    /// reservations there. `None`: demand is only modelled.
    pub mes_http: Option<String>,
    /// Bearer token for `mes_http`.
    pub mes_token: Option<String>,
    /// Every station starts `stopped` until a `start` command reaches it.
    pub start_stopped: bool,
}

/// Runs the line to the end (or until interrupted) and returns what really happened.
pub async fn run(cli: Options) -> anyhow::Result<Truth> {
    let plant = Plant::load(&cli.plant)?;
    let scenario = Scenario::resolve(&cli.scenario)?;
    let duration_ms = cli.duration.unwrap_or_else(|| scenario.duration_ms());
    if cli.topic_prefix.is_empty() || cli.topic_prefix.contains(['+', '#']) {
        anyhow::bail!("--topic-prefix must be a non-empty topic without wildcards");
    }

    // Boots start from the wall clock (in ms), so a new run is always a new boot to an
    // MES that saw earlier runs of the same devices. Boots are not part of the truth.
    let boot_base = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1).max(1);
    let (mut line, warnings) = Line::new(&plant, &scenario, cli.seed, duration_ms, boot_base);
    for w in warnings {
        eprintln!("[line-sim] warning: {w}");
    }
    if cli.start_stopped {
        line.stop_all();
    }

    let modbus = modbus::Devices::start(&plant).await?;
    for (wc, device, addr, unit) in modbus.describe() {
        eprintln!("[line-sim] work center {wc}: Modbus device {device} on {addr} unit {unit}");
    }

    let client_id = format!("line-sim-{}", cli.seed);
    let drops = scenario.faults.mqtt_drops_per_hour > 0.0;
    let (mut link, mut commands) = mqtt::Link::connect(&cli.mqtt, &client_id, &cli.topic_prefix, drops).await?;
    // Promo demand becomes reservations at the MES, with refs unique to this run.
    let reserver = match (&cli.mes_http, line.demand_sku()) {
        (Some(url), Some(sku)) => {
            eprintln!("[line-sim] promo demand for {sku} becomes reservations at {url}");
            Some(reserve::Reserver::start(url, cli.mes_token.clone(), format!("promo-{boot_base}"))?)
        }
        _ => None,
    };
    eprintln!(
        "[line-sim] plant {} ({} work centers), scenario {} ({}), seed {}, {} simulated at speed {}, broker {} as {client_id}",
        cli.plant.display(),
        line.devices().count(),
        scenario.name,
        scenario.description,
        cli.seed,
        clock_label(duration_ms),
        cli.speed,
        cli.mqtt
    );

    let interrupted = Arc::new(AtomicBool::new(false));
    if cli.handle_signals {
        tokio::spawn(watch_signals(interrupted.clone()));
    }

    // Whether to wait for the MES to read the Modbus devices when it matters.
    let mut modbus_wait = !modbus.is_empty();
    if modbus_wait {
        // The MES takes its first reading of a device as the baseline: start the line
        // only once every device has been read with its counters at 0.
        modbus.show(&line);
        eprintln!("[line-sim] waiting for the MES to read the Modbus devices...");
        if !modbus.wait_observed(MODBUS_WAIT).await {
            eprintln!(
                "[line-sim] warning: nobody read {} within {MODBUS_WAIT:?}; running without waiting for reads (an MES that starts polling later will not count what was made before)",
                modbus.unobserved().join(", ")
            );
            modbus_wait = false;
        }
    }

    let prefix = cli.topic_prefix.clone();
    let mut ledger = Ledger::default();
    let mut out = Vec::new();
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut ticks: u64 = 0;
    while !line.done() && !interrupted.load(Relaxed) {
        while let Ok((device, payload)) = commands.try_recv() {
            match Command::parse(&payload).and_then(|c| {
                let text = format!("{c:?}");
                line.command(&device, c).map(|()| text)
            }) {
                Ok(text) => eprintln!("[line-sim] {} command for {device}: {text}", clock_label(line.now_ms())),
                Err(e) => eprintln!("[line-sim] warning: command for {device} ignored: {e}"),
            }
        }
        for (device, c) in modbus.take_commands() {
            let text = format!("{c:?}");
            match line.command(&device, c) {
                Ok(()) => eprintln!("[line-sim] {} Modbus write to {device}: {text}", clock_label(line.now_ms())),
                Err(e) => eprintln!("[line-sim] warning: Modbus write to {device} ignored: {e}"),
            }
        }
        out.clear();
        line.step(&mut out);
        publish_all(&mut link, &mut ledger, &prefix, &out).await?;
        // Cut the connection right after publishing, so publishes are in flight.
        for _ in 0..line.take_mqtt_drops() {
            eprintln!("[line-sim] {} fault: dropping the MQTT connection", clock_label(line.now_ms()));
            link.cut();
        }
        for order in line.take_sales_orders() {
            if let Some(r) = &reserver {
                r.send(order).await;
            }
        }
        if !modbus.is_empty() {
            if modbus_wait && modbus.must_wait(&line) {
                // A silent device answers again: the MES must read it now.
                modbus.answer_all();
                if !modbus.wait_observed(MODBUS_STEP_WAIT).await {
                    eprintln!(
                        "[line-sim] warning: the MES did not read {} before a restart; its count may fall short",
                        modbus.unobserved().join(", ")
                    );
                }
            }
            modbus.show(&line);
        }
        ticks += 1;
        match cli.speed {
            Speed::Factor(x) => {
                let due = started + Duration::from_secs_f64(line.now_ms() as f64 / 1000.0 / x);
                tokio::time::sleep_until(due.into()).await;
            }
            Speed::Max => {
                if ticks & 0xFF == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            progress(&line, &link);
        }
    }
    out.clear();
    line.finish(&mut out);
    publish_all(&mut link, &mut ledger, &prefix, &out).await?;
    let all_acked = link.wait_acked(ACK_WAIT).await;
    let unanswered = modbus.unanswered();
    if !modbus.is_empty() {
        modbus.show(&line);
        modbus.answer_all();
        if modbus_wait && !modbus.wait_observed(MODBUS_WAIT).await {
            eprintln!(
                "[line-sim] warning: the MES has not read the final counters of {}",
                modbus.unobserved().join(", ")
            );
        }
    }
    drop(modbus);
    progress(&line, &link);

    let mut truth = line.truth();
    if let (Some(r), Some(demand)) = (reserver, truth.demand.as_mut()) {
        demand.mes = Some(r.finish(RESERVE_WAIT).await);
    }
    let publishing: Vec<&str> = line.devices().filter(|(_, _, mqtt)| *mqtt).map(|(_, wc, _)| wc).collect();
    let differences = ledger.differences(&truth, publishing);
    if let Some(path) = &cli.truth {
        std::fs::write(path, truth.to_json())
            .with_context(|| format!("cannot write the truth file {}", path.display()))?;
        eprintln!("[line-sim] truth written to {}", path.display());
    }
    for b in line.buffers() {
        eprintln!("[line-sim] buffer {:<12} {:>9} -> {:>9} (capacity {})", b.id, b.initial, b.level, b.capacity);
    }
    for (wc, t) in &truth.work_centers {
        eprintln!(
            "[line-sim] {wc:<12} good {:>9} scrap {:>7} running {:>9.1}s down {:>8.1}s",
            t.good, t.scrap, t.running_s, t.down_s
        );
    }
    if let Some(d) = &truth.demand {
        eprintln!(
            "[line-sim] demand for {}: {} sales orders, {} units requested, {} promised from stock ({} short)",
            d.sku, d.requests, d.requested, d.promised, d.short_requests
        );
        if let Some(m) = &d.mes {
            eprintln!(
                "[line-sim] reservations at the MES: {} granted ({} units), {} refused, {} failed",
                m.granted_requests, m.granted, m.refused_requests, m.failed_requests
            );
        }
    }
    let f = &truth.faults;
    eprintln!(
        "[line-sim] faults: {} reboots, {} MQTT connection drops ({} publishes resent), {} Modbus silences ({} requests left unanswered)",
        f.reboots,
        link.cuts(),
        link.retransmitted(),
        f.modbus_timeouts,
        unanswered
    );
    eprintln!(
        "[line-sim] {} messages published ({} acknowledged, {} counted, {} duplicate/out of order) in {:.1}s",
        link.published(),
        link.acked(),
        ledger.counted,
        ledger.stale,
        started.elapsed().as_secs_f64()
    );
    let (published, acked, lost) = (link.published(), link.acked(), link.session_lost());
    link.close().await;
    if !differences.is_empty() {
        anyhow::bail!("internal error: the published counters disagree with the truth: {}", differences.join("; "));
    }
    if !all_acked {
        anyhow::bail!("the broker acknowledged only {acked} of {published} publishes within {ACK_WAIT:?}");
    }
    if lost && published > acked {
        eprintln!(
            "[line-sim] warning: the broker lost the session during the run; {} publishes were dropped with it",
            published.saturating_sub(acked)
        );
    }
    Ok(truth)
}

/// The first Ctrl-C (or SIGTERM) ends the run early — the final counters are still sent
/// and the truth written; a second one exits at once.
async fn watch_signals(interrupted: Arc<AtomicBool>) {
    async fn signal() {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
        }
        let _ = tokio::signal::ctrl_c().await;
    }
    signal().await;
    eprintln!("[line-sim] interrupted: ending the run early (again to quit at once)");
    interrupted.store(true, Relaxed);
    signal().await;
    eprintln!("[line-sim] interrupted twice: quitting without the truth");
    std::process::exit(130);
}

async fn publish_all(
    link: &mut mqtt::Link,
    ledger: &mut Ledger,
    prefix: &str,
    out: &[model::Telemetry],
) -> anyhow::Result<()> {
    for m in out {
        ledger.record(m);
        let topic = format!("{prefix}/devices/{}/telemetry", m.device);
        link.publish(topic, m.to_json()).await?;
    }
    Ok(())
}

fn progress(line: &Line, link: &mqtt::Link) {
    eprintln!(
        "[line-sim] sim {} / {}  units made {:>9}  messages {:>9} (acked {:>9}){}",
        clock_label(line.now_ms()),
        clock_label(line.duration_ms()),
        line.units_made(),
        link.published(),
        link.acked(),
        if link.connected() { "" } else { "  [broker disconnected]" }
    );
}

//! `mes demo`: the MES on embedded defaults with a built-in line driving it.
//!
//! Until the full simulator (`line-sim`) is wired in, the demo plays each MQTT device of
//! the plant itself, as a real device would (cumulative counters over MQTT QoS 1), under a
//! promo surge that ramps the line from 1× to 10×, then reconciles the MES against what
//! it published.

use crate::app::Handle;
use crate::plant::{Device, Plant};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// What the demo line really made, per work center.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Truth {
    pub good: u64,
    pub scrap: u64,
    pub messages: u64,
}

struct Station {
    wc: String,
    device: String,
    order: String,
    rate_per_s: f64,
    carry: f64,
    seq: u64,
    good: u64,
    scrap: u64,
}

/// Deterministic pseudo-random numbers (PCG-style LCG), so a seed replays a run.
struct Lcg(u64);
impl Lcg {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Plays the plant's MQTT devices for `duration`; returns the truth per work center.
pub async fn run_line(
    plant: &Plant,
    handle: &Handle,
    duration: Duration,
    seed: u64,
    prefix: &str,
) -> anyhow::Result<BTreeMap<String, Truth>> {
    let (host, port) =
        crate::config::MqttConfig { url: handle.mqtt_url.clone(), ..crate::config::MqttConfig::embedded() }
            .host_port()
            .map_err(anyhow::Error::msg)?;
    let mut opts = MqttOptions::new(format!("demo-line-{seed}"), host, port);
    opts.set_keep_alive(Duration::from_secs(15)).set_clean_session(true).set_inflight(500);
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acked2 = acked.clone();
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked2.fetch_add(1, Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });

    // One released order per work center, created through the MES's own store.
    let run_tag = crate::now_ms() / 1000;
    let mut stations = Vec::new();
    for w in &plant.work_centers {
        let Device::Mqtt { id } = &w.device else {
            continue;
        };
        let Some(sku) = plant.output_sku(w) else {
            continue;
        };
        let order = format!("PO-DEMO-{}-{run_tag}", w.id);
        let new = crate::db::queries::NewOrder {
            id: order.clone(),
            sku: sku.to_string(),
            quantity: 1_000_000,
            due: None,
            priority: 0,
            work_center: Some(w.id.clone()),
        };
        handle.store.create_order(&new, None, |_| String::new()).await?;
        handle
            .store
            .order_command(&order, mes_actors::OrderCommand::Release, &crate::settlement::Ledger::default())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        stations.push(Station {
            wc: w.id.clone(),
            device: id.clone(),
            order,
            rate_per_s: 1.0 / w.ideal_cycle_s.max(0.001),
            carry: 0.0,
            seq: 0,
            good: 0,
            scrap: 0,
        });
    }

    let mut rng = Lcg(seed);
    let boot = (crate::now_ms() / 1000) as u64; // a fresh boot per demo run
    let tick = Duration::from_millis(100);
    let started = Instant::now();
    let mut truth: BTreeMap<String, Truth> = BTreeMap::new();
    let mut last_print = Instant::now();
    while started.elapsed() < duration {
        let progress = started.elapsed().as_secs_f64() / duration.as_secs_f64();
        let surge = 1.0 + 9.0 * progress.min(1.0); // Double 11: ramps to 10×
        for s in &mut stations {
            s.carry += s.rate_per_s * surge * tick.as_secs_f64();
            let n = s.carry.floor() as u64;
            s.carry -= n as f64;
            for _ in 0..n {
                if rng.next_f64() < 0.02 {
                    s.scrap += 1;
                } else {
                    s.good += 1;
                }
            }
            s.seq += 1;
            let state = if n > 0 { "running" } else { "idle" };
            let payload = json!({"boot": boot, "seq": s.seq, "good": s.good, "scrap": s.scrap, "state": state,
                                 "order": s.order, "ts": crate::http::rfc3339(crate::now_ms()),
                                 "metrics": {"surge": (surge * 100.0).round() / 100.0}});
            let topic = format!("{prefix}/devices/{}/telemetry", s.device);
            client.publish(topic, QoS::AtLeastOnce, false, payload.to_string()).await?;
            let t = truth.entry(s.wc.clone()).or_default();
            t.good = s.good;
            t.scrap = s.scrap;
            t.messages = s.seq;
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            let made: u64 = truth.values().map(|t| t.good + t.scrap).sum();
            eprintln!(
                "[demo] {:>5.1}s surge {:>4.1}x  units made {made:>8}  committed msgs {:>8}  in flight {}",
                started.elapsed().as_secs_f64(),
                surge,
                handle.metrics.committed_jobs.load(Relaxed),
                handle.metrics.in_flight.load(Relaxed)
            );
        }
        tokio::time::sleep(tick).await;
    }
    // Let the broker acknowledge what we sent, then let the MES drain.
    let sent: u64 = truth.values().map(|t| t.messages).sum();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && (acked.load(Relaxed) < sent || handle.metrics.committed_jobs.load(Relaxed) < sent)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    poller.abort();
    Ok(truth)
}

/// Prints MES counts next to the truth; returns whether every count matches.
pub async fn reconcile(handle: &Handle, truth: &BTreeMap<String, Truth>) -> anyhow::Result<bool> {
    let wcs = handle.store.work_centers().await?;
    let mut all_ok = true;
    println!("\nReconciliation: MES vs what the line really made");
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10}  result",
        "work ctr", "good(MES)", "good(real)", "scrap(MES)", "scrap(real)"
    );
    for w in &wcs {
        let Some(t) = truth.get(&w.id) else { continue };
        let ok = w.good_total as u64 == t.good && w.scrap_total as u64 == t.scrap;
        all_ok &= ok;
        println!(
            "{:<10} {:>10} {:>10} {:>10} {:>10}  {}",
            w.id,
            w.good_total,
            t.good,
            w.scrap_total,
            t.scrap,
            if ok { "exact" } else { "MISMATCH" }
        );
    }
    println!("\nBuffers:");
    for b in handle.store.buffers().await? {
        println!(
            "  {:<12} {:<12} on hand {:>9}  reserved {:>7}  available {:>9}",
            b.id, b.sku, b.on_hand, b.reserved, b.available
        );
    }
    let m = &handle.metrics;
    println!(
        "\nMessages: {} received, {} committed, {} duplicates, {} dead letters, {} commits",
        m.telemetry_messages.load(Relaxed),
        m.committed_jobs.load(Relaxed),
        m.telemetry_duplicates.load(Relaxed),
        m.dead_letters.load(Relaxed),
        m.commits.load(Relaxed)
    );
    println!("{}", if all_ok { "All counts exact." } else { "Counts differ!" });
    Ok(all_ok)
}

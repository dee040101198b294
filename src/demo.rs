//! `mes demo`: the MES on embedded defaults with the line simulator playing the demo plant.
//!
//! The simulator runs in-process but talks to the MES only as real devices do: MQTT
//! publishers on the embedded broker and Modbus TCP servers the MES polls. At the end the
//! demo reconciles what the MES counted with what the simulator says really happened.

use crate::app::Handle;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Prints a one-line summary every few seconds until `stop` is dropped.
pub fn live_summary(handle: Handle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let m = &handle.metrics;
            let totals = match handle.store.work_centers().await {
                Ok(w) => w
                    .iter()
                    .map(|w| format!("{} {}/{}", w.id, w.good_total, w.scrap_total))
                    .collect::<Vec<_>>()
                    .join("  "),
                Err(_) => String::new(),
            };
            eprintln!(
                "[demo] {:>5.0}s  committed {:>8}  in flight {:>5}  dead letters {}  |  {totals}",
                started.elapsed().as_secs_f64(),
                m.committed_jobs.load(Relaxed),
                m.in_flight.load(Relaxed),
                m.dead_letters.load(Relaxed),
            );
        }
    })
}

/// Waits (bounded) until the MES shows the truth's counts, i.e. it has drained its input.
pub async fn drain(handle: &Handle, truth: &line_sim::Truth, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(wcs) = handle.store.work_centers().await {
            let done = truth.work_centers.iter().all(|(id, t)| {
                wcs.iter().any(|w| &w.id == id && w.good_total as u64 == t.good && w.scrap_total as u64 == t.scrap)
            });
            if done && handle.metrics.in_flight.load(Relaxed) == 0 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints MES counts, stock and books next to the truth; returns whether all match.
pub async fn reconcile(handle: &Handle, truth: &line_sim::Truth) -> anyhow::Result<bool> {
    let mut all_ok = true;
    println!("\nReconciliation: what the MES counted vs what the line really made");
    println!(
        "{:<10} {:>11} {:>11} {:>11} {:>11}  result",
        "work ctr", "good (MES)", "good (real)", "scrap (MES)", "scrap (real)"
    );
    let wcs = handle.store.work_centers().await?;
    for (id, t) in &truth.work_centers {
        let (g, s) = wcs.iter().find(|w| &w.id == id).map(|w| (w.good_total, w.scrap_total)).unwrap_or((-1, -1));
        let ok = g as u64 == t.good && s as u64 == t.scrap;
        all_ok &= ok;
        println!("{id:<10} {g:>11} {:>11} {s:>11} {:>11}  {}", t.good, t.scrap, if ok { "exact" } else { "MISMATCH" });
    }
    println!("\nStock (initial − consumed + produced):");
    println!("{:<12} {:<11} {:>11} {:>11}  result", "buffer", "sku", "MES", "real");
    for b in handle.store.buffers().await? {
        let real = truth.buffers.get(&b.id).copied();
        let ok = real.is_none_or(|r| r as i64 == b.on_hand);
        all_ok &= ok;
        let real = real.map(|r| r.to_string()).unwrap_or_else(|| "-".into());
        println!("{:<12} {:<11} {:>11} {real:>11}  {}", b.id, b.sku, b.on_hand, if ok { "exact" } else { "MISMATCH" });
    }
    let tb = handle.store.trial_balance().await?;
    let (d, c) = tb.iter().fold((0i64, 0i64), |(d, c), (_, _, x, y)| (d + x, c + y));
    println!("\nTrial balance:");
    for (code, name, debit, credit) in &tb {
        if *debit != 0 || *credit != 0 {
            println!(
                "  {code} {name:<34} Dr {:>14}  Cr {:>14}",
                mes_actors::Money(*debit).to_string(),
                mes_actors::Money(*credit).to_string()
            );
        }
    }
    println!(
        "  {:<39} Dr {:>14}  Cr {:>14}  {}",
        "total",
        mes_actors::Money(d).to_string(),
        mes_actors::Money(c).to_string(),
        if d == c { "balanced" } else { "UNBALANCED" }
    );
    all_ok &= d == c;
    if let Some(demand) = &truth.demand {
        println!(
            "\nPromo demand for {}: {} sales orders, {} units requested; the line's stock could cover {} ({} orders short)",
            demand.sku, demand.requests, demand.requested, demand.promised, demand.short_requests
        );
        if let Some(mes) = &demand.mes {
            // Nothing ships during the demo, so the MES holds exactly what it granted.
            let reserved: i64 =
                handle.store.buffers().await?.iter().filter(|b| b.sku == demand.sku).map(|b| b.reserved).sum();
            let ok = reserved == mes.granted as i64 && mes.failed_requests == 0;
            all_ok &= ok;
            println!(
                "  reservations: {} granted ({} units), {} refused, {} failed; MES reserved {reserved}  {}",
                mes.granted_requests,
                mes.granted,
                mes.refused_requests,
                mes.failed_requests,
                if ok { "exact" } else { "MISMATCH" }
            );
        }
    }
    let f = &truth.faults;
    println!(
        "\nFaults: {} device reboots, {} MQTT connection drops, {} Modbus timeouts",
        f.reboots, f.mqtt_drops, f.modbus_timeouts
    );
    let m = &handle.metrics;
    println!(
        "\nMessages: {} received, {} committed in {} group commits, {} duplicates, {} dead letters; {} Modbus polls",
        m.telemetry_messages.load(Relaxed),
        m.committed_jobs.load(Relaxed),
        m.commits.load(Relaxed),
        m.telemetry_duplicates.load(Relaxed),
        m.dead_letters.load(Relaxed),
        m.modbus_polls.load(Relaxed),
    );
    println!("{}", if all_ok { "Every count is exact and the books balance." } else { "Differences found!" });
    Ok(all_ok)
}

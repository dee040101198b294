//! HTTP fuzzing with schemathesis against the served `/openapi.json`: the real `mes serve`
//! with an admin token, every documented operation, a bounded number of generated cases
//! and a fixed seed.
//!
//! 1. Negative (schema-violating) inputs to every write operation: none is a 5xx, each is
//!    refused, and the state read through the API (inventory, buffers, orders, work
//!    centers' totals, trial balance, journal, reservations' effects, surge plans, ERP
//!    outbox, dead letters, audit log) is exactly what it was before.
//! 2. All inputs (valid and invalid) to every operation: no 5xx, and responses conform to
//!    the documented schemas.
//!
//! Afterwards the process is still running and answers `/healthz`.
//!
//! schemathesis (`st`) comes from `MES_TEST_SCHEMATHESIS` (CI: a venv made by `.ci/run`),
//! else `target/schemathesis-venv/bin/st`; without it the test is skipped with a note,
//! unless `MES_TEST_REQUIRE_SCHEMATHESIS` is set (CI), where it fails.

use crate::harness::{Mes, MesOptions};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;

const TOKEN: &str = "fuzz-admin-token-1";
/// Generated cases per operation and phase, and the seed that makes runs repeatable.
const EXAMPLES: &str = "50";
const SEED: &str = "20261127";

fn schemathesis() -> Option<PathBuf> {
    let default = format!("{}/target/schemathesis-venv/bin/st", env!("CARGO_MANIFEST_DIR"));
    crate::harness::optional_tool(
        "MES_TEST_SCHEMATHESIS",
        &default,
        &["--version"],
        "MES_TEST_REQUIRE_SCHEMATHESIS",
        "no schemathesis (python3 -m venv target/schemathesis-venv && target/schemathesis-venv/bin/pip install schemathesis; or set MES_TEST_SCHEMATHESIS)",
    )
    .map(PathBuf::from)
}

/// Runs `st run` against the MES with `args`; panics with its output unless it passed.
fn run(st: &PathBuf, mes: &Mes, what: &str, args: &[&str]) {
    let out = Command::new(st)
        .arg("run")
        .arg(format!("{}/openapi.json", mes.http))
        .args(["--url", &mes.http])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        // One worker: hypothesis parses lambda sources with `ast.parse`, which CPython 3.11
        // can fail in concurrent threads ("AST constructor recursion depth mismatch").
        .args(["--seed", SEED, "--max-examples", EXAMPLES, "--workers", "1", "--request-timeout", "10"])
        .args(["--phases", "examples,coverage,fuzzing", "--suppress-health-check", "all"])
        // A stream that never ends, and a page of HTML.
        .args(["--exclude-path", "/api/v1/events", "--exclude-path", "/"])
        .args(args)
        .env("NO_COLOR", "1")
        .current_dir(&mes.dir)
        .output()
        .expect("run schemathesis");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The summary: operations, cases generated, checks passed, warnings.
    let summary: Vec<&str> = text.lines().skip_while(|l| !l.contains("SUMMARY")).collect();
    eprintln!("schemathesis {what}:\n{}", summary.join("\n"));
    assert!(out.status.success(), "schemathesis {what} found problems:\n{text}\nMES log:\n{}", mes.log());
}

async fn get(mes: &Mes, path: &str) -> Value {
    let r = mes.client.get(format!("{}{path}", mes.http)).bearer_auth(TOKEN).send().await.expect("GET");
    assert_eq!(r.status().as_u16(), 200, "GET {path}");
    r.json().await.expect("JSON")
}

/// What the API shows of the state, without what moves with the clock (live OEE, device
/// status times).
async fn snapshot(mes: &Mes) -> Value {
    let work_centers: Vec<Value> = get(mes, "/api/v1/work-centers")
        .await
        .as_array()
        .expect("work centers")
        .iter()
        .map(|w| json!([w["id"], w["state"], w["good_total"], w["scrap_total"], w["current_order"]]))
        .collect();
    let buffers: Vec<Value> = get(mes, "/api/v1/buffers")
        .await
        .as_array()
        .expect("buffers")
        .iter()
        .map(|b| json!([b["id"], b["on_hand"], b["reserved"], b["available"], b["alert"]]))
        .collect();
    json!({
        "inventory": get(mes, "/api/v1/inventory").await,
        "buffers": buffers,
        "orders": get(mes, "/api/v1/orders?limit=1000").await,
        "work_centers": work_centers,
        "trial_balance": get(mes, "/api/v1/trial-balance").await,
        "journal": get(mes, "/api/v1/journal?limit=100000").await,
        "surge_plans": get(mes, "/api/v1/surge-plans?limit=1000").await,
        "erp_outbox": get(mes, "/api/v1/erp/outbox?limit=1000").await,
        "dead_letters": get(mes, "/api/v1/dead-letters?limit=1000").await,
        "audit": get(mes, "/api/v1/audit?limit=1000").await,
    })
}

async fn post(mes: &Mes, path: &str, body: Value) -> (u16, Value) {
    mes.post(path, body, &[("Authorization", &format!("Bearer {TOKEN}"))]).await
}

/// FORM-1's totals once they are `want` (or after 30 s): the harness's reads carry no token.
async fn wait_totals(mes: &Mes, want: (i64, i64)) -> (i64, i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let wc = get(mes, "/api/v1/work-centers/FORM-1").await;
        let got = (wc["good_total"].as_i64().unwrap_or(-1), wc["scrap_total"].as_i64().unwrap_or(-1));
        if got == want || std::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_invalid_input_changes_nothing() {
    let Some(st) = schemathesis() else { return };
    let extra = format!("[[auth.tokens]]\nname = \"fuzz\"\nrole = \"admin\"\ntoken = \"{TOKEN}\"\n");
    let mut mes = Mes::start(MesOptions { extra_config: extra, ..Default::default() }).await;

    // Some state to keep: a released order with output, a reservation.
    let (s, o) =
        post(&mes, "/api/v1/orders", json!({"id": "PO-F1", "sku": "HOUSING", "quantity": 10, "work_center": "FORM-1"}))
            .await;
    assert_eq!(s, 201, "{o}");
    let (s, o) = post(&mes, "/api/v1/orders/PO-F1/release", json!({})).await;
    assert_eq!(s, 200, "{o}");
    let mut dev = mes.device("fuzz");
    dev.reading("form-01", 1, 1, 4, 1, json!({})).await;
    dev.flush().await;
    assert_eq!(wait_totals(&mes, (4, 1)).await, (4, 1));

    let before = snapshot(&mes).await;
    run(
        &st,
        &mes,
        "negative (write operations)",
        &[
            "--mode",
            "negative",
            "--include-method",
            "POST",
            "--include-method",
            "DELETE",
            "--checks",
            "not_a_server_error,negative_data_rejection",
        ],
    );
    let after = snapshot(&mes).await;
    if before != after {
        for (k, v) in before.as_object().expect("snapshot") {
            if after[k] != *v {
                eprintln!("{k} before: {v}\n{k} after:  {}", after[k]);
            }
        }
        panic!("invalid requests changed the state");
    }

    run(&st, &mes, "all modes (every operation)", &["--checks", "not_a_server_error,response_schema_conformance"]);

    let exited = mes.child.as_mut().expect("child").try_wait().expect("child status");
    assert!(exited.is_none(), "mes exited during fuzzing ({exited:?}); log:\n{}", mes.log());
    let r = mes.client.get(format!("{}/healthz", mes.http)).send().await.expect("healthz after fuzzing");
    assert_eq!(r.status().as_u16(), 200);
    // Ingest still counts.
    dev.reading("form-01", 1, 2, 6, 1, json!({})).await;
    dev.flush().await;
    assert_eq!(wait_totals(&mes, (6, 1)).await, (6, 1));
}

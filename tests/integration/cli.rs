//! The command line: bad config and plant files stop start-up naming the problem;
//! `check-map`; graceful shutdown.

use crate::harness::{temp_dir, Mes, MesOptions};
use std::process::Command;

fn mes(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mes"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run mes");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_names_the_key_and_line() {
    let dir = temp_dir();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[http]\nlisten = \"127.0.0.1:0\"\n\n[database]\nurll = \"sqlite://x.db\"\n").expect("write");
    let (code, _, err) = mes(&["migrate", "--config", cfg.to_str().expect("path")], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("urll") && err.contains("line 5"), "{err}");

    let (code, _, err) = mes(&["migrate"], &[("MES_HTTP__LISTEN", "not-an-address")]);
    assert_ne!(code, 0);
    assert!(err.contains("http.listen"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_plant_file_names_the_entry() {
    let dir = temp_dir();
    let plant = dir.join("plant.toml");
    std::fs::write(
        &plant,
        "[[materials]]\nsku = \"A\"\nstandard_cost = \"1.00\"\n[[buffers]]\nid = \"B\"\nsku = \"A\"\ncapacity = 10\n\
         [[work_centers]]\nid = \"W\"\noutput = \"NOWHERE\"\ndevice = { mqtt = { id = \"w\" } }\n",
    )
    .expect("write");
    let cfg = dir.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"sqlite://{}/db.sqlite\"\n[plant]\nfile = \"{}\"\n",
            dir.display(),
            plant.display()
        ),
    )
    .expect("write");
    let (code, _, err) = mes(&["migrate", "--config", cfg.to_str().expect("path")], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("work_centers `W`: output buffer `NOWHERE` does not exist"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_map_reports_lines() {
    let ok = concat!(env!("CARGO_MANIFEST_DIR"), "/plc-maps/maps/press-v1.toml");
    let (code, out, err) = mes(&["check-map", ok], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("press-v1"), "{out}");

    let dir = temp_dir();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\nversion = 1\n\n[[points]]\nname = \"a\"\nkind = \"holding\"\naddress = 0\ntype = \"u32\"\n\n\
         [[points]]\nname = \"b\"\nkind = \"holding\"\naddress = 1\ntype = \"u16\"\n\n[[points]]\nname = \"c\"\nkind = \"holding\"\naddress = 5\ntype = \"u17\"\n",
    )
    .expect("write");
    let (code, _, err) = mes(&["check-map", bad.to_str().expect("path")], &[]);
    assert_ne!(code, 0);
    assert!(err.contains(":10:") || err.contains(":11:") || err.contains(":13:"), "overlap named by line: {err}");
    assert!(err.contains("u17"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_commits_and_exits_zero_within_ten_seconds() {
    let mut m = Mes::start(MesOptions::default()).await;
    let mut dev = m.device("term");
    for seq in 1..=50 {
        dev.reading("assy-01", 1, seq, seq, 0, serde_json::json!({})).await;
    }
    dev.flush().await;
    m.wait_totals("ASSY-1", (50, 0)).await;
    let (status, took) = m.terminate();
    assert!(status.success(), "exit status {status}; log:\n{}", m.log());
    assert!(took.as_secs() < 10, "took {took:?}");
}

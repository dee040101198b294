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
    // A shipped map: exit 0 and the summary (points, requests per poll, each read, writable).
    let ok = concat!(env!("CARGO_MANIFEST_DIR"), "/plc-maps/maps/press-v1.toml");
    let (code, out, err) = mes(&["check-map", ok], &[]);
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert_eq!(
        out,
        "map press-v1 version 1: 8 points, 3 read requests per poll\n\
         \x20 read input 0..=1 (2 registers)\n\
         \x20 read holding 0..=7 (8 registers)\n\
         \x20 read holding 100..=102 (3 registers)\n\
         \x20 writable: order_target, command\n"
    );

    // A bad map: exit 1 and every problem on the line it concerns, sorted by line.
    let lines = [
        "name = \"x\"",       // 1
        "version = 1",        // 2
        "colour = \"red\"",   // 3: unknown map key
        "",                   // 4
        "[[points]]",         // 5
        "name = \"a\"",       // 6
        "kind = \"holding\"", // 7
        "address = 0",        // 8
        "type = \"u32\"",     // 9: holding 0..=1
        "",                   // 10
        "[[points]]",         // 11
        "name = \"b\"",       // 12
        "kind = \"holding\"", // 13
        "address = 1",        // 14: overlaps `a`
        "type = \"u16\"",     // 15
        "",                   // 16
        "[[points]]",         // 17
        "name = \"c\"",       // 18
        "kind = \"holding\"", // 19
        "address = 5",        // 20
        "type = \"u17\"",     // 21: no such type
        "",                   // 22
        "[[points]]",         // 23
        "name = \"a\"",       // 24: duplicate name
        "kind = \"input\"",   // 25
        "address = 9",        // 26
        "type = \"u16\"",     // 27
        "writable = true",    // 28: input registers cannot be written
    ];
    let dir = temp_dir();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, lines.join("\n") + "\n").expect("write");
    let path = bad.to_str().expect("path");
    let (code, out, err) = mes(&["check-map", path], &[]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    let at = |line: usize, message: &str| format!("{path}:{line}: {message}");
    let expected = [
        at(3, "map: unknown key `colour` (allowed keys: name, version, word_order, points)"),
        at(14, "point `b`: key `address`: holding addresses 1..=1 overlap point `a` (0..=1, line 5)"),
        at(21, "point `c`: key `type` has unknown value `u17` (expected one of: bool, u16, i16, u32, i32, f32, u64)"),
        at(24, "point `a`: duplicate point name (first defined on line 5)"),
        at(
            28,
            "point `a`: key `writable`: the input table is read-only; only holding registers and coils can be written",
        ),
    ];
    assert_eq!(err.lines().collect::<Vec<_>>(), expected, "{err}");
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

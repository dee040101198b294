//! Every file in `maps/` loads clean and is bundled by `shipped_map`.

use mes_plc_maps::{check_file, shipped_map, RegisterMap, Role, SHIPPED_MAPS};
use std::path::PathBuf;

fn maps_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("maps")
}

#[test]
fn every_map_file_loads_clean_and_is_shipped() {
    let mut seen = 0;
    let entries = std::fs::read_dir(maps_dir()).expect("maps dir");
    for entry in entries {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        seen += 1;
        let map = RegisterMap::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let stem = path.file_stem().and_then(|s| s.to_str()).expect("utf-8 name");
        assert_eq!(map.name, stem, "file name and `name` key differ");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(shipped_map(stem), Some(text.as_str()), "{stem} not in SHIPPED_MAPS");
        let summary = check_file(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(summary.points, map.points.len());
    }
    assert_eq!(seen, SHIPPED_MAPS.len());
    assert!(seen >= 2);
}

#[test]
fn press_v1_matches_the_contract() {
    let map = RegisterMap::shipped("press-v1").expect("shipped").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(map.version, 1);
    assert_eq!(map.wrap_bits(Role::Good), Some(32));
    assert_eq!(map.wrap_bits(Role::Scrap), Some(16));
    assert_eq!(map.wrap_bits(Role::Boot), Some(16));
    let summary = check_file(maps_dir().join("press-v1.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(summary.writable, vec!["order_target", "command"]);
    assert_eq!(summary.requests_per_poll, 3);
    let shown = summary.to_string();
    assert!(shown.starts_with("map press-v1 version 1: 8 points, 3 read requests per poll"));
    assert!(shown.contains("read holding 0..=7 (8 registers)"));
}

#[test]
fn former_v2_loads() {
    let map = RegisterMap::shipped("former-v2").expect("shipped").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(map.wrap_bits(Role::Good), Some(32));
    assert_eq!(map.wrap_bits(Role::Boot), Some(16));
    assert!(map.point_by_role(Role::Order).is_some_and(|p| p.writable));
    assert!(RegisterMap::shipped("nope").is_none());
}

#[test]
fn missing_file_is_reported_without_a_line() {
    let err = check_file("/nonexistent/dir/x.toml").expect_err("missing file");
    assert_eq!(err.problems[0].line, 0);
    assert!(err.to_string().starts_with("/nonexistent/dir/x.toml: cannot read map file"));
}

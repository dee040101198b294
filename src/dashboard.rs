//! The live dashboard page served at `/`.

pub const PAGE: &str = include_str!("dashboard.html");

//! Settlement rules: what one counted delta does to stock and to the books.
//!
//! Pure functions over plain types. Money is in 1/10_000 units ([`crate::money::SCALE`]).
//! Every amount is computed per reading and only then summed, so the books come out the
//! same however readings are batched into commits.

use std::collections::BTreeMap;

/// Chart of accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Account {
    RawMaterials,
    Wip,
    FinishedGoods,
    AppliedConversion,
    CostOfGoodsSold,
    Scrap,
    MaterialUsageVariance,
    EfficiencyVariance,
    /// Counted stock that differs from the books (inventory adjustments).
    InventoryAdjustment,
}

impl Account {
    pub const ALL: [Account; 9] = [
        Account::RawMaterials,
        Account::Wip,
        Account::FinishedGoods,
        Account::AppliedConversion,
        Account::CostOfGoodsSold,
        Account::Scrap,
        Account::MaterialUsageVariance,
        Account::EfficiencyVariance,
        Account::InventoryAdjustment,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Account::RawMaterials => "1200",
            Account::Wip => "1300",
            Account::FinishedGoods => "1400",
            Account::AppliedConversion => "2500",
            Account::CostOfGoodsSold => "5000",
            Account::Scrap => "5100",
            Account::MaterialUsageVariance => "5300",
            Account::EfficiencyVariance => "5310",
            Account::InventoryAdjustment => "5400",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Account::RawMaterials => "Raw materials inventory",
            Account::Wip => "Work in process",
            Account::FinishedGoods => "Finished and semi-finished goods",
            Account::AppliedConversion => "Conversion cost applied",
            Account::CostOfGoodsSold => "Cost of goods sold",
            Account::Scrap => "Scrap (yield variance)",
            Account::MaterialUsageVariance => "Material usage variance",
            Account::EfficiencyVariance => "Efficiency variance",
            Account::InventoryAdjustment => "Inventory adjustments",
        }
    }

    pub fn from_code(code: &str) -> Option<Account> {
        Account::ALL.into_iter().find(|a| a.code() == code)
    }
}

/// One side-balanced posting: debit one account, credit another, same amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Posting {
    pub kind: &'static str,
    pub debit: Account,
    pub credit: Account,
    pub amount: i64,
}

/// A component a work center consumes per unit of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub sku: String,
    pub per_unit: i64,
    pub buffer: String,
    /// Inventory account the component is carried in.
    pub account: Account,
    /// Standard cost per unit of the component.
    pub unit_cost: i64,
}

/// What settlement needs to know about one work center.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkCenterSpec {
    pub output_sku: String,
    pub output_buffer: String,
    pub inputs: Vec<Input>,
    /// Conversion cost per running hour.
    pub conversion_per_hour: i64,
    /// Standard cost of one unit of output: material at standard plus conversion over the
    /// ideal cycle.
    pub standard_unit_cost: i64,
    pub standard_material: i64,
    pub standard_conversion: i64,
}

impl WorkCenterSpec {
    /// Builds the standard cost from BOM inputs and the ideal cycle.
    pub fn new(
        output_sku: String,
        output_buffer: String,
        inputs: Vec<Input>,
        conversion_per_hour: i64,
        ideal_cycle_ms: i64,
    ) -> Self {
        let standard_material: i64 = inputs.iter().map(|i| i.per_unit * i.unit_cost).sum();
        let standard_conversion = conversion_per_hour * ideal_cycle_ms / 3_600_000;
        Self {
            output_sku,
            output_buffer,
            inputs,
            conversion_per_hour,
            standard_unit_cost: standard_material + standard_conversion,
            standard_material,
            standard_conversion,
        }
    }
}

/// A change of stock in one buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Movement {
    pub buffer: String,
    pub sku: String,
    /// Positive in, negative out.
    pub qty: i64,
    pub kind: &'static str,
}

/// Everything one reading's delta settles.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settlement {
    pub movements: Vec<Movement>,
    pub postings: Vec<Posting>,
    /// Material put into WIP at standard prices (actual quantities).
    pub material: i64,
    /// Conversion applied for running time.
    pub conversion: i64,
}

/// Settles `good` and `scrap` units made in `running_ms` at a work center.
///
/// Good and scrap units both consume the BOM; good units enter the output buffer.
/// Postings: material issue (Dr WIP / Cr inventory), conversion applied (Dr WIP /
/// Cr applied conversion), completion at standard (Dr finished goods / Cr WIP), scrap at
/// standard (Dr scrap / Cr WIP).
pub fn settle(spec: &WorkCenterSpec, good: i64, scrap: i64, running_ms: i64) -> Settlement {
    debug_assert!(good >= 0 && scrap >= 0 && running_ms >= 0);
    let mut s = Settlement::default();
    let made = good + scrap;
    for i in &spec.inputs {
        let qty = i.per_unit * made;
        if qty == 0 {
            continue;
        }
        s.movements.push(Movement { buffer: i.buffer.clone(), sku: i.sku.clone(), qty: -qty, kind: "consumption" });
        let value = qty * i.unit_cost;
        s.material += value;
        if value != 0 {
            s.postings.push(Posting { kind: "material_issue", debit: Account::Wip, credit: i.account, amount: value });
        }
    }
    if good > 0 {
        s.movements.push(Movement {
            buffer: spec.output_buffer.clone(),
            sku: spec.output_sku.clone(),
            qty: good,
            kind: "production",
        });
    }
    s.conversion = conversion(spec.conversion_per_hour, running_ms);
    let mut post = |kind, debit, credit, amount: i64| {
        if amount != 0 {
            s.postings.push(Posting { kind, debit, credit, amount });
        }
    };
    post("conversion", Account::Wip, Account::AppliedConversion, s.conversion);
    post("completion", Account::FinishedGoods, Account::Wip, good * spec.standard_unit_cost);
    post("scrap", Account::Scrap, Account::Wip, scrap * spec.standard_unit_cost);
    s
}

/// Conversion applied for one reading's running time, on its own (readings without an
/// order; an order's is priced from its cumulative running time, [`conversion_between`]).
pub fn conversion(per_hour: i64, running_ms: i64) -> i64 {
    per_hour * running_ms / 3_600_000
}

/// Conversion applied for running time between two cumulative running times. Computing
/// from the cumulative time keeps the total exact (no per-reading rounding drift) however
/// the time is split into readings and batches.
pub fn conversion_between(per_hour: i64, before_ms: i64, after_ms: i64) -> i64 {
    let at = |ms: i64| (i128::from(per_hour) * i128::from(ms) / 3_600_000) as i64;
    at(after_ms) - at(before_ms)
}

/// An order's cost report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderCost {
    /// Good output at standard cost.
    pub standard: i64,
    /// Everything put into WIP: material and conversion.
    pub actual: i64,
    pub material_usage: i64,
    pub efficiency: i64,
    pub yield_: i64,
}

/// Splits an order's actual cost into standard and variances; they always add up:
/// `standard + material_usage + efficiency + yield == actual`.
pub fn order_cost(spec: &WorkCenterSpec, good: i64, scrap: i64, material: i64, conversion: i64) -> OrderCost {
    let made = good + scrap;
    let c = OrderCost {
        standard: good * spec.standard_unit_cost,
        actual: material + conversion,
        material_usage: material - made * spec.standard_material,
        efficiency: conversion - made * spec.standard_conversion,
        yield_: scrap * spec.standard_unit_cost,
    };
    debug_assert_eq!(c.standard + c.material_usage + c.efficiency + c.yield_, c.actual);
    c
}

/// Postings that empty an order's remaining WIP into variances at close.
pub fn close_postings(cost: &OrderCost) -> Vec<Posting> {
    let mut out = Vec::new();
    for (kind, account, amount) in [
        ("material_usage_variance", Account::MaterialUsageVariance, cost.material_usage),
        ("efficiency_variance", Account::EfficiencyVariance, cost.efficiency),
    ] {
        match amount {
            a if a > 0 => out.push(Posting { kind, debit: account, credit: Account::Wip, amount: a }),
            a if a < 0 => out.push(Posting { kind, debit: Account::Wip, credit: account, amount: -a }),
            _ => {}
        }
    }
    out
}

/// Sums postings into per-account (debit, credit) totals.
pub fn trial_balance<'a>(postings: impl IntoIterator<Item = &'a Posting>) -> BTreeMap<Account, (i64, i64)> {
    let mut tb: BTreeMap<Account, (i64, i64)> = BTreeMap::new();
    for p in postings {
        tb.entry(p.debit).or_default().0 += p.amount;
        tb.entry(p.credit).or_default().1 += p.amount;
    }
    tb
}

#[cfg(test)]
mod tests {
    use super::*;

    fn press() -> WorkCenterSpec {
        // WIDGET from 2 × SHEET at 1.20; 60.00 per hour over a 1 s cycle.
        WorkCenterSpec::new(
            "WIDGET".into(),
            "FG".into(),
            vec![Input {
                sku: "SHEET".into(),
                per_unit: 2,
                buffer: "RM".into(),
                account: Account::RawMaterials,
                unit_cost: 12_000,
            }],
            600_000,
            1_000,
        )
    }

    #[test]
    fn standard_cost_is_material_plus_conversion() {
        let p = press();
        assert_eq!((p.standard_material, p.standard_conversion, p.standard_unit_cost), (24_000, 166, 24_166));
    }

    #[test]
    fn settlement_moves_stock_and_balances() {
        let s = settle(&press(), 10, 2, 12_000);
        assert_eq!(
            s.movements,
            vec![
                Movement { buffer: "RM".into(), sku: "SHEET".into(), qty: -24, kind: "consumption" },
                Movement { buffer: "FG".into(), sku: "WIDGET".into(), qty: 10, kind: "production" },
            ]
        );
        assert_eq!(s.material, 24 * 12_000);
        assert_eq!(s.conversion, 2_000); // 12 s at 60.00/h = 0.20
        let tb = trial_balance(&s.postings);
        let (d, c): (i64, i64) = tb.values().fold((0, 0), |(d, c), (x, y)| (d + x, c + y));
        assert_eq!(d, c);
        // WIP keeps exactly what is not yet explained by standard output and scrap.
        let wip = tb[&Account::Wip].0 - tb[&Account::Wip].1;
        assert_eq!(wip, s.material + s.conversion - 12 * 24_166);
    }

    #[test]
    fn order_cost_adds_up_and_close_empties_wip() {
        let p = press();
        // Three readings, summed: the books do not depend on batching.
        let parts = [settle(&p, 4, 0, 5_000), settle(&p, 5, 1, 7_000), settle(&p, 1, 1, 2_000)];
        let (material, conversion): (i64, i64) =
            parts.iter().fold((0, 0), |(m, c), s| (m + s.material, c + s.conversion));
        let cost = order_cost(&p, 10, 2, material, conversion);
        assert_eq!(cost.standard + cost.material_usage + cost.efficiency + cost.yield_, cost.actual);
        assert_eq!(cost.material_usage, 0, "backflush consumes exactly the BOM");
        assert_eq!(cost.yield_, 2 * 24_166);
        let mut all: Vec<Posting> = parts.iter().flat_map(|s| s.postings.clone()).collect();
        all.extend(close_postings(&cost));
        let tb = trial_balance(&all);
        assert_eq!(tb[&Account::Wip].0, tb[&Account::Wip].1, "WIP of a closed order is zero");
    }

    #[test]
    fn conversion_from_cumulative_time_does_not_drift() {
        let split: i64 = (0..10).map(|i| conversion_between(600_000, i * 1_000, (i + 1) * 1_000)).sum();
        assert_eq!(split, conversion_between(600_000, 0, 10_000));
        assert_eq!(split, 1_666);
    }

    #[test]
    fn account_codes_round_trip() {
        for a in Account::ALL {
            assert_eq!(Account::from_code(a.code()), Some(a));
        }
    }
}

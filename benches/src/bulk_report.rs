//! The markdown table the bulk benchmark prints: one row per body size,
//! the rate of each path and their ratios.

use std::fmt;

use crate::report::group_thousands;

/// One body size: MB/s over each path, each absent if that case failed or
/// did not run.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkRow {
    /// The body size, e.g. `16 MiB`.
    pub size: String,
    /// Over a lazy channel (node to node).
    pub lazy: Option<f64>,
    /// Through the message server.
    pub server: Option<f64>,
    /// Raw TCP, one loopback connection.
    pub raw: Option<f64>,
}

impl BulkRow {
    /// Whether every case of the row produced a rate.
    pub fn is_complete(&self) -> bool {
        self.lazy.is_some() && self.server.is_some() && self.raw.is_some()
    }
}

/// `size | lazy MB/s | via server MB/s | raw TCP MB/s | lazy/raw |
/// server/raw | lazy/server`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BulkTable {
    rows: Vec<BulkRow>,
}

impl BulkTable {
    /// An empty table.
    pub fn new() -> BulkTable {
        BulkTable::default()
    }

    /// Appends a row.
    pub fn push(&mut self, row: BulkRow) {
        self.rows.push(row);
    }

    /// The rows so far.
    pub fn rows(&self) -> &[BulkRow] {
        &self.rows
    }
}

impl fmt::Display for BulkTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| size | lazy MB/s | via server MB/s | raw TCP MB/s | lazy/raw | server/raw | lazy/server |"
        )?;
        writeln!(f, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
        for row in &self.rows {
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {} | {} |",
                row.size,
                rate_cell(row.lazy),
                rate_cell(row.server),
                rate_cell(row.raw),
                ratio_cell(row.lazy, row.raw),
                ratio_cell(row.server, row.raw),
                ratio_cell(row.lazy, row.server),
            )?;
        }
        Ok(())
    }
}

fn rate_cell(rate: Option<f64>) -> String {
    rate.map_or_else(|| "-".to_owned(), |r| group_thousands(r.round() as u64))
}

fn ratio_cell(num: Option<f64>, den: Option<f64>) -> String {
    match (num, den) {
        (Some(n), Some(d)) if d > 0.0 => format!("{:.2}", n / d),
        _ => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_show_rates_and_ratios() {
        let mut table = BulkTable::new();
        table.push(BulkRow {
            size: "1 MiB".into(),
            lazy: Some(1_500.0),
            server: Some(750.0),
            raw: Some(3_000.0),
        });
        table.push(BulkRow {
            size: "64 MiB".into(),
            lazy: None,
            server: Some(500.0),
            raw: Some(1_000.0),
        });
        let text = table.to_string();
        assert!(
            text.contains("| 1 MiB | 1,500 | 750 | 3,000 | 0.50 | 0.25 | 2.00 |"),
            "{text}"
        );
        assert!(
            text.contains("| 64 MiB | - | 500 | 1,000 | - | 0.50 | - |"),
            "{text}"
        );
        assert!(table.rows()[0].is_complete());
        assert!(!table.rows()[1].is_complete());
    }
}

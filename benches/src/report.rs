//! Rates and the markdown table the benchmarks print.

use std::fmt;
use std::time::Duration;

/// Events per second; zero for an empty interval.
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// One case: our rate and the raw-TCP peer's, each absent if that side
/// failed or has no counterpart.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// What was measured, e.g. `notify 128 B`.
    pub case: String,
    /// clustercomm messages per second.
    pub ours: Option<f64>,
    /// Raw-TCP messages per second.
    pub raw: Option<f64>,
}

/// The result table: `case | clustercomm msgs/s | raw TCP msgs/s | ratio`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    rows: Vec<Row>,
}

impl Table {
    /// An empty table.
    pub fn new() -> Table {
        Table::default()
    }

    /// Appends a row.
    pub fn push(&mut self, case: impl Into<String>, ours: Option<f64>, raw: Option<f64>) {
        self.rows.push(Row {
            case: case.into(),
            ours,
            raw,
        });
    }

    /// The rows so far.
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| case | clustercomm msgs/s | raw TCP msgs/s | ratio (ours/raw) |"
        )?;
        writeln!(f, "| --- | ---: | ---: | ---: |")?;
        for row in &self.rows {
            let ratio = match (row.ours, row.raw) {
                (Some(ours), Some(raw)) if raw > 0.0 => format!("{:.3}", ours / raw),
                _ => "-".to_owned(),
            };
            writeln!(
                f,
                "| {} | {} | {} | {} |",
                row.case,
                rate_cell(row.ours),
                rate_cell(row.raw),
                ratio
            )?;
        }
        Ok(())
    }
}

fn rate_cell(rate: Option<f64>) -> String {
    rate.map_or_else(
        || "failed".to_owned(),
        |r| group_thousands(r.round() as u64),
    )
}

/// `1234567` as `1,234,567`.
pub fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        for (n, text) in [
            (0, "0"),
            (999, "999"),
            (1_000, "1,000"),
            (123_456, "123,456"),
            (1_234_567, "1,234,567"),
        ] {
            assert_eq!(group_thousands(n), text);
        }
    }

    #[test]
    fn rates_and_ratios() {
        assert_eq!(per_second(10, Duration::from_millis(500)), 20.0);
        assert_eq!(per_second(10, Duration::ZERO), 0.0);
        let mut table = Table::new();
        table.push("a", Some(500.0), Some(1_000.0));
        table.push("b", None, Some(1_000.0));
        let text = table.to_string();
        assert!(text.contains("| a | 500 | 1,000 | 0.500 |"), "{text}");
        assert!(text.contains("| b | failed | 1,000 | - |"), "{text}");
    }
}

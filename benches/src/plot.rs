//! The picture of the path sweep: throughput against body size for the
//! lazy channel and the message-server path, with the recommended
//! `lazy.threshold_bytes` marked.

use std::path::Path;

use plotters::prelude::*;

use crate::ours::SweepPoint;
use crate::suite::size;

/// Fonts tried, in order, for the labels (Debian's fonts-dejavu-core).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// Registers the first font found as "sans-serif"; false if none is.
fn load_font() -> bool {
    for path in FONTS {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters keeps the font for the process's life.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

/// Draws the sweep to a PNG at `path`. Without a font on the machine the
/// picture has no text (the table says the same in words).
///
/// # Errors
///
/// If there is nothing to draw, or the file cannot be written.
pub fn sweep_png(
    path: &Path,
    points: &[SweepPoint],
    threshold: Option<usize>,
    machine: &str,
) -> anyhow::Result<()> {
    anyhow::ensure!(!points.is_empty(), "no sweep points to draw");
    let labels = load_font();
    let root = BitMapBackend::new(path, (1000, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let x = |body: usize| (body as f64).log2();
    let (x_lo, x_hi) = (
        x(points.first().map_or(1024, |p| p.body)),
        x(points.last().map_or(1 << 24, |p| p.body)),
    );
    let y_hi = points
        .iter()
        .map(|p| p.lazy_mb_s.max(p.server_mb_s))
        .fold(1.0, f64::max)
        * 1.1;
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(20)
        .x_label_area_size(if labels { 50 } else { 10 })
        .y_label_area_size(if labels { 80 } else { 10 });
    if labels {
        let caption = format!("clustercomm: throughput by body size ({machine})");
        // Smaller for a long machine name, so the caption fits the width.
        let font = (1800 / caption.chars().count().max(1)).clamp(12, 22) as u32;
        builder.caption(caption, ("sans-serif", font));
    }
    let mut chart = builder.build_cartesian_2d(x_lo..x_hi, 0.0..y_hi)?;
    if labels {
        chart
            .configure_mesh()
            .x_desc("body size")
            .y_desc("MB/s (acknowledged)")
            .x_label_formatter(&|v| size(2f64.powf(*v).round() as usize))
            .label_style(("sans-serif", 14))
            .draw()?;
    } else {
        chart.configure_mesh().disable_mesh().draw()?;
    }
    let lazy: Vec<(f64, f64)> = points.iter().map(|p| (x(p.body), p.lazy_mb_s)).collect();
    let server: Vec<(f64, f64)> = points.iter().map(|p| (x(p.body), p.server_mb_s)).collect();
    let lazy_series = chart.draw_series(LineSeries::new(lazy.clone(), BLUE.stroke_width(3)))?;
    if labels {
        lazy_series
            .label("lazy channel (node to node)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(3)));
    }
    chart.draw_series(lazy.iter().map(|p| Circle::new(*p, 4, BLUE.filled())))?;
    let server_series = chart.draw_series(LineSeries::new(server.clone(), RED.stroke_width(3)))?;
    if labels {
        server_series
            .label("through the message server")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(3)));
    }
    chart.draw_series(server.iter().map(|p| Circle::new(*p, 4, RED.filled())))?;
    if let Some(t) = threshold {
        let marker = chart.draw_series(LineSeries::new(
            vec![(x(t), 0.0), (x(t), y_hi)],
            BLACK.stroke_width(2),
        ))?;
        if labels {
            marker
                .label(format!("recommended lazy.threshold_bytes = {t}"))
                .legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2))
                });
        }
    }
    if labels {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

//! Charts as PNG: the replay chart (queue length and GPU allocation over time, one line per
//! policy) and a grid of metric panels (the operations guide's dashboard picture). Labels are
//! drawn with a built-in 3x5 pixel font so no system font library is needed.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::sim::SimResult;

const COLORS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {message}")]
pub struct PlotError {
    pub path: String,
    pub message: String,
}

/// Rows of a glyph, three bits each, top first.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '-' => [0, 0, 7, 0, 0],
        '.' => [0, 0, 0, 0, 2],
        '%' => [5, 1, 2, 4, 5],
        ':' => [0, 2, 0, 2, 0],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        '/' => [1, 1, 2, 4, 4],
        '=' => [0, 7, 0, 7, 0],
        '_' => [0, 0, 0, 0, 7],
        _ => [0; 5],
    }
}

/// Draws `text` with its top-left corner at `(x, y)`, each font pixel `scale` pixels wide.
fn text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    x: i32,
    y: i32,
    scale: i32,
    color: RGBColor,
    text: &str,
) -> Result<(), String> {
    for (i, c) in text.chars().enumerate() {
        let ox = x + i as i32 * 4 * scale;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    let px = ox + col * scale;
                    let py = y + row as i32 * scale;
                    area.draw(&Rectangle::new(
                        [(px, py), (px + scale - 1, py + scale - 1)],
                        color.filled(),
                    ))
                    .map_err(|e| e.to_string())?;
                }
            }
        }
    }
    Ok(())
}

fn text_width(text: &str, scale: i32) -> i32 {
    text.chars().count() as i32 * 4 * scale
}

/// A short label for a number: 1234 -> "1234", 1.5e6 -> "1.5M".
fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}K", v / 1e3)
    } else if a >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

type Series = Vec<(f64, f64)>;

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    x_max: f64,
    y_max: f64,
    series: &[(String, Series)],
    x_label: &str,
) -> Result<(), String> {
    let (width, height) = area.dim_in_pixel();
    let (left, right, top, bottom) = (90i32, 20i32, 40i32, 50i32);
    let plot = area.margin(top, bottom, left, right);
    let mut chart = ChartBuilder::on(&plot)
        .build_cartesian_2d(0.0..x_max.max(1.0), 0.0..y_max.max(1.0))
        .map_err(|e| e.to_string())?;
    for (i, (_, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?;
    }
    let black = RGBColor(0, 0, 0);
    let (pw, ph) = (width as i32 - left - right, height as i32 - top - bottom);
    area.draw(&Rectangle::new(
        [(left, top), (left + pw, top + ph)],
        black.stroke_width(1),
    ))
    .map_err(|e| e.to_string())?;
    text(area, left, 12, 3, black, title)?;
    for tick in 0..=4 {
        let frac = f64::from(tick) / 4.0;
        let y = top + ph - (frac * f64::from(ph)) as i32;
        let label = short(frac * y_max);
        text(
            area,
            left - 10 - text_width(&label, 2),
            y - 5,
            2,
            black,
            &label,
        )?;
        area.draw(&PathElement::new(vec![(left - 5, y), (left, y)], black))
            .map_err(|e| e.to_string())?;
        let x = left + (frac * f64::from(pw)) as i32;
        let label = short(frac * x_max);
        text(
            area,
            x - text_width(&label, 2) / 2,
            top + ph + 10,
            2,
            black,
            &label,
        )?;
        area.draw(&PathElement::new(
            vec![(x, top + ph), (x, top + ph + 5)],
            black,
        ))
        .map_err(|e| e.to_string())?;
    }
    text(
        area,
        left + pw - text_width(x_label, 2),
        top + ph + 32,
        2,
        black,
        x_label,
    )?;
    let mut lx = left + pw - 10;
    for (i, (name, _)) in series.iter().enumerate().rev() {
        lx -= text_width(name, 2) + 30;
        let color = COLORS[i % COLORS.len()];
        area.draw(&Rectangle::new([(lx, 14), (lx + 16, 22)], color.filled()))
            .map_err(|e| e.to_string())?;
        text(area, lx + 22, 13, 2, black, name)?;
    }
    Ok(())
}

/// Queue length (top) and GPU allocation in percent (bottom) over virtual time, in hours.
pub fn draw(path: &Path, results: &[SimResult], title: &str) -> Result<(), PlotError> {
    let err = |message: String| PlotError {
        path: path.display().to_string(),
        message,
    };
    let root = BitMapBackend::new(path, (1400, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (top, bottom) = root.split_vertically(450);
    let t0 = results
        .iter()
        .filter_map(|r| r.samples.first())
        .map(|s| s.t)
        .fold(f64::INFINITY, f64::min);
    let t0 = if t0.is_finite() { t0 } else { 0.0 };
    // Thin very long series to about one point per pixel column.
    let thin = |points: Vec<(f64, f64)>| -> Series {
        let step = (points.len() / 4000).max(1);
        points.into_iter().step_by(step).collect()
    };
    let mut queue = Vec::new();
    let mut alloc = Vec::new();
    let (mut x_max, mut q_max) = (0.0f64, 0.0f64);
    for r in results {
        let q: Series = r
            .samples
            .iter()
            .map(|s| ((s.t - t0) / 3600.0, s.queued as f64))
            .collect();
        let a: Series = r
            .samples
            .iter()
            .map(|s| {
                (
                    (s.t - t0) / 3600.0,
                    100.0 * s.allocated_gpus as f64 / r.total_gpus.max(1) as f64,
                )
            })
            .collect();
        x_max = x_max.max(q.last().map_or(0.0, |p| p.0));
        q_max = q_max.max(q.iter().map(|p| p.1).fold(0.0, f64::max));
        queue.push((r.policy.clone(), thin(q)));
        alloc.push((r.policy.clone(), thin(a)));
    }
    panel(
        &top,
        &format!("{title}: queued jobs"),
        x_max,
        q_max * 1.05,
        &queue,
        "hours",
    )
    .map_err(err)?;
    panel(&bottom, "GPUs allocated (%)", x_max, 100.0, &alloc, "hours").map_err(err)?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// One panel of a grid: named lines over a shared x axis.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Panel {
    pub title: String,
    /// Top of the y axis; the highest point (plus 5%) when absent.
    #[serde(default)]
    pub y_max: Option<f64>,
    pub series: Vec<NamedSeries>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct NamedSeries {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Panels in a grid of `columns`, each 700x400 pixels, under one title; x is in `x_label`.
pub fn draw_grid(
    path: &Path,
    title: &str,
    x_label: &str,
    columns: usize,
    panels: &[Panel],
) -> Result<(), PlotError> {
    let err = |message: String| PlotError {
        path: path.display().to_string(),
        message,
    };
    let columns = columns.max(1);
    let rows = panels.len().div_ceil(columns).max(1);
    let (w, h) = (700 * columns as u32, 400 * rows as u32 + 50);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    text(&root, 20, 15, 4, RGBColor(0, 0, 0), title).map_err(err)?;
    let (_, body) = root.split_vertically(50);
    let areas = body.split_evenly((rows, columns));
    let x_max = panels
        .iter()
        .flat_map(|p| &p.series)
        .flat_map(|s| &s.points)
        .map(|p| p.0)
        .fold(0.0, f64::max);
    for (area, p) in areas.iter().zip(panels) {
        let highest = p
            .series
            .iter()
            .flat_map(|s| &s.points)
            .map(|p| p.1)
            .fold(0.0, f64::max);
        let series: Vec<(String, Series)> = p
            .series
            .iter()
            .map(|s| (s.name.clone(), s.points.clone()))
            .collect();
        panel(
            area,
            &p.title,
            x_max,
            p.y_max.unwrap_or(highest * 1.05),
            &series,
            x_label,
        )
        .map_err(err)?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

//! Draws metric panels from a JSON file as one PNG: `bench/dashboard` scrapes a running agent's
//! `/metrics` and uses this for the picture in docs/operations.md.
//!
//! Usage: `dashboard INPUT.json OUTPUT.png`, where the input is
//! `{"title": ..., "x_label": ..., "columns": 2, "panels": [{"title": ..., "y_max": 100,
//! "series": [{"name": ..., "points": [[x, y], ...]}]}]}`.

use agentd::replay::plot::{Panel, draw_grid};

#[derive(serde::Deserialize)]
struct Input {
    title: String,
    x_label: String,
    columns: usize,
    panels: Vec<Panel>,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, input, output] = args.as_slice() else {
        anyhow::bail!("usage: dashboard INPUT.json OUTPUT.png");
    };
    let text = fs_err::read_to_string(input)?;
    let input: Input = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{input}: not a dashboard description: {e}"))?;
    draw_grid(
        std::path::Path::new(output),
        &input.title,
        &input.x_label,
        input.columns,
        &input.panels,
    )?;
    println!("wrote {output}");
    Ok(())
}

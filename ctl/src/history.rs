//! `agentctl history`: finished jobs with their accounting, newest first, or their summary by
//! user or queue (as Slurm's `sacct` and `sreport` give them).

use agentd_api::Client;
use agentd_api::history::{HistoryEntry, HistoryPage, HistorySummary};
use serde_json::Value;

use crate::Failure;
use crate::jobs::encode;
use crate::output::{self, Format, Table};

/// What `agentctl history` was asked for.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HistoryArgs {
    /// Only the jobs of this user.
    #[arg(long)]
    pub user: Option<String>,
    /// Succeeded, Failed or Cancelled.
    #[arg(long)]
    pub state: Option<String>,
    #[arg(long)]
    pub queue: Option<String>,
    /// Finished at or after: 2026-11-30, 2026-11-30T08:00:00 (UTC), Unix seconds, or a time
    /// ago such as 2h or 7d.
    #[arg(long)]
    pub since: Option<String>,
    /// Finished before; the same forms as --since.
    #[arg(long)]
    pub until: Option<String>,
    /// Only jobs whose name starts with PREFIX.
    #[arg(long, value_name = "PREFIX")]
    pub name: Option<String>,
    /// Jobs in one page (1 to 1000).
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Continue after a previous page (its `next_cursor`).
    #[arg(long)]
    pub cursor: Option<String>,
    /// Add the jobs up by user or by queue instead of listing them.
    #[arg(long, value_name = "BY", num_args = 0..=1, default_missing_value = "user",
          value_parser = ["user", "queue"])]
    pub summary: Option<String>,
}

pub async fn history(client: &Client, args: &HistoryArgs, format: Format) -> Result<(), Failure> {
    let now = now();
    let mut query = Vec::new();
    for (key, value) in [
        ("user", &args.user),
        ("state", &args.state),
        ("queue", &args.queue),
        ("name", &args.name),
        ("cursor", &args.cursor),
    ] {
        if let Some(v) = value {
            query.push(format!("{key}={}", encode(v)));
        }
    }
    for (key, value) in [("since", &args.since), ("until", &args.until)] {
        if let Some(v) = value {
            let t = parse_time(v, now).map_err(|m| Failure::Usage(format!("--{key}: {m}")))?;
            query.push(format!("{key}={t}"));
        }
    }
    match &args.summary {
        Some(by) => query.push(format!("summary={by}")),
        None => query.push(format!("limit={}", args.limit)),
    }
    let path = format!("/v1/history?{}", query.join("&"));
    let value = client.get_value(&path).await?;
    if args.summary.is_some() {
        let summary: HistorySummary =
            serde_json::from_value(value.clone()).map_err(|e| Failure::Request(e.to_string()))?;
        return print_summary(&summary, &value, format);
    }
    let page: HistoryPage =
        serde_json::from_value(value.clone()).map_err(|e| Failure::Request(e.to_string()))?;
    print_page(&page, &value, format)
}

fn print_page(page: &HistoryPage, value: &Value, format: Format) -> Result<(), Failure> {
    if format == Format::Csv {
        let mut out = csv_line(&[
            "name",
            "user",
            "queue",
            "state",
            "reason",
            "submitted_at",
            "started_at",
            "finished_at",
            "wait_seconds",
            "run_seconds",
            "replicas",
            "gpus",
            "gpu_seconds",
            "restarts",
            "restart_reasons",
            "exit_codes",
            "template",
            "template_values",
        ]);
        for j in &page.jobs {
            let (template, values) = j.template.as_ref().map_or_else(
                || (String::new(), String::new()),
                |t| (t.name.clone(), crate::templates::values_text(t)),
            );
            out.push_str(&csv_line(&[
                &j.name,
                j.user.as_deref().unwrap_or(""),
                &j.queue,
                j.state.as_str(),
                &j.reason,
                &j.submitted_at.to_string(),
                &j.started_at.map(|t| t.to_string()).unwrap_or_default(),
                &j.finished_at.to_string(),
                &format!("{:.3}", j.wait_seconds),
                &format!("{:.3}", j.run_seconds),
                &j.replicas.to_string(),
                &j.gpus.to_string(),
                &format!("{:.3}", j.gpu_seconds),
                &j.restarts.to_string(),
                &j.restart_reasons.join(" "),
                &exit_codes(j),
                &template,
                &values,
            ]));
        }
        print!("{out}");
        return Ok(());
    }
    if output::print_structured(format, value)? {
        return Ok(());
    }
    if page.jobs.is_empty() {
        println!("no finished jobs");
        return Ok(());
    }
    let mut table = Table::new([
        "NAME", "USER", "QUEUE", "STATE", "FINISHED", "WAIT", "RUN", "GPUS", "GPU-H", "RESTARTS",
        "EXIT", "REASON",
    ]);
    for j in &page.jobs {
        table.row(vec![
            j.name.clone(),
            j.user.clone().unwrap_or_else(|| "-".to_owned()),
            j.queue.clone(),
            j.state.to_string(),
            utc(j.finished_at),
            output::duration(j.wait_seconds as u64),
            output::duration(j.run_seconds as u64),
            j.gpus.to_string(),
            format!("{:.2}", j.gpu_seconds / 3600.0),
            if j.restart_reasons.is_empty() {
                j.restarts.to_string()
            } else {
                format!("{} ({})", j.restarts, j.restart_reasons.join(","))
            },
            exit_codes(j),
            j.reason.clone(),
        ]);
    }
    print!("{}", table.render(""));
    if let Some(cursor) = &page.next_cursor {
        println!("more: agentctl history --cursor {cursor} (with the same filters)");
    }
    Ok(())
}

fn print_summary(summary: &HistorySummary, value: &Value, format: Format) -> Result<(), Failure> {
    let key = summary.by.as_str();
    let failures = |row: &agentd_api::history::SummaryRow| {
        row.failures
            .iter()
            .map(|(reason, n)| format!("{reason}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if format == Format::Csv {
        let mut out = csv_line(&[
            key,
            "jobs",
            "gpu_hours",
            "mean_wait_seconds",
            "succeeded",
            "failed",
            "cancelled",
            "failures",
        ]);
        for row in &summary.rows {
            out.push_str(&csv_line(&[
                &row.key,
                &row.jobs.to_string(),
                &format!("{:.4}", row.gpu_hours),
                &format!("{:.3}", row.mean_wait_seconds),
                &row.succeeded.to_string(),
                &row.failed.to_string(),
                &row.cancelled.to_string(),
                &failures(row),
            ]));
        }
        print!("{out}");
        return Ok(());
    }
    if output::print_structured(format, value)? {
        return Ok(());
    }
    if summary.rows.is_empty() {
        println!("no finished jobs");
        return Ok(());
    }
    let mut table = Table::new([
        &key.to_uppercase(),
        "JOBS",
        "GPU-HOURS",
        "MEAN WAIT",
        "SUCCEEDED",
        "FAILED",
        "CANCELLED",
        "FAILURES",
    ]);
    for row in &summary.rows {
        table.row(vec![
            row.key.clone(),
            row.jobs.to_string(),
            format!("{:.2}", row.gpu_hours),
            output::duration(row.mean_wait_seconds as u64),
            row.succeeded.to_string(),
            row.failed.to_string(),
            row.cancelled.to_string(),
            failures(row),
        ]);
    }
    print!("{}", table.render(""));
    Ok(())
}

/// `worker-0=0 worker-1=137` (`sig9` for a signal), the replicas of the last generation.
fn exit_codes(j: &HistoryEntry) -> String {
    j.exit_codes
        .iter()
        .filter_map(|e| match (e.exit_code, e.signal) {
            (_, Some(s)) => Some(format!("{}=sig{s}", e.replica)),
            (Some(c), None) => Some(format!("{}={c}", e.replica)),
            (None, None) => None,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One CSV record (RFC 4180): fields with a comma, quote or line break are quoted.
fn csv_line(fields: &[&str]) -> String {
    let mut line = fields
        .iter()
        .map(|f| {
            if f.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                (*f).to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    line.push_str("\r\n");
    line
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A Unix time as `2026-11-30 08:05:59` (UTC).
fn utc(time: f64) -> String {
    let secs = time.floor() as i64;
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let of_day = secs.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// Reads `--since`/`--until`: a date, a date and time (UTC), Unix seconds, or a time ago.
fn parse_time(text: &str, now: f64) -> Result<f64, String> {
    let bad = || {
        format!(
            "{text:?} is not a time: write 2026-11-30, 2026-11-30T08:00:00 (UTC), Unix seconds, \
             or a time ago such as 90m, 2h or 7d"
        )
    };
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0)
            .then_some(seconds)
            .ok_or_else(bad);
    }
    let ago = text.len() > 1 && text[..text.len() - 1].bytes().all(|b| b.is_ascii_digit());
    if let Some(unit) = text
        .chars()
        .last()
        .filter(|c| ago && c.is_ascii_alphabetic())
    {
        let scale = match unit {
            's' => 1.0,
            'm' => 60.0,
            'h' => 3600.0,
            'd' => 86_400.0,
            'w' => 7.0 * 86_400.0,
            _ => return Err(bad()),
        };
        let n: u32 = text[..text.len() - 1].parse().map_err(|_| bad())?;
        return Ok((now - f64::from(n) * scale).max(0.0));
    }
    let (date, time) = text
        .split_once(['T', ' '])
        .map_or((text, None), |(d, t)| (d, Some(t.trim_end_matches('Z'))));
    let numbers = |s: &str, sep: char, n: usize| -> Option<Vec<i64>> {
        let parts: Vec<i64> = s
            .split(sep)
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        (parts.len() == n || (sep == ':' && parts.len() == 2 && n == 3)).then_some(parts)
    };
    let ymd = numbers(date, '-', 3).ok_or_else(bad)?;
    let (year, month, day) = (ymd[0], ymd[1], ymd[2]);
    if !(1970..=9999).contains(&year) || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return Err(bad());
    }
    let mut seconds = days_from_civil(year, month, day) * 86_400;
    if let Some(time) = time {
        let hms = numbers(time, ':', 3).ok_or_else(bad)?;
        let (hour, minute, second) = (hms[0], hms[1], hms.get(2).copied().unwrap_or(0));
        if !(0..24).contains(&hour) || !(0..60).contains(&minute) || !(0..61).contains(&second) {
            return Err(bad());
        }
        seconds += hour * 3600 + minute * 60 + second;
    }
    Ok(seconds as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_every_form() {
        let now = 1_764_489_600.0; // 2025-11-30T08:00:00Z
        assert_eq!(parse_time("2025-11-30", now), Ok(1_764_460_800.0));
        assert_eq!(parse_time("2025-11-30T08:00:00Z", now), Ok(now));
        assert_eq!(parse_time("2025-11-30 08:00", now), Ok(now));
        assert_eq!(parse_time("1764489600", now), Ok(now));
        assert_eq!(parse_time("2h", now), Ok(now - 7200.0));
        assert_eq!(parse_time("7d", now), Ok(now - 7.0 * 86_400.0));
        for bad in [
            "yesterday",
            "2025-13-01",
            "2025-11-30T25:00",
            "-5",
            "3y",
            "",
        ] {
            let err = parse_time(bad, now).unwrap_err();
            assert!(err.contains("is not a time"), "{bad}: {err}");
        }
        assert_eq!(utc(now), "2025-11-30 08:00:00");
        assert_eq!(utc(0.0), "1970-01-01 00:00:00");
    }

    #[test]
    fn csv_quotes_what_needs_it() {
        assert_eq!(
            csv_line(&["a", "b,c", "say \"hi\""]),
            "a,\"b,c\",\"say \"\"hi\"\"\"\r\n"
        );
    }
}

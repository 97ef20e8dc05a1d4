//! `agentctl submit`, `jobs`, `job`, `logs`, `cancel` and `queues`.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentd_api::jobs::{JobList, JobState, JobStatus, QueueList};
use agentd_api::templates::TemplateSubmit;
use agentd_api::{Client, ClientError};
use http_body_util::BodyExt;
use hyper::Method;
use hyper::body::Bytes;

use crate::Failure;
use crate::output::{self, Format, Table, printable};

/// Reads a manifest from a file, or from standard input for `-`.
pub(crate) fn read_manifest(file: &Path) -> Result<Vec<u8>, Failure> {
    if file == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::stdin().read_to_end(&mut bytes)?;
        return Ok(bytes);
    }
    fs_err::read(file).map_err(|e| Failure::Request(e.to_string()))
}

/// The content type of a manifest file: JSON by its extension, else YAML.
pub(crate) fn content_type(file: &Path) -> &'static str {
    match file.extension().and_then(|e| e.to_str()) {
        Some("json") => "application/json",
        _ => "application/yaml",
    }
}

/// What `agentctl submit` submits.
pub enum Submission {
    /// A manifest file (`-`: standard input).
    File(PathBuf),
    /// A job made from a template.
    Template(TemplateSubmit, String),
}

pub async fn submit(
    client: &Client,
    submission: Submission,
    wait: bool,
    format: Format,
) -> Result<(), Failure> {
    let bytes = match submission {
        Submission::File(file) => {
            let manifest = read_manifest(&file)?;
            client
                .request(
                    Method::POST,
                    "/v1/jobs",
                    Some(content_type(&file)),
                    Bytes::from(manifest),
                )
                .await?
        }
        Submission::Template(request, template) => {
            let body = serde_json::to_vec(&request).map_err(|e| Failure::Request(e.to_string()))?;
            client
                .request(
                    Method::POST,
                    &format!("/v1/templates/{}/jobs", encode(&template)),
                    Some("application/json"),
                    Bytes::from(body),
                )
                .await?
        }
    };
    let value: serde_json::Value = agentd_api::client::decode(&bytes)?;
    let status: JobStatus = serde_json::from_value(value.clone())
        .map_err(|e| Failure::Request(format!("unexpected answer from the agent: {e}")))?;
    if !wait {
        if !output::print_structured(format, &value)? {
            println!("job {} submitted to queue {}", status.name, status.queue);
        }
        return Ok(());
    }
    eprintln!(
        "job {} submitted to queue {}; waiting for it to finish",
        status.name, status.queue
    );
    let last = watch(client, &status.name).await?;
    if !output::print_structured(format, &serde_json::to_value(&last).unwrap_or_default())? {
        println!(
            "job {}: {} ({}: {})",
            last.name, last.state, last.reason, last.message
        );
    }
    match last.state {
        JobState::Succeeded => Ok(()),
        _ => Err(Failure::Request(format!(
            "job {} {}: {}",
            last.name,
            last.state.as_str().to_lowercase(),
            last.message
        ))),
    }
}

/// Polls the job until it finishes, keeping one progress line up to date on standard error.
async fn watch(client: &Client, name: &str) -> Result<JobStatus, Failure> {
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut shown = String::new();
    loop {
        let path = format!("/v1/jobs/{}", encode(name));
        let job: JobStatus = match client.get(&path).await {
            Ok(job) => job,
            // Removed as soon as it finished (ttlSecondsAfterFinished): the agent keeps its
            // last status a while, which says how it ended.
            Err(ClientError::Api { status, .. }) if status == hyper::StatusCode::NOT_FOUND => {
                client.get(&format!("{path}?removed=true")).await?
            }
            Err(e) => return Err(e.into()),
        };
        let running = job
            .replicas
            .iter()
            .filter(|r| r.state == agentd_api::jobs::ReplicaState::Running)
            .count();
        let line = format!(
            "{} {}: {}/{} replicas running, {} restarts — {}",
            output::duration(started.elapsed().as_secs()),
            job.state,
            running,
            job.replicas.len(),
            job.restarts,
            job.message
        );
        let key = format!("{}{}{}{}", job.state, running, job.restarts, job.message);
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else if key != shown {
            eprintln!("{line}");
        }
        shown = key;
        if job.state.is_finished() {
            if tty {
                eprintln!();
            }
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn list(
    client: &Client,
    queue: Option<&str>,
    state: Option<&str>,
    user: Option<&str>,
    format: Format,
) -> Result<(), Failure> {
    let mut query = Vec::new();
    if let Some(u) = user {
        query.push(format!("user={}", encode(u)));
    }
    if let Some(q) = queue {
        query.push(format!("queue={}", encode(q)));
    }
    if let Some(s) = state {
        query.push(format!("state={}", encode(s)));
    }
    let path = if query.is_empty() {
        "/v1/jobs".to_owned()
    } else {
        format!("/v1/jobs?{}", query.join("&"))
    };
    let value = client.get_value(&path).await?;
    if output::print_structured(format, &value)? {
        return Ok(());
    }
    let list: JobList =
        serde_json::from_value(value).map_err(|e| Failure::Request(e.to_string()))?;
    if list.jobs.is_empty() {
        println!("no jobs");
        return Ok(());
    }
    let now = now();
    let mut table = Table::new([
        "NAME", "OWNER", "QUEUE", "STATE", "REPLICAS", "GPUS", "RESTARTS", "AGE", "REASON",
    ]);
    for j in &list.jobs {
        let gpus: usize = j.replicas.iter().map(|r| r.gpu_indices.len()).sum();
        table.row(vec![
            j.name.clone(),
            owner(j),
            j.queue.clone(),
            j.state.to_string(),
            j.replicas.len().to_string(),
            gpus.to_string(),
            format!("{}/{}", j.restarts, j.backoff_limit),
            output::duration((now - j.submitted_at).max(0.0) as u64),
            j.reason.clone(),
        ]);
    }
    print!("{}", table.render(""));
    Ok(())
}

/// The owner's name, or `-` for a job from before owners were recorded.
fn owner(job: &JobStatus) -> String {
    job.owner
        .as_ref()
        .map_or_else(|| "-".to_owned(), |o| o.user.clone())
}

pub async fn show(client: &Client, name: &str, format: Format) -> Result<(), Failure> {
    let value = client
        .get_value(&format!("/v1/jobs/{}", encode(name)))
        .await?;
    if output::print_structured(format, &value)? {
        return Ok(());
    }
    let j: JobStatus =
        serde_json::from_value(value).map_err(|e| Failure::Request(e.to_string()))?;
    println!("Name      {} ({})", j.name, j.kind);
    println!("Owner     {}", printable(&owner(&j)));
    if let Some(t) = &j.template {
        if t.values.is_empty() {
            println!("Template  {}", printable(&t.name));
        } else {
            println!(
                "Template  {} with {}",
                printable(&t.name),
                printable(&crate::templates::values_text(t))
            );
        }
    }
    println!("Queue     {} (priority {})", j.queue, j.priority);
    println!("State     {}: {}", j.state, printable(&j.reason));
    println!("Message   {}", printable(&j.message));
    println!(
        "Restarts  {} of {} (generation {})",
        j.restarts, j.backoff_limit, j.generation
    );
    let mut table = Table::new(["REPLICA", "STATE", "NODE", "GPUS", "ADDRESS", "PID", "EXIT"]);
    for r in &j.replicas {
        table.row(vec![
            r.name.clone(),
            format!("{:?}", r.state),
            r.node.clone().unwrap_or_else(|| "-".into()),
            if r.gpu_indices.is_empty() {
                "-".into()
            } else {
                r.gpu_indices
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            },
            r.address.clone().unwrap_or_else(|| "-".into()),
            r.pid.map_or("-".into(), |p| p.to_string()),
            match (r.exit_code, r.signal) {
                (Some(c), _) => c.to_string(),
                (None, Some(s)) => format!("signal {s}"),
                _ => "-".into(),
            },
        ]);
    }
    println!("Replicas");
    print!("{}", table.render("  "));
    println!("Events");
    let mut events = Table::new(["AGE", "REASON", "MESSAGE"]);
    let now = now();
    for e in &j.events {
        events.row(vec![
            output::duration((now - e.time).max(0.0) as u64),
            e.reason.clone(),
            e.message.clone(),
        ]);
    }
    print!("{}", events.render("  "));
    Ok(())
}

pub async fn logs(
    client: &Client,
    name: &str,
    replica: Option<&str>,
    follow: bool,
) -> Result<(), Failure> {
    let mut path = format!("/v1/jobs/{}/logs?follow={follow}", encode(name));
    if let Some(r) = replica {
        path.push_str(&format!("&replica={}", encode(r)));
    }
    let response = client.send(Method::GET, &path, None, Bytes::new()).await?;
    let mut body = response.into_body();
    let mut out = std::io::stdout().lock();
    let mut printed = false;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| Failure::Request(format!("the log stream broke off: {e}")))?;
        if let Some(data) = frame.data_ref() {
            out.write_all(data)?;
            out.flush()?;
            printed |= !data.is_empty();
        }
    }
    if !printed {
        // An empty answer is not an error: the replica has written nothing (yet).
        let replica = replica.map_or_else(|| "its first replica".to_owned(), str::to_owned);
        eprintln!("job {name}: no output from {replica}");
    }
    Ok(())
}

pub async fn cancel(client: &Client, name: &str, format: Format) -> Result<(), Failure> {
    let bytes = client
        .request(
            Method::DELETE,
            &format!("/v1/jobs/{}", encode(name)),
            None,
            Bytes::new(),
        )
        .await?;
    let value: serde_json::Value = agentd_api::client::decode(&bytes)?;
    if output::print_structured(format, &value)? {
        return Ok(());
    }
    let j: JobStatus =
        serde_json::from_value(value).map_err(|e| Failure::Request(e.to_string()))?;
    // The reason says what this request did, which differs between a first and a second
    // cancel of the same job.
    match j.reason.as_str() {
        "Cancelled" => println!("job {} cancelled; its replicas are being stopped", j.name),
        "Removed" => println!("job {} ({}) removed", j.name, j.state),
        _ => println!("job {} ({}): {}", j.name, j.state, j.message),
    }
    Ok(())
}

pub async fn queues(client: &Client, format: Format) -> Result<(), Failure> {
    let value = client.get_value("/v1/queues").await?;
    if output::print_structured(format, &value)? {
        return Ok(());
    }
    let list: QueueList =
        serde_json::from_value(value).map_err(|e| Failure::Request(e.to_string()))?;
    let mut table = Table::new(["QUEUE", "PRIORITY", "QUEUED", "RUNNING", "GPUS", "LIMITS"]);
    for q in &list.queues {
        let mut limits = Vec::new();
        if let Some(n) = q.max_running_jobs {
            limits.push(format!("{n} jobs"));
        }
        if let Some(n) = q.max_gpus {
            limits.push(format!("{n} GPUs"));
        }
        table.row(vec![
            if q.default {
                format!("{} (default)", q.name)
            } else if q.removed {
                format!("{} (removed)", q.name)
            } else {
                q.name.clone()
            },
            q.priority.to_string(),
            q.queued.to_string(),
            q.running.to_string(),
            q.gpus_in_use.to_string(),
            if limits.is_empty() {
                "-".into()
            } else {
                limits.join(", ")
            },
        ]);
    }
    print!("{}", table.render(""));
    if list.queues.iter().any(|q| q.removed) {
        println!("(removed): no longer defined; serves the jobs it holds, takes no new one");
    }
    if let Some(source) = &list.source {
        println!("queues from {source}");
    }
    if let Some(problem) = &list.problem {
        println!("{problem}");
    }
    Ok(())
}

pub(crate) fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Percent-encodes a path or query component.
pub(crate) fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

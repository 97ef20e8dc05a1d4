//! Where the agent's log records go and in what form.
//!
//! Under systemd, when stderr *is* the journal stream systemd gave the agent (`JOURNAL_STREAM`
//! names its device and inode), records go to journald natively, with their fields as journal
//! fields (`journalctl -u agentd JOB=mnist` works) and levels as priorities. Otherwise they are
//! readable text on stderr, or one JSON object per line with `--log-format json`. The filter is
//! `RUST_LOG` when set, else the configured `log`, else `info`.
//!
//! This module only sets up the subscriber; it never decides what is worth logging.

use std::fmt;
use std::str::FromStr;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The filter used when neither `RUST_LOG` nor the config sets one.
pub const DEFAULT_FILTER: &str = "info";

/// The identifier journal records carry (`journalctl -t agentd`).
pub const SYSLOG_IDENTIFIER: &str = "agentd";

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("log filter {filter:?} from {source_name} is not valid: {source}")]
    Filter {
        filter: String,
        source_name: &'static str,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("log format {0:?} is not one of auto, text, json, journald")]
    Format(String),
    #[error("cannot reach journald at /run/systemd/journal/socket: {0}")]
    Journald(#[source] std::io::Error),
    #[error("a global log subscriber is already set: {0}")]
    AlreadySet(#[source] tracing_subscriber::util::TryInitError),
}

/// What the operator asked for (`--log-format`, `log.format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// journald when stderr is the journal, else text.
    #[default]
    Auto,
    Text,
    Json,
    Journald,
}

impl FromStr for LogFormat {
    type Err = LoggingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            "journald" => Ok(Self::Journald),
            other => Err(LoggingError::Format(other.to_owned())),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Text => "text",
            Self::Json => "json",
            Self::Journald => "journald",
        })
    }
}

/// Where records actually go, after [`LogFormat::Auto`] is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSink {
    Text,
    Json,
    Journald,
}

impl LogFormat {
    /// Resolves `Auto` against what stderr is.
    pub fn sink(self, stderr_is_journal: bool) -> LogSink {
        match self {
            Self::Auto if stderr_is_journal => LogSink::Journald,
            Self::Auto | Self::Text => LogSink::Text,
            Self::Json => LogSink::Json,
            Self::Journald => LogSink::Journald,
        }
    }
}

/// True when stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` is
/// `<device>:<inode>` of that stream, and it must match stderr, because a shell started from a
/// service inherits the variable while its stderr may go elsewhere (systemd.exec(5)).
pub fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    journal_stream_matches(&stream.to_string_lossy(), stat.st_dev, stat.st_ino)
}

fn journal_stream_matches(journal_stream: &str, dev: u64, ino: u64) -> bool {
    journal_stream
        .split_once(':')
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        .is_some_and(|(d, i)| d == dev && i == ino)
}

/// The filter: `RUST_LOG` when set (the operator's override), else `configured`, else `info`.
pub fn filter(configured: Option<&str>) -> Result<EnvFilter, LoggingError> {
    let (filter, source_name) = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => (env, "RUST_LOG"),
        _ => match configured {
            Some(c) => (c.to_owned(), "the config key `log`"),
            None => (DEFAULT_FILTER.to_owned(), "the default"),
        },
    };
    let parsed = EnvFilter::builder()
        .parse(&filter)
        .map_err(|source| LoggingError::Filter {
            filter: filter.clone(),
            source_name,
            source,
        })?;
    if filter.contains("kube_client") {
        return Ok(parsed);
    }
    // kube-rs logs every failed request at ERROR; the cluster module says once per change of
    // the link's state instead, and counts each request in a metric. Naming kube_client in
    // the filter brings its lines back.
    Ok(parsed.add_directive(
        "kube_client::client::builder=off"
            .parse()
            .expect("a valid directive"),
    ))
}

/// Installs the global subscriber and returns where records go. Call once, first thing in
/// `main`. When journald is asked for (or detected) but unreachable, falls back to text and says
/// so in the first record rather than losing the logs.
pub fn init(format: LogFormat, configured_filter: Option<&str>) -> Result<LogSink, LoggingError> {
    let filter = filter(configured_filter)?;
    let registry = tracing_subscriber::registry().with(filter);
    match format.sink(stderr_is_journal()) {
        LogSink::Journald => match journald_layer() {
            Ok(layer) => {
                registry
                    .with(layer)
                    .try_init()
                    .map_err(LoggingError::AlreadySet)?;
                Ok(LogSink::Journald)
            }
            Err(error) => {
                registry
                    .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
                    .try_init()
                    .map_err(LoggingError::AlreadySet)?;
                tracing::warn!(%error, "logging as text on stderr instead of to journald");
                Ok(LogSink::Text)
            }
        },
        LogSink::Json => {
            registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_current_span(true)
                        .with_writer(std::io::stderr),
                )
                .try_init()
                .map_err(LoggingError::AlreadySet)?;
            Ok(LogSink::Json)
        }
        LogSink::Text => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(ansi)
                        .with_writer(std::io::stderr),
                )
                .try_init()
                .map_err(LoggingError::AlreadySet)?;
            Ok(LogSink::Text)
        }
    }
}

fn journald_layer() -> Result<tracing_journald::Layer, LoggingError> {
    Ok(tracing_journald::layer()
        .map_err(LoggingError::Journald)?
        .with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned())
        // Fields keep their own names (JOB=, QUEUE=, GPU=): they are what operators filter on,
        // and none of the agent's field names collide with journald's own.
        .with_field_prefix(None))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn formats_parse_and_auto_follows_stderr() {
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        let error = "xml".parse::<LogFormat>().unwrap_err().to_string();
        assert!(
            error.contains("xml") && error.contains("journald"),
            "{error}"
        );
        assert_eq!(LogFormat::Auto.sink(true), LogSink::Journald);
        assert_eq!(LogFormat::Auto.sink(false), LogSink::Text);
        assert_eq!(LogFormat::Json.sink(true), LogSink::Json);
        assert_eq!(LogFormat::Text.sink(true), LogSink::Text);
    }

    #[test]
    fn journal_stream_must_name_stderr_itself() {
        assert!(journal_stream_matches("8:12345", 8, 12345));
        assert!(!journal_stream_matches("8:12345", 8, 12346));
        assert!(!journal_stream_matches("garbage", 8, 12345));
        assert!(!journal_stream_matches("", 0, 0));
    }

    #[test]
    fn a_bad_configured_filter_names_itself() {
        if std::env::var_os("RUST_LOG").is_some() {
            // RUST_LOG wins over the config by design; this case cannot be observed here.
            return;
        }
        let error = filter(Some("agentd=loud")).unwrap_err().to_string();
        assert!(
            error.contains("agentd=loud") && error.contains("config key `log`"),
            "{error}"
        );
        filter(Some("agentd=debug,hyper=warn")).unwrap();
    }

    /// Child side of the tests below, run by them in a process of its own (a subscriber is set
    /// once per process); ignored so that it never counts as a test of its own.
    #[test]
    #[ignore = "the child process of the logging tests, run by them"]
    fn log_child() {
        let Ok(format) = std::env::var("AGENTD_LOG_CHILD") else {
            return;
        };
        let sink = init(format.parse().unwrap(), Some("info")).unwrap();
        println!("sink={sink:?}");
        let span = tracing::info_span!("job", job = "mnist");
        let _guard = span.enter();
        tracing::warn!(gpu = 3, xid = 79, "GPU fell off the bus");
        tracing::debug!("below the info filter");
    }

    fn run_child(format: &str, shell_prefix: &str) -> std::process::Output {
        let exe = std::env::current_exe().unwrap();
        let command = format!(
            "{shell_prefix} AGENTD_LOG_CHILD={format} '{}' --exact logging::tests::log_child --ignored --nocapture --test-threads=1",
            exe.display()
        );
        Command::new("sh")
            .arg("-c")
            .arg(command)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }

    #[test]
    fn json_records_are_one_object_per_line_with_fields() {
        let out = run_child("json", "");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr
            .lines()
            .find(|l| l.contains("fell off"))
            .unwrap_or_else(|| panic!("{stderr}"));
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(record["level"], "WARN");
        assert_eq!(record["message"], "GPU fell off the bus");
        assert_eq!(record["gpu"], 3);
        assert_eq!(record["span"]["job"], "mnist");
        assert!(!stderr.contains("below the info filter"));
    }

    /// A real journald in a private mount namespace receives the records, with fields and
    /// priority, and `journalctl -o json` reads them back.
    #[test]
    fn journald_records_carry_fields_and_priority() {
        let journald = [
            "/lib/systemd/systemd-journald",
            "/usr/lib/systemd/systemd-journald",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
        let Some(journald) = journald else {
            skip_outside_ci("systemd-journald is not installed (apt-get install systemd)");
            return;
        };
        let probe = Command::new("unshare").args(["-m", "true"]).status();
        if !probe.is_ok_and(|s| s.success()) {
            skip_outside_ci(
                "cannot create a mount namespace (unshare -m) to run a private journald",
            );
            return;
        }
        // A private /run/systemd and /run/log so this journald never touches the machine's own.
        // stderr is a file whose device:inode JOURNAL_STREAM names, as systemd would set it.
        let prefix = format!(
            "set -e; mount -t tmpfs tmpfs /run/systemd; mount -t tmpfs tmpfs /run/log; \
             {journald} & J=$!; \
             for i in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done; \
             exec 2>/run/log/stderr; export JOURNAL_STREAM=$(stat -c %d:%i /run/log/stderr); \
             trap 'kill $J' EXIT;"
        );
        let inner = run_child_script("auto", &prefix);
        let out = Command::new("unshare")
            .args(["-m", "sh", "-c", &inner])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("sink=Journald"), "{stdout}");
        let record: serde_json::Value = stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|r| r["MESSAGE"] == "GPU fell off the bus")
            .unwrap_or_else(|| panic!("no record in {stdout}"));
        assert_eq!(
            record["PRIORITY"], "4",
            "WARN is journald's warning priority"
        );
        assert_eq!(record["SYSLOG_IDENTIFIER"], "agentd");
        assert_eq!(record["GPU"], "3");
        assert_eq!(record["XID"], "79");
        assert_eq!(record["JOB"], "mnist", "span fields are journal fields too");
        assert!(!stdout.contains("below the info filter"));
    }

    /// A missing tool skips the test on a developer's machine; under CI, whose install step
    /// provides every tool, it is a failure, so that a broken install cannot hide as a skip.
    fn skip_outside_ci(why: &str) {
        assert!(
            std::env::var_os("CI").is_none(),
            "{why} (CI installs it: see scripts/test-deps)"
        );
        eprintln!("SKIP: {why}");
    }

    fn run_child_script(format: &str, prefix: &str) -> String {
        let exe = std::env::current_exe().unwrap();
        format!(
            "{prefix} AGENTD_LOG_CHILD={format} '{}' --exact logging::tests::log_child --ignored --nocapture --test-threads=1; \
             for i in $(seq 200); do journalctl -o json --no-pager -t agentd | grep -q 'fell off' && break; sleep 0.05; done; \
             journalctl -o json --no-pager -t agentd",
            exe.display()
        )
    }
}

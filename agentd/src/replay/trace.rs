//! Readers for cluster descriptions and job traces: the generic CSV format operators can write
//! from their own logs, and the public openb, Philly and Tiresias traces.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::IndexedRandom;

use crate::sched::{GpuSlot, NodeCapacity};

/// One job of a trace, in the terms of the generic format.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceJob {
    pub id: String,
    pub submit_s: f64,
    /// The true run time: when the simulated job ends. The scheduler never sees it.
    pub duration_s: f64,
    /// The run time the user declared (`activeDeadlineSeconds`), if any.
    pub limit_s: Option<f64>,
    pub queue: String,
    pub replicas: u32,
    pub gpus_per_replica: u32,
    pub cpu_milli_per_replica: u64,
    pub memory_mib_per_replica: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{path}: no header line; expected columns {expected}")]
    Empty { path: PathBuf, expected: String },
    #[error("{path}: missing column `{column}`; expected columns {expected}")]
    MissingColumn {
        path: PathBuf,
        column: String,
        expected: String,
    },
    #[error("{path}:{line}: column `{column}`: {message} (got `{value}`)")]
    Field {
        path: PathBuf,
        line: usize,
        column: String,
        value: String,
        message: String,
    },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

/// A CSV file read by column name. The traces have no quoted fields.
struct Table {
    path: PathBuf,
    columns: HashMap<String, usize>,
    rows: Vec<(usize, Vec<String>)>,
}

impl Table {
    fn read(path: &Path, expected: &[&str]) -> Result<Self, TraceError> {
        let text = fs_err::read_to_string(path)?;
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let expected_list = expected.join(",");
        let Some((_, header)) = lines.next() else {
            return Err(TraceError::Empty {
                path: path.to_owned(),
                expected: expected_list,
            });
        };
        let columns: HashMap<String, usize> = header
            .split(',')
            .enumerate()
            .map(|(i, c)| (c.trim().to_owned(), i))
            .collect();
        for column in expected {
            if !columns.contains_key(*column) {
                return Err(TraceError::MissingColumn {
                    path: path.to_owned(),
                    column: (*column).to_owned(),
                    expected: expected_list,
                });
            }
        }
        let rows = lines
            .map(|(i, l)| (i + 1, l.split(',').map(|f| f.trim().to_owned()).collect()))
            .collect();
        Ok(Table {
            path: path.to_owned(),
            columns,
            rows,
        })
    }

    fn get<'r>(&self, row: &'r [String], column: &str) -> &'r str {
        self.columns
            .get(column)
            .and_then(|&i| row.get(i))
            .map_or("", String::as_str)
    }

    fn err(&self, line: usize, column: &str, value: &str, message: &str) -> TraceError {
        TraceError::Field {
            path: self.path.clone(),
            line,
            column: column.to_owned(),
            value: value.to_owned(),
            message: message.to_owned(),
        }
    }

    fn num<T: std::str::FromStr>(
        &self,
        line: usize,
        row: &[String],
        column: &str,
        what: &str,
    ) -> Result<T, TraceError> {
        let value = self.get(row, column);
        value
            .parse()
            .map_err(|_| self.err(line, column, value, what))
    }

    fn seconds(&self, line: usize, row: &[String], column: &str) -> Result<f64, TraceError> {
        let value = self.get(row, column);
        match value.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
            _ => Err(self.err(line, column, value, "expected seconds, a number >= 0")),
        }
    }
}

fn gpu_node(name: String, gpus: u32, cpu_milli: u64, memory_mib: u64, model: &str) -> NodeCapacity {
    NodeCapacity {
        labels: BTreeMap::from([("agentd.io/gpu.product".to_owned(), model.to_owned())]),
        gpus: (0..gpus)
            .map(|i| GpuSlot {
                index: i,
                uuid: format!("GPU-{name}-{i}"),
                product: model.to_owned(),
                memory_mib: 0,
                healthy: true,
            })
            .collect(),
        name,
        cpu_milli,
        memory_mib,
        schedulable: true,
        taints: Vec::new(),
    }
}

/// Nodes in the generic format: `name,gpus,cpu_milli,memory_mib,gpu_model`.
pub fn read_generic_nodes(path: &Path) -> Result<Vec<NodeCapacity>, TraceError> {
    let t = Table::read(
        path,
        &["name", "gpus", "cpu_milli", "memory_mib", "gpu_model"],
    )?;
    let mut out = Vec::with_capacity(t.rows.len());
    for (line, row) in &t.rows {
        let name = t.get(row, "name");
        if name.is_empty() {
            return Err(t.err(*line, "name", name, "a node needs a name"));
        }
        let gpus: u32 = t.num(*line, row, "gpus", "expected a whole number of GPUs")?;
        if gpus as usize > crate::sched::MAX_GPUS_PER_NODE {
            return Err(t.err(
                *line,
                "gpus",
                t.get(row, "gpus"),
                "at most 128 GPUs per node",
            ));
        }
        out.push(gpu_node(
            name.to_owned(),
            gpus,
            t.num(*line, row, "cpu_milli", "expected whole millicores")?,
            t.num(*line, row, "memory_mib", "expected whole MiB")?,
            t.get(row, "gpu_model"),
        ));
    }
    Ok(out)
}

/// `N` nodes of `G` GPUs each, written `NxG` (e.g. `250x8`), for traces that come without a
/// cluster. CPU and memory are large enough never to bind.
pub fn uniform_nodes(spec: &str) -> Option<Vec<NodeCapacity>> {
    let (n, g) = spec.split_once('x')?;
    let (n, g): (u32, u32) = (n.parse().ok()?, g.parse().ok()?);
    if n == 0 || g as usize > crate::sched::MAX_GPUS_PER_NODE {
        return None;
    }
    Some(
        (0..n)
            .map(|i| gpu_node(format!("node-{i:04}"), g, 1 << 40, 1 << 40, "GPU"))
            .collect(),
    )
}

/// Jobs in the generic format.
pub fn read_generic_jobs(path: &Path) -> Result<Vec<TraceJob>, TraceError> {
    let cols = [
        "id",
        "submit_s",
        "duration_s",
        "limit_s",
        "queue",
        "replicas",
        "gpus_per_replica",
        "cpu_milli_per_replica",
        "memory_mib_per_replica",
    ];
    let t = Table::read(path, &cols)?;
    let mut out = Vec::with_capacity(t.rows.len());
    for (line, row) in &t.rows {
        let line = *line;
        let limit = t.get(row, "limit_s");
        let limit_s = if limit.is_empty() {
            None
        } else {
            Some(t.seconds(line, row, "limit_s")?)
        };
        let replicas: u32 = t.num(line, row, "replicas", "expected a whole number >= 1")?;
        if replicas == 0 {
            return Err(t.err(line, "replicas", "0", "expected a whole number >= 1"));
        }
        let id = t.get(row, "id");
        if id.is_empty() {
            return Err(t.err(line, "id", id, "a job needs an id"));
        }
        out.push(TraceJob {
            id: id.to_owned(),
            submit_s: t.seconds(line, row, "submit_s")?,
            duration_s: t.seconds(line, row, "duration_s")?,
            limit_s,
            queue: t.get(row, "queue").to_owned(),
            replicas,
            gpus_per_replica: t.num(line, row, "gpus_per_replica", "expected a whole number")?,
            cpu_milli_per_replica: t.num(
                line,
                row,
                "cpu_milli_per_replica",
                "expected whole millicores",
            )?,
            memory_mib_per_replica: t.num(
                line,
                row,
                "memory_mib_per_replica",
                "expected whole MiB",
            )?,
        });
    }
    Ok(out)
}

/// openb nodes: `sn,cpu_milli,memory_mib,gpu,model`.
pub fn read_openb_nodes(path: &Path) -> Result<Vec<NodeCapacity>, TraceError> {
    let t = Table::read(path, &["sn", "cpu_milli", "memory_mib", "gpu", "model"])?;
    let mut out = Vec::with_capacity(t.rows.len());
    for (line, row) in &t.rows {
        out.push(gpu_node(
            t.get(row, "sn").to_owned(),
            t.num(*line, row, "gpu", "expected a whole number of GPUs")?,
            t.num(*line, row, "cpu_milli", "expected whole millicores")?,
            t.num(*line, row, "memory_mib", "expected whole MiB")?,
            t.get(row, "model"),
        ));
    }
    Ok(out)
}

/// openb pods. A pod asking for a fraction of a GPU (`gpu_milli` < 1000) gets a whole one:
/// agentd hands out whole GPUs. A pod runs from `creation_time` to `deletion_time`.
pub fn read_openb_pods(path: &Path) -> Result<Vec<TraceJob>, TraceError> {
    let t = Table::read(
        path,
        &[
            "name",
            "cpu_milli",
            "memory_mib",
            "num_gpu",
            "creation_time",
            "deletion_time",
        ],
    )?;
    let mut out = Vec::with_capacity(t.rows.len());
    for (line, row) in &t.rows {
        let line = *line;
        let created = t.seconds(line, row, "creation_time")?;
        let deleted = t.seconds(line, row, "deletion_time")?;
        out.push(TraceJob {
            id: t.get(row, "name").to_owned(),
            submit_s: created,
            duration_s: (deleted - created).max(0.0),
            limit_s: None,
            queue: String::new(),
            replicas: 1,
            gpus_per_replica: t.num(line, row, "num_gpu", "expected a whole number of GPUs")?,
            cpu_milli_per_replica: t.num(line, row, "cpu_milli", "expected whole millicores")?,
            memory_mib_per_replica: t.num(line, row, "memory_mib", "expected whole MiB")?,
        });
    }
    Ok(out)
}

/// A gang of `gpus` GPUs: one replica up to 8 GPUs, otherwise replicas of 8 (whole nodes).
fn gang_shape(gpus: u32) -> (u32, u32) {
    if gpus <= 8 {
        (1, gpus)
    } else {
        (gpus.div_ceil(8), 8)
    }
}

/// The Philly VC trace. It gives training steps, not seconds: each job's duration is drawn
/// from the Philly runtime distribution (`philly_runtime.csv`, zero run times dropped) with a
/// fixed seed, so a run is reproducible. The queue is the job's VC.
pub fn read_philly(path: &Path, runtimes: &Path, seed: u64) -> Result<Vec<TraceJob>, TraceError> {
    let r = Table::read(runtimes, &["runtime"])?;
    let mut pool: Vec<f64> = Vec::with_capacity(r.rows.len());
    for (line, row) in &r.rows {
        let v = r.seconds(*line, row, "runtime")?;
        if v >= 1.0 {
            pool.push(v);
        }
    }
    if pool.is_empty() {
        return Err(TraceError::File {
            path: runtimes.to_owned(),
            message: "no run time of at least 1 s to draw from".to_owned(),
        });
    }
    let t = Table::read(path, &["job_id", "vc", "arrival_time_s", "num_gpu"])?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(t.rows.len());
    for (line, row) in &t.rows {
        let gpus: u32 = t.num(*line, row, "num_gpu", "expected a whole number of GPUs")?;
        let (replicas, per) = gang_shape(gpus);
        out.push(TraceJob {
            id: t.get(row, "job_id").to_owned(),
            submit_s: t.seconds(*line, row, "arrival_time_s")?,
            duration_s: *pool.choose(&mut rng).unwrap_or(&1.0),
            limit_s: None,
            queue: t.get(row, "vc").to_owned(),
            replicas,
            gpus_per_replica: per,
            cpu_milli_per_replica: 0,
            memory_mib_per_replica: 0,
        });
    }
    Ok(out)
}

/// The Tiresias 60-job trace: `job_id,num_gpu,submit_time,...,duration`.
pub fn read_tiresias(path: &Path) -> Result<Vec<TraceJob>, TraceError> {
    let t = Table::read(path, &["job_id", "num_gpu", "submit_time", "duration"])?;
    let mut out = Vec::with_capacity(t.rows.len());
    for (line, row) in &t.rows {
        let gpus: u32 = t.num(*line, row, "num_gpu", "expected a whole number of GPUs")?;
        let (replicas, per) = gang_shape(gpus);
        out.push(TraceJob {
            id: t.get(row, "job_id").to_owned(),
            submit_s: t.seconds(*line, row, "submit_time")?,
            duration_s: t.seconds(*line, row, "duration")?,
            limit_s: None,
            queue: String::new(),
            replicas,
            gpus_per_replica: per,
            cpu_milli_per_replica: 0,
            memory_mib_per_replica: 0,
        });
    }
    Ok(out)
}

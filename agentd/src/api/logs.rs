//! `GET /v1/jobs/{name}/logs`: a replica's log, whole or followed. Following streams what the
//! replica writes until the job has ended and its processes are gone.

use std::io::Read;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::{Bytes, Frame};
use hyper::{Response, StatusCode, header};
use tokio::sync::mpsc;

use super::{ApiError, Body};
use crate::core::{Command, CoreHandle, LogFiles};

const POLL: Duration = Duration::from_millis(200);

pub async fn respond(
    core: &CoreHandle,
    name: String,
    replica: Option<String>,
    follow: bool,
) -> Result<Response<Body>, ApiError> {
    let files = core
        .ask(|reply| Command::Logs {
            name: name.clone(),
            replica: replica.clone(),
            reply,
        })
        .await?;
    let body: Body = if follow {
        let (tx, rx) = mpsc::channel(16);
        let core = core.clone();
        tokio::spawn(follow_log(core, name, files, tx));
        ChannelBody(rx).boxed()
    } else {
        // A log can be large: it is read off the async workers.
        let text = tokio::task::spawn_blocking(move || {
            let mut text = Vec::new();
            for file in &files.files {
                if let Ok(mut f) = std::fs::File::open(file) {
                    let _ = f.read_to_end(&mut text);
                }
            }
            text
        })
        .await
        .unwrap_or_default();
        http_body_util::Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed()
    };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(body)
        .expect("static headers are valid"))
}

/// Cluster mode: the replica's pod log through the API server, on any agent whose role may
/// read pod logs. The replica is checked against the job as `GET /v1/jobs/{name}` sees it.
pub async fn respond_cluster(
    core: &CoreHandle,
    cluster: &crate::cluster::Cluster,
    name: String,
    replica: Option<String>,
    follow: bool,
) -> Result<Response<Body>, ApiError> {
    let job = core
        .ask(|reply| Command::Get {
            name: name.clone(),
            removed: false,
            reply,
        })
        .await?;
    let chosen = crate::core::log_replica(&job, replica.as_deref())?
        .ok_or_else(|| ApiError::NotFound(format!("job {name} has no replicas placed yet")))?;
    let body: Body = match cluster
        .replica_log(
            &name,
            &chosen.replica_type,
            chosen.index,
            job.generation,
            follow,
        )
        .await?
    {
        crate::cluster::PodLog::Whole(bytes) => http_body_util::Full::new(bytes)
            .map_err(|never| match never {})
            .boxed(),
        // Forwarded by a task: the response body must be `Sync`, which the API server's
        // stream is not.
        crate::cluster::PodLog::Follow(mut stream) => {
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(async move {
                use futures::StreamExt;
                loop {
                    // A client that left ends the follow even while the log is quiet.
                    let next = tokio::select! {
                        next = stream.next() => next,
                        () = tx.closed() => return,
                    };
                    match next {
                        Some(Ok(bytes)) => {
                            if tx.send(bytes).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(e)) => {
                            let said = format!("\n[agentd: the log stream broke off: {e}]\n");
                            let _ = tx.send(Bytes::from(said)).await;
                            return;
                        }
                        None => return,
                    }
                }
            });
            ChannelBody(rx).boxed()
        }
    };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(body)
        .expect("static headers are valid"))
}

/// Sends the log so far, then whatever is appended, until the job is over or the client leaves.
async fn follow_log(core: CoreHandle, name: String, mut files: LogFiles, tx: mpsc::Sender<Bytes>) {
    let current = files.files.last().cloned().unwrap_or_default();
    let mut tail = Tail::new(current);
    // The current file is held first, so that an older part rotated meanwhile is not the
    // file held (read twice) nor one missed.
    tail.open_current();
    for older in &files.files[..files.files.len().saturating_sub(1)] {
        if tail.holds(older) {
            continue;
        }
        if let Ok(bytes) = std::fs::read(older)
            && tx.send(Bytes::from(bytes)).await.is_err()
        {
            return;
        }
    }
    loop {
        let complete = files.complete;
        let bytes = tail.next();
        if !bytes.is_empty() {
            if tx.send(Bytes::from(bytes)).await.is_err() {
                return;
            }
            continue;
        }
        if complete {
            return;
        }
        tokio::time::sleep(POLL).await;
        if tx.is_closed() {
            return;
        }
        let replica = Some(files.replica.clone());
        match core
            .ask(|reply| Command::Logs {
                name: name.clone(),
                replica,
                reply,
            })
            .await
        {
            Ok(latest) => files = latest,
            Err(_) => return,
        }
    }
}

/// Follows a log file across rotation. It holds the file it reads by handle, so a rotation
/// (a rename) does not take it away: what is left in it is read to the end before the next
/// file is taken, which is the rotated part if the log rotated twice meanwhile, else the new
/// current file.
struct Tail {
    path: std::path::PathBuf,
    held: Option<(std::fs::File, u64)>,
}

fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

impl Tail {
    fn new(path: std::path::PathBuf) -> Self {
        Self { path, held: None }
    }

    fn open_current(&mut self) {
        let path = self.path.clone();
        self.open(&path);
    }

    fn open(&mut self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(file) = std::fs::File::open(path) else {
            return false;
        };
        let Ok(meta) = file.metadata() else {
            return false;
        };
        self.held = Some((file, meta.ino()));
        true
    }

    /// Whether `path` is the file held now.
    fn holds(&self, path: &Path) -> bool {
        self.held
            .as_ref()
            .is_some_and(|(_, ino)| inode(path) == Some(*ino))
    }

    /// The next bytes of the log (at most 1 MiB); empty when nothing new is there yet.
    fn next(&mut self) -> Vec<u8> {
        for _ in 0..3 {
            let Some((file, ino)) = &mut self.held else {
                self.open_current();
                if self.held.is_none() {
                    return Vec::new();
                }
                continue;
            };
            let mut bytes = Vec::new();
            let _ = file.take(1 << 20).read_to_end(&mut bytes);
            if !bytes.is_empty() {
                return bytes;
            }
            let held = *ino;
            // At the end of the file held: has the log moved on to another file?
            match inode(&self.path) {
                Some(now) if now != held => {
                    let rotated = crate::exec::replica_log::rotated_path(&self.path);
                    match inode(&rotated) {
                        // Rotated twice: the part between is the rotated file.
                        Some(r) if r != held => {
                            if !self.open(&rotated) {
                                self.open_current();
                            }
                        }
                        _ => self.open_current(),
                    }
                }
                _ => return Vec::new(),
            }
        }
        Vec::new()
    }
}

/// A response body fed by a channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

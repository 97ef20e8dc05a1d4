//! `GET /v1/jobs/{name}/logs`: a replica's log, whole or followed. Following streams what the
//! replica writes until the job has ended and its processes are gone.

use std::io::{Read, Seek, SeekFrom};
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
        let mut text = Vec::new();
        for file in &files.files {
            if let Ok(mut f) = std::fs::File::open(file) {
                let _ = f.read_to_end(&mut text);
            }
        }
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

/// Sends the log so far, then whatever is appended, until the job is over or the client leaves.
async fn follow_log(core: CoreHandle, name: String, mut files: LogFiles, tx: mpsc::Sender<Bytes>) {
    let current = files.files.last().cloned().unwrap_or_default();
    for older in &files.files[..files.files.len().saturating_sub(1)] {
        if let Ok(bytes) = std::fs::read(older)
            && tx.send(Bytes::from(bytes)).await.is_err()
        {
            return;
        }
    }
    let mut offset = 0u64;
    loop {
        let complete = files.complete;
        match read_from(&current, &mut offset) {
            Some(bytes) if !bytes.is_empty() => {
                if tx.send(Bytes::from(bytes)).await.is_err() {
                    return;
                }
                continue;
            }
            _ if complete => return,
            _ => {}
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

/// Reads what was appended since `offset`; a file that shrank was rotated: start again at 0.
fn read_from(path: &Path, offset: &mut u64) -> Option<Vec<u8>> {
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    if len < *offset {
        *offset = 0;
    }
    file.seek(SeekFrom::Start(*offset)).ok()?;
    let mut bytes = Vec::new();
    file.take(1 << 20).read_to_end(&mut bytes).ok()?;
    *offset += bytes.len() as u64;
    Some(bytes)
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

//! A replica's log file, bounded by rotation: written by the replica's supervisor
//! ([`super::shim`]), read by the agent (`GET /v1/jobs/{name}/logs`, which reads the rotated
//! half first).

use std::io::Write;
use std::path::{Path, PathBuf};

/// A replica's log: `NAME.log`, and when it passes half the limit it moves to `NAME.log.1`
/// (replacing the older one), so a replica never uses more than the limit on disk. The file
/// (and its directory) is made on the first output, headed by a line saying which generation
/// started with what command: a replica that prints nothing leaves no file behind, and
/// starting one costs no file system work.
pub struct LogFile {
    path: PathBuf,
    /// The replica's user and group, who own its log files.
    owner: Option<(u32, u32)>,
    file: Option<std::fs::File>,
    header: Option<String>,
    written: u64,
    half: u64,
}

impl LogFile {
    pub fn new(path: &Path, max_bytes: u64, header: String) -> Self {
        Self {
            path: path.to_owned(),
            owner: None,
            file: None,
            header: Some(header),
            written: 0,
            half: (max_bytes / 2).max(1),
        }
    }

    /// The log files are to belong to `uid` and `gid`, so that the replica's user can read them.
    #[must_use]
    pub fn owned_by(mut self, uid: u32, gid: u32) -> Self {
        self.owner = Some((uid, gid));
        self
    }

    /// Gives a new log file to its owner; a file left to root is still served by the agent.
    fn hand_over(&self, file: &std::fs::File) {
        if let Some((uid, gid)) = self.owner
            && let Err(e) = std::os::unix::fs::fchown(file, Some(uid), Some(gid))
        {
            tracing::warn!(path = %self.path.display(), "cannot give the log to uid {uid}: {e}");
        }
    }

    pub fn write(&mut self, bytes: &[u8]) {
        if self.file.is_none() && !self.create() {
            return;
        }
        if let Some(header) = self.header.take() {
            self.append(format!("--- {header} ---\n").as_bytes());
        }
        self.append(bytes);
    }

    /// Ends the log with `line`, if the replica wrote one.
    pub(crate) fn finish(&mut self, line: &str) {
        if self.file.is_some() {
            self.append(format!("--- {line} ---\n").as_bytes());
        }
    }

    fn create(&mut self) -> bool {
        let opened = self
            .path
            .parent()
            .map_or(Ok(()), fs_err::create_dir_all)
            .and_then(|()| {
                fs_err::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
            });
        match opened {
            Ok(file) => {
                self.written = file.metadata().map_or(0, |m| m.len());
                let file = file.into_parts().0;
                self.hand_over(&file);
                self.file = Some(file);
                true
            }
            Err(e) => {
                // Once per replica: its output is dropped, the replica goes on.
                if self.header.take().is_some() {
                    tracing::warn!("replica output is lost: {e}");
                }
                false
            }
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.written + bytes.len() as u64 > self.half && self.written > 0 {
            self.rotate();
        }
        // A full disk loses log lines, never the replica.
        if let Some(file) = &mut self.file
            && file.write_all(bytes).is_ok()
        {
            self.written += bytes.len() as u64;
        }
    }

    fn rotate(&mut self) {
        let old = rotated_path(&self.path);
        if std::fs::rename(&self.path, &old).is_err() {
            return;
        }
        if let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        {
            self.hand_over(&file);
            self.file = Some(file);
            self.written = 0;
        }
    }
}

/// Where the older half of a log lives.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker-0.log");
        let mut log = LogFile::new(&path, 8192, "header".to_owned());
        for _ in 0..1000 {
            log.write(&[b'x'; 100]);
        }
        let total = std::fs::metadata(&path).unwrap().len()
            + std::fs::metadata(rotated_path(&path)).unwrap().len();
        assert!(total <= 8192, "{total}");
        assert!(total >= 4096, "{total}");
    }
}

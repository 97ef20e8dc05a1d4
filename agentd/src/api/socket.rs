//! The API's Unix socket: created with its parent directory, group `agentd` and mode 0660 when
//! that group exists (0600 otherwise), replacing the file a dead agent left behind but never
//! taking over from a live one.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The group whose members may use the socket.
pub const SOCKET_GROUP: &str = "agentd";

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another agent is already running on {}; stop it first (systemctl stop agentd) or give this one another --socket", path.display())]
    AlreadyRunning { path: PathBuf },
    #[error("{} exists and is not a socket; remove it or choose another --socket", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the socket at `path`, ready to accept.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let io = |action, source| SocketError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io("create the directory of", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(SocketError::AlreadyRunning {
                    path: path.to_owned(),
                });
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %path.display(), "replacing the stale socket of an agent that is gone");
                std::fs::remove_file(path).map_err(|e| io("remove the stale socket", e))?;
            }
            Err(e) => return Err(io("check the existing socket", e)),
        },
        Ok(_) => {
            return Err(SocketError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", e)),
    }
    // Nobody else may connect in the moment between bind and chmod.
    let old_mask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old_mask);
    let listener = bound.map_err(|e| io("bind", e))?;
    restrict(path).map_err(|e| io("set the owner and mode of", e))?;
    Ok(listener)
}

/// Mode 0660 with group `agentd` if the group exists, else 0600.
pub fn restrict(path: &Path) -> std::io::Result<()> {
    let group = nix::unistd::Group::from_name(SOCKET_GROUP).ok().flatten();
    let mode = match group {
        Some(group) => {
            nix::unistd::chown(path, None, Some(group.gid)).map_err(std::io::Error::from)?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_parent_and_restricts_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/agentd/agentd.sock");
        let _listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        let expected = if nix::unistd::Group::from_name(SOCKET_GROUP)
            .unwrap()
            .is_some()
        {
            0o660
        } else {
            0o600
        };
        assert_eq!(mode, expected);
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentd.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a dropped listener leaves its file behind");
        let _listener = bind(&path).unwrap();
    }

    #[test]
    fn live_socket_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentd.sock");
        let _live = bind(&path).unwrap();
        let err = bind(&path).unwrap_err();
        assert!(matches!(err, SocketError::AlreadyRunning { .. }), "{err}");
        assert!(err.to_string().contains("already running"));
    }

    #[test]
    fn regular_file_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentd.sock");
        std::fs::write(&path, "precious").unwrap();
        assert!(matches!(
            bind(&path).unwrap_err(),
            SocketError::NotASocket { .. }
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }
}

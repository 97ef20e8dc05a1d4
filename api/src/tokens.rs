//! Bearer tokens for the agent's HTTPS listener: how a token is made, how it is hashed, and the
//! format of the tokens file (`api.tokens_file`), which `agentctl token create` writes and the
//! agent reads. The file holds only hashes: whoever reads it cannot use what they read.
//!
//! One token a line, fields separated by spaces, `#` starts a comment:
//!
//! ```text
//! sha256:<64 hex digits> user=alice groups=ml,agentd-admin expires=1767225600
//! ```
//!
//! `groups` and `expires` (Unix seconds) are optional.

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

/// What a new token starts with, so that a leaked one is easy to recognise (and to search for).
pub const TOKEN_PREFIX: &str = "agentd_";
/// Random bytes in a token: 256 bits.
pub const TOKEN_BYTES: usize = 32;

/// The environment variables `agentctl` reads for the remote agent.
pub const SERVER_ENV: &str = "AGENTD_SERVER";
pub const CA_FILE_ENV: &str = "AGENTD_CA_FILE";
pub const TOKEN_FILE_ENV: &str = "AGENTD_TOKEN_FILE";
pub const CERT_FILE_ENV: &str = "AGENTD_CERT_FILE";
pub const KEY_FILE_ENV: &str = "AGENTD_KEY_FILE";

/// The SHA-256 of a token.
///
/// A plain hash is enough here, where a password would need a slow one (Argon2, scrypt): a token
/// is 256 random bits, so guessing the token from its hash means trying about 2^255 tokens,
/// and no amount of hashing speed makes that feasible. Slow hashes protect secrets people
/// choose, which are few enough to enumerate; these are not chosen by people.
pub type TokenHash = [u8; 32];

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}:{line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// One line of the tokens file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    pub hash: TokenHash,
    pub user: String,
    pub groups: Vec<String>,
    /// Unix seconds after which the token is refused; `None`: it does not expire.
    pub expires: Option<u64>,
}

impl TokenEntry {
    /// The line for the tokens file (without the newline).
    pub fn to_line(&self) -> String {
        let mut line = format!("sha256:{} user={}", hex(&self.hash), self.user);
        if !self.groups.is_empty() {
            line.push_str(" groups=");
            line.push_str(&self.groups.join(","));
        }
        if let Some(expires) = self.expires {
            line.push_str(&format!(" expires={expires}"));
        }
        line
    }

    /// Reads one line; `Ok(None)` for a blank line or a comment.
    pub fn parse_line(line: &str) -> Result<Option<Self>, String> {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            return Ok(None);
        }
        let mut fields = line.split_whitespace();
        let hash = fields
            .next()
            .and_then(|f| f.strip_prefix("sha256:"))
            .ok_or("a line starts with sha256:<the token's hash in hex>")?;
        let hash = unhex(hash).ok_or("the hash is not 64 hex digits (a SHA-256)")?;
        let (mut user, mut groups, mut expires) = (None, Vec::new(), None);
        for field in fields {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| format!("{field:?} is not key=value (user, groups, expires)"))?;
            match key {
                "user" => user = Some(check_name("user", value)?),
                "groups" => {
                    groups = value
                        .split(',')
                        .map(|g| check_name("groups", g))
                        .collect::<Result<_, _>>()?;
                }
                "expires" => {
                    expires =
                        Some(value.parse::<u64>().map_err(|_| {
                            format!("expires={value:?} is not a time in Unix seconds")
                        })?);
                }
                other => {
                    return Err(format!(
                        "unknown field {other:?}; a line has user=, groups= and expires="
                    ));
                }
            }
        }
        let user = user.ok_or("the line names no user= ")?;
        Ok(Some(Self {
            hash,
            user,
            groups,
            expires,
        }))
    }

    /// Whether the token has expired at `now` (Unix seconds).
    pub fn expired(&self, now: u64) -> bool {
        self.expires.is_some_and(|at| now >= at)
    }
}

/// Reads a whole tokens file, which only its owner (root, or the reader itself) may write:
/// a line in it can make anyone an admin.
pub fn read_file(path: &Path) -> Result<Vec<TokenEntry>, TokenError> {
    use std::io::Read as _;
    let io = |action, source| TokenError::Io {
        action,
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(|e| io("read the tokens file", e))?;
    let meta = file.metadata().map_err(|e| io("read the tokens file", e))?;
    check_private(path, &meta, reader_uid())?;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| io("read the tokens file", e))?;
    parse_file(&text, &path.display().to_string())
}

/// The effective uid of this process: the owner of `/proc/self`.
fn reader_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Refuses a tokens file that someone other than root or `reader` owns, or that its group or
/// others may write.
fn check_private(
    path: &Path,
    meta: &std::fs::Metadata,
    reader: Option<u32>,
) -> Result<(), TokenError> {
    use std::os::unix::fs::MetadataExt as _;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(TokenError::Invalid(format!(
            "{}: the tokens file may be written by its group or others (mode {mode:o}), and a \
             line in it can make anyone an admin: chmod 600 it",
            path.display()
        )));
    }
    let owner = meta.uid();
    if owner != 0 && Some(owner) != reader {
        return Err(TokenError::Invalid(format!(
            "{}: the tokens file belongs to uid {owner}, who could make anyone an admin with it: \
             it must belong to root or to the agent's user (chown)",
            path.display()
        )));
    }
    Ok(())
}

/// Reads the text of a tokens file; `path` names it in errors.
pub fn parse_file(text: &str, path: &str) -> Result<Vec<TokenEntry>, TokenError> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        match TokenEntry::parse_line(line) {
            Ok(Some(entry)) => entries.push(entry),
            Ok(None) => {}
            Err(message) => {
                return Err(TokenError::Line {
                    path: path.to_owned(),
                    line: n + 1,
                    message,
                });
            }
        }
    }
    Ok(entries)
}

/// A new token: the prefix and 256 bits from the system's random source, in hex.
pub fn new_token() -> Result<String, TokenError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| TokenError::Invalid("the system's random source failed".to_owned()))?;
    Ok(format!("{TOKEN_PREFIX}{}", hex(&bytes)))
}

pub fn hash_token(token: &str) -> TokenHash {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    hash
}

/// Compares two hashes in time that does not depend on where they differ.
pub fn same_hash(a: &TokenHash, b: &TokenHash) -> bool {
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(diff) == 0
}

/// Makes a token for `user`, appends its hash to the tokens file at `path` (created with mode
/// 0600 if missing) and returns the token, which exists nowhere else.
pub fn create(
    path: &Path,
    user: &str,
    groups: &[String],
    expires_in: Option<Duration>,
    now: u64,
) -> Result<String, TokenError> {
    let user = check_name("--user", user).map_err(TokenError::Invalid)?;
    let groups = groups
        .iter()
        .map(|g| check_name("--group", g))
        .collect::<Result<Vec<_>, _>>()
        .map_err(TokenError::Invalid)?;
    let token = new_token()?;
    let entry = TokenEntry {
        hash: hash_token(&token),
        user,
        groups,
        expires: expires_in.map(|d| now.saturating_add(d.as_secs().max(1))),
    };
    let io = |action, source| TokenError::Io {
        action,
        path: path.display().to_string(),
        source,
    };
    // The existing file must parse (appending to a broken file would hide the break), and be
    // one the agent will read.
    let existing = match std::fs::metadata(path) {
        Ok(meta) => {
            check_private(path, &meta, reader_uid())?;
            std::fs::read_to_string(path).map_err(|e| io("read the tokens file", e))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io("read the tokens file", e)),
    };
    parse_file(&existing, &path.display().to_string())?;
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| io("open the tokens file", e))?
    };
    let mut text = String::new();
    if !existing.is_empty() && !existing.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&entry.to_line());
    text.push('\n');
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io("write the tokens file", e))?;
    Ok(token)
}

/// A lifetime such as `90d`, `12h`, `30m`, `3600s` or `2w`.
pub fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{text:?} is not a lifetime: write a whole number and a unit, s, m, h, d or w \
             (such as 12h or 90d)"
        )
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    match n.checked_mul(seconds) {
        Some(0) | None => Err(bad()),
        Some(s) => Ok(Duration::from_secs(s)),
    }
}

/// A user or group name as Unix systems allow them: letters, digits, `.`, `_`, `-` (not first),
/// at most 64 characters.
fn check_name(what: &str, name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "{what} {name:?} is not a user or group name: letters, digits, '.', '_' and '-' \
             (not first), at most 64 characters"
        ))
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn unhex(text: &str) -> Option<TokenHash> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_created_token_is_found_by_its_hash_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let token = create(&path, "alice", &["ml".to_owned()], None, 100).unwrap();
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == TOKEN_PREFIX.len() + 64);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&token), "the file holds the token itself");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let entries = read_file(&path).unwrap();
        assert_eq!(entries.len(), 1);
        assert!(same_hash(&entries[0].hash, &hash_token(&token)));
        assert!(!same_hash(&entries[0].hash, &hash_token("agentd_other")));
        assert_eq!(entries[0].user, "alice");
        assert_eq!(entries[0].groups, ["ml"]);
        assert_eq!(entries[0].expires, None);

        let second = create(&path, "bob", &[], Some(Duration::from_mins(1)), 100).unwrap();
        assert_ne!(token, second);
        let entries = read_file(&path).unwrap();
        assert_eq!(entries[1].expires, Some(160));
        assert!(!entries[1].expired(159) && entries[1].expired(160));
    }

    #[test]
    fn a_tokens_file_others_could_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        create(&path, "alice", &[], None, 100).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = read_file(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        let err = create(&path, "bob", &[], None, 100)
            .unwrap_err()
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(read_file(&path).unwrap().len(), 1);
        // Another user's file is refused to every reader but that user (needs root to set up).
        if std::os::unix::fs::chown(&path, Some(65534), None).is_err() {
            eprintln!("SKIPPED the owner check: only root can give the file to another user");
            return;
        }
        let meta = std::fs::metadata(&path).unwrap();
        let err = check_private(&path, &meta, Some(0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("belongs to uid 65534"), "{err}");
        assert!(check_private(&path, &meta, Some(65534)).is_ok());
    }

    #[test]
    fn lines_round_trip_and_bad_lines_are_named() {
        let entry = TokenEntry {
            hash: hash_token("x"),
            user: "carol".into(),
            groups: vec!["a".into(), "b".into()],
            expires: Some(7),
        };
        assert_eq!(
            TokenEntry::parse_line(&entry.to_line()).unwrap(),
            Some(entry.clone())
        );
        assert_eq!(TokenEntry::parse_line("  # a comment").unwrap(), None);
        let err = parse_file("\nsha256:abc user=x\n", "/etc/agentd/tokens").unwrap_err();
        assert!(
            err.to_string().starts_with("/etc/agentd/tokens:2:"),
            "{err}"
        );
        let line = format!("sha256:{} group=x", hex(&entry.hash));
        let err = TokenEntry::parse_line(&line).unwrap_err();
        assert!(err.contains("\"group\""), "{err}");
        let line = format!("sha256:{} groups=x", hex(&entry.hash));
        assert!(TokenEntry::parse_line(&line).unwrap_err().contains("user"));
    }

    #[test]
    fn names_and_lifetimes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let err = create(&path, "al ice", &[], None, 0).unwrap_err();
        assert!(err.to_string().contains("--user"), "{err}");
        let err = create(&path, "alice", &["-x".to_owned()], None, 0).unwrap_err();
        assert!(err.to_string().contains("--group"), "{err}");
        assert!(!path.exists(), "nothing is written for a refused token");
        assert_eq!(
            parse_lifetime("90d").unwrap(),
            Duration::from_hours(90 * 24)
        );
        assert_eq!(parse_lifetime("2w").unwrap(), Duration::from_hours(14 * 24));
        for bad in ["", "5", "0h", "h", "-1d", "5y"] {
            assert!(parse_lifetime(bad).is_err(), "{bad}");
        }
    }
}

//! Authentication: static bearer tokens in kube-apiserver's `--token-auth-file` format, and the
//! user a request runs as.
//!
//! A token file has one token per line: `token,user,uid,"group1,group2"` (the groups column is
//! optional; a groups list with commas must be quoted). Every authenticated user is also in
//! `system:authenticated`, as on a real server. With authentication off, every request runs as
//! `system:unsecured` in `system:masters`, as kube-apiserver's old insecure port did.

use std::collections::HashMap;
use std::path::Path;
use std::sync::RwLock;

use http::HeaderMap;

pub const MASTERS: &str = "system:masters";
pub const AUTHENTICATED: &str = "system:authenticated";
pub const ANONYMOUS: &str = "system:anonymous";

/// Who a request runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
}

impl UserInfo {
    /// The identity of every request when authentication is off.
    pub fn unsecured() -> Self {
        Self {
            name: "system:unsecured".into(),
            uid: String::new(),
            groups: vec![MASTERS.into(), AUTHENTICATED.into()],
        }
    }

    pub fn is_master(&self) -> bool {
        self.groups.iter().any(|g| g == MASTERS)
    }

    /// `(namespace, name)` when the user is a ServiceAccount
    /// (`system:serviceaccount:<namespace>:<name>`).
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let rest = self.name.strip_prefix("system:serviceaccount:")?;
        rest.split_once(':')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
    }
}

/// One line of a token file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticToken {
    pub token: String,
    pub user: String,
    pub uid: String,
    pub groups: Vec<String>,
}

impl StaticToken {
    pub fn new(token: &str, user: &str, groups: &[&str]) -> Self {
        Self {
            token: token.into(),
            user: user.into(),
            uid: user.into(),
            groups: groups.iter().map(|g| (*g).to_string()).collect(),
        }
    }

    /// A token with a random secret for `user`.
    pub fn generate(user: &str, groups: &[&str]) -> Self {
        Self::new(&random_token(), user, groups)
    }

    /// The token of ServiceAccount `namespace/name`, with the groups a real server gives
    /// ServiceAccount tokens.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        let groups = [
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{namespace}"),
        ];
        let refs: Vec<&str> = groups.iter().map(String::as_str).collect();
        Self::generate(&format!("system:serviceaccount:{namespace}:{name}"), &refs)
    }

    /// The line for a token file.
    pub fn to_line(&self) -> String {
        format!(
            "{},{},{},\"{}\"",
            self.token,
            self.user,
            self.uid,
            self.groups.join(",")
        )
    }
}

/// 32 random lowercase hex digits.
pub fn random_token() -> String {
    use std::fmt::Write;
    let bytes: [u8; 16] = rand::random();
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading the token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("token file line {line}: {message}")]
    Line { line: usize, message: String },
}

/// Splits one CSV record: fields separated by commas, a field in double quotes may hold commas,
/// `""` inside quotes is a quote.
fn csv_fields(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (false, '"') if cur.is_empty() && !was_quoted => {
                quoted = true;
                was_quoted = true;
            }
            (false, '"') => return Err("a quote inside an unquoted field".into()),
            (false, ',') => {
                fields.push(std::mem::take(&mut cur));
                was_quoted = false;
            }
            (_, c) => cur.push(c),
        }
    }
    if quoted {
        return Err("a quoted field is not closed".into());
    }
    fields.push(cur);
    Ok(fields)
}

/// Parses a token file's text. Blank lines are skipped; every other line needs a token, a user
/// name and a uid.
pub fn parse_token_file(text: &str) -> Result<Vec<StaticToken>, TokenFileError> {
    let mut out: Vec<StaticToken> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let err = |message: String| TokenFileError::Line {
            line: line_no,
            message,
        };
        if line.trim().is_empty() {
            continue;
        }
        let f = csv_fields(line).map_err(err)?;
        if f.len() < 3 {
            return Err(err(format!(
                "has {} column(s); the format is token,user,uid[,\"group1,group2\"]",
                f.len()
            )));
        }
        if f[0].is_empty() {
            return Err(err("the token (column 1) is empty".into()));
        }
        if f[1].is_empty() {
            return Err(err("the user name (column 2) is empty".into()));
        }
        if out.iter().any(|t| t.token == f[0]) {
            return Err(err(format!(
                "the token of user {:?} is already given to another user",
                f[1]
            )));
        }
        let groups = f
            .get(3)
            .map(|g| {
                g.split(',')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        out.push(StaticToken {
            token: f[0].clone(),
            user: f[1].clone(),
            uid: f[2].clone(),
            groups,
        });
    }
    Ok(out)
}

pub fn read_token_file(path: &Path) -> Result<Vec<StaticToken>, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_token_file(&text)
}

/// Why a request is not authenticated.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No credentials: the request would run as `system:anonymous`, which is refused.
    Anonymous,
    /// A bearer token that no user has.
    InvalidToken,
}

/// The token table; `None` users means authentication is off.
#[derive(Debug, Default)]
pub struct Authenticator {
    tokens: Option<RwLock<HashMap<String, UserInfo>>>,
}

impl Authenticator {
    pub fn new(tokens: Option<&[StaticToken]>) -> Self {
        let tokens = tokens.map(|ts| {
            RwLock::new(
                ts.iter()
                    .map(|t| (t.token.clone(), user_of(t)))
                    .collect::<HashMap<_, _>>(),
            )
        });
        Self { tokens }
    }

    pub fn enabled(&self) -> bool {
        self.tokens.is_some()
    }

    /// Adds (or replaces) a token; false when authentication is off.
    pub fn add(&self, token: &StaticToken) -> bool {
        let Some(tokens) = &self.tokens else {
            return false;
        };
        tokens
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(token.token.clone(), user_of(token));
        true
    }

    /// The user a request with these headers runs as.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<UserInfo, AuthError> {
        let Some(tokens) = &self.tokens else {
            return Ok(UserInfo::unsecured());
        };
        let Some(value) = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return Err(AuthError::Anonymous);
        };
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or(AuthError::InvalidToken)?;
        tokens
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(token)
            .cloned()
            .ok_or(AuthError::InvalidToken)
    }
}

fn user_of(t: &StaticToken) -> UserInfo {
    let mut groups = t.groups.clone();
    if !groups.iter().any(|g| g == AUTHENTICATED) {
        groups.push(AUTHENTICATED.into());
    }
    UserInfo {
        name: t.user.clone(),
        uid: t.uid.clone(),
        groups,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_format_of_kube_apiserver() {
        let text = "abc,alice,1001,\"dev,ops\"\n\ndef,bob,1002\nghi,system:serviceaccount:ns:sa,u3,system:serviceaccounts\n";
        let t = parse_token_file(text).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].groups, vec!["dev", "ops"]);
        assert_eq!(t[1].user, "bob");
        assert!(t[1].groups.is_empty());
        assert_eq!(t[2].groups, vec!["system:serviceaccounts"]);
        let round = parse_token_file(&t[0].to_line()).unwrap();
        assert_eq!(round[0], t[0]);
    }

    #[test]
    fn token_file_errors_name_the_line() {
        let e = parse_token_file("abc,alice,1\nonly,two\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "token file line 2: has 2 column(s); the format is token,user,uid[,\"group1,group2\"]"
        );
        let e = parse_token_file(",alice,1\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("line 1: the token (column 1) is empty")
        );
        let e = parse_token_file("a,alice,1,\"g1,g2\n").unwrap_err();
        assert!(e.to_string().contains("not closed"));
        let e = parse_token_file("a,alice,1\na,bob,2\n").unwrap_err();
        assert!(e.to_string().contains("line 2"));
    }

    #[test]
    fn bearer_tokens_authenticate() {
        let auth = Authenticator::new(Some(&[StaticToken::new("s3cret", "alice", &["dev"])]));
        let mut h = HeaderMap::new();
        assert_eq!(auth.authenticate(&h), Err(AuthError::Anonymous));
        h.insert(http::header::AUTHORIZATION, "Bearer nope".parse().unwrap());
        assert_eq!(auth.authenticate(&h), Err(AuthError::InvalidToken));
        h.insert(
            http::header::AUTHORIZATION,
            "Bearer s3cret".parse().unwrap(),
        );
        let u = auth.authenticate(&h).unwrap();
        assert_eq!(u.name, "alice");
        assert_eq!(u.groups, vec!["dev", AUTHENTICATED]);
        assert!(!u.is_master());
        let off = Authenticator::new(None);
        assert!(off.authenticate(&HeaderMap::new()).unwrap().is_master());
    }

    #[test]
    fn service_account_user_names() {
        let t = StaticToken::service_account("agentd-system", "agentd-node");
        let u = user_of(&t);
        assert_eq!(u.service_account(), Some(("agentd-system", "agentd-node")));
        assert!(
            u.groups
                .contains(&"system:serviceaccounts:agentd-system".to_string())
        );
        let plain = user_of(&StaticToken::new("x", "system:serviceaccount:bad", &[]));
        assert_eq!(plain.service_account(), None);
    }
}

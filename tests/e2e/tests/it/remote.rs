//! The HTTPS listener: the socket's routes and rules behind TLS, callers known by bearer tokens
//! (`agentctl token create`) or client certificates; TLS 1.2+ only; certificate and tokens
//! reloaded on SIGHUP; `agentctl --server https://...` and `--server ssh://...`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use e2e::{Agent, AgentOptions, agentctl_bin};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};
use serde_json::Value;

use crate::auth::{ADMIN_GROUP, ALICE, BOB, ctl_as, ok, uid_of, users};

/// A CA and what it signs, written as PEM files.
pub(crate) struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub(crate) pem: String,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `cn` (and, for a server, the loopback names), and its key, in PEM.
    pub(crate) fn sign(&self, cn: &str, server: bool) -> (String, String) {
        let names = if server {
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(names).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// An agent with the HTTPS listener on, its CA, and the files it reads.
pub(crate) struct Remote {
    pub(crate) agent: Agent,
    _files: tempfile::TempDir,
    pub(crate) dir: PathBuf,
    pub(crate) url: String,
    pub(crate) port: u16,
}

impl Remote {
    pub(crate) fn start(client_ca: Option<&Ca>) -> Remote {
        Remote::start_with(client_ca, "", Vec::new())
    }

    /// As [`Remote::start`], with more `[api]` settings and environment for the agent.
    pub(crate) fn start_with(
        client_ca: Option<&Ca>,
        api_settings: &str,
        env: Vec<(String, String)>,
    ) -> Remote {
        users();
        let files = tempfile::tempdir().unwrap();
        let dir = files.path().to_owned();
        let ca = Ca::new("agentd-test-ca");
        let (cert, key) = ca.sign("agentd", true);
        write(&dir.join("ca.pem"), &ca.pem);
        write(&dir.join("cert.pem"), &cert);
        write(&dir.join("key.pem"), &key);
        write(&dir.join("tokens"), "# agentd tokens\n");
        let mut api = format!(
            "[api]\nadmin_group = \"{ADMIN_GROUP}\"\nlisten = \"127.0.0.1:{{port}}\"\n\
             tls_cert = \"{}\"\ntls_key = \"{}\"\ntokens_file = \"{}\"\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display(),
            dir.join("tokens").display()
        );
        api.push_str(api_settings);
        if let Some(client_ca) = client_ca {
            write(&dir.join("client-ca.pem"), &client_ca.pem);
            api.push_str(&format!(
                "client_ca = \"{}\"\n",
                dir.join("client-ca.pem").display()
            ));
        }
        let port = e2e::free_port();
        let agent = Agent::start(AgentOptions {
            config: format!(
                "{}[jobs]\nkill_grace = \"2s\"\n",
                api.replace("{port}", &port.to_string())
            ),
            env,
            ..AgentOptions::default()
        });
        // The test's directory is private; replicas run as their owners and write inside it.
        std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Remote {
            agent,
            _files: files,
            dir,
            url: format!("https://127.0.0.1:{port}"),
            port,
        }
    }

    /// A new token for `user` (with `extra` flags), kept in a file of its own; returns the path.
    pub(crate) fn token(&self, user: &str, extra: &[&str]) -> PathBuf {
        let tokens = self.dir.join("tokens");
        let out = Command::new(agentctl_bin())
            .args(["token", "create", "--user", user, "--tokens-file"])
            .arg(&tokens)
            .args(extra)
            .output()
            .unwrap();
        let token = ok(&out, "token create");
        let token = token.trim();
        assert!(
            token.starts_with("agentd_") && !token.contains(char::is_whitespace),
            "{token:?}"
        );
        let path = self
            .dir
            .join(format!("{user}-{}.token", token_count(&tokens)));
        write(&path, token);
        path
    }

    pub(crate) fn reload(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.agent.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// agentctl against the HTTPS listener with the token in `token_file` (none if `None`).
    pub(crate) fn ctl(
        &self,
        token_file: Option<&Path>,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Output {
        use std::io::Write as _;
        let mut command = Command::new(agentctl_bin());
        command
            .env_remove("AGENTD_SOCKET")
            .env("AGENTD_SERVER", &self.url)
            .env("AGENTD_CA_FILE", self.dir.join("ca.pem"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        match token_file {
            Some(path) => command.env("AGENTD_TOKEN_FILE", path),
            None => command.env_remove("AGENTD_TOKEN_FILE"),
        };
        let mut child = command.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    }

    fn json(&self, token_file: &Path, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.ctl(Some(token_file), &all, None);
        serde_json::from_str(&ok(&out, &format!("agentctl --server {args:?}"))).unwrap()
    }

    /// `curl` to the listener: (status, body as JSON).
    fn curl(&self, method: &str, path: &str, extra: &[&str]) -> (u16, Value) {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "-X", method, "--cacert"])
            .arg(self.dir.join("ca.pem"))
            .args(extra)
            .arg(format!("{}{path}", self.url))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').expect("curl printed the status");
        (
            code.trim().parse().unwrap(),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    }

    pub(crate) fn wait_until(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check() {
            assert!(
                Instant::now() < deadline,
                "{what}: not so after 30s\n{}",
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn write(path: &Path, text: &str) {
    // Renamed into place, as an operator rotating files should, so the agent never reads half.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn token_count(tokens: &Path) -> usize {
    std::fs::read_to_string(tokens)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("sha256:"))
        .count()
}

fn job(name: &str, script: &str) -> String {
    format!(
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\nspec:\n  replicaSpecs:\n    Worker:\n      replicas: 1\n      template:\n        spec:\n          containers:\n          - name: tensorflow\n            command: [sh, -c, '{script}']\n"
    )
}

fn failed_with(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
}

#[test]
fn both_doors_answer_the_same_for_the_same_user() {
    let remote = Remote::start(None);
    let alice = remote.token(ALICE, &[]);
    remote.reload();
    remote.wait_until("the token is read", || {
        remote.ctl(Some(&alice), &["jobs"], None).status.success()
    });
    let manifest = remote.dir.join("whoami.yaml");
    write(&manifest, &job("whoami", "id -u; echo line-2; echo line-3"));
    // Submitted over HTTPS from a file here, by root's agentctl: the token, not the process,
    // says who submits.
    let submitted = remote.json(&alice, &["submit", manifest.to_str().unwrap()]);
    assert_eq!(submitted["owner"]["user"], ALICE);
    assert_eq!(submitted["owner"]["uid"], uid_of(ALICE));
    // `logs -f` over HTTPS follows the replica to its end.
    remote
        .agent
        .wait_for(&["job", "whoami"], Duration::from_mins(1), |j| {
            j["state"] == "Running" || j["state"] == "Succeeded"
        });
    let followed = remote.ctl(Some(&alice), &["logs", "whoami", "--follow"], None);
    let followed = ok(&followed, "logs --follow over https");
    assert!(followed.contains("line-3"), "{followed}");
    remote
        .agent
        .wait_for(&["job", "whoami"], Duration::from_mins(1), |j| {
            j["state"] == "Succeeded"
        });
    // The replica ran as alice.
    let logs = ok(
        &remote.ctl(Some(&alice), &["logs", "whoami"], None),
        "logs over https",
    );
    let uid = uid_of(ALICE).to_string();
    assert!(logs.lines().any(|l| l.trim() == uid), "{logs}");
    let socket_logs = ok(
        &ctl_as(&remote.agent, ALICE, &["logs", "whoami"], ""),
        "logs on the socket",
    );
    assert_eq!(logs, socket_logs);
    for args in [
        &["job", "whoami"][..],
        &["jobs"][..],
        &["queues"][..],
        &["nodes"][..],
    ] {
        let over_https = remote.json(&alice, args);
        let mut socket_args = args.to_vec();
        socket_args.extend(["-o", "json"]);
        let on_socket: Value = serde_json::from_str(&ok(
            &ctl_as(&remote.agent, ALICE, &socket_args, ""),
            "on the socket",
        ))
        .unwrap();
        if args == ["nodes"] {
            // The agent's age moves between the two reads.
            assert_eq!(
                over_https["nodes"][0]["name"],
                on_socket["nodes"][0]["name"]
            );
            continue;
        }
        assert_eq!(over_https, on_socket, "{args:?}");
    }
    // Cancel (here: remove the finished job) over HTTPS, seen on the socket.
    ok(
        &remote.ctl(Some(&alice), &["cancel", "whoami"], None),
        "cancel over https",
    );
    let gone = remote.agent.ctl(&["job", "whoami"]);
    assert_eq!(gone.status.code(), Some(1));
}

#[test]
fn tokens_missing_bad_or_expired_are_401_and_without_the_right_403() {
    let remote = Remote::start(None);
    let alice = remote.token(ALICE, &[]);
    let bob = remote.token(BOB, &[]);
    let bob_admin = remote.token(BOB, &["--group", ADMIN_GROUP]);
    let ghost = remote.token("agentd-test-nobody-here", &[]);
    let short = remote.token(ALICE, &["--expires", "1s"]);
    remote.reload();
    remote.wait_until("the new tokens are read", || {
        remote
            .ctl(Some(&bob_admin), &["jobs"], None)
            .status
            .success()
    });
    ok(
        &remote.ctl(
            Some(&alice),
            &["submit", "-"],
            Some(&job("mine", "sleep 600")),
        ),
        "alice submits over https",
    );

    // No token: 401, and the message says what to send.
    let (status, body) = remote.curl("GET", "/v1/jobs", &[]);
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer"),
        "{body}"
    );
    failed_with(
        &remote.ctl(None, &["jobs"], None),
        1,
        "Authorization: Bearer",
    );
    // A bad token: 401.
    let (status, body) = remote.curl(
        "GET",
        "/v1/jobs",
        &["-H", "Authorization: Bearer agentd_0123"],
    );
    assert_eq!(status, 401, "{body}");
    let wrong = remote.dir.join("wrong.token");
    write(&wrong, "agentd_not-a-token");
    failed_with(
        &remote.ctl(Some(&wrong), &["jobs"], None),
        1,
        "not in the agent's tokens file",
    );
    // An expired token: 401 saying so.
    remote.wait_until("the 1s token expires", || {
        let out = remote.ctl(Some(&short), &["jobs"], None);
        String::from_utf8_lossy(&out.stderr).contains("expired")
    });
    failed_with(&remote.ctl(Some(&short), &["jobs"], None), 1, "expired");

    // A valid token without the right: 403 naming the rule.
    ok(
        &remote.ctl(Some(&bob), &["jobs"], None),
        "bob reads the list",
    );
    failed_with(
        &remote.ctl(Some(&bob), &["cancel", "mine"], None),
        1,
        "own-jobs",
    );
    failed_with(
        &remote.ctl(Some(&bob), &["logs", "mine"], None),
        1,
        "own-jobs",
    );
    let token = std::fs::read_to_string(&bob).unwrap();
    let (status, body) = remote.curl(
        "DELETE",
        "/v1/jobs/mine",
        &["-H", &format!("Authorization: Bearer {token}")],
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["rule"], "own-jobs");
    failed_with(
        &remote.ctl(Some(&bob), &["drain", "any"], None),
        1,
        "admin-nodes",
    );
    // A user with no account here reads, but may not submit: replicas run as their submitter.
    ok(&remote.ctl(Some(&ghost), &["jobs"], None), "ghost reads");
    failed_with(
        &remote.ctl(Some(&ghost), &["submit", "-"], Some(&job("ghosts", "true"))),
        1,
        "agentd-test-nobody-here has no account on this machine",
    );
    // The admin group on the token makes bob an admin.
    let cancelled = remote.json(&bob_admin, &["cancel", "mine"]);
    assert_eq!(cancelled["name"], "mine");
    let events = remote.agent.ctl_json(&["job", "mine"]);
    assert!(
        crate::auth::has_event(&events, &format!("cancelled by {BOB}")),
        "{events}"
    );
}

#[test]
fn only_tls_1_2_and_later_and_sighup_reloads_tokens_and_certificate() {
    let remote = Remote::start(None);
    let s_client = |version: &str, ca: &Path| {
        Command::new("openssl")
            .args(["s_client", version, "-brief", "-verify_return_error"])
            // Let the client offer the old version at all (OpenSSL's own floor is 1.2).
            .args(["-cipher", "DEFAULT@SECLEVEL=0", "-connect"])
            .arg(format!("127.0.0.1:{}", remote.port))
            .arg("-CAfile")
            .arg(ca)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let ca = remote.dir.join("ca.pem");
    for version in ["-tls1_2", "-tls1_3"] {
        let out = s_client(version, &ca);
        assert!(
            out.status.success(),
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for version in ["-tls1_1", "-tls1"] {
        let out = s_client(version, &ca);
        assert!(
            !out.status.success(),
            "{version} was accepted: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Tokens: a removed one stops working, a new one starts.
    let old = remote.token(ALICE, &[]);
    remote.reload();
    remote.wait_until("the first token works", || {
        remote.ctl(Some(&old), &["jobs"], None).status.success()
    });
    write(&remote.dir.join("tokens"), "");
    let new = remote.token(BOB, &[]);
    assert!(
        !remote.ctl(Some(&new), &["jobs"], None).status.success(),
        "a token works before the agent was told to read it"
    );
    remote.reload();
    remote.wait_until("the new token works", || {
        remote.ctl(Some(&new), &["jobs"], None).status.success()
    });
    failed_with(
        &remote.ctl(Some(&old), &["jobs"], None),
        1,
        "not in the agent's tokens file",
    );

    // The certificate: one from another CA replaces it on SIGHUP.
    let next_ca = Ca::new("agentd-test-ca-2");
    let (cert, key) = next_ca.sign("agentd", true);
    let next_ca_file = remote.dir.join("ca-2.pem");
    write(&next_ca_file, &next_ca.pem);
    write(&remote.dir.join("cert.pem"), &cert);
    write(&remote.dir.join("key.pem"), &key);
    assert!(s_client("-tls1_3", &ca).status.success());
    remote.reload();
    remote.wait_until("the new certificate is served", || {
        s_client("-tls1_3", &next_ca_file).status.success()
    });
    assert!(!s_client("-tls1_3", &ca).status.success());
    // A bad new file keeps the one in use, and the log says why.
    write(&remote.dir.join("key.pem"), "not a key");
    remote.reload();
    remote.wait_until("the bad key is reported", || {
        remote
            .agent
            .log()
            .contains("keeping the current certificate")
    });
    assert!(s_client("-tls1_3", &next_ca_file).status.success());
    ok(
        &Command::new(agentctl_bin())
            .args(["--server", &remote.url, "--ca-file"])
            .arg(&next_ca_file)
            .arg("--token-file")
            .arg(&new)
            .arg("jobs")
            .output()
            .unwrap(),
        "agentctl trusts the new CA",
    );
}

#[test]
fn client_certificates_act_as_the_user_their_cn_names() {
    let clients = Ca::new("agentd-test-clients");
    let remote = Remote::start(Some(&clients));
    let (cert, key) = clients.sign(ALICE, false);
    write(&remote.dir.join("alice.pem"), &cert);
    write(&remote.dir.join("alice.key"), &key);
    let as_alice = [
        "--cert",
        remote.dir.join("alice.pem").to_str().unwrap(),
        "--key",
        remote.dir.join("alice.key").to_str().unwrap(),
    ]
    .map(str::to_owned);
    let as_alice: Vec<&str> = as_alice.iter().map(String::as_str).collect();
    let mut submit = as_alice.clone();
    let manifest = job("by-cert", "sleep 600");
    submit.extend([
        "-H",
        "Content-Type: application/yaml",
        "--data-binary",
        &manifest,
    ]);
    let (status, body) = remote.curl("POST", "/v1/jobs", &submit);
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["owner"]["user"], ALICE);
    assert_eq!(body["owner"]["uid"], uid_of(ALICE));
    let (status, _) = remote.curl("DELETE", "/v1/jobs/by-cert", &as_alice);
    assert_eq!(status, 200);
    // agentctl shows the certificate itself: flags, or the environment.
    let agentctl = |cert: &Path, key: &Path, args: &[&str], stdin: &str| {
        let mut command = Command::new(agentctl_bin());
        command
            .args(["--server", &remote.url, "--ca-file"])
            .arg(remote.dir.join("ca.pem"))
            .arg("--cert-file")
            .arg(cert)
            .arg("--key-file")
            .arg(key);
        run_with_stdin(command.args(args), stdin)
    };
    let (alice_pem, alice_key) = (remote.dir.join("alice.pem"), remote.dir.join("alice.key"));
    let submitted = ok(
        &agentctl(
            &alice_pem,
            &alice_key,
            &["submit", "-", "-o", "json"],
            &job("by-ctl", "sleep 600"),
        ),
        "agentctl submits with a client certificate",
    );
    let submitted: Value = serde_json::from_str(&submitted).unwrap();
    assert_eq!(submitted["owner"]["user"], ALICE);
    let mut from_env = Command::new(agentctl_bin());
    from_env
        .env("AGENTD_SERVER", &remote.url)
        .env("AGENTD_CA_FILE", remote.dir.join("ca.pem"))
        .env("AGENTD_CERT_FILE", &alice_pem)
        .env("AGENTD_KEY_FILE", &alice_key)
        .env_remove("AGENTD_TOKEN_FILE")
        .args(["cancel", "by-ctl", "-o", "json"]);
    let cancelled: Value = serde_json::from_str(&ok(
        &run_with_stdin(&mut from_env, ""),
        "cancel, from the environment",
    ))
    .unwrap();
    assert_eq!(cancelled["name"], "by-ctl");
    let events = remote.agent.ctl_json(&["job", "by-ctl"]);
    assert!(
        crate::auth::has_event(&events, &format!("cancelled by {ALICE}")),
        "{events}"
    );
    // Files that cannot be used are usage errors naming the flag.
    let missing = remote.dir.join("missing.pem");
    failed_with(
        &agentctl(&missing, &alice_key, &["jobs"], ""),
        2,
        "--cert-file",
    );
    failed_with(
        &agentctl(&alice_pem, &alice_pem, &["jobs"], ""),
        2,
        "(--key-file): the file holds no PEM private key",
    );
    let mut half = Command::new(agentctl_bin());
    half.args(["--server", &remote.url, "--cert-file"])
        .arg(&alice_pem)
        .arg("jobs");
    failed_with(
        &run_with_stdin(&mut half, ""),
        2,
        "--cert-file needs --key-file",
    );
    // Neither a certificate nor a token: 401.
    let (status, _) = remote.curl("GET", "/v1/jobs", &[]);
    assert_eq!(status, 401);
    // A certificate from a CA the agent does not trust does not get through the handshake.
    let (cert, key) = Ca::new("someone-else").sign(ALICE, false);
    write(&remote.dir.join("forged.pem"), &cert);
    write(&remote.dir.join("forged.key"), &key);
    let forged = [
        "--cert",
        remote.dir.join("forged.pem").to_str().unwrap(),
        "--key",
        remote.dir.join("forged.key").to_str().unwrap(),
    ]
    .map(str::to_owned);
    let forged: Vec<&str> = forged.iter().map(String::as_str).collect();
    let (status, _) = remote.curl("GET", "/v1/jobs", &forged);
    assert_eq!(status, 0, "curl got an answer with a forged certificate");
    let refused = agentctl(
        &remote.dir.join("forged.pem"),
        &remote.dir.join("forged.key"),
        &["jobs"],
        "",
    );
    assert!(
        !refused.status.success(),
        "agentctl got an answer with a forged certificate: {}",
        String::from_utf8_lossy(&refused.stdout)
    );
}

/// Runs `command` with `stdin` on its standard input; its output.
fn run_with_stdin(command: &mut Command, stdin: &str) -> Output {
    use std::io::Write as _;
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

/// `--server ssh://USER@HOST` runs `ssh ... -- USER@HOST agentctl __dial-stdio`. No sshd is
/// installed here, so a stand-in `ssh` first on PATH records its arguments and runs the command
/// locally, as sshd would run it on the far machine.
#[test]
fn ssh_server_runs_agentctl_on_the_far_machine() {
    let agent = Agent::start(AgentOptions::default());
    let bin = agent.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let record = agent.dir.path().join("ssh-args");
    let fake_ssh = format!(
        "#!/bin/sh\n\
         printf '%s\\n' \"$@\" > '{}'\n\
         while [ \"$1\" != -- ]; do shift; done\n\
         shift 2\n\
         exec sh -c \"$*\"\n",
        record.display()
    );
    std::fs::write(bin.join("ssh"), fake_ssh).unwrap();
    std::fs::set_permissions(bin.join("ssh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}:{}",
        bin.display(),
        agentctl_bin().parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let server = format!("ssh://alice@gpu-7:2222{}", agent.socket.display());
    let ctl = |args: &[&str], stdin: Option<&Path>| {
        let mut command = Command::new(agentctl_bin());
        command
            .env("PATH", &path)
            .env("AGENTD_SERVER", &server)
            .env("AGENTD_SOCKET", "/nonexistent/agentd.sock")
            .args(args);
        if let Some(file) = stdin {
            command.stdin(std::fs::File::open(file).unwrap());
        }
        command.output().unwrap()
    };
    let manifest = agent.dir.path().join("hello.yaml");
    write(&manifest, &job("hello", "echo hello over ssh"));
    let submitted = ok(
        &ctl(&["submit", manifest.to_str().unwrap(), "-o", "json"], None),
        "submit over ssh",
    );
    let submitted: Value = serde_json::from_str(&submitted).unwrap();
    assert_eq!(submitted["name"], "hello");
    let args = std::fs::read_to_string(&record).unwrap();
    assert_eq!(
        args.lines().collect::<Vec<_>>(),
        [
            "-p",
            "2222",
            "--",
            "alice@gpu-7",
            "agentctl",
            "--socket",
            &format!("'{}'", agent.socket.display()),
            "__dial-stdio"
        ]
    );
    let followed = ok(
        &ctl(&["logs", "hello", "--follow"], None),
        "logs -f over ssh",
    );
    assert!(followed.contains("hello over ssh"), "{followed}");
    let over_ssh = ok(&ctl(&["jobs", "-o", "json"], None), "jobs over ssh");
    let on_socket = ok(&agent.ctl(&["jobs", "-o", "json"]), "jobs on the socket");
    assert_eq!(
        serde_json::from_str::<Value>(&over_ssh).unwrap(),
        serde_json::from_str::<Value>(&on_socket).unwrap()
    );
    let from_stdin = agent.dir.path().join("hello-2.yaml");
    write(&from_stdin, &job("hello-2", "true"));
    let submitted = ok(
        &ctl(&["submit", "-", "-o", "json"], Some(&from_stdin)),
        "submit from standard input over ssh",
    );
    assert_eq!(
        serde_json::from_str::<Value>(&submitted).unwrap()["name"],
        "hello-2"
    );
}

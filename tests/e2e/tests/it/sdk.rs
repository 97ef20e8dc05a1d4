//! The Python SDK (`sdk/python`) against a real agent: installed with pip into a directory of its
//! own, then its tests run with `AGENTD_SOCKET` naming the agent.

use std::path::Path;
use std::process::Command;

use e2e::{Agent, AgentOptions};

fn sdk_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../sdk/python"))
}

fn run(command: &mut Command) -> String {
    let out = command.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{command:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The tests' Python environment (made by `scripts/python-env` on first use).
fn python_env() -> std::path::PathBuf {
    let out = Command::new(sdk_dir().join("../../scripts/python-env"))
        .output()
        .expect("scripts/python-env runs");
    assert!(
        out.status.success(),
        "cannot set up the Python environment: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().into()
}

/// Installs the SDK with pip into a directory of its own under `dir`; returns that directory.
fn install(dir: &Path) -> std::path::PathBuf {
    // The shared test environment's pip (which has setuptools and wheel) installs the package
    // into a directory of its own, from the source alone: standard library only, no index.
    // A copy of the source, because building writes `build/` and `*.egg-info` beside it.
    let source = dir.join("agentd-client");
    for file in [
        "pyproject.toml",
        "README.md",
        "agentd_client/__init__.py",
        "agentd_client/client.py",
        "agentd_client/py.typed",
    ] {
        std::fs::create_dir_all(source.join(file).parent().unwrap()).unwrap();
        std::fs::copy(sdk_dir().join(file), source.join(file)).unwrap();
    }
    let site = dir.join("site");
    let _ = run(Command::new(python_env().join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--no-index",
            "--no-build-isolation",
            "--no-cache-dir",
        ])
        .arg("--target")
        .arg(&site)
        .arg(&source));
    assert!(
        site.join("agentd_client/py.typed").exists(),
        "the package is typed"
    );
    site
}

#[test]
fn python_sdk_against_a_real_agent() {
    let agent = Agent::start(AgentOptions::default());
    let site = install(agent.dir.path());
    // From the tests' directory, so that the installed package is the one imported.
    let report = run(Command::new(python_env().join("bin/python"))
        .args(["-m", "unittest", "-v", "test_client"])
        .current_dir(sdk_dir().join("tests"))
        .env("AGENTD_SOCKET", &agent.socket)
        .env_remove("AGENTD_SERVER")
        .env("PYTHONPATH", &site));
    assert!(
        report.contains("Ran 6 tests") && !report.contains("skipped"),
        "{report}"
    );
}

#[test]
fn python_sdk_over_https() {
    let clients = crate::remote::Ca::new("agentd-test-clients");
    let remote = crate::remote::Remote::start(Some(&clients));
    let (cert, key) = clients.sign(crate::auth::BOB, false);
    std::fs::write(remote.dir.join("bob.pem"), cert).unwrap();
    std::fs::write(remote.dir.join("bob.key"), key).unwrap();
    let token = remote.token(crate::auth::ALICE, &[]);
    remote.reload();
    remote.wait_until("the token is read", || {
        remote.ctl(Some(&token), &["jobs"], None).status.success()
    });
    let other_ca = remote.dir.join("other-ca.pem");
    std::fs::write(&other_ca, crate::remote::Ca::new("not-the-agents").pem).unwrap();
    let site = install(remote.agent.dir.path());
    let report = run(Command::new(python_env().join("bin/python"))
        .args(["-m", "unittest", "-v", "test_remote"])
        .current_dir(sdk_dir().join("tests"))
        .env_remove("AGENTD_SOCKET")
        .env("AGENTD_SERVER", &remote.url)
        .env("AGENTD_CA_FILE", remote.dir.join("ca.pem"))
        .env("AGENTD_TOKEN_FILE", &token)
        .env("AGENTD_OTHER_CA_FILE", &other_ca)
        .env("AGENTD_TEST_USER", crate::auth::ALICE)
        .env("AGENTD_TEST_CERT_USER", crate::auth::BOB)
        .env("AGENTD_TEST_CERT_FILE", remote.dir.join("bob.pem"))
        .env("AGENTD_TEST_KEY_FILE", remote.dir.join("bob.key"))
        .env("PYTHONPATH", &site));
    assert!(
        report.contains("Ran 5 tests") && !report.contains("skipped"),
        "{report}"
    );
}

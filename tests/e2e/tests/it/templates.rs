//! Job templates: `agentctl template save|list|show|delete` and `agentctl submit --template`,
//! with the real agent and CLI; who may change whose template; cluster mode's refusal.

use std::time::Duration;

use e2e::cluster::{Identity, KubeSim, NodeAgent, NodeAgentOptions};
use serde_json::Value;

use crate::auth::{self, ALICE, BOB, CAROL, ctl_as, ok};
use crate::jobs::{agent, wait_state};

/// A Kubeflow TFJob of one worker that prints its replica count and exits 0.
const TEMPLATE: &str = "\
apiVersion: kubeflow.org/v1
kind: TFJob
metadata:
  name: tf2
spec:
  tfReplicaSpecs:
    Worker:
      replicas: 1
      restartPolicy: Never
      template:
        spec:
          containers:
          - name: tensorflow
            image: tensorflow/tensorflow:2.15.0
            command: [sh, -c, 'echo started']
";

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_template_is_saved_shown_and_made_into_jobs_with_values_set() {
    let agent = agent(0);
    let file = agent.dir.path().join("tf2.yaml");
    std::fs::write(&file, TEMPLATE).unwrap();
    let file = file.to_str().unwrap();

    let saved = ok(&agent.ctl(&["template", "save", "tf2", file]), "save");
    assert_eq!(saved.trim(), "template tf2 saved");
    let replaced = ok(&agent.ctl(&["template", "save", "tf2", file]), "save again");
    assert_eq!(replaced.trim(), "template tf2 replaced");

    // A template that could never be submitted is refused, every problem at its path.
    let broken = agent.dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        TEMPLATE.replace("replicas: 1", "replicas: -1").replace(
            "spec:\n  tfReplicaSpecs:",
            "spec:\n  runPolicy: {backoffLimit: -3}\n  tfReplicaSpecs:",
        ),
    )
    .unwrap();
    let refused = agent.ctl(&["template", "save", "broken", broken.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    let message = stderr(&refused);
    assert!(
        message.contains("spec.tfReplicaSpecs.Worker.replicas")
            && message.contains("spec.runPolicy.backoffLimit"),
        "{message}"
    );
    let bad_name = agent.ctl(&["template", "save", "Not_A_Name", file]);
    assert_eq!(bad_name.status.code(), Some(1));
    assert!(
        stderr(&bad_name).contains("not a valid template name"),
        "{}",
        stderr(&bad_name)
    );

    let list = agent.ctl_json(&["template", "list"]);
    let names: Vec<&str> = list["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tf2"], "{list}");
    assert_eq!(list["templates"][0]["owner"]["user"], "root");
    let table = ok(&agent.ctl(&["template", "list"]), "list");
    assert!(table.starts_with("NAME"), "{table}");
    assert_eq!(
        ok(&agent.ctl(&["template", "show", "tf2"]), "show"),
        TEMPLATE
    );
    let yaml = ok(
        &agent.ctl(&["template", "show", "tf2", "-o", "yaml"]),
        "show yaml",
    );
    assert!(
        yaml.contains("manifest:") && yaml.contains("owner:"),
        "{yaml}"
    );

    // A job made with values set runs, and says what it was made from.
    let made = agent.ctl(&[
        "submit",
        "--template",
        "tf2",
        "--name",
        "run-1",
        "--set",
        "spec.tfReplicaSpecs.Worker.replicas=2",
        "--set",
        "spec.tfReplicaSpecs.Worker.template.spec.containers[0].image=tensorflow/tensorflow:2.16.1",
        "--set",
        "metadata.labels.team=ads",
    ]);
    ok(&made, "submit --template");
    let job = wait_state(&agent, "run-1", "Succeeded", Duration::from_secs(30));
    assert_eq!(job["replicas"].as_array().unwrap().len(), 2, "{job}");
    assert_eq!(job["kind"], "TFJob", "{job}");
    assert_eq!(job["template"]["name"], "tf2", "{job}");
    assert_eq!(
        job["template"]["values"][0],
        serde_json::json!({"path": "spec.tfReplicaSpecs.Worker.replicas", "value": 2}),
        "{job}"
    );
    assert_eq!(job["template"]["values"].as_array().unwrap().len(), 3);
    let shown = ok(&agent.ctl(&["job", "run-1"]), "job run-1");
    assert!(
        shown.contains("Template  tf2 with spec.tfReplicaSpecs.Worker.replicas=2 "),
        "{shown}"
    );
    let history = agent.ctl_json(&["history", "--name", "run-1"]);
    assert_eq!(history["jobs"][0]["template"]["name"], "tf2", "{history}");
    assert_eq!(
        history["jobs"][0]["template"]["values"][2]["value"], "ads",
        "{history}"
    );
    let csv = ok(
        &agent.ctl(&["history", "--name", "run-1", "-o", "csv"]),
        "history -o csv",
    );
    let (header, row) = csv.split_once('\n').expect("a header and a row");
    assert!(
        header.trim_end().ends_with(",template,template_values"),
        "{csv}"
    );
    assert!(
        row.contains(",tf2,\"spec.tfReplicaSpecs.Worker.replicas=2 ")
            && row.contains("metadata.labels.team=\"\"ads\"\"\""),
        "{csv}"
    );

    // A path past the end of a list, and a field the form does not have: refused by path.
    let past = agent.ctl(&[
        "submit",
        "--template",
        "tf2",
        "--name",
        "run-2",
        "--set",
        "spec.tfReplicaSpecs.Worker.template.spec.containers[1].image=x",
    ]);
    assert_eq!(past.status.code(), Some(1));
    assert!(
        stderr(&past).contains("spec.tfReplicaSpecs.Worker.template.spec.containers[1].image")
            && stderr(&past).contains("past its end"),
        "{}",
        stderr(&past)
    );
    let unknown = agent.ctl(&[
        "submit",
        "--template",
        "tf2",
        "--name",
        "run-2",
        "--set",
        "spec.tfReplicaSpecs.Worker.replica=2",
    ]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains("spec.tfReplicaSpecs.Worker.replica:")
            && stderr(&unknown).contains("no such field"),
        "{}",
        stderr(&unknown)
    );

    // A value that fails validation: refused naming the field, and no job is made.
    let invalid = agent.ctl(&[
        "submit",
        "--template",
        "tf2",
        "--name",
        "run-2",
        "--set",
        "spec.tfReplicaSpecs.Worker.replicas=-1",
    ]);
    assert_eq!(invalid.status.code(), Some(1));
    assert!(
        stderr(&invalid).contains("spec.tfReplicaSpecs.Worker.replicas: ")
            && stderr(&invalid).contains("got -1"),
        "{}",
        stderr(&invalid)
    );
    assert_eq!(agent.ctl(&["job", "run-2"]).status.code(), Some(1));

    // --set and --name need --template; a file and a template do not go together.
    let usage = agent.ctl(&["submit", "--name", "x", file]);
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));

    ok(&agent.ctl(&["template", "delete", "tf2"]), "delete");
    let gone = agent.ctl(&["template", "show", "tf2"]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(
        stderr(&gone).contains("no template named \"tf2\""),
        "{}",
        stderr(&gone)
    );
}

#[test]
fn users_change_their_own_templates_and_make_jobs_from_everyones() {
    let agent = auth::agent();
    ok(
        &ctl_as(
            &agent,
            ALICE,
            &["template", "save", "alices", "-"],
            TEMPLATE,
        ),
        "alice saves",
    );
    // Bob sees and uses Alice's template; the job made is his.
    let list = ok(
        &ctl_as(&agent, BOB, &["template", "list", "-o", "json"], ""),
        "bob lists",
    );
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["templates"][0]["owner"]["user"], ALICE, "{list}");
    let made = ok(
        &ctl_as(
            &agent,
            BOB,
            &[
                "submit",
                "--template",
                "alices",
                "--name",
                "bobs",
                "-o",
                "json",
            ],
            "",
        ),
        "bob submits from alice's template",
    );
    let made: Value = serde_json::from_str(&made).unwrap();
    assert_eq!(made["owner"]["user"], BOB, "{made}");
    assert_eq!(made["template"]["name"], "alices", "{made}");

    // Bob may neither replace nor delete it: 403 naming the rule and the owner.
    for args in [
        &["template", "save", "alices", "-"][..],
        &["template", "delete", "alices"],
    ] {
        let denied = ctl_as(&agent, BOB, args, TEMPLATE);
        assert_eq!(denied.status.code(), Some(1), "{args:?}");
        let message = stderr(&denied);
        assert!(
            message.contains("own-templates") && message.contains(ALICE),
            "{args:?}: {message}"
        );
    }
    assert_eq!(
        ok(
            &ctl_as(&agent, ALICE, &["template", "show", "alices"], ""),
            "alice shows"
        ),
        TEMPLATE
    );
    // Root makes jobs only from root's templates: Alice could change what hers runs, and a
    // job of root's runs as root.
    let refused = agent.ctl(&["submit", "--template", "alices", "--name", "roots"]);
    assert_eq!(refused.status.code(), Some(1));
    let message = stderr(&refused);
    assert!(
        message.contains("root-runs-root-templates") && message.contains(ALICE),
        "{message}"
    );
    // An admin acts on every template.
    ok(
        &ctl_as(&agent, CAROL, &["template", "delete", "alices"], ""),
        "an admin deletes",
    );
}

#[test]
fn cluster_mode_refuses_templates_saying_why() {
    let sim = KubeSim::start(1, true);
    let kubeconfig = sim.dir.path().join("leader.kubeconfig");
    sim.kubeconfig_for(Identity::Leader, sim.addr(), &kubeconfig);
    let node = NodeAgent::start(&NodeAgentOptions {
        node: "node-0".to_owned(),
        gpus: 0,
        leader_eligible: true,
        kubeconfig,
        interval: "1s",
        metrics: false,
    });
    let refused = node.agent.ctl(&["template", "list"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("templates are a standalone-mode feature"),
        "{}",
        stderr(&refused)
    );
}

//! Tests of the job model as a user meets it: manifests in, errors and `TF_CONFIG` out.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::*;
use crate::sched::Resources;

const NATIVE_EXAMPLE: &[u8] = include_bytes!("../../../examples/mnist-trainingjob.yaml");
const TFJOB_EXAMPLE: &[u8] = include_bytes!("../../../examples/mnist-tfjob.yaml");

/// Kubeflow's `examples/tensorflow/dist-mnist/tf_job_mnist.yaml`, as published.
const KUBEFLOW_DIST_MNIST: &str = r#"apiVersion: "kubeflow.org/v1"
kind: "TFJob"
metadata:
  name: "dist-mnist-for-e2e-test"
spec:
  tfReplicaSpecs:
    PS:
      replicas: 2
      restartPolicy: Never
      template:
        spec:
          containers:
            - name: tensorflow
              image: kubeflow/tf-dist-mnist-test:1.0
    Worker:
      replicas: 4
      restartPolicy: Never
      template:
        spec:
          containers:
            - name: tensorflow
              image: kubeflow/tf-dist-mnist-test:1.0
"#;

/// Kubeflow's `examples/tensorflow/distribution_strategy/keras-API/multi_worker_tfjob.yaml`.
const KUBEFLOW_MULTI_WORKER: &str = r"apiVersion: kubeflow.org/v1
kind: TFJob
metadata:
  name: multi-worker
spec:
  runPolicy:
    cleanPodPolicy: None
  tfReplicaSpecs:
    Worker:
      replicas: 2
      restartPolicy: Never
      template:
        spec:
          containers:
            - name: tensorflow
              image: kubeflowimages/multi_worker_strategy:v20200522-2a5b081c
              volumeMounts:
                - mountPath: /train
                  name: training
              resources:
                limits:
                  nvidia.com/gpu: 1
          volumes:
            - name: training
              persistentVolumeClaim:
                claimName: strategy-volume
";

fn parse_str(text: &str) -> Result<TrainingJob, SpecError> {
    parse(text.as_bytes())
}

/// The field paths of a failed parse or validation, in order.
fn fields(result: Result<impl std::fmt::Debug, SpecError>) -> Vec<String> {
    match result {
        Ok(v) => panic!("expected errors, got {v:?}"),
        Err(e) => e.field_errors().iter().map(|f| f.field.clone()).collect(),
    }
}

fn message_for(err: &SpecError, field: &str) -> String {
    err.field_errors()
        .iter()
        .find(|f| f.field == field)
        .unwrap_or_else(|| panic!("no error for {field}: {err}"))
        .message
        .clone()
}

/// A native job with the given replica groups, each one `tensorflow` container running `true`.
fn job_with(groups: &str) -> String {
    let mut text = String::from(
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {name: demo}\nspec:\n  replicaSpecs:\n",
    );
    for group in groups.split(',').filter(|g| !g.is_empty()) {
        let (t, n) = group.split_once('=').unwrap();
        writeln!(
            text,
            "    {t}:\n      replicas: {n}\n      template: {{spec: {{containers: [{{name: tensorflow, command: [\"true\"]}}]}}}}"
        )
        .unwrap();
    }
    text
}

// ---- examples shipped with the product ------------------------------------------------------

#[test]
fn shipped_trainingjob_example_is_valid_for_standalone() {
    let job = parse(NATIVE_EXAMPLE).unwrap();
    validate_for_standalone(&job).unwrap();
    assert_eq!(job.name, "mnist");
    assert_eq!(job.source, SourceKind::TrainingJob);
    assert_eq!(job.spec.queue.as_deref(), Some("fast"));
    assert_eq!(job.spec.success_policy, SuccessPolicy::AllWorkers);
    assert_eq!(
        replica_names(&job),
        [(ReplicaType::Worker, 0), (ReplicaType::Worker, 1)]
    );
    let worker = &job.spec.replica_specs[&ReplicaType::Worker];
    assert_eq!(worker.restart_policy, RestartPolicy::ExitCode);
    let command = worker
        .training_container()
        .unwrap()
        .command
        .clone()
        .unwrap();
    assert_eq!(command, ["python3", "examples/mnist_multiworker.py"]);
}

#[test]
fn shipped_tfjob_example_is_valid_for_standalone() {
    let job = parse(TFJOB_EXAMPLE).unwrap();
    validate_for_standalone(&job).unwrap();
    assert_eq!(job.source, SourceKind::TfJob);
    assert_eq!(job.spec.queue.as_deref(), Some("fast"));
    assert_eq!(job.spec.run_policy.schedule_timeout_seconds, Some(600));
    assert_eq!(
        job.spec.run_policy.clean_pod_policy,
        Some(CleanPodPolicy::Running)
    );
    assert_eq!(job.total_replicas(), 2);
    let command = job.spec.replica_specs[&ReplicaType::Worker]
        .training_container()
        .unwrap()
        .command
        .clone()
        .unwrap();
    assert_eq!(command[..2], ["python3", "examples/mnist_multiworker.py"]);
}

// ---- Kubeflow TFJob import ------------------------------------------------------------------

#[test]
fn kubeflow_dist_mnist_imports_unchanged() {
    let job = parse_str(KUBEFLOW_DIST_MNIST).unwrap();
    assert_eq!(job.name, "dist-mnist-for-e2e-test");
    assert_eq!(job.source, SourceKind::TfJob);
    assert_eq!(job.spec.replica_specs[&ReplicaType::Ps].replicas, 2);
    assert_eq!(job.spec.replica_specs[&ReplicaType::Worker].replicas, 4);
    assert_eq!(
        job.spec.replica_specs[&ReplicaType::Worker].restart_policy,
        RestartPolicy::Never
    );
    validate(&job).unwrap();
    // The image's entrypoint does the work, which standalone mode cannot use.
    let err = validate_for_standalone(&job).unwrap_err();
    assert_eq!(
        fields(Err::<(), _>(err)),
        [
            "spec.tfReplicaSpecs.PS.template.spec.containers[0].command",
            "spec.tfReplicaSpecs.Worker.template.spec.containers[0].command",
        ]
    );
}

#[test]
fn kubeflow_multi_worker_example_asks_for_one_gpu_per_worker() {
    let job = parse_str(KUBEFLOW_MULTI_WORKER).unwrap();
    validate(&job).unwrap();
    assert_eq!(
        job.spec.run_policy.clean_pod_policy,
        Some(CleanPodPolicy::None)
    );
    let gang = gang_request(&job, 5.0);
    let gpus: Vec<u32> = gang.replicas.iter().map(|r| r.resources.gpus).collect();
    assert_eq!(gpus, [1, 1]);
}

#[test]
fn kubeflow_defaults_apply_to_missing_fields() {
    let job = parse_str(
        "apiVersion: kubeflow.org/v1\nkind: TFJob\nmetadata: {name: d}\nspec:\n  tfReplicaSpecs:\n    worker:\n      template: {spec: {containers: [{name: tensorflow}]}}\n",
    )
    .unwrap();
    // Replica type keys are matched ignoring case; one replica; restart policy Never.
    let spec = &job.spec.replica_specs[&ReplicaType::Worker];
    assert_eq!(spec.replicas, 1);
    assert_eq!(spec.restart_policy, RestartPolicy::Never);
    assert_eq!(job.spec.success_policy, SuccessPolicy::Default);
    assert_eq!(
        job.spec.run_policy.effective_backoff_limit(),
        DEFAULT_BACKOFF_LIMIT
    );
}

#[test]
fn tfjob_scheduling_policy_and_success_policy_are_read() {
    let job = parse_str(
        r#"apiVersion: kubeflow.org/v1
kind: TFJob
metadata: {name: sp, namespace: team-a, labels: {app: x}}
spec:
  successPolicy: AllWorkers
  enableDynamicWorker: false
  runPolicy:
    suspend: false
    managedBy: kubeflow.org/training-operator
    backoffLimit: 5
    ttlSecondsAfterFinished: 60
    activeDeadlineSeconds: 3600
    schedulingPolicy:
      minAvailable: 3
      queue: slow
      priorityClass: high
      scheduleTimeoutSeconds: 120
      minResources: {cpu: "4"}
  tfReplicaSpecs:
    PS: {replicas: 1, template: {spec: {containers: [{name: tensorflow}]}}}
    Worker: {replicas: 2, restartPolicy: ExitCode, template: {spec: {containers: [{name: tensorflow}]}}}
status:
  conditions: []
"#,
    )
    .unwrap();
    validate(&job).unwrap();
    assert_eq!(job.namespace.as_deref(), Some("team-a"));
    assert_eq!(job.labels["app"], "x");
    assert_eq!(job.spec.success_policy, SuccessPolicy::AllWorkers);
    assert_eq!(job.spec.queue.as_deref(), Some("slow"));
    let rp = &job.spec.run_policy;
    assert_eq!(rp.backoff_limit, Some(5));
    assert_eq!(rp.effective_backoff_limit(), 5);
    assert_eq!(rp.ttl_seconds_after_finished, Some(60));
    assert_eq!(rp.active_deadline_seconds, Some(3600));
    assert_eq!(rp.min_available, Some(3));
    assert_eq!(rp.priority_class.as_deref(), Some("high"));
    assert_eq!(rp.schedule_timeout_seconds, Some(120));
}

#[test]
fn older_tfjob_with_inline_run_policy_is_accepted() {
    let job = parse_str(
        "apiVersion: kubeflow.org/v1\nkind: TFJob\nmetadata: {name: old}\nspec:\n  cleanPodPolicy: None\n  backoffLimit: 1\n  tfReplicaSpecs:\n    Worker: {replicas: 2, template: {spec: {containers: [{name: tensorflow}]}}}\n",
    )
    .unwrap();
    assert_eq!(
        job.spec.run_policy.clean_pod_policy,
        Some(CleanPodPolicy::None)
    );
    assert_eq!(job.spec.run_policy.backoff_limit, Some(1));
    let err = parse_str(
        "apiVersion: kubeflow.org/v1\nkind: TFJob\nmetadata: {name: old}\nspec:\n  backoffLimit: 1\n  runPolicy: {backoffLimit: 2}\n  tfReplicaSpecs:\n    Worker: {template: {spec: {containers: [{name: tensorflow}]}}}\n",
    );
    assert_eq!(fields(err), ["spec.backoffLimit"]);
}

#[test]
fn inline_tfjob_fields_are_reported_where_they_were_written() {
    let err = parse_str(
        "apiVersion: kubeflow.org/v1\nkind: TFJob\nmetadata: {name: old}\nspec:\n  backoffLimit: -1\n  activeDeadlineSeconds: 0\n  schedulingPolicy: {minAvailable: 0, scheduleTimeoutSeconds: 0}\n  tfReplicaSpecs:\n    Worker: {template: {spec: {containers: [{name: tensorflow}]}}}\n",
    );
    assert_eq!(
        fields(err),
        [
            "spec.activeDeadlineSeconds",
            "spec.backoffLimit",
            "spec.schedulingPolicy.minAvailable",
            "spec.schedulingPolicy.scheduleTimeoutSeconds",
        ]
    );
}

#[test]
fn schedule_timeout_in_two_places_must_agree() {
    let text = job_with("Worker=1").replace(
        "spec:\n",
        "spec:\n  runPolicy: {scheduleTimeoutSeconds: 60, schedulingPolicy: {scheduleTimeoutSeconds: 90}}\n",
    );
    assert_eq!(
        fields(parse_str(&text)),
        ["spec.runPolicy.schedulingPolicy.scheduleTimeoutSeconds"]
    );
    let text = job_with("Worker=1").replace(
        "spec:\n",
        "spec:\n  runPolicy: {schedulingPolicy: {scheduleTimeoutSeconds: 90}}\n",
    );
    let job = parse_str(&text).unwrap();
    assert_eq!(job.spec.run_policy.schedule_timeout_seconds, Some(90));
}

#[test]
fn replica_types_given_twice_in_different_case_are_refused() {
    let err = parse_str(
        "apiVersion: kubeflow.org/v1\nkind: TFJob\nmetadata: {name: t}\nspec:\n  tfReplicaSpecs:\n    Worker: {}\n    worker: {}\n",
    );
    assert_eq!(fields(err), ["spec.tfReplicaSpecs.worker"]);
}

#[test]
fn yaml_merge_keys_are_applied() {
    let job = parse_str(
        r"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: merge}
spec:
  replicaSpecs:
    PS: &group
      replicas: 1
      template: {spec: {containers: [{name: tensorflow, command: [python3]}]}}
    Worker:
      <<: *group
      replicas: 3
",
    )
    .unwrap();
    validate_for_standalone(&job).unwrap();
    assert_eq!(job.spec.replica_specs[&ReplicaType::Worker].replicas, 3);
}

#[test]
fn errors_read_as_sentences_naming_each_field() {
    let err = validate(&parse_str(&job_with("Chief=2,PS=0")).unwrap()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "spec.replicaSpecs.Chief.replicas: must be 1: a job has a single Chief; got 2; \
         spec.replicaSpecs.PS.replicas: must be at least 1; remove PS from the replica groups to \
         have none"
    );
}

#[test]
fn dynamic_workers_are_refused_with_a_reason() {
    let err = parse_str(
        "apiVersion: kubeflow.org/v1\nkind: TFJob\nmetadata: {name: dyn}\nspec:\n  enableDynamicWorker: true\n  tfReplicaSpecs:\n    Worker: {replicas: 2, template: {spec: {containers: [{name: tensorflow}]}}}\n",
    )
    .unwrap_err();
    let message = message_for(&err, "spec.enableDynamicWorker");
    assert!(message.contains("not supported"), "{message}");
    let err = parse_str(
        "apiVersion: kubeflow.org/v1\nkind: TFJob\nmetadata: {name: s}\nspec:\n  runPolicy: {suspend: true}\n  tfReplicaSpecs:\n    Worker: {replicas: 2, template: {spec: {containers: [{name: tensorflow}]}}}\n",
    );
    assert_eq!(fields(err), ["spec.runPolicy.suspend"]);
}

#[test]
fn json_manifests_are_read_too() {
    let json = serde_json::json!({
        "apiVersion": "kubeflow.org/v1",
        "kind": "TFJob",
        "metadata": {"name": "j"},
        "spec": {"tfReplicaSpecs": {"Worker": {"replicas": 3, "template": {"spec": {
            "containers": [{"name": "tensorflow", "command": ["python3", "t.py"]}]}}}}}
    });
    let job = parse(json.to_string().as_bytes()).unwrap();
    validate_for_standalone(&job).unwrap();
    assert_eq!(job.total_replicas(), 3);
}

// ---- shape errors, with the field path -------------------------------------------------------

#[test]
fn unknown_fields_outside_the_template_are_errors_naming_the_field() {
    let cases = [
        ("spec:\n  replicaSpecs: {}\n  priorty: 3\n", "spec.priorty"),
        ("spek: {}\n", "spek"),
        (
            "spec:\n  runPolicy: {backofLimit: 3}\n  replicaSpecs: {}\n",
            "spec.runPolicy.backofLimit",
        ),
        (
            "spec:\n  replicaSpecs:\n    Worker: {replicaz: 2}\n",
            "spec.replicaSpecs.Worker.replicaz",
        ),
        (
            "spec:\n  runPolicy: {schedulingPolicy: {minAvailible: 1}}\n  replicaSpecs: {}\n",
            "spec.runPolicy.schedulingPolicy.minAvailible",
        ),
    ];
    for (body, path) in cases {
        let text = format!(
            "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: u}}\n{body}"
        );
        let err = parse_str(&text).unwrap_err();
        let [only] = err.field_errors() else {
            panic!("{err}")
        };
        assert_eq!(only.field, path, "{body}");
        assert!(
            only.message.starts_with("unknown field"),
            "{}",
            only.message
        );
    }
}

#[test]
fn anything_kubernetes_accepts_in_a_pod_template_parses() {
    let job = parse_str(
        r#"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: t}
spec:
  replicaSpecs:
    Worker:
      template:
        metadata: {labels: {a: b}, annotations: {x: y}}
        spec:
          nodeSelector: {agentd.io/gpu.product: H200}
          tolerations: [{key: gpu, operator: Exists}]
          containers:
            - name: tensorflow
              command: [python3]
              workingDir: /srv
              env: [{name: A, value: "1"}]
              securityContext: {runAsUser: 1000}
"#,
    )
    .unwrap();
    validate_for_standalone(&job).unwrap();
    let gang = gang_request(&job, 0.0);
    assert_eq!(
        gang.replicas[0].rule.selector["agentd.io/gpu.product"],
        "H200"
    );
}

/// A one-worker job whose template spec also holds `extra` (YAML lines at the spec's indent).
fn job_placed_by(extra: &str) -> String {
    format!(
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: placed}}\nspec:\n  \
         replicaSpecs:\n    Worker:\n      template:\n        spec:\n          containers:\n          \
         - {{name: tensorflow, command: [\"true\"]}}\n{extra}"
    )
}

#[test]
fn node_affinity_and_tolerations_reach_placement() {
    let job = parse_str(&job_placed_by(
        "          nodeSelector: {agentd.io/gpu.product: H200}
          tolerations:
          - {key: dedicated, operator: Exists, effect: NoSchedule}
          - {key: zone, value: z1}
          - {key: soft, operator: Exists, effect: PreferNoSchedule}
          affinity:
            nodeAffinity:
              requiredDuringSchedulingIgnoredDuringExecution:
                nodeSelectorTerms:
                - matchExpressions:
                  - {key: zone, operator: In, values: [z1, z2]}
                  - {key: generation, operator: Gt, values: [\"4\"]}
                - matchFields:
                  - {key: metadata.name, operator: In, values: [gpu-7]}
              preferredDuringSchedulingIgnoredDuringExecution:
              - weight: 1
                preference: {matchExpressions: [{key: x, operator: Exists}]}
",
    ))
    .unwrap();
    validate_for_standalone(&job).unwrap();
    let rule = &gang_request(&job, 0.0).replicas[0].rule;
    assert_eq!(rule.selector["agentd.io/gpu.product"], "H200");
    assert_eq!(
        rule.describe(),
        "label agentd.io/gpu.product=H200 and node affinity zone in (z1,z2), generation > 4 \
         or metadata.name=gpu-7"
    );
    assert!(rule.affinity[1][0].field);
    // PreferNoSchedule is a preference: it is not kept.
    assert_eq!(
        rule.tolerations,
        [
            crate::sched::Toleration {
                key: "dedicated".to_owned(),
                exists: true,
                value: String::new(),
                effect: Some(crate::sched::TaintEffect::NoSchedule),
            },
            crate::sched::Toleration {
                key: "zone".to_owned(),
                exists: false,
                value: "z1".to_owned(),
                effect: None,
            },
        ]
    );
}

#[test]
fn bad_node_affinity_and_tolerations_are_refused_naming_the_field() {
    let job = parse_str(&job_placed_by(
        "          tolerations:
          - {value: v}
          - {key: k, operator: Exists, value: v}
          - {key: k, operator: Gt}
          - {key: k, effect: NoScheduleOften}
          - {key: k, effect: NoSchedule, tolerationSeconds: 30}
          affinity:
            nodeAffinity:
              requiredDuringSchedulingIgnoredDuringExecution:
                nodeSelectorTerms:
                - matchExpressions:
                  - {key: zone, operator: Within, values: [a]}
                  - {key: zone, operator: In}
                  - {key: zone, operator: Exists, values: [a]}
                  - {key: gen, operator: Gt, values: [four]}
                - {}
                - matchFields:
                  - {key: metadata.labels, operator: In, values: [a]}
                  - {key: metadata.name, operator: Exists}
                  - {key: metadata.name, operator: In, values: [a, b]}
",
    ))
    .unwrap();
    let err = validate_for_standalone(&job).unwrap_err();
    let at = "spec.replicaSpecs.Worker.template.spec";
    let terms = format!(
        "{at}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms"
    );
    assert_eq!(
        fields(Err::<(), _>(err.clone())),
        [
            format!("{terms}[0].matchExpressions[0].operator"),
            format!("{terms}[0].matchExpressions[1].values"),
            format!("{terms}[0].matchExpressions[2].values"),
            format!("{terms}[0].matchExpressions[3].values"),
            format!("{terms}[1]"),
            format!("{terms}[2].matchFields[0].key"),
            format!("{terms}[2].matchFields[1].operator"),
            format!("{terms}[2].matchFields[2].values"),
            format!("{at}.tolerations[0].operator"),
            format!("{at}.tolerations[1].value"),
            format!("{at}.tolerations[2].operator"),
            format!("{at}.tolerations[3].effect"),
            format!("{at}.tolerations[4].tolerationSeconds"),
        ]
    );
    assert_eq!(
        message_for(&err, &format!("{terms}[0].matchExpressions[0].operator")),
        "\"Within\" is not an operator; use one of In, NotIn, Exists, DoesNotExist, Gt, Lt"
    );
    assert_eq!(
        message_for(&err, &format!("{terms}[0].matchExpressions[3].values")),
        "must be one whole number with operator Gt (got [\"four\"])"
    );
    assert_eq!(
        message_for(&err, &format!("{at}.tolerations[3].effect")),
        "\"NoScheduleOften\" is not a taint effect; use NoSchedule, PreferNoSchedule or \
         NoExecute, or leave it out for all"
    );
}

#[test]
fn wrong_types_name_the_field() {
    let err = parse_str(
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {name: w}\nspec:\n  replicaSpecs:\n    Worker: {replicas: two}\n",
    )
    .unwrap_err();
    assert_eq!(
        err.field_errors()[0].field,
        "spec.replicaSpecs.Worker.replicas"
    );
    let err = parse_str(
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {name: w}\nspec:\n  replicaSpecs:\n    Worker:\n      template: {spec: {containers: [{name: tensorflow, command: python3}]}}\n",
    )
    .unwrap_err();
    assert_eq!(
        err.field_errors()[0].field,
        "spec.replicaSpecs.Worker.template.spec.containers[0].command"
    );
    // Kubernetes' types read a missing container name as empty; validation names it.
    let job = parse_str(
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {name: w}\nspec:\n  replicaSpecs:\n    Worker:\n      template: {spec: {containers: [{command: [a]}]}}\n",
    )
    .unwrap();
    assert_eq!(
        fields(validate(&job)),
        ["spec.replicaSpecs.Worker.template.spec.containers[0].name"]
    );
}

#[test]
fn restart_and_success_policies_list_what_is_allowed() {
    let err = parse_str(
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {name: r}\nspec:\n  replicaSpecs:\n    Worker: {restartPolicy: Sometimes}\n",
    )
    .unwrap_err();
    let message = message_for(&err, "spec.replicaSpecs.Worker.restartPolicy");
    for allowed in ["Never", "OnFailure", "Always", "ExitCode"] {
        assert!(message.contains(allowed), "{message}");
    }
    let err = parse_str(
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {name: r}\nspec:\n  successPolicy: Chief\n  replicaSpecs: {}\n",
    )
    .unwrap_err();
    assert!(message_for(&err, "spec.successPolicy").contains("AllWorkers"));
    let err = parse_str(
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {name: r}\nspec:\n  runPolicy: {cleanPodPolicy: Some}\n  replicaSpecs: {}\n",
    )
    .unwrap_err();
    assert!(message_for(&err, "spec.runPolicy.cleanPodPolicy").contains("Running"));
}

#[test]
fn unknown_replica_types_and_bad_counts_are_all_reported() {
    let err = parse_str(
        r"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: c}
spec:
  queue: fast
  runPolicy:
    backoffLimit: -1
    activeDeadlineSeconds: 0
    ttlSecondsAfterFinished: -5
    schedulingPolicy: {minAvailable: 0, queue: slow}
  replicaSpecs:
    Launcher: {}
    Worker: {replicas: -2}
",
    )
    .unwrap_err();
    assert_eq!(
        fields(Err::<(), _>(err.clone())),
        [
            "spec.runPolicy.backoffLimit",
            "spec.runPolicy.activeDeadlineSeconds",
            "spec.runPolicy.ttlSecondsAfterFinished",
            "spec.runPolicy.schedulingPolicy.minAvailable",
            "spec.runPolicy.schedulingPolicy.queue",
            "spec.replicaSpecs.Launcher",
            "spec.replicaSpecs.Worker.replicas",
        ]
    );
    assert!(
        message_for(&err, "spec.replicaSpecs.Launcher")
            .contains("Chief, Master, PS, Worker, Evaluator")
    );
    assert!(message_for(&err, "spec.runPolicy.backoffLimit").contains("at least 0"));
}

#[test]
fn api_version_and_kind_must_be_a_supported_pair() {
    let cases = [
        ("kind: TrainingJob\n", "apiVersion"),
        ("apiVersion: agentd.io/v1alpha1\n", "kind"),
        (
            "apiVersion: kubeflow.org/v1beta2\nkind: TFJob\n",
            "apiVersion",
        ),
        ("apiVersion: kubeflow.org/v1\nkind: PyTorchJob\n", "kind"),
        ("apiVersion: batch/v1\nkind: Job\n", "kind"),
    ];
    for (head, field) in cases {
        let err = parse_str(&format!("{head}metadata: {{name: x}}\nspec: {{}}\n")).unwrap_err();
        let message = message_for(&err, field);
        assert!(
            message.contains("kubeflow.org/v1 with kind TFJob"),
            "{message}"
        );
    }
}

#[test]
fn broken_documents_are_syntax_errors() {
    for text in ["", "  \n", "spec: [unclosed", "{\"kind\": ", "a: 1\na: 2\n"] {
        assert!(
            matches!(parse_str(text), Err(SpecError::Syntax { .. })),
            "{text:?}: {:?}",
            parse_str(text)
        );
    }
    assert_eq!(fields(parse_str("- a\n- b\n")), ["."]);
}

#[test]
fn metadata_name_is_required() {
    let err = parse_str(
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {generateName: x-}\nspec: {replicaSpecs: {}}\n",
    );
    assert_eq!(fields(err), ["metadata.generateName", "metadata.name"]);
}

#[test]
fn one_queue_in_two_places_must_agree() {
    let err = parse_str(
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {name: q}\nspec:\n  queue: fast\n  runPolicy: {schedulingPolicy: {queue: slow}}\n  replicaSpecs: {}\n",
    );
    assert_eq!(fields(err), ["spec.runPolicy.schedulingPolicy.queue"]);
}

// ---- validation: every class, every path, all at once ---------------------------------------

#[test]
fn a_valid_job_passes() {
    let job = parse_str(&job_with("Chief=1,PS=2,Worker=4,Evaluator=1")).unwrap();
    validate_for_standalone(&job).unwrap();
}

#[test]
fn names_must_be_dns_labels() {
    for bad in [
        "Mnist",
        "-mnist",
        "mnist-",
        "mn_ist",
        "1mnist",
        &"a".repeat(64),
    ] {
        let text = job_with("Worker=1").replace("name: demo", &format!("name: {bad:?}"));
        let job = parse_str(&text).unwrap();
        let err = validate(&job).unwrap_err();
        assert_eq!(
            fields(Err::<(), _>(err.clone())),
            ["metadata.name"],
            "{bad}"
        );
        assert!(message_for(&err, "metadata.name").contains("lower-case"));
    }
    // A name that fits alone but not with its longest replica suffix.
    let name = "a".repeat(55);
    let job =
        parse_str(&job_with("Worker=11").replace("name: demo", &format!("name: {name}"))).unwrap();
    let err = validate(&job).unwrap_err();
    assert!(
        message_for(&err, "metadata.name").contains("worker-10"),
        "{err}"
    );
    let job =
        parse_str(&job_with("Worker=1").replace("{name: demo}", "{name: demo, namespace: Team_A}"))
            .unwrap();
    assert_eq!(fields(validate(&job)), ["metadata.namespace"]);
}

#[test]
fn replica_group_rules_are_reported_together() {
    let job = parse_str(&job_with("Chief=2,Master=1,PS=0,Worker=1,Evaluator=2")).unwrap();
    let err = validate(&job).unwrap_err();
    assert_eq!(
        fields(Err::<(), _>(err.clone())),
        [
            "spec.replicaSpecs.Master",
            "spec.replicaSpecs.Chief.replicas",
            "spec.replicaSpecs.PS.replicas",
            "spec.replicaSpecs.Evaluator.replicas",
        ]
    );
    assert!(message_for(&err, "spec.replicaSpecs.PS.replicas").contains("at least 1"));
    assert!(message_for(&err, "spec.replicaSpecs.Evaluator.replicas").contains("at most one"));
}

#[test]
fn a_job_needs_a_replica_that_decides_success() {
    assert_eq!(
        fields(validate(&parse_str(&job_with("")).unwrap())),
        ["spec.replicaSpecs"]
    );
    assert_eq!(
        fields(validate(&parse_str(&job_with("PS=1,Evaluator=1")).unwrap())),
        ["spec.replicaSpecs"]
    );
    let text = job_with("Chief=1").replace("spec:\n", "spec:\n  successPolicy: AllWorkers\n");
    assert_eq!(
        fields(validate(&parse_str(&text).unwrap())),
        ["spec.successPolicy"]
    );
}

#[test]
fn tfjob_paths_use_tf_replica_specs() {
    let job = parse_str(
        "apiVersion: kubeflow.org/v1\nkind: TFJob\nmetadata: {name: t}\nspec:\n  tfReplicaSpecs:\n    Worker: {replicas: 0, template: {spec: {containers: [{name: tensorflow}]}}}\n",
    )
    .unwrap();
    assert_eq!(
        fields(validate(&job)),
        ["spec.tfReplicaSpecs.Worker.replicas"]
    );
}

#[test]
fn min_available_may_not_exceed_the_gang() {
    let text = job_with("Worker=2").replace(
        "spec:\n",
        "spec:\n  runPolicy: {schedulingPolicy: {minAvailable: 3}}\n",
    );
    let err = validate(&parse_str(&text).unwrap()).unwrap_err();
    assert!(
        message_for(&err, "spec.runPolicy.schedulingPolicy.minAvailable").contains("1 to 2"),
        "{err}"
    );
}

const CONTAINER_CASES: &str = r"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: containers}
spec:
  replicaSpecs:
    Chief:
      template: {}
    PS:
      template:
        spec:
          containers: [{name: a, command: [x]}, {name: b, command: [y]}]
    Worker:
      template:
        spec:
          containers: [{name: trainer, args: [--x]}]
    Evaluator:
      template:
        spec:
          containers: [{name: sidecar}, {name: tensorflow, command: []}]
";

#[test]
fn containers_are_checked_for_every_group() {
    let job = parse_str(CONTAINER_CASES).unwrap();
    let err = validate_for_standalone(&job).unwrap_err();
    assert_eq!(
        fields(Err::<(), _>(err.clone())),
        [
            "spec.replicaSpecs.Chief.template.spec.containers",
            "spec.replicaSpecs.PS.template.spec.containers",
            "spec.replicaSpecs.Worker.template.spec.containers[0].command",
            "spec.replicaSpecs.Evaluator.template.spec.containers[1].command",
        ]
    );
    assert!(
        message_for(&err, "spec.replicaSpecs.PS.template.spec.containers")
            .contains("none is named \"tensorflow\"")
    );
    // Without standalone's need for a command, only the container problems remain.
    assert_eq!(
        fields(validate(&job)),
        [
            "spec.replicaSpecs.Chief.template.spec.containers",
            "spec.replicaSpecs.PS.template.spec.containers",
        ]
    );
}

const RESOURCE_CASES: &str = r#"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: res}
spec:
  replicaSpecs:
    Worker:
      template:
        spec:
          initContainers:
            - name: fetch
              resources: {limits: {memory: 1Gb}}
          containers:
            - name: tensorflow
              command: [python3]
              resources:
                limits: {cpu: "1", memory: 1Gi, nvidia.com/gpu: "0.5", ephemeral-storage: lots}
                requests: {cpu: "2", memory: 512Mi}
            - name: helper
              resources:
                limits: {nvidia.com/gpu: 2}
                requests: {nvidia.com/gpu: 1, cpu: -1}
"#;

#[test]
fn resource_quantities_are_checked() {
    let job = parse_str(RESOURCE_CASES).unwrap();
    let err = validate(&job).unwrap_err();
    let at = "spec.replicaSpecs.Worker.template.spec";
    assert_eq!(
        fields(Err::<(), _>(err.clone())),
        [
            format!("{at}.containers[0].resources.limits[ephemeral-storage]"),
            format!("{at}.containers[0].resources.limits[nvidia.com/gpu]"),
            format!("{at}.containers[0].resources.requests[cpu]"),
            format!("{at}.containers[1].resources.requests[cpu]"),
            format!("{at}.containers[1].resources.requests[nvidia.com/gpu]"),
            format!("{at}.initContainers[0].resources.limits[memory]"),
        ]
    );
    let m = |suffix: &str| message_for(&err, &format!("{at}.{suffix}"));
    assert!(m("containers[0].resources.limits[nvidia.com/gpu]").contains("whole number"));
    assert!(m("containers[0].resources.requests[cpu]").contains("more than the limit 1"));
    assert!(m("containers[1].resources.requests[cpu]").contains("negative"));
    assert!(m("containers[1].resources.requests[nvidia.com/gpu]").contains("not overcommitted"));
    assert!(m("initContainers[0].resources.limits[memory]").contains("Mi, Gi"));
}

// ---- replicas and the gang -------------------------------------------------------------------

#[test]
fn replicas_are_named_and_ordered_chief_ps_worker_evaluator() {
    let job = parse_str(&job_with("Worker=2,Evaluator=1,PS=2,Chief=1")).unwrap();
    let names: Vec<String> = replica_names(&job)
        .into_iter()
        .map(|(t, i)| replica_name(t, i))
        .collect();
    assert_eq!(
        names,
        [
            "chief-0",
            "ps-0",
            "ps-1",
            "worker-0",
            "worker-1",
            "evaluator-0"
        ]
    );
}

#[test]
fn gang_request_carries_what_the_scheduler_needs() {
    let job = parse_str(
        r#"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: big}
spec:
  queue: slow
  priority: 7
  runPolicy:
    activeDeadlineSeconds: 3600
    schedulingPolicy: {minAvailable: 2}
  replicaSpecs:
    PS:
      template:
        spec:
          containers:
            - name: tensorflow
              resources: {requests: {cpu: 500m, memory: 1Gi}}
    Worker:
      replicas: 2
      template:
        spec:
          nodeSelector: {agentd.io/gpu.product: H200}
          containers:
            - name: tensorflow
              resources:
                limits: {cpu: "4", memory: 1.5Gi, nvidia.com/gpu: 2}
                requests: {cpu: "2", memory: 1Gi, nvidia.com/gpu: 2}
            - name: sidecar
              resources: {limits: {cpu: 100m, memory: "1000000"}}
"#,
    )
    .unwrap();
    validate(&job).unwrap();
    let gang = gang_request(&job, 42.5);
    assert_eq!(gang.id, "big");
    assert_eq!(gang.queue, "slow");
    assert_eq!(gang.priority, 7);
    assert!((gang.submitted_at - 42.5).abs() < f64::EPSILON);
    assert_eq!(gang.min_available, Some(2));
    assert_eq!(gang.declared_runtime_s, Some(3600.0));
    let names: Vec<&str> = gang.replicas.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["ps-0", "worker-0", "worker-1"]);
    assert_eq!(
        gang.replicas[0].resources,
        Resources {
            gpus: 0,
            cpu_milli: 500,
            memory_mib: 1024
        }
    );
    assert!(gang.replicas[0].rule.selector.is_empty());
    // Limits win over requests; containers add up; 1,000,000 bytes round up to 1 MiB.
    assert_eq!(
        gang.replicas[1].resources,
        Resources {
            gpus: 2,
            cpu_milli: 4100,
            memory_mib: 1536 + 1
        }
    );
    assert_eq!(
        gang.replicas[2].rule.selector["agentd.io/gpu.product"],
        "H200"
    );
}

// ---- TF_CONFIG goldens -----------------------------------------------------------------------

/// A TFJob named as in the Kubeflow operator's own tests (`test-tfjob`).
fn kubeflow_test_job(workers: u32, ps: u32, evaluators: u32, namespace: &str) -> TrainingJob {
    let mut text = format!(
        "apiVersion: kubeflow.org/v1\nkind: TFJob\nmetadata: {{name: test-tfjob, namespace: {namespace}}}\nspec:\n  tfReplicaSpecs:\n"
    );
    for (t, n) in [("Worker", workers), ("PS", ps), ("Evaluator", evaluators)] {
        if n > 0 {
            writeln!(
                text,
                "    {t}: {{replicas: {n}, template: {{spec: {{containers: [{{name: tensorflow}}]}}}}}}"
            )
            .unwrap();
        }
    }
    let job = parse_str(&text).unwrap();
    validate(&job).unwrap();
    job
}

#[test]
fn tf_config_has_the_kubeflow_operators_form() {
    let job = kubeflow_test_job(1, 1, 0, "ns2");
    let hosts = ClusterHosts::cluster(&job, "tf.training.org", CLUSTER_PORT);
    assert_eq!(
        tf_config(&job, &hosts, (ReplicaType::Worker, 0)).unwrap(),
        r#"{"cluster":{"ps":["test-tfjob-ps-0.test-tfjob.ns2.svc.tf.training.org:2222"],"worker":["test-tfjob-worker-0.test-tfjob.ns2.svc.tf.training.org:2222"]},"task":{"type":"worker","index":0},"environment":"cloud"}"#
    );
    assert_eq!(
        tf_config(&job, &hosts, (ReplicaType::Ps, 0)).unwrap(),
        r#"{"cluster":{"ps":["test-tfjob-ps-0.test-tfjob.ns2.svc.tf.training.org:2222"],"worker":["test-tfjob-worker-0.test-tfjob.ns2.svc.tf.training.org:2222"]},"task":{"type":"ps","index":0},"environment":"cloud"}"#
    );
}

#[test]
fn tf_config_without_a_cluster_domain_ends_in_svc() {
    let job = kubeflow_test_job(2, 0, 0, "ns0");
    let hosts = ClusterHosts::cluster(&job, "", CLUSTER_PORT);
    assert_eq!(
        tf_config(&job, &hosts, (ReplicaType::Worker, 1)).unwrap(),
        r#"{"cluster":{"worker":["test-tfjob-worker-0.test-tfjob.ns0.svc:2222","test-tfjob-worker-1.test-tfjob.ns0.svc:2222"]},"task":{"type":"worker","index":1},"environment":"cloud"}"#
    );
}

#[test]
fn the_evaluator_is_left_out_of_the_cluster_but_knows_its_task() {
    let job = kubeflow_test_job(1, 1, 1, "ns3");
    let hosts = ClusterHosts::cluster(&job, "tf.training.io", CLUSTER_PORT);
    let cluster = r#"{"cluster":{"ps":["test-tfjob-ps-0.test-tfjob.ns3.svc.tf.training.io:2222"],"worker":["test-tfjob-worker-0.test-tfjob.ns3.svc.tf.training.io:2222"]}"#;
    assert_eq!(
        tf_config(&job, &hosts, (ReplicaType::Worker, 0)).unwrap(),
        format!(r#"{cluster},"task":{{"type":"worker","index":0}},"environment":"cloud"}}"#)
    );
    assert_eq!(
        tf_config(&job, &hosts, (ReplicaType::Evaluator, 0)).unwrap(),
        format!(r#"{cluster},"task":{{"type":"evaluator","index":0}},"environment":"cloud"}}"#)
    );
}

#[test]
fn a_single_replica_job_gets_no_tf_config() {
    let job = kubeflow_test_job(1, 0, 0, "ns0");
    let hosts = ClusterHosts::cluster(&job, "tf.training.com", CLUSTER_PORT);
    assert_eq!(tf_config(&job, &hosts, (ReplicaType::Worker, 0)), None);
    // One worker and one evaluator is two replicas: distributed, as the operator counts.
    let job = kubeflow_test_job(1, 0, 1, "ns0");
    let hosts = ClusterHosts::cluster(&job, "", CLUSTER_PORT);
    assert_eq!(
        tf_config(&job, &hosts, (ReplicaType::Worker, 0)).unwrap(),
        r#"{"cluster":{"worker":["test-tfjob-worker-0.test-tfjob.ns0.svc:2222"]},"task":{"type":"worker","index":0},"environment":"cloud"}"#
    );
}

#[test]
fn standalone_tf_config_lists_localhost_ports_in_kubeflow_key_order() {
    let job = parse_str(&job_with("Chief=1,PS=1,Worker=2")).unwrap();
    let ports = replica_names(&job)
        .into_iter()
        .zip([41000u16, 41001, 41002, 41003]);
    let hosts = ClusterHosts::standalone(ports);
    assert_eq!(
        tf_config(&job, &hosts, (ReplicaType::Chief, 0)).unwrap(),
        r#"{"cluster":{"chief":["localhost:41000"],"ps":["localhost:41001"],"worker":["localhost:41002","localhost:41003"]},"task":{"type":"chief","index":0},"environment":"cloud"}"#
    );
    // Master sorts between chief and ps, as Go's map order puts it.
    let job = parse_str(&job_with("Master=1,PS=1")).unwrap();
    let hosts = ClusterHosts::standalone(replica_names(&job).into_iter().zip([7u16, 8]));
    assert_eq!(
        tf_config(&job, &hosts, (ReplicaType::Ps, 0)).unwrap(),
        r#"{"cluster":{"master":["localhost:7"],"ps":["localhost:8"]},"task":{"type":"ps","index":0},"environment":"cloud"}"#
    );
}

#[test]
fn tf_config_is_none_for_replicas_outside_the_job_or_without_hosts() {
    let job = parse_str(&job_with("Worker=2")).unwrap();
    let hosts = ClusterHosts::standalone([((ReplicaType::Worker, 0), 1u16)]);
    assert_eq!(tf_config(&job, &hosts, (ReplicaType::Worker, 0)), None);
    let hosts = ClusterHosts::cluster(&job, "", CLUSTER_PORT);
    assert_eq!(tf_config(&job, &hosts, (ReplicaType::Worker, 2)), None);
    assert_eq!(tf_config(&job, &hosts, (ReplicaType::Ps, 0)), None);
    assert_eq!(
        hosts.get(ReplicaType::Worker, 1),
        Some("demo-worker-1.demo.default.svc:2222")
    );
}

// ---- success policy --------------------------------------------------------------------------

fn done(replicas: &[(ReplicaType, u32)]) -> BTreeSet<(ReplicaType, u32)> {
    replicas.iter().copied().collect()
}

#[test]
fn default_success_policy_waits_for_the_chief_else_worker_zero() {
    use ReplicaType::{Chief, Master, Ps, Worker};
    let job = parse_str(&job_with("Chief=1,Worker=2")).unwrap();
    assert!(!job_succeeded(&job, &done(&[(Worker, 0), (Worker, 1)])));
    assert!(job_succeeded(&job, &done(&[(Chief, 0)])));
    let job = parse_str(&job_with("Master=1,PS=1")).unwrap();
    assert!(job_succeeded(&job, &done(&[(Master, 0)])));
    assert!(!job_succeeded(&job, &done(&[(Ps, 0)])));
    let job = parse_str(&job_with("PS=1,Worker=3")).unwrap();
    assert!(!job_succeeded(&job, &done(&[(Worker, 1), (Worker, 2)])));
    assert!(job_succeeded(&job, &done(&[(Worker, 0)])));
}

#[test]
fn all_workers_success_policy_waits_for_every_worker() {
    use ReplicaType::{Chief, Worker};
    let all = |groups: &str| {
        parse_str(&job_with(groups).replace("spec:\n", "spec:\n  successPolicy: AllWorkers\n"))
            .unwrap()
    };
    let job = all("Worker=3");
    assert!(!job_succeeded(&job, &done(&[(Worker, 0), (Worker, 1)])));
    assert!(job_succeeded(
        &job,
        &done(&[(Worker, 0), (Worker, 1), (Worker, 2)])
    ));
    // With a chief, the chief decides, as in Kubeflow.
    let job = all("Chief=1,Worker=2");
    assert!(job_succeeded(&job, &done(&[(Chief, 0)])));
    assert!(!job_succeeded(&job, &done(&[(Worker, 0), (Worker, 1)])));
}

// ---- round trip ------------------------------------------------------------------------------

#[test]
fn to_manifest_reads_back_to_the_same_job() {
    for source in [
        NATIVE_EXAMPLE,
        TFJOB_EXAMPLE,
        KUBEFLOW_MULTI_WORKER.as_bytes(),
    ] {
        let job = parse(source).unwrap();
        let manifest = to_manifest(&job);
        assert_eq!(manifest["apiVersion"], "agentd.io/v1alpha1");
        let again = parse(manifest.to_string().as_bytes()).unwrap();
        assert_eq!(
            again,
            TrainingJob {
                source: SourceKind::TrainingJob,
                written: again.written.clone(),
                ..job
            }
        );
    }
}

// ---- properties ------------------------------------------------------------------------------

mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_mangled_manifests(cut in 0usize..2000, junk in "[ -~\n]{0,16}") {
            let text = String::from_utf8_lossy(NATIVE_EXAMPLE).into_owned();
            let cut = cut.min(text.len());
            let cut = (0..=cut).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
            let mangled = format!("{}{junk}{}", &text[..cut], &text[cut..]);
            if let Ok(job) = parse(mangled.as_bytes()) {
                let _ = validate_for_standalone(&job);
                let _ = gang_request(&job, 0.0);
            }
        }

        #[test]
        fn binary_and_decimal_suffixes_scale_exactly(n in 0u64..1_000_000, i in 0usize..9) {
            let (suffix, unit) = [
                ("", 1u64), ("k", 1_000), ("M", 1_000_000), ("G", 1_000_000_000),
                ("T", 1_000_000_000_000), ("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30),
                ("Ti", 1 << 40),
            ][i];
            prop_assert_eq!(parse_memory_bytes(&format!("{n}{suffix}")), Ok(n * unit));
        }

        #[test]
        fn millicores_read_the_same_written_either_way(milli in 0u64..10_000_000) {
            prop_assert_eq!(parse_cpu_milli(&format!("{milli}m")), Ok(milli));
            let decimal = format!("{}.{:03}", milli / 1000, milli % 1000);
            prop_assert_eq!(parse_cpu_milli(&decimal), Ok(milli));
        }

        #[test]
        fn tf_config_lists_every_training_replica_and_names_the_task(
            chief in 0u32..2, ps in 0u32..3, workers in 1u32..5, evaluator in 0u32..2,
        ) {
            let mut groups = vec![format!("Worker={workers}")];
            if chief > 0 { groups.push("Chief=1".into()); }
            if ps > 0 { groups.push(format!("PS={ps}")); }
            if evaluator > 0 { groups.push("Evaluator=1".into()); }
            let job = parse_str(&job_with(&groups.join(","))).unwrap();
            validate_for_standalone(&job).unwrap();
            let replicas = replica_names(&job);
            let hosts = ClusterHosts::standalone(replicas.iter().copied().zip(30000u16..));
            for &(t, i) in &replicas {
                let config = tf_config(&job, &hosts, (t, i));
                if replicas.len() == 1 {
                    prop_assert!(config.is_none());
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(&config.unwrap()).unwrap();
                prop_assert_eq!(&v["task"]["type"], t.as_tf_key());
                prop_assert_eq!(&v["task"]["index"], i);
                prop_assert_eq!(&v["environment"], "cloud");
                let cluster = v["cluster"].as_object().unwrap();
                prop_assert!(!cluster.contains_key("evaluator"));
                let listed: usize = cluster.values().map(|m| m.as_array().unwrap().len()).sum();
                prop_assert_eq!(listed as u32, chief + ps + workers);
            }
        }
    }
}

// ---- manifests as people write them -----------------------------------------------------------

/// Rules for [`admit`] with the default queues, a small bound and a `PATH` of `/usr/bin:/bin`.
fn rules() -> Admission {
    Admission {
        queues: ["fast".to_owned(), "slow".to_owned()].into(),
        default_queue: "fast".to_owned(),
        max_replicas_per_job: 64,
        path: "/usr/bin:/bin".to_owned(),
        target: Target::Standalone,
        cluster_domain: String::new(),
    }
}

/// A TFJob with a Worker group whose one container is given as YAML flow text.
fn tfjob_with_container(container: &str) -> String {
    format!(
        "apiVersion: kubeflow.org/v1\nkind: TFJob\nmetadata: {{name: c}}\nspec:\n  tfReplicaSpecs:\n    Worker:\n      template:\n        spec:\n          containers:\n          - {container}\n"
    )
}

fn admit_str(text: &str) -> Result<TrainingJob, SpecError> {
    admit(text.as_bytes(), &rules())
}

#[test]
fn typos_inside_a_pod_template_are_errors_naming_their_path() {
    let text = r"apiVersion: kubeflow.org/v1
kind: TFJob
metadata:
  name: typo
  lables: {team: a}
spec:
  tfReplicaSpecs:
    Worker:
      template:
        metadata: {annotatons: {a: b}}
        spec:
          nodeSelecter: {gpu: h200}
          containers:
          - name: tensorflow
            command: [/bin/true]
            workingdir: /tmp
            resource:
              limits: {nvidia.com/gpu: 1}
            ports: [{containerPort: 2222, nmae: tfjob-port}]
";
    let err = parse_str(text).unwrap_err();
    assert_eq!(
        fields(Err::<(), _>(err.clone())),
        [
            "metadata.lables",
            "spec.tfReplicaSpecs.Worker.template.metadata.annotatons",
            "spec.tfReplicaSpecs.Worker.template.spec.nodeSelecter",
            "spec.tfReplicaSpecs.Worker.template.spec.containers[0].ports[0].nmae",
            "spec.tfReplicaSpecs.Worker.template.spec.containers[0].resource",
            "spec.tfReplicaSpecs.Worker.template.spec.containers[0].workingdir",
        ]
    );
    assert!(
        message_for(&err, "metadata.lables").starts_with("unknown field"),
        "{err}"
    );
    // Nulls are "not set" in Kubernetes, and the fields it knows pass.
    parse_str(&tfjob_with_container(
        "{name: tensorflow, command: [/bin/true], workingDir: /tmp, resources: {limits: {cpu: 1}}, securityContext: null}",
    ))
    .unwrap();
}

#[test]
fn every_problem_is_reported_at_once_at_the_manifests_own_paths() {
    let text = r"apiVersion: kubeflow.org/v1
kind: TFJob
metadata: {name: all}
spec:
  runPolicy:
    backoffLimit: -1
    schedulingPolicy: {queue: nowhere}
  tfReplicaSpecs:
    Ps:
      replicas: 0
      template:
        spec:
          containers:
          - name: tensorflow
            command: [/bin/true]
            env: [{name: KEY, valueFrom: {secretKeyRef: {name: s, key: k}}}]
    Worker:
      template:
        spec:
          containers:
          - {name: tensorflow, command: python3}
";
    let err = admit_str(text).unwrap_err();
    assert_eq!(
        fields(Err::<(), _>(err.clone())),
        [
            "spec.runPolicy.backoffLimit",
            "spec.tfReplicaSpecs.Worker.template.spec.containers[0].command",
            "spec.tfReplicaSpecs.Ps.replicas",
            "spec.tfReplicaSpecs.Ps.template.spec.containers[0].env[0].valueFrom",
            "spec.runPolicy.schedulingPolicy.queue",
        ],
        "{err}"
    );
    assert!(
        message_for(&err, "spec.runPolicy.schedulingPolicy.queue").contains("no queue named"),
        "{err}"
    );
}

#[test]
fn a_bom_and_empty_documents_around_the_manifest_are_accepted() {
    let text = String::from_utf8(TFJOB_EXAMPLE.to_vec()).unwrap();
    for form in [
        format!("\u{feff}{text}"),
        format!("---\n{text}"),
        format!("{text}---\n"),
        format!("\u{feff}---\n# a comment\n---\n{text}\n---\n"),
    ] {
        let job = parse(form.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{form}"));
        assert_eq!(job.name, "mnist-tfjob");
    }
    let json = format!(
        "\u{feff}{}",
        serde_json::to_string(&to_manifest(&parse(TFJOB_EXAMPLE).unwrap())).unwrap()
    );
    parse(json.as_bytes()).unwrap();
}

#[test]
fn more_than_one_document_says_how_many_and_which() {
    let text = String::from_utf8(TFJOB_EXAMPLE.to_vec()).unwrap();
    let two = format!("{text}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\n");
    let err = parse(two.as_bytes()).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("holds 2 documents (TFJob mnist-tfjob, Service web)"),
        "{message}"
    );
    let err = parse(b"---\n# nothing here\n---\n").unwrap_err();
    assert!(err.to_string().contains("no document"), "{err}");
}

#[test]
fn hostile_documents_are_refused_at_the_limits() {
    let deep = format!("a: {}", "[".repeat(120_000));
    let err = parse(deep.as_bytes()).unwrap_err();
    assert!(matches!(err, SpecError::Syntax { .. }), "{err}");
    let deep_json = format!("{}{}", "{\"a\":".repeat(MAX_DEPTH + 1), "1");
    let deep_json = format!("{deep_json}{}", "}".repeat(MAX_DEPTH + 1));
    assert!(
        parse(deep_json.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("deeper")
    );
    // An alias bomb: each level refers to the one before it ten times.
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        writeln!(
            bomb,
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]"
        )
        .unwrap();
    }
    assert!(matches!(
        parse(bomb.as_bytes()),
        Err(SpecError::Syntax { .. })
    ));
    // Real manifests are far inside the limits.
    parse(NATIVE_EXAMPLE).unwrap();
}

#[test]
fn replicas_beyond_the_agents_bound_are_refused_at_submit() {
    let text = tfjob_with_container("{name: tensorflow, command: [/bin/true]}")
        .replace("    Worker:\n", "    Worker:\n      replicas: 1000000000\n");
    let err = admit_str(&text).unwrap_err();
    assert!(
        message_for(&err, "spec.tfReplicaSpecs.Worker.replicas")
            .contains("at most 64 per job (jobs.max_replicas_per_job"),
        "{err}"
    );
}

#[test]
fn env_from_is_refused_in_standalone_mode() {
    let err = admit_str(&tfjob_with_container(
        "{name: tensorflow, command: [/bin/true], envFrom: [{configMapRef: {name: settings}}]}",
    ))
    .unwrap_err();
    assert!(
        message_for(
            &err,
            "spec.tfReplicaSpecs.Worker.template.spec.containers[0].envFrom[0]"
        )
        .contains("not supported in standalone mode"),
        "{err}"
    );
}

/// In cluster mode the replicas are pods: the program, working directory and entrypoint are
/// the image's, and the cluster resolves `valueFrom` and `envFrom`; none of that is looked for
/// on the machine that admits the job. What no container could start with is still refused.
#[test]
fn in_cluster_mode_the_image_and_the_cluster_supply_what_standalone_needs_here() {
    let cluster = rules().for_cluster("cluster.local");
    let container = "{name: tensorflow, image: registry.example.com/trainer:1.4, \
         command: [/opt/trainer/bin/train], workingDir: /opt/trainer, \
         env: [{name: KEY, valueFrom: {secretKeyRef: {name: wandb, key: key}}}], \
         envFrom: [{configMapRef: {name: settings}}]}";
    let text = tfjob_with_container(container);
    admit(text.as_bytes(), &cluster).expect("admitted for the cluster");
    let refused = fields(admit_str(&text));
    assert_eq!(refused.len(), 3, "{refused:?}");
    let entrypoint = tfjob_with_container("{name: tensorflow, image: trainer:1.4}");
    admit(entrypoint.as_bytes(), &cluster).expect("the image's entrypoint");
    assert!(
        fields(admit_str(&entrypoint))
            .iter()
            .any(|f| f.ends_with("containers[0].command")),
        "standalone needs a command"
    );
    let nul = tfjob_with_container("{name: tensorflow, image: t, args: [\"a\\0b\"]}");
    assert_eq!(
        fields(admit(nul.as_bytes(), &cluster)),
        ["spec.tfReplicaSpecs.Worker.template.spec.containers[0].args[0]"]
    );
}

/// `TF_CONFIG` lists every replica's address: in cluster mode a pod's address carries the
/// job's name twice and its namespace, so a large gang with long names cannot be given it in
/// one environment variable, and is refused before it is placed; the same gang with short
/// names is admitted.
#[test]
fn a_tf_config_too_long_for_one_environment_variable_is_refused() {
    let cluster = Admission {
        max_replicas_per_job: 1024,
        ..rules().for_cluster("cluster.local")
    };
    let job = |name: &str, namespace: &str| {
        format!(
            "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}, \
             namespace: {namespace}}}\nspec:\n  replicaSpecs:\n    Worker:\n      replicas: \
             1024\n      template:\n        spec:\n          containers: [{{name: tensorflow, \
             image: t}}]\n"
        )
    };
    admit(job("mnist", "default").as_bytes(), &cluster).expect("short names fit");
    let long = job(&"n".repeat(40), &format!("{}x", "team-".repeat(8)));
    let err = admit(long.as_bytes(), &cluster).unwrap_err();
    assert_eq!(fields(Err::<(), _>(err.clone())), ["spec.replicaSpecs"]);
    let message = message_for(&err, "spec.replicaSpecs");
    assert!(
        message.contains("TF_CONFIG, which lists the address of each of the job's 1024 replicas"),
        "{message}"
    );
    assert!(message.contains("at most 131071 bytes"), "{message}");
    assert!(
        message.contains("shorter job name or namespace"),
        "{message}"
    );
}

#[test]
fn what_can_never_start_is_refused_at_submit() {
    let at = "spec.tfReplicaSpecs.Worker.template.spec.containers[0]";
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("train.sh");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    let d = dir.path().display();
    let cases: Vec<(String, String, &str)> = vec![
        (
            "{name: tensorflow, command: [no-such-trainer]}".into(),
            format!("{at}.command[0]"),
            "not an executable file in PATH=/usr/bin:/bin",
        ),
        (
            "{name: tensorflow, command: [/no/such/trainer]}".into(),
            format!("{at}.command[0]"),
            "cannot be run",
        ),
        (
            "{name: tensorflow, command: [/usr]}".into(),
            format!("{at}.command[0]"),
            "is a directory",
        ),
        (
            format!("{{name: tensorflow, command: [{}]}}", script.display()),
            format!("{at}.command[0]"),
            "is not executable",
        ),
        (
            "{name: tensorflow, command: ['']}".into(),
            format!("{at}.command[0]"),
            "is empty",
        ),
        (
            "{name: tensorflow, command: [/bin/true], args: [\"a\\0b\"]}".into(),
            format!("{at}.args[0]"),
            "NUL",
        ),
        (
            "{name: tensorflow, command: [/bin/true], env: [{name: A, value: \"x\\0\"}]}".into(),
            format!("{at}.env[0].value"),
            "NUL",
        ),
        (
            "{name: tensorflow, command: [/bin/true], workingDir: \"/tmp\\0\"}".into(),
            format!("{at}.workingDir"),
            "NUL",
        ),
        (
            "{name: tensorflow, command: [/bin/true], workingDir: data}".into(),
            format!("{at}.workingDir"),
            "relative",
        ),
        (
            format!("{{name: tensorflow, command: [/bin/true], workingDir: {d}/missing}}"),
            format!("{at}.workingDir"),
            "the directory /",
        ),
        (
            format!(
                "{{name: tensorflow, command: [/bin/true], workingDir: {}}}",
                script.display()
            ),
            format!("{at}.workingDir"),
            "is not a directory",
        ),
        (
            "{name: tensorflow, command: [/bin/true], env: [{name: '', value: x}]}".into(),
            format!("{at}.env[0].name"),
            "required",
        ),
        (
            "{name: tensorflow, command: [/bin/true], env: [{name: A=B, value: x}]}".into(),
            format!("{at}.env[0].name"),
            "contains '='",
        ),
    ];
    for (container, field, expected) in cases {
        let err = admit_str(&tfjob_with_container(&container)).unwrap_err();
        let message = message_for(&err, &field);
        assert!(message.contains(expected), "{container}: {message}");
    }
    let missing = format!("{d}/missing");
    let err = admit_str(&tfjob_with_container(&format!(
        "{{name: tensorflow, command: [/bin/true], workingDir: {missing}}}"
    )))
    .unwrap_err();
    assert!(
        message_for(&err, &format!("{at}.workingDir")).contains(&missing),
        "{err}"
    );
    // An environment too large to pass to a program.
    let big = "x".repeat(200_000);
    let err = admit_str(&tfjob_with_container(&format!(
        "{{name: tensorflow, command: [/bin/true], env: [{{name: BIG, value: {big}}}]}}"
    )))
    .unwrap_err();
    assert!(
        message_for(&err, &format!("{at}.env")).contains("BIG="),
        "{err}"
    );
    // A program found in the PATH the container sets, relative to its working directory, and
    // a name that needs `$(VAR)` expansion, all start.
    for container in [
        "{name: tensorflow, command: [sh, -c, 'true']}".to_owned(),
        "{name: tensorflow, command: [\"true\"], env: [{name: PATH, value: /bin}]}".to_owned(),
        format!(
            "{{name: tensorflow, command: [$(BIN)/true], env: [{{name: BIN, value: /bin}}], workingDir: {d}}}"
        ),
    ] {
        admit_str(&tfjob_with_container(&container)).unwrap_or_else(|e| panic!("{container}: {e}"));
    }
}

#[test]
fn admitted_jobs_get_the_default_queue() {
    let job = admit_str(&tfjob_with_container(
        "{name: tensorflow, command: [/bin/true]}",
    ))
    .unwrap();
    assert_eq!(job.spec.queue.as_deref(), Some("fast"));
}

#[test]
fn tfjob_port_is_read_per_replica_type() {
    let job = parse_str(
        r"apiVersion: kubeflow.org/v1
kind: TFJob
metadata: {name: ports}
spec:
  tfReplicaSpecs:
    PS:
      template:
        spec:
          containers:
          - name: tensorflow
            ports: [{name: metrics, containerPort: 9000}, {name: tfjob-port, containerPort: 3333}]
    Worker:
      replicas: 2
      template:
        spec:
          containers: [{name: tensorflow}]
",
    )
    .unwrap();
    let hosts = ClusterHosts::cluster(&job, "", CLUSTER_PORT);
    assert_eq!(
        hosts.get(ReplicaType::Ps, 0),
        Some("ports-ps-0.ports.default.svc:3333")
    );
    assert_eq!(
        hosts.get(ReplicaType::Worker, 1),
        Some("ports-worker-1.ports.default.svc:2222")
    );
}

#[test]
fn success_messages_name_the_replica_that_decided() {
    let job = parse_str(&job_with("Worker=3")).unwrap();
    assert_eq!(
        success_message(&job, "worker-0"),
        "worker-0 completed, which completes the job"
    );
    assert_eq!(
        success_message(&job, "worker-1"),
        "worker-1 completed; worker-0 completed, which completes the job"
    );
    let job = parse_str(&job_with("Chief=1,Worker=2")).unwrap();
    assert_eq!(
        success_message(&job, "chief-0"),
        "chief-0 completed, which completes the job"
    );
    let mut job = parse_str(&job_with("Worker=3")).unwrap();
    job.spec.success_policy = SuccessPolicy::AllWorkers;
    assert_eq!(
        success_message(&job, "worker-1"),
        "all 3 workers completed (successPolicy AllWorkers; the last was worker-1), which completes the job"
    );
}

#[test]
fn shipped_examples_are_admitted() {
    let rules = Admission {
        path: std::env::var("PATH").unwrap_or_default(),
        ..rules()
    };
    for example in [NATIVE_EXAMPLE, TFJOB_EXAMPLE] {
        admit(example, &rules).unwrap();
    }
}
